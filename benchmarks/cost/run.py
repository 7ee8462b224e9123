"""The cost run's command line: the baseline's files, one process per model and version (alternating), the report."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from benchmarks.common import command_line, machine_info

from .models import MODELS
from .report import render_markdown, write_section
from .results import CostResults, Measurement, merge

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / "benchmarks" / ".cache"
DEFAULT_JSON = CACHE / "cost.json"
DEFAULT_MARKDOWN = ROOT / "BENCHMARKS.md"
BASELINE = "5fd020c"
"""The commit before issue 23's work: what the ``before`` rows measure."""


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()


def baseline_root(commit: str) -> Path:
    """The package files at ``commit``, extracted once under ``benchmarks/.cache`` with ``git archive``."""
    full = _git("rev-parse", "--verify", f"{commit}^{{commit}}")
    root = CACHE / f"baseline-{full[:12]}"
    if not (root / "lightning_actprune" / "__init__.py").is_file():
        root.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(
            ["git", "archive", full, "lightning_actprune"], cwd=ROOT, capture_output=True, check=True
        )
        subprocess.run(["tar", "-x", "-C", str(root)], input=archive.stdout, check=True)
    return root


def current_version() -> str:
    """This checkout's commit, marked ``+changes`` when its package files differ from it."""
    dirty = _git("status", "--porcelain", "--", "lightning_actprune")
    return _git("rev-parse", "--short=12", "HEAD") + ("+changes" if dirty else "")


def measure_in_subprocess(
    name: str, version: str, package_root: Path, images: int, batch_size: int, threads: int, timeout: float
) -> Measurement:
    """:func:`benchmarks.cost.measure.measure` in a fresh process, niced, under a timeout."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "benchmarks.cost.measure", name, version, "--package-root", str(package_root)]
    command += ["--images", str(images), "--batch-size", str(batch_size), "--threads", str(threads)]
    spec = MODELS[name]
    try:
        done = subprocess.run(
            command, env=env, capture_output=True, text=True, timeout=timeout, preexec_fn=lambda: os.nice(10)
        )
    except subprocess.TimeoutExpired:
        return Measurement(name, version, spec.resolution, images, batch_size, error=f"timed out after {timeout:g} s")
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = " ".join(done.stderr.strip().splitlines()[-1:])[:300]
        error = f"exit code {done.returncode}: {tail}"
        return Measurement(name, version, spec.resolution, images, batch_size, error=error)
    return Measurement(**json.loads(lines[-1]))


def run(args: argparse.Namespace, argv: Sequence[str] | None) -> CostResults:
    start = time.perf_counter()
    roots = {"before": baseline_root(args.baseline), "after": ROOT}
    rows: list[Measurement] = []
    machine = machine_info()

    def results() -> CostResults:
        return CostResults(
            rows=rows,
            command=command_line("benchmarks.cost", argv),
            cpu=machine.cpu,
            threads=args.threads,
            torch=torch.__version__,
            torch_pruning=machine.versions["torch-pruning"] or "",
            baseline=args.baseline,
            current=current_version(),
            total_seconds=time.perf_counter() - start,
            skipped_before=[name for name in args.models if name in args.skip_before],
        )

    for name in args.models:
        for version, root in roots.items():  # side by side: the two versions of one model run back to back
            if version == "before" and name in args.skip_before:
                continue
            row = measure_in_subprocess(name, version, root, args.images, args.batch_size, args.threads, args.timeout)
            print(
                f"{name} {version}: pass {row.validation_seconds:.1f} s, prune step {row.prune_seconds:.1f} s"
                f" ({row.passes} passes {row.passes_seconds:.1f} s, the rest {row.other_seconds:.1f} s),"
                f" statistics +{row.statistics_overhead:.0%} {row.error}",
                flush=True,
            )
            rows.append(row)
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(results().to_json())  # after every row: a run cut short keeps what it measured
    return results()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cost", description=__doc__)
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=sorted(MODELS), help="default: all")
    parser.add_argument("--images", type=int, default=64, help="validation images (default 64)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2, help="torch threads per process (default 2)")
    parser.add_argument("--baseline", default=BASELINE, help=f"the commit to compare with (default {BASELINE})")
    parser.add_argument(
        "--skip-before",
        nargs="*",
        default=[],
        choices=sorted(MODELS),
        help="models measured only after (the baseline's slow rows left out to fit a time budget)",
    )
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per process (default 1800)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where the results go")
    parser.add_argument("--markdown", type=Path, default=DEFAULT_MARKDOWN, help="the file whose section is written")
    parser.add_argument("--report-only", action="store_true", help="render the last run's JSON again")
    parser.add_argument(
        "--merge",
        nargs="+",
        type=Path,
        help="render the JSON of several runs (groups of models run in parallel) as one table, written to --json",
    )
    args = parser.parse_args(argv)
    if args.merge:
        runs = [CostResults.from_json(path.read_text()) for path in args.merge]
        results = merge(runs, list(MODELS))
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(results.to_json())
    elif args.report_only:
        if not args.json.is_file():
            raise SystemExit(f"error: --report-only renders the results of a full run; {args.json} does not exist.")
        results = CostResults.from_json(args.json.read_text())
    else:
        results = run(args, argv)
    write_section(args.markdown, render_markdown(results))
    print(f"wrote {args.json} and {args.markdown}")
