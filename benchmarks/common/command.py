"""The command line the benchmarks share: where they write, their common options, their log and the quoted command."""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CACHE = ROOT / "benchmarks" / ".cache"
"""Where the benchmarks cache trained weights and write their results JSON (git-ignored)."""
DEFAULT_MARKDOWN = ROOT / "BENCHMARKS.md"
"""The file whose generated sections the benchmarks rewrite."""


def command_line(module: str, argv: Sequence[str] | None = None) -> str:
    """``python -m <module>`` and its arguments (``sys.argv[1:]`` when ``argv`` is ``None``), shell-quoted.

    Example:
        >>> command_line("benchmarks.lm", ["--out", "my results.json", "--reductions", "0.3", "0.5"])
        "python -m benchmarks.lm --out 'my results.json' --reductions 0.3 0.5"
    """
    return shlex.join(["python", "-m", module, *(sys.argv[1:] if argv is None else argv)])


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of the Fashion-MNIST benchmarks: data, cache, retraining, the Markdown, ``--report-only``."""
    parser.add_argument("--data-dir", type=Path, default=None, help="a directory with the four IDX .gz files")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="where the trained weights go")
    parser.add_argument("--retrain", action="store_true", help="ignore cached weights")
    parser.add_argument("--markdown", type=Path, default=DEFAULT_MARKDOWN)
    parser.add_argument(
        "--report-only", action="store_true", help="re-render the report from the last run's JSON (no measurement)"
    )


def last_results(path: Path) -> str:
    """The text of the last run's results, for ``--report-only``; exits with a message when there is none."""
    if not path.is_file():
        raise SystemExit(f"error: --report-only renders the results of a full run; {path} does not exist.")
    return path.read_text()


def quiet_run_log() -> Callable[[str], None]:
    """Quiet Lightning's info logs and known harmless warnings; returns a logger that stamps the run's seconds."""
    started = time.perf_counter()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*isinstance\\(treespec, LeafSpec\\).*")

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f}s] {message}", flush=True)

    return log
