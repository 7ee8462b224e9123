"""The whole recovery benchmark: base, every method at every reduction, then the report (the command line)."""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from benchmarks.common import (
    DEFAULT_CACHE,
    DEFAULT_MARKDOWN,
    INSTALL_COMMAND,
    TrainConfig,
    command_line,
    last_results,
    load_fashion_mnist,
    locate_fashion_mnist,
    machine_info,
    quiet_run_log,
)
from lightning_actprune.core import count_parameters

from .protocol import (
    TP_IMPORTANCES,
    EpochSeededDataModule,
    fine_tune,
    from_scratch,
    hidden_widths,
    ours_one_shot,
    ours_with_recovery,
    test_accuracy,
    torch_pruning_at,
    train_base,
)
from .report import render_markdown, write_section
from .results import Base, EpochTime, RecoveryConfig, RecoveryResults, Row

RESULTS_FILE = "recovery_results.json"
OURS = "ours (default criterion)"
"""Rows measured before issue 21 say ``ours (fluctuation, normalize)``: the default criterion of then."""
SCRATCH = "from scratch, same widths"
METHODS = ("ours", "torch-pruning", "scratch")
"""The method groups ``--methods`` can choose: ours one-shot and with recovery, Torch-Pruning (every importance,
global and per layer, with fine-tuning), from scratch."""


def tp_method(importance: str, global_pruning: bool) -> str:
    """The row label of one Torch-Pruning setting."""
    return f"Torch-Pruning {importance}, {'global' if global_pruning else 'per layer'}"


def run_recovery(
    datamodule: EpochSeededDataModule,
    config: RecoveryConfig,
    cache_dir: Path,
    log: Callable[[str], None] = print,
    methods: Sequence[str] = METHODS,
) -> tuple[Base, list[Row], list[EpochTime]]:
    """Train (or resume) the base, then measure the chosen ``methods`` (groups of :data:`METHODS`) at each reduction."""
    train = config.train
    checkpoint = cache_dir / f"recovery_base_{config.base_key()}_e{train.epochs - 1}.ckpt"
    model, probe, seconds, cached = train_base(datamodule, train, checkpoint)
    test_loader = datamodule.test_dataloader()
    base = Base(
        params=count_parameters(model),
        test_acc=test_accuracy(model, test_loader),
        epoch_seconds=probe.seconds[-1],
        train_seconds=seconds,
        cached=cached,
    )
    log(f"unpruned after {train.epochs} epochs: {base.params:,} parameters, test accuracy {base.test_acc:.4f}")
    rows = [Row(0.0, "unpruned", 0, base.params, base.test_acc, hidden_widths(model))]
    times: list[EpochTime] = []
    most = max(config.recovery_epochs)

    def add(reduction: float, method: str, epochs: int, params: int, accuracy: float, widths: list[int]) -> None:
        rows.append(Row(reduction, method, epochs, params, accuracy, widths))
        log(f"-{reduction:.0%} {method} +{epochs} epoch(s): {params:,} parameters, test accuracy {accuracy:.4f}")

    for reduction in config.reductions:
        pruned = ours_one_shot(model, datamodule, reduction)  # also the widths trained from scratch
        widths = hidden_widths(pruned)
        if "ours" in methods:
            add(reduction, OURS, 0, count_parameters(pruned), test_accuracy(pruned, test_loader), widths)
            for epochs in config.recovery_epochs:
                recovered, fit_probe = ours_with_recovery(train, datamodule, checkpoint, reduction, epochs)
                recovered_widths = hidden_widths(recovered)
                accuracy = test_accuracy(recovered, test_loader)
                add(reduction, OURS, epochs, count_parameters(recovered), accuracy, recovered_widths)
                times.append(
                    EpochTime(reduction, epochs, fit_probe.seconds[0], fit_probe.seconds[1:], fit_probe.test_acc[0])
                )
        if "torch-pruning" in methods:
            for importance in TP_IMPORTANCES:
                for global_pruning in (True, False):
                    method = tp_method(importance, global_pruning)
                    tp_model = torch_pruning_at(
                        model,
                        datamodule,
                        importance,
                        global_pruning,
                        reduction,
                        config.taylor_batches,
                        config.bisection_steps,
                    )
                    params, tp_widths = count_parameters(tp_model), hidden_widths(tp_model)
                    add(reduction, method, 0, params, test_accuracy(tp_model, test_loader), tp_widths)
                    tuned = fine_tune(tp_model, datamodule, most)
                    for epochs in config.recovery_epochs:
                        add(reduction, method, epochs, params, tuned.test_acc[epochs - 1], tp_widths)
        if "scratch" in methods:
            scratch = from_scratch(train, datamodule, widths, train.epochs + most)
            for epochs in (0, *config.recovery_epochs):
                add(reduction, SCRATCH, epochs, scratch.params[-1], scratch.test_acc[train.epochs + epochs - 1], widths)
    return base, rows, times


