"""One model with one version of the package, in the process that runs this module (the run starts one per pair).

``python -m benchmarks.cost.measure MODEL VERSION --package-root PATH`` imports ``lightning_actprune`` from
``PATH`` (this checkout, or the baseline commit's files) and prints one JSON line: a :class:`Measurement`. Only the
callback's public API is used, so that every version of the package can be measured alike.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import json
import logging
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from .models import MODELS, build
from .results import Measurement

OVERHEAD_BATCHES = 3
"""Validation batches timed with and without the statistics recorder: the first sets the recorder up, the rest are
its steady cost per batch."""

OVERHEAD_RUNS = 8
"""Runs of those batches per variant (plain, every moment, the default's moments)."""


def _classifier(network: nn.Module) -> Any:
    import lightning.pytorch as pl

    class Classifier(pl.LightningModule):
        """The network behind a cross-entropy ``validation_step``, as a user's module."""

        def __init__(self) -> None:
            super().__init__()
            self.net = network

        def forward(self, x: Tensor) -> Tensor:
            return self.net(x)

        def training_step(self, batch: tuple[Tensor, Tensor], _: int) -> Tensor:
            return F.cross_entropy(self(batch[0]), batch[1])

        def validation_step(self, batch: tuple[Tensor, Tensor], _: int) -> None:
            self.log("val_loss", F.cross_entropy(self(batch[0]), batch[1]))

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.01)

    return Classifier()


def _trainer(**kwargs: Any) -> Any:
    import lightning.pytorch as pl

    return pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def _timed(seconds: list[float], function: Callable[..., Any]) -> Callable[..., Any]:
    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            seconds.append(time.perf_counter() - start)

    return timed


def _timed_pruning(**kwargs: Any) -> Any:
    """``ActivationPruning(**kwargs)`` that times its analysis, its prune and the validation passes in it.

    Only the callback's hooks are timed, so that every version is measured alike: the analysis runs at the first
    validation batch of ``fit`` (every ``on_validation_batch_end`` is timed), the prune at its end
    (``on_fit_end``: with ``max_epochs=0`` it records its own statistics, then plans, prunes and validates).
    """
    from lightning_actprune import ActivationPruning

    class TimedPruning(ActivationPruning):
        def __init__(self) -> None:
            super().__init__(**kwargs)
            self.analysis: list[float] = []
            self.pruning: list[float] = []
            self.passes: list[float] = []

        def on_validation_batch_end(self, *args: Any, **hook_kwargs: Any) -> None:
            _timed(self.analysis, super().on_validation_batch_end)(*args, **hook_kwargs)

        def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
            trainer.validate = _timed(self.passes, trainer.validate)  # the passes the prune step runs
            try:
                _timed(self.pruning, super().on_fit_end)(trainer, pl_module)
            finally:
                del trainer.validate

    return TimedPruning()


def _batch_seconds(
    model: nn.Module, batches: list[Tensor], recording: Callable[[], Any] | None, shares: list[float] | None = None
) -> tuple[float, float]:
    """The first batch's seconds and the fastest of the others', under one recorder (or none), in inference mode.

    Lightning validates in ``torch.inference_mode``; the recorder's first batch also creates its per-layer metrics.
    With ``shares``, each batch after the first appends the seconds spent inside the recorder's metric updates over
    the rest of that batch (:func:`_updates_timed`).
    """
    seconds = []
    inside = [0.0]
    timing = _updates_timed(inside) if shares is not None else contextlib.nullcontext()
    with torch.inference_mode(), timing, recording() if recording is not None else contextlib.nullcontext():
        for index, images in enumerate(batches):
            inside[0] = 0.0
            start = time.perf_counter()
            model(images)
            seconds.append(time.perf_counter() - start)
            if shares is not None and index:
                shares.append(inside[0] / max(seconds[-1] - inside[0], 1e-9))
    return seconds[0], min(seconds[1:], default=seconds[0])


