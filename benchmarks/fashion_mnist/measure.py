"""What this benchmark measures on a model besides accuracy: size, latency, and the cost of pruning.

Accuracy and the statistics pass are :class:`benchmarks.common.Evaluator` and
:func:`benchmarks.common.gather_statistics`.
"""

from __future__ import annotations

import copy
import io
import statistics as stats
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence

import lightning.pytorch as pl
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from benchmarks.common import quiet_trainer
from lightning_actprune import ActivationPruning
from lightning_actprune.core import (
    ActivationRecorder,
    apply_plan,
    count_parameters,
    find_prunable_layers,
    plan_pruning,
)

from .results import Cost, PeakMemory


def nonzero_parameters(model: nn.Module) -> int:
    """Parameter values that are not exactly zero (what masking-based pruning reduces)."""
    return sum(int(torch.count_nonzero(p)) for p in model.parameters())


def state_dict_bytes(model: nn.Module) -> int:
    """Bytes of ``torch.save(model.state_dict())``: the file a user would ship."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def measure_latency(
    models: Mapping[str, nn.Module], input_shape: Sequence[int], batch: int, rounds: int, iterations: int
) -> dict[str, float]:
    """Median seconds per forward pass (``inference_mode``) of every model, measured side by side.

    Every model is warmed up, then each round times ``iterations`` forwards of every model in turn (the order
    rotates each round), so drift in the machine's load hits all models alike.
    """
    x = torch.rand(batch, *input_shape, generator=torch.Generator().manual_seed(0))
    names = list(models)
    times: dict[str, list[float]] = {name: [] for name in names}
    with torch.inference_mode():
        for model in models.values():
            model.eval()
            for _ in range(max(3, iterations)):
                model(x)
        for round_index in range(rounds):
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                model = models[name]
                start = time.perf_counter()
                for _ in range(iterations):
                    model(x)
                times[name].append((time.perf_counter() - start) / iterations)
    return {name: stats.median(values) for name, values in times.items()}


def peak_allocated_bytes(fn: Callable[[], object]) -> int:
    """The most CPU memory ``fn`` held allocated through PyTorch at any moment, above what it started with.

    Read from ``torch.profiler`` memory events (each op's own allocations and frees, in time order), so it counts
    the temporaries an op sequence creates even when the allocator reuses memory and the RSS does not move.
    """
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        fn()
    held = peak = 0
    for event in sorted(profiler.events(), key=lambda e: e.time_range.start):
        held += event.cpu_memory_usage if event.name == "[memory]" else event.self_cpu_memory_usage
        peak = max(peak, held)
    return peak


def measure_cost(
    model: pl.LightningModule,
    datamodule: pl.LightningDataModule,
    threshold: float,
    statistic: str,
    repeats: int,
) -> Cost:
    """Time the callback's ``on_fit_end`` and the statistics pass against plain validation passes, side by side.

    A Trainer runs ``fit`` for zero epochs on a copy of ``model`` (so its validation data are the fit's, as after a
    real training run); then each round times, in rotating order: ``trainer.validate``; ``trainer.validate`` with an
    :class:`ActivationRecorder` attached; and ``ActivationPruning(threshold).on_fit_end`` on a fresh copy (the
    statistics pass, the dependency analysis, planning, surgery and the re-validation, and whatever else the
    callback does by default, such as writing the pruned checkpoint, into a temporary directory). Ratios are of
    medians.
    """
    with tempfile.TemporaryDirectory() as root_dir:  # whatever the callback writes (its pruned checkpoint) goes here
        return _measure_cost(model, datamodule, threshold, statistic, repeats, root_dir)


def _measure_cost(
    model: pl.LightningModule,
    datamodule: pl.LightningDataModule,
    threshold: float,
    statistic: str,
    repeats: int,
    root_dir: str,
) -> Cost:
    fitted = copy.deepcopy(model)
    trainer = quiet_trainer(max_epochs=0, default_root_dir=root_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(fitted, datamodule=datamodule)
    fitted.eval()
    recorders: list[ActivationRecorder] = []
    callbacks: list[ActivationPruning] = []
    pruned: list[nn.Module] = []

    def plain() -> None:
        trainer.validate(fitted, datamodule=datamodule, verbose=False)

    def statistics_pass() -> None:
        with ActivationRecorder(fitted) as recorder:
            trainer.validate(fitted, datamodule=datamodule, verbose=False)
        recorder.moments()
        recorders.append(recorder)

    def on_fit_end(fresh: pl.LightningModule) -> None:
        callback = ActivationPruning(threshold=threshold, statistic=statistic, monitor="val_acc")  # type: ignore[arg-type]
        callback.on_fit_end(trainer, fresh)
        callbacks.append(callback)

    def analysis_plan_surgery(fresh: nn.Module) -> None:
        # the steps between the two validation passes, on the statistics of the last statistics pass
        layers = find_prunable_layers(fresh, recorders[-1].example_inputs)
        apply_plan(fresh, plan_pruning(layers, recorders[-1].moments(), threshold, statistic, model=fresh))
        pruned.append(fresh)

    steps: dict[str, Callable[[], None]] = {
        "plain": plain,
        "statistics": statistics_pass,
        "on_fit_end": lambda: on_fit_end(fresh_copies.pop()),
    }
    times: dict[str, list[float]] = {name: [] for name in [*steps, "analysis_plan_surgery"]}
    plain()  # warm-up
    names = list(steps)
    for round_index in range(repeats):
        fresh_copies = [copy.deepcopy(fitted), copy.deepcopy(fitted)]
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - start)
        start = time.perf_counter()
        analysis_plan_surgery(fresh_copies.pop())
        times["analysis_plan_surgery"].append(time.perf_counter() - start)

    batch = next(iter(datamodule.val_dataloader()))[0]

    def forward() -> None:
        with torch.inference_mode():
            fitted(batch)

    def recorded_forward() -> None:
        with ActivationRecorder(fitted), torch.inference_mode():
            fitted(batch)

    forward()
    recorded_forward()
    memory = PeakMemory(
        batch=len(batch), plain=peak_allocated_bytes(forward), statistics=peak_allocated_bytes(recorded_forward)
    )
    median = {name: stats.median(values) for name, values in times.items()}
    result = callbacks[-1].result
    return Cost(
        repeats=repeats,
        seconds=times,
        median_seconds=median,
        on_fit_end_ratio=median["on_fit_end"] / median["plain"],
        statistics_ratio=median["statistics"] / median["plain"],
        statistics_ratio_per_round=[s / p for s, p in zip(times["statistics"], times["plain"], strict=True)],
        peak_allocated_bytes=memory,
        params_before=count_parameters(fitted),
        plain_functions_params_after=count_parameters(pruned[-1]),
        callback_params_after=None if result is None else result.params_after,
        threshold=threshold,
    )