def check_same_config(earlier: RecoveryConfig, now: RecoveryConfig, source: object) -> None:
    """Rows of two runs share one table only when both were configured alike."""
    if earlier != now:
        raise ValueError(
            f"{source} was measured with another configuration: {earlier} (there) vs {now} (now); pass the same"
            " --epochs and --reductions as that run, or run every method."
        )


def merge_results(earlier: RecoveryResults, new: RecoveryResults) -> RecoveryResults:
    """``earlier`` with ``new``'s rows: a row of the same reduction, method and epochs is replaced, others are added.

    An added row goes after the last row of its reduction, so the table stays grouped by reduction. The base, the
    machine and the epoch times stay ``earlier``'s (``new``'s times are added); the commands are both recorded.

    Raises:
        ValueError: the two runs were configured differently (their numbers are not comparable).
    """
    check_same_config(earlier.config, new.config, "the results to merge into")
    rows = list(earlier.rows)
    for row in new.rows:
        if row.method == "unpruned":
            continue
        key = (row.reduction, row.method, row.recovery_epochs)
        same = [i for i, r in enumerate(rows) if (r.reduction, r.method, r.recovery_epochs) == key]
        if same:
            rows[same[0]] = row
            continue
        position = max((i + 1 for i, r in enumerate(rows) if r.reduction == row.reduction), default=len(rows))
        rows.insert(position, row)
    return dataclasses.replace(
        earlier,
        rows=rows,
        times=[*earlier.times, *new.times],
        command=f"{earlier.command}, then {new.command}",
        total_seconds=earlier.total_seconds + new.total_seconds,
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Train (or resume) the base, run every method, write the JSON and the section of BENCHMARKS.md."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.recovery",
        description="Pruning with recovery epochs vs one-shot, Torch-Pruning + fine-tuning and training from scratch.",
    )
    parser.add_argument("--data-dir", type=Path, default=None, help="a directory with the four IDX .gz files")
    parser.add_argument(
        "--install-data", action="store_true", help=f"if Fashion-MNIST is missing, run `{INSTALL_COMMAND}`"
    )
    parser.add_argument("--epochs", type=int, default=TrainConfig.epochs, help="E: epochs of the unpruned model")
    parser.add_argument(
        "--reductions", type=float, nargs="+", default=RecoveryConfig.reductions, help="target parameter reductions"
    )
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--markdown", type=Path, default=DEFAULT_MARKDOWN)
    parser.add_argument("--report-only", action="store_true", help="re-render the section from the last run's JSON")
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=METHODS,
        default=None,
        help="measure only these methods and merge their rows into the cache's results JSON (same configuration)",
    )
    args = parser.parse_args(argv)
    results_path = args.cache_dir / RESULTS_FILE
    if args.report_only:
        write_section(args.markdown, render_markdown(RecoveryResults.from_json(last_results(results_path))))
        return
    earlier = None
    try:
        config = RecoveryConfig(
            train=dataclasses.replace(TrainConfig(), epochs=args.epochs), reductions=tuple(args.reductions)
        )
        if args.methods is not None:  # before anything is trained
            if not results_path.is_file():
                raise ValueError(f"--methods merges into the results of a full run; {results_path} does not exist.")
            earlier = RecoveryResults.from_json(results_path.read_text())
            check_same_config(earlier.config, config, results_path)
        data_dir = locate_fashion_mnist(args.data_dir, install=args.install_data)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}") from None
    log = quiet_run_log()
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    train, val, test = load_fashion_mnist(data_dir, config.train.num_val)
    datamodule = EpochSeededDataModule(train, val, test, batch_size=config.train.batch_size, seed=config.train.seed)
    base, rows, times = run_recovery(datamodule, config, args.cache_dir, log, args.methods or METHODS)
    command = command_line("benchmarks.recovery", argv)
    results = RecoveryResults(config, base, rows, times, machine_info(), command, time.perf_counter() - started)
    if earlier is not None:
        results = merge_results(earlier, results)
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    results_path.write_text(results.to_json())
    write_section(args.markdown, render_markdown(results))
    log(f"wrote {args.markdown} and {results_path}; total {results.total_seconds / 60:.1f} min")
