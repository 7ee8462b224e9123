"""The whole run per seed, the merge of runs made side by side, and the command line."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from benchmarks.common import (
    DEFAULT_CACHE,
    DEFAULT_MARKDOWN,
    Evaluator,
    SplitDataModule,
    command_line,
    last_results,
    locate_fashion_mnist,
    machine_info,
    quiet_run_log,
)
from lightning_actprune.core import count_parameters

from . import methods
from .data import datamodule, trained_base
from .models import ARCHITECTURES, QualityConfig, recipe
from .report import write_report
from .results import (
    OURS,
    OURS_BEFORE,
    OURS_DISTILLED,
    OURS_RESIDUAL,
    OURS_RESIDUAL_DISTILLED,
    SCRATCH,
    UNPRUNED,
    QualityResults,
    Row,
    torch_pruning_method,
)

REDUCTIONS = {"vit": [0.3, 0.5, 0.7], "mlp": [0.3, 0.5, 0.7, 0.95], "resnet": [0.3, 0.5, 0.7]}
"""The parameter reductions measured by default: the issue's grid, and −95 % for the MLP's goal."""


def results_file(arch: str) -> Path:
    """Where a run of ``arch`` stores its numbers by default."""
    return DEFAULT_CACHE / f"quality_{arch}_results.json"


TP_SETTINGS = tuple((importance, scope) for importance in methods.TP_IMPORTANCES for scope in (True, False))


def run_seed(
    config: QualityConfig,
    data: SplitDataModule,
    cache_dir: Path,
    reductions: Sequence[float],
    recovery_epochs: int,
    scratch_reductions: Sequence[float],
    log: Callable[[str], None],
    scratch_only: bool = False,
    residual_only: bool = False,
) -> tuple[list[Row], float]:
    """Every method on the base of ``config.seed``; returns the rows and the seconds of one base training epoch.

    ``scratch_only``: only the unpruned model, ours one-shot (its widths) and the architectures trained from scratch,
    to add those rows to an earlier run's (``--merge`` keeps one row per seed and cell). ``residual_only``: only the
    unpruned model and ours with residual channels (the ViT), likewise.
    """
    base, facts = trained_base(data, config, cache_dir)
    evaluator = Evaluator(data)

    def row(reduction: float, method: str, model: torch.nn.Module, epochs: int, seconds: list[float]) -> Row:
        measured = Row(
            config.seed,
            reduction,
            method,
            epochs,
            count_parameters(model),
            evaluator.test_accuracy(model),  # type: ignore[arg-type]
            methods.widths(model),
            seconds,
        )
        log(f"seed {config.seed} -{reduction:.0%} {method} +{epochs}: {measured.test_acc:.4f} ({measured.widths})")
        return measured

    rows = [row(0.0, UNPRUNED, base, 0, [])]
    if config.arch == "vit":  # residual channels: LayerNorm-coupled, which only the ViT has
        rows += _residual_rows(base, data, reductions, recovery_epochs, row)
    if residual_only:
        return rows, facts.train_seconds / config.epochs
    criteria = (("default", OURS), ("standardised fluctuation", OURS_BEFORE))
    one_shot = {}  # by criterion, then reduction; the default's widths are those trained from scratch
    for criterion, name in criteria[:1] if scratch_only else criteria:
        one_shot[criterion] = methods.ours_one_shot(base, data, list(reductions), criterion)
        rows += [row(r, name, one_shot[criterion][r], 0, []) for r in reductions]
    for importance, global_pruning in () if scratch_only else TP_SETTINGS:
        name = torch_pruning_method(importance, global_pruning)
        for reduction in reductions:
            pruned, _ = methods.torch_pruning_at(base, data, importance, global_pruning, reduction)
            rows.append(row(reduction, name, pruned, 0, []))
            if recovery_epochs:
                tuned, seconds = methods.fine_tuned(pruned, data, recovery_epochs)
                rows.append(row(reduction, name, tuned, recovery_epochs, seconds))
    for reduction in reductions if recovery_epochs and not scratch_only else ():
        for weight, name in ((0.0, OURS), (0.5, OURS_DISTILLED)):
            recovered, seconds = methods.ours_recovered(base, data, reduction, recovery_epochs, weight)
            rows.append(row(reduction, name, recovered, recovery_epochs, seconds))
    for reduction in scratch_reductions:
        epochs = config.epochs + recovery_epochs
        scratch = methods.from_scratch(one_shot["default"][reduction], config, data, epochs)
        rows.append(row(reduction, SCRATCH, scratch, epochs, []))
    return rows, facts.train_seconds / config.epochs


def _residual_rows(
    base: torch.nn.Module,
    data: SplitDataModule,
    reductions: Sequence[float],
    recovery_epochs: int,
    row: Callable[[float, str, torch.nn.Module, int, list[float]], Row],
) -> list[Row]:
    """Ours with ``prune_residual: true``: one-shot, then recovered without and with distillation."""
    one_shot = methods.ours_one_shot(base, data, list(reductions), "default", residual=True)
    rows = [row(r, OURS_RESIDUAL, one_shot[r], 0, []) for r in reductions]
    for reduction in reductions if recovery_epochs else ():
        for weight, name in ((0.0, OURS_RESIDUAL), (0.5, OURS_RESIDUAL_DISTILLED)):
            recovered, seconds = methods.ours_recovered(base, data, reduction, recovery_epochs, weight, residual=True)
            rows.append(row(reduction, name, recovered, recovery_epochs, seconds))
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m benchmarks.quality``: see the package docstring."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__)
    parser.add_argument("--arch", choices=ARCHITECTURES, default="vit")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--reductions", type=float, nargs="+", default=None, help="default: the architecture's")
    parser.add_argument("--recovery-epochs", type=int, default=1)
    parser.add_argument("--scratch", type=float, nargs="*", default=[0.5], help="reductions trained from scratch")
    parser.add_argument(
        "--scratch-only", action="store_true", help="only the --scratch rows (and their widths), to merge with a run"
    )
    parser.add_argument(
        "--residual-only", action="store_true", help="only ours with residual channels (the ViT), to merge with a run"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data-dir", type=Path, default=None, help="a directory with the four IDX .gz files")
    parser.add_argument("--install-data", action="store_true", help="install the Debian package if it is missing")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="where the trained weights go")
    parser.add_argument("--out", type=Path, default=None, help="the results JSON (default: by architecture)")
    parser.add_argument("--merge", type=Path, nargs="+", help="merge these results (runs of other seeds) and report")
    parser.add_argument("--markdown", type=Path, default=DEFAULT_MARKDOWN)
    parser.add_argument("--report-only", action="store_true", help="re-render the report from --out")
    args = parser.parse_args(argv)
    args.out = args.out or results_file(args.arch)
    if args.report_only:
        write_report(QualityResults.from_json(last_results(args.out)), args.markdown)
        return
    if args.merge:
        runs = [QualityResults.from_json(path.read_text()) for path in args.merge]
        merged = runs[0]
        for other in runs[1:]:
            merged.rows += other.rows
            merged.base_epoch_seconds |= other.base_epoch_seconds
            merged.minutes = max(merged.minutes, other.minutes)
        seen: set[tuple[int, float, str, int]] = set()  # a cell measured twice (a --scratch-only run): the first row
        unique = []
        for row in merged.rows:
            if (key := (row.seed, row.reduction, row.method, row.epochs)) not in seen:
                seen.add(key)
                unique.append(row)
        merged.rows = unique
        merged.command = " + ".join(run.command for run in runs)
        args.out.write_text(merged.to_json())
        write_report(merged, args.markdown)
        return
    torch.set_num_threads(args.threads)
    log = quiet_run_log()
    data_dir = locate_fashion_mnist(args.data_dir, install=args.install_data)
    started = time.perf_counter()
    rows: list[Row] = []
    base_seconds = {}
    for seed in args.seeds:
        config = recipe(args.arch, seed)
        seed_rows, base_seconds[seed] = run_seed(
            config,
            datamodule(data_dir, config),
            args.cache_dir,
            args.reductions or REDUCTIONS[args.arch],
            args.recovery_epochs,
            args.scratch,
            log,
            args.scratch_only,
            args.residual_only,
        )
        rows += seed_rows
    results = QualityResults(
        recipe(args.arch, 0),
        base_seconds,
        rows,
        machine_info(("torch", "lightning", "torch-pruning", "timm")),
        command_line("benchmarks.quality", argv),
        (time.perf_counter() - started) / 60,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(results.to_json())
    write_report(results, args.markdown)
