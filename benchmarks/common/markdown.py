"""Markdown for reports: tables, number cells, ``mean ± spread`` cells and a generated section between two markers."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path

_ALIGN = {"l": "---", "r": "---:", "c": ":---:"}


def _cell(value: object) -> str:
    return " ".join(str(value).split()).replace("|", "\\|")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]], align: str = "") -> str:
    r"""A GitHub Markdown table; ``align`` has one letter per column (``l``, ``r``, ``c``; missing ones are ``l``).

    Cells are ``str()``-ed, their whitespace collapsed and their pipes escaped, so no value breaks the table.

    Example:
        >>> print(markdown_table(["method", "ppl"], [["a|b", 1.5]], align="lr"))
        | method | ppl |
        |---|---:|
        | a\|b | 1.5 |
    """
    for row in rows:
        if len(row) != len(header):
            raise ValueError(f"every row needs {len(header)} cells (one per header); got {len(row)}: {row!r}.")
    unknown = set(align) - set(_ALIGN)
    if unknown:
        raise ValueError(f"`align` letters can be l, r or c; got {''.join(sorted(unknown))!r}.")
    spec = [_ALIGN[align[i]] if i < len(align) else _ALIGN["l"] for i in range(len(header))]
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "|".join(spec) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def pct(fraction: float) -> str:
    """A fraction as a percentage with one decimal.

    Example:
        >>> pct(0.7012)
        '70.1%'
    """
    return f"{100 * fraction:.1f}%"


def acc(accuracy: float) -> str:
    """An accuracy in percent with two decimals, unsigned.

    Example:
        >>> acc(0.8734)
        '87.34'
    """
    return f"{100 * accuracy:.2f}"


def delta(accuracy: float, base: float) -> str:
    """The change of an accuracy from ``base``, in percentage points, signed.

    Example:
        >>> delta(0.85, 0.8734), delta(0.9, 0.8734)
        ('-2.34', '+2.66')
    """
    return f"{100 * (accuracy - base):+.2f}"


def mean_spread(values: Sequence[float], digits: int = 2) -> str:
    """``"mean ± std"`` over seeds (sample standard deviation); one value alone is written as it is.

    Example:
        >>> mean_spread([3.0, 3.2, 3.4]), mean_spread([3.0])
        ('3.20 ± 0.20', '3.00')
    """
    if not values:
        return "—"
    if any(math.isnan(v) for v in values):
        return "nan"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def write_section(path: Path, generated: str, begin: str, end: str) -> None:
    """Put ``generated`` between the lines ``begin`` and ``end`` of ``path``, keeping the text around them.

    Markers that are missing are appended at the end of the file, which is created (with its parents) if need be.
    """
    text = path.read_text() if path.is_file() else ""
    if begin not in text or end not in text:
        text = (text.rstrip("\n") + "\n\n" if text.strip() else "") + f"{begin}\n{end}\n"
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{head}{begin}\n{generated}\n{end}{tail}")