@contextlib.contextmanager
def _updates_timed(inside: list[float]) -> Iterator[None]:
    """While it is entered, every metric update of the recorder adds its seconds to ``inside[0]``.

    The share of a batch spent there is the recording's overhead measured within one batch: a slow spell of the
    machine slows the updates and the rest alike, where two runs side by side may fall on different spells. Nothing
    is timed with a package version whose metric is not ``_statistics.ActivationStatistics``.
    """
    try:
        from lightning_actprune._statistics import ActivationStatistics
    except ImportError:
        yield
        return
    update = ActivationStatistics.update

    def timed(self: Any, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return update(self, *args, **kwargs)
        finally:
            inside[0] += time.perf_counter() - start

    ActivationStatistics.update = timed  # type: ignore[method-assign]
    try:
        yield
    finally:
        ActivationStatistics.update = update  # type: ignore[method-assign]


def _statistics_cost(model: nn.Module, batches: list[Tensor], result: Measurement) -> None:
    """Per batch, the fastest of :data:`OVERHEAD_RUNS` runs: without recording, every moment, the default's moments.

    A batch under the recorder is one after its first (the steady cost of every batch of a pass); what the first
    batch costs beyond that (creating a metric per layer) is paid once per pass, and is kept apart. The variants
    take turns, so that a slow spell of the machine falls on all of them; the fastest batch is the one least
    disturbed.
    """
    from lightning_actprune.core import ActivationRecorder

    variants: dict[str, Callable[[], Any] | None] = {"plain": None, "every": lambda: ActivationRecorder(model)}
    if "moments" in inspect.signature(ActivationRecorder).parameters:
        from lightning_actprune._scoring import recorded_moments

        needed = recorded_moments("fluctuation")
        variants["needed"] = lambda: ActivationRecorder(model, moments=needed)  # type: ignore[call-arg]
    best: dict[str, float] = {}
    setup: dict[str, float] = {}
    shares: list[float] = []  # of the callback's recorder: the default's moments where the version can
    timed = "needed" if "needed" in variants else "every"
    _batch_seconds(model, batches[:1], None)  # warm-up
    for _ in range(OVERHEAD_RUNS):
        for name, recording in variants.items():
            first, steady = _batch_seconds(model, batches, recording, shares if name == timed else None)
            best[name] = min(best.get(name, float("inf")), steady)
            setup[name] = min(setup.get(name, float("inf")), first - steady)
    result.update_share = statistics.median(shares) if shares else 0.0
    result.batch_seconds = best["plain"]
    result.recorded_batch_seconds = best["every"]
    result.needed_batch_seconds = best.get("needed", 0.0)
    result.recorder_setup_seconds = max(0.0, setup.get("needed", setup["every"]))
    with ActivationRecorder(model) as recorder, torch.no_grad():
        model(batches[0][:1])
    result.measured_layers = len(recorder.metrics)


def measure(name: str, version: str, images: int, batch_size: int, target: float) -> Measurement:
    """Every number of one row; a failure becomes the row's ``error``."""
    import lightning_actprune

    spec = MODELS[name]
    result = Measurement(name, version, spec.resolution, images, batch_size, package=lightning_actprune.__file__)
    try:
        network = build(name)
        result.params = sum(p.numel() for p in network.parameters())
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(images, 3, spec.resolution, spec.resolution, generator=generator)
        y = torch.randint(0, 10, (images,), generator=generator)
        loader = DataLoader(TensorDataset(x, y), batch_size=batch_size)
        starts = range(0, min(OVERHEAD_BATCHES * batch_size, images), batch_size)
        _statistics_cost(network, [x[i : i + batch_size] for i in starts], result)
        if not spec.prune:
            return result
        module = _classifier(network)
        validation = [_plain_pass(module, loader)]
        pruning = _timed_pruning(target_params_reduction=target, pruned_checkpoint=None)
        _trainer(max_epochs=0, callbacks=[pruning]).fit(module, loader, loader)
        if pruning.result is None:
            raise RuntimeError("the callback left no result")
        validation.append(_plain_pass(module, loader))  # the pruned model's: as fast or faster
        result.validation_seconds = sum(validation) / 2
        result.validation_spread = abs(validation[0] - validation[1]) / result.validation_seconds
        result.analysis_seconds = sum(pruning.analysis)
        result.prune_seconds = result.analysis_seconds + sum(pruning.pruning)
        result.passes_seconds, result.passes = sum(pruning.passes), len(pruning.passes)
        result.reduction = pruning.result.params_reduction
    except Exception as error:
        result.error = f"{type(error).__name__}: {error}"[:500]
        traceback.print_exc(file=sys.stderr)
    return result


def _plain_pass(module: Any, loader: DataLoader) -> float:
    trainer = _trainer()
    start = time.perf_counter()
    trainer.validate(module, loader, verbose=False)
    return time.perf_counter() - start


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cost.measure", description=__doc__)
    parser.add_argument("model", choices=sorted(MODELS))
    parser.add_argument("version")
    parser.add_argument("--package-root", required=True, help="the directory lightning_actprune is imported from")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--target", type=float, default=0.3)
    args = parser.parse_args()
    sys.path.insert(0, args.package_root)  # before the first import of lightning_actprune
    torch.set_num_threads(args.threads)
    with _quiet():
        result = measure(args.model, args.version, args.images, args.batch_size, args.target)
    print(json.dumps(dataclasses.asdict(result)))


if __name__ == "__main__":
    main()
