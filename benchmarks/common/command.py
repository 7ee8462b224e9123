"""The command that ran a benchmark, as a report quotes it."""

from __future__ import annotations

import shlex
import sys
from collections.abc import Sequence


def command_line(module: str, argv: Sequence[str] | None = None) -> str:
    """``python -m <module>`` and its arguments (``sys.argv[1:]`` when ``argv`` is ``None``), shell-quoted.

    Example:
        >>> command_line("benchmarks.lm", ["--out", "my results.json", "--reductions", "0.3", "0.5"])
        "python -m benchmarks.lm --out 'my results.json' --reductions 0.3 0.5"
    """
    return shlex.join(["python", "-m", module, *(sys.argv[1:] if argv is None else argv)])
