"""The whole CNN benchmark: prune the trained ResNet every way, train the from-scratch networks, write the report."""

from __future__ import annotations

import argparse
import dataclasses
import statistics as stats
import time
import typing
from collections.abc import Callable, Sequence

import lightning.pytorch as pl
import torch
from torch import nn

from benchmarks.common import (
    Evaluator,
    SplitDataModule,
    add_common_arguments,
    command_line,
    gather_statistics,
    last_results,
    load_fashion_mnist,
    locate_fashion_mnist,
    machine_info,
    ours_at_reduction,
    pruned_copy,
    quiet_run_log,
    recalibrated,
    write_section,
)
from lightning_actprune._recalibration import batchnorm_layers
from lightning_actprune.core import STATISTICS, count_parameters

from .methods import (
    channels_of,
    fine_tuned,
    fit_with_recovery,
    group_channels,
    scratch_widths,
    torch_pruning_at_reduction,
)
from .models import ResNetClassifier, train_or_load
from .report import BEGIN, END, render_markdown
from .results import (
    OURS,
    OURS_RECALIBRATED,
    OURS_RECOVERED,
    SCRATCH,
    SCRATCH_LONGER,
    TP,
    TP_FINE_TUNED,
    TP_RECALIBRATED,
    CNNBenchmarkResults,
    CNNMeasurements,
    CNNRow,
    CNNRunInfo,
    CNNSettings,
    CNNTrainConfig,
    CNNTrainingFacts,
    RecalibrationCost,
    RecoveryFacts,
)

RESULTS_FILE = "fashion_cnn_results.json"

TrainScratch = Callable[[tuple[int, ...], tuple[int, ...], int], tuple[ResNetClassifier, CNNTrainingFacts]]
"""Trains a :class:`ResNetClassifier` with the given ``widths`` and ``hidden`` the way the unpruned one was, for the
given number of epochs."""


