"""The whole benchmark: run every measurement on the trained model, then write the report (the command line)."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from benchmarks.common import (
    INSTALL_COMMAND,
    Evaluator,
    SplitDataModule,
    TrainConfig,
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
    widths_of,
)
from lightning_actprune.core import count_parameters, layer_scores, model_size_mb, plan_pruning

from .compare import compare_at_reduction, grid_at_reduction, summarize_grid
from .measure import measure_cost, measure_latency, state_dict_bytes
from .methods import Variant, lightning_unstructured, option_grid
from .models import train_or_load
from .report import plot, render_markdown, write_markdown
from .results import (
    Baseline,
    BenchmarkResults,
    GridRow,
    Measurements,
    MethodRow,
    RunInfo,
    Settings,
    SpeedRow,
    SweepRow,
)

DEFAULT_PLOT = Path(__file__).resolve().parents[2] / "docs" / "benchmark_accuracy_vs_params.png"
RESULTS_FILE = "fashion_mnist_results.json"


def run_benchmark(
    model: pl.LightningModule,
    datamodule: pl.LightningDataModule,
    settings: Settings,
    log: Callable[[str], None] = print,
) -> Measurements:
    """Run every measurement on the trained ``model`` (never modified)."""
    model.eval()
    evaluator = Evaluator(datamodule)
    started = time.perf_counter()
    before = count_parameters(model)
    base_accuracy = evaluator.test_accuracy(model)
    baseline = Baseline(
        params=before,
        file_bytes=state_dict_bytes(model),
        size_mb=model_size_mb(model),
        test_acc=base_accuracy,
        val=evaluator.validate(model),
    )
    log(f"unpruned: {before:,} parameters, test accuracy {base_accuracy:.4f}")

    layers, moments, state_bytes = gather_statistics(evaluator, model)
    never_active = {layer.name: int((layer_scores(layer, moments, "nonzero_fraction") == 0).sum()) for layer in layers}
    log(f"neurons that never fire on the validation set: {never_active}")
    example_input = next(iter(datamodule.val_dataloader()))[0][:1]
    input_shape = tuple(example_input.shape[1:])

    seed_rows = []
    seed_models: dict[float, nn.Module] = {}
    for threshold in settings.thresholds:
        plan = plan_pruning(layers, moments, threshold, settings.seed_statistic, model=model)
        pruned = pruned_copy(model, plan)
        params = count_parameters(pruned)
        accuracy = evaluator.test_accuracy(pruned)
        seed_models[threshold] = pruned
        seed_rows.append(
            SweepRow(
                threshold=threshold,
                widths=widths_of(plan),
                params=params,
                reduction=1 - params / before,
                file_bytes=state_dict_bytes(pruned),
                test_acc=accuracy,
            )
        )
        log(f"λ={threshold:g}: {params:,} parameters (-{1 - params / before:.1%}), test accuracy {accuracy:.4f}")
    marked = next((r for r in seed_rows if r.reduction >= settings.marked_reduction), None)

    grid: list[tuple[GridRow, Tensor]] = []
    for target in settings.targets:
        grid += grid_at_reduction(model, layers, moments, evaluator, target, option_grid(settings.statistics))
        log(f"target -{target:.0%}: {len(settings.statistics) * 4} settings of our options tested")
    seed = Variant(settings.seed_statistic)
    choice = summarize_grid(grid, seed, settings.noise_z)
    chosen = choice.variant(choice.recommended)
    recommended = Variant(chosen.statistic, chosen.compensate, chosen.normalize)
    log(f"best mean over the targets: {choice.best}; recommended: {choice.recommended}")

    comparison: list[MethodRow] = []
    latency_iterations = settings.latency_iterations
    for target in sorted({*settings.targets, *settings.plot_targets}):
        pairs = compare_at_reduction(
            model, layers, moments, evaluator, target, settings, example_input, extra_variants=[recommended]
        )
        if target in settings.targets:
            models = {"unpruned": model, **{row.method: pruned for row, pruned in pairs}}
            per_batch = {
                batch: measure_latency(models, input_shape, batch, settings.latency_rounds, iterations)
                for batch, iterations in latency_iterations.items()
            }
            for row, _ in pairs:
                row.latency_ms = {str(batch): 1e3 * per_batch[batch][row.method] for batch in per_batch}
            baseline.latency_ms_by_target[str(target)] = {
                str(batch): 1e3 * per_batch[batch]["unpruned"] for batch in per_batch
            }
        comparison.extend(row for row, _ in pairs)
        best = max((row for row, _ in pairs), key=lambda r: r.test_acc)
        log(f"target -{target:.0%}: best {best.method} at {best.test_acc:.4f}")

    # table 2 tests with trainer.test, table 3 with a plain forward: the same settings must give the same numbers
    grid_accuracy = {
        (f"ours ({Variant(r.statistic, r.compensate, r.normalize).label})", r.target): r.test_acc for r, _ in grid
    }
    mismatches = [
        f"{row.method} at -{row.target:.0%}: {row.test_acc} vs {grid_accuracy[row.method, row.target]}"
        for row in comparison
        if (row.method, row.target) in grid_accuracy
        and abs(row.test_acc - grid_accuracy[row.method, row.target]) > 1e-6
    ]
    if mismatches:
        log(f"WARNING: tables 2 and 3 disagree: {'; '.join(mismatches)}")

    speed_models: dict[str, nn.Module] = {"unpruned": model}
    speed_params: dict[str, int] = {"unpruned": before}
    for target in settings.targets:
        _, plan, params = ours_at_reduction(model, layers, moments, settings.seed_statistic, target)
        speed_models[f"ours ({settings.seed_statistic}) -{target:.0%}"] = pruned_copy(model, plan)
        speed_params[f"ours ({settings.seed_statistic}) -{target:.0%}"] = params
    if marked is not None:
        name = f"ours ({settings.seed_statistic}) λ={marked.threshold:g}"
        speed_models[name], speed_params[name] = seed_models[marked.threshold], marked.params
    masked_rows = [r for r in comparison if r.method == "ModelPruning l1_unstructured" and r.target in settings.targets]
    if masked_rows:
        heaviest = max(masked_rows, key=lambda r: r.target)
        name = f"ModelPruning l1_unstructured -{heaviest.target:.0%}"
        speed_models[name] = lightning_unstructured(model, evaluator.trainer, before - heaviest.nonzero)
        speed_params[name] = heaviest.params
    speed = []
    for batch, iterations in latency_iterations.items():
        latency = measure_latency(speed_models, input_shape, batch, settings.speed_rounds, iterations)
        for name, seconds in latency.items():
            speed.append(
                SpeedRow(
                    model=name,
                    batch=batch,
                    params=speed_params[name],
                    latency_ms=1e3 * seconds,
                    latency_ratio=seconds / latency["unpruned"],
                    throughput_per_s=batch / seconds,
                    throughput_ratio=latency["unpruned"] / seconds,
                    param_ratio=speed_params[name] / before,
                )
            )
    log("speed measured")

    cost_threshold = marked.threshold if marked is not None else settings.thresholds[-1]
    cost = measure_cost(model, datamodule, cost_threshold, settings.seed_statistic, settings.cost_repeats)
    cost.metric_state_bytes = state_bytes
    log(f"cost: on_fit_end {cost.on_fit_end_ratio:.2f}x, statistics pass {cost.statistics_ratio:.3f}x")
    return Measurements(
        settings=settings,
        baseline=baseline,
        layers={layer.name: layer.neurons for layer in layers},
        never_active=never_active,
        seed_table=seed_rows,
        marked=marked,
        comparison=comparison,
        grid=[row for row, _ in grid],
        choice=choice,
        table_mismatches=mismatches,
        speed=speed,
        cost=cost,
        test_evaluations=evaluator.calls,
        benchmark_seconds=time.perf_counter() - started,
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Train (or load) the model, run every measurement, write BENCHMARKS.md, the plot and the JSON."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.fashion_mnist",
        description="Benchmark ActivationPruning on Fashion-MNIST against the tools a user would pick instead.",
    )
    add_common_arguments(parser)
    parser.add_argument(
        "--install-data",
        action="store_true",
        help=f"if Fashion-MNIST is missing, run `{INSTALL_COMMAND}` (as root or via sudo); off by default",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads for every measurement")
    parser.add_argument("--train-threads", type=int, default=2, help="torch.set_num_threads while training")
    parser.add_argument("--plot", type=Path, default=DEFAULT_PLOT)
    args = parser.parse_args(argv)
    if args.install_data and args.data_dir is not None:
        parser.error("--install-data installs the Debian package's directory; it cannot be combined with --data-dir")
    results_path = args.cache_dir / RESULTS_FILE
    if args.report_only:
        results = BenchmarkResults.from_json(last_results(results_path))
        write_markdown(args.markdown, render_markdown(results))
        plot(results.measurements, args.plot)
        return

    started = time.perf_counter()
    try:
        data_dir = locate_fashion_mnist(args.data_dir, install=args.install_data)
    except FileNotFoundError as error:
        raise SystemExit(f"error: {error}") from None
    log = quiet_run_log()

    config = TrainConfig()
    train, val, test = load_fashion_mnist(data_dir, config.num_val)
    datamodule = SplitDataModule(train, val, test, batch_size=config.batch_size, seed=config.seed)
    log(f"data from {data_dir}: {len(train)} train / {len(val)} validation / {len(test)} test")
    torch.set_num_threads(args.train_threads)
    model, training = train_or_load(datamodule, config, args.cache_dir, retrain=args.retrain)
    torch.set_num_threads(args.threads)
    log(f"model {'loaded from the cache' if training.cached else 'trained'} ({training.train_seconds:.0f}s)")

    measurements = run_benchmark(model, datamodule, Settings(), log=log)
    run = RunInfo(
        machine=machine_info(),
        training=training,
        command=command_line("benchmarks.fashion_mnist", argv),
        total_seconds=time.perf_counter() - started,
    )
    results = BenchmarkResults(measurements, run)
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    results_path.write_text(results.to_json())
    write_markdown(args.markdown, render_markdown(results))
    plot(measurements, args.plot)
    log(f"wrote {args.markdown} and {args.plot}; total {run.total_seconds / 60:.1f} min")
