"""The sweep's command line: list the models, check each in its own process, write the JSON and the report."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from benchmarks.common import DEFAULT_CACHE, DEFAULT_MARKDOWN, machine_info

from .report import render_markdown, write_section
from .results import ERROR, ModelResult, SweepResults, merge

MAX_PARAMS = 30_000_000
ROOT = Path(__file__).resolve().parents[2]
DEFAULT_JSON = DEFAULT_CACHE / "architectures.json"


def small_models(max_params: int = MAX_PARAMS) -> list[tuple[str, int]]:
    """The torchvision classification models with fewer than ``max_params`` parameters (10 classes), by name."""
    import torchvision

    found = []
    for name in torchvision.models.list_models(module=torchvision.models):
        try:
            with torch.device("meta"):  # sizes only: no memory, no initialisation
                model = torchvision.models.get_model(name, weights=None, num_classes=10)
        except NotImplementedError:  # a builder that computes its widths with tensors (RegNet)
            model = torchvision.models.get_model(name, weights=None, num_classes=10)
        params = sum(p.numel() for p in model.parameters())
        if params < max_params:
            found.append((name, params))
    return found


def check_in_subprocess(name: str, params: int, timeout: float) -> ModelResult:
    """:func:`benchmarks.architectures.check.check` in a fresh process, on one thread, niced, under a timeout."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "benchmarks.architectures.check", name]
    try:
        done = subprocess.run(
            command, env=env, capture_output=True, text=True, timeout=timeout, preexec_fn=lambda: os.nice(10)
        )
    except subprocess.TimeoutExpired:
        return ModelResult(name=name, status=ERROR, params=params, error=f"timed out after {timeout:g} s")
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = " ".join(done.stderr.strip().splitlines()[-1:])[:300]
        return ModelResult(name=name, status=ERROR, params=params, error=f"exit code {done.returncode}: {tail}")
    return ModelResult(**json.loads(lines[-1]))


def run(names: Sequence[str] | None, timeout: float, log: Path | None = None) -> SweepResults:
    start = time.perf_counter()
    models = small_models()
    if names:
        unknown = sorted(set(names) - {name for name, _ in models})
        if unknown:
            raise SystemExit(f"`--models` must name models under {MAX_PARAMS:,} parameters; got {unknown}.")
        models = [(name, params) for name, params in models if name in names]
    rows = []
    for index, (name, params) in enumerate(models, start=1):
        row = check_in_subprocess(name, params, timeout)
        print(
            f"[{index}/{len(models)}] {name}: {row.status} in {row.fixed_seconds:.1f} s"
            f" ({row.peak_rss_mb:.0f} MB) {row.error}",
            flush=True,
        )
        rows.append(row)
    machine = machine_info()
    return SweepResults(
        rows=rows,
        command="python -m benchmarks.architectures" + (f" --models {' '.join(names)}" if names else ""),
        cpu=machine.cpu,
        threads=1,
        torch=torch.__version__,
        torchvision=importlib.metadata.version("torchvision"),
        torch_pruning=importlib.metadata.version("torch-pruning"),
        total_seconds=time.perf_counter() - start,
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.architectures", description=__doc__)
    parser.add_argument("--models", nargs="*", help="model names (default: every one under 30M parameters)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per model (default 600)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where the results go")
    parser.add_argument("--markdown", type=Path, default=DEFAULT_MARKDOWN, help="the file whose section is written")
    parser.add_argument(
        "--merge", nargs="+", type=Path, help="render the JSON of several runs (subsets run side by side) as one table"
    )
    args = parser.parse_args(argv)
    if args.merge:
        results = merge([SweepResults.from_json(path.read_text()) for path in args.merge])
    else:
        results = run(args.models, args.timeout)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(results.to_json())
    write_section(args.markdown, render_markdown(results))
    print(f"wrote {args.json} and {args.markdown}")