def _forward_seconds(model: nn.Module, loader: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        for x, _ in loader:
            model(x)
    return time.perf_counter() - start


def run_benchmark(
    model: ResNetClassifier,
    datamodule: SplitDataModule,
    settings: CNNSettings,
    train_scratch: TrainScratch,
    build: Callable[[], ResNetClassifier],
    training: CNNTrainingFacts,
    log: Callable[[str], None] = print,
) -> CNNMeasurements:
    """Every row at every target, on the trained ``model`` (never modified).

    ``build`` makes the untrained network that ``training`` (its config: epochs, seed) turned into ``model``; the
    recovery rows train it again, one epoch longer, with the callback pruning inside ``fit``.
    """
    model.eval()
    started = time.perf_counter()
    evaluator = Evaluator(datamodule)
    before = count_parameters(model)
    base_accuracy = evaluator.test_accuracy(model)
    log(f"unpruned: {before:,} parameters, test accuracy {base_accuracy:.4f}")
    layers, moments, _ = gather_statistics(evaluator, model)
    example_input = datamodule.val_set.tensors[0][:1]
    rows: list[CNNRow] = []
    recalibration_copies: dict[float, pl.LightningModule] = {}

    def row(target: float, method: str, pruned: pl.LightningModule, channels: dict[str, int], **extra: float) -> CNNRow:
        params = count_parameters(pruned)
        done = CNNRow(target, method, params, 1 - params / before, evaluator.test_accuracy(pruned), channels, **extra)
        log(f"-{target:.0%} {method}: {params:,} parameters (-{done.reduction:.1%}), test accuracy {done.test_acc:.4f}")
        rows.append(done)
        return done

    def recalibrate(pruned: pl.LightningModule) -> tuple[pl.LightningModule, float]:
        return recalibrated(pruned, datamodule.train_dataloader(), settings.recalibration_batches)

    for target in settings.targets:
        threshold, plan, _ = ours_at_reduction(
            model, layers, moments, settings.statistic, target, normalize=settings.normalize
        )
        ours = typing.cast(pl.LightningModule, pruned_copy(model, plan)).eval()
        channels = group_channels(plan)
        row(target, OURS, ours, channels, threshold=threshold)
        fixed, seconds = recalibrate(ours)
        recalibration_copies[target] = fixed
        row(target, OURS_RECALIBRATED, fixed, channels, threshold=threshold, recalibration_seconds=seconds)

        ratio, theirs = torch_pruning_at_reduction(model, example_input, target)
        their_channels = channels_of(theirs, layers)
        row(target, TP, theirs, their_channels, pruning_ratio=ratio)
        fixed, seconds = recalibrate(theirs)
        row(target, TP_RECALIBRATED, fixed, their_channels, pruning_ratio=ratio, recalibration_seconds=seconds)
        if target in settings.recovery_targets:
            tuned, seconds = fine_tuned(theirs, datamodule, 1, training.config.seed)
            row(target, TP_FINE_TUNED, tuned, their_channels, pruning_ratio=ratio, train_seconds=seconds)

    epochs = training.config.epochs
    recovery: list[RecoveryFacts] = []
    for target in settings.recovery_targets:
        start = time.perf_counter()
        recovered, pruning, timer = fit_with_recovery(
            build,
            datamodule,
            epochs,
            training.config.seed,
            target,
            settings.recalibration_batches,
            statistic=settings.statistic,
            normalize=settings.normalize,
        )
        seconds = time.perf_counter() - start
        result = pruning.result
        if result is None or not result.pruned:
            raise RuntimeError(f"ActivationPruning did not prune at -{target:.0%} inside fit")
        facts = RecoveryFacts(
            target=target,
            pruned_at_epoch=typing.cast(int, pruning.pruned_at_epoch),
            val_acc_base=training.final_val_acc,
            val_acc_before_prune=result.metrics_before["val_acc"],
            val_acc_after_prune=result.metrics_after["val_acc"],
            val_acc_recovered=result.metrics_recovered["val_acc"],
            epoch_seconds=timer.seconds,
        )
        recovery.append(facts)
        log(
            f"-{target:.0%} recovery: val acc {facts.val_acc_base} (unpruned run) / {facts.val_acc_before_prune}"
            f" before the prune / {facts.val_acc_after_prune} after / {facts.val_acc_recovered} recovered;"
            f" recovery epoch {facts.epoch_ratio:.2f}x an unpruned one"
        )
        channels = group_channels(result.plan)
        row(target, OURS_RECOVERED, recovered, channels, threshold=result.plan.threshold, train_seconds=seconds)

    for target in settings.targets:
        (ours_row,) = [r for r in rows if r.target == target and r.method == OURS]
        widths, hidden = scratch_widths(model, ours_row.channels)
        scratch, facts = train_scratch(widths, hidden, epochs)
        if count_parameters(scratch) != ours_row.params:
            log(f"WARNING: from scratch at -{target:.0%} has {count_parameters(scratch):,} parameters, not ours'")
        row(target, SCRATCH, scratch, ours_row.channels, train_seconds=facts.train_seconds)
        if target in settings.recovery_targets:
            scratch, facts = train_scratch(widths, hidden, epochs + 1)
            row(target, SCRATCH_LONGER, scratch, ours_row.channels, train_seconds=facts.train_seconds)

    middle = sorted(settings.targets)[len(settings.targets) // 2]
    pruned = recalibration_copies[middle]
    validation = list(datamodule.val_dataloader())
    recalibration_seconds = [recalibrate(pruned)[1] for _ in range(settings.cost_repeats)]
    validation_seconds = [_forward_seconds(pruned, validation) for _ in range(settings.cost_repeats)]
    cost = RecalibrationCost(
        batches=settings.recalibration_batches,
        seconds=stats.median(recalibration_seconds),
        validation_seconds=stats.median(validation_seconds),
    )
    log(f"recalibration: {cost.seconds:.2f}s, {cost.ratio:.2f}x one validation pass")
    return CNNMeasurements(
        settings=settings,
        params_before=before,
        test_acc_before=base_accuracy,
        groups={layer.name: layer.neurons for layer in layers},
        batchnorm_layers=len(batchnorm_layers(model)),
        rows=rows,
        recalibration=cost,
        benchmark_seconds=time.perf_counter() - started,
        recovery=recovery,
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Train (or load) the ResNet, run every measurement, write BENCHMARKS.md's CNN section and the JSON."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.fashion_cnn",
        description="BatchNorm recalibration after pruning a small ResNet on Fashion-MNIST, against Torch-Pruning.",
    )
    add_common_arguments(parser)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for training and measuring")
    parser.add_argument("--epochs", type=int, default=CNNTrainConfig.epochs, help="epochs of the unpruned network")
    parser.add_argument(
        "--widths", type=int, nargs=3, default=CNNTrainConfig.widths, help="channels of the three stages"
    )
    parser.add_argument(
        "--statistic", choices=STATISTICS, default=CNNSettings.statistic, help="the neuron statistic ours ranks by"
    )
    parser.add_argument(
        "--no-normalize",
        dest="normalize",
        action="store_false",
        help="rank neurons by their raw statistic across layers, not standardised per layer",
    )
    parser.add_argument("--seed", type=int, default=CNNTrainConfig.seed, help="seed of the training and the data order")
    parser.add_argument(
        "--recovery-targets",
        type=float,
        nargs="+",
        default=CNNSettings.recovery_targets,
        help="targets that also get the rows training one more epoch (each trains the network again)",
    )
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error(f"--epochs must be an integer >= 1; got {args.epochs}")
    if min(args.widths) < 1:
        parser.error(f"--widths must be three integers >= 1; got {args.widths}")
    results_path = args.cache_dir / RESULTS_FILE
    if args.report_only:
        results = CNNBenchmarkResults.from_json(last_results(results_path))
        write_section(args.markdown, render_markdown(results), BEGIN, END)
        return

    started = time.perf_counter()
    try:
        data_dir = locate_fashion_mnist(args.data_dir)
    except FileNotFoundError as error:
        raise SystemExit(f"error: {error}") from None
    log = quiet_run_log()
    torch.set_num_threads(args.threads)
    config = dataclasses.replace(CNNTrainConfig(), widths=tuple(args.widths), epochs=args.epochs, seed=args.seed)
    train, val, test = load_fashion_mnist(data_dir, config.num_val)
    datamodule = SplitDataModule(train, val, test, batch_size=config.batch_size, seed=config.seed)
    log(f"data from {data_dir}: {len(train)} train / {len(val)} validation / {len(test)} test")
    model, training = train_or_load(datamodule, config, args.cache_dir, retrain=args.retrain)
    log(f"model {'loaded from the cache' if training.cached else 'trained'} ({training.train_seconds:.0f}s)")

    def train_scratch(
        widths: tuple[int, ...], hidden: tuple[int, ...], epochs: int
    ) -> tuple[ResNetClassifier, CNNTrainingFacts]:
        scratch_config = CNNTrainConfig(widths, config.lr, config.batch_size, epochs, config.seed)
        trained, facts = train_or_load(datamodule, scratch_config, args.cache_dir, hidden, retrain=args.retrain)
        log(f"from scratch {widths} hidden {hidden}, {epochs} epochs: {'cached' if facts.cached else 'trained'}")
        return trained, facts

    settings = CNNSettings(
        recovery_targets=tuple(args.recovery_targets), statistic=args.statistic, normalize=args.normalize
    )
    measurements = run_benchmark(
        model,
        datamodule,
        settings,
        train_scratch,
        lambda: ResNetClassifier(config.widths, None, config.lr),
        training,
        log=log,
    )
    run = CNNRunInfo(
        machine=machine_info(),
        training=training,
        command=command_line("benchmarks.fashion_cnn", argv),
        total_seconds=time.perf_counter() - started,
    )
    results = CNNBenchmarkResults(measurements, run)
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    results_path.write_text(results.to_json())
    write_section(args.markdown, render_markdown(results), BEGIN, END)
    log(f"wrote {args.markdown}; total {run.total_seconds / 60:.1f} min")
