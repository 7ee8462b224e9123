"""The callback's dealings with the Trainer: validation passes that leave no trace, compiled modules, data."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_actprune import _lightning_compat as compat
from lightning_actprune._distributed import average_batchnorm_statistics, synced_metrics, unrepeated_val_dataloaders
from lightning_actprune._recalibration import batchnorm_layers, recalibrating_batchnorm
from lightning_actprune._surgery import restoring


class FirstBatches:
    """The first ``count`` batches of a loader, as an iterable with a length (what ``trainer.validate`` takes)."""

    def __init__(self, loader: Iterable[Any], count: int) -> None:
        self.loader, self.count = loader, count

    def __iter__(self) -> Iterator[Any]:
        return itertools.islice(iter(self.loader), self.count)

    def __len__(self) -> int:
        try:
            return min(len(self.loader), self.count)  # type: ignore[arg-type]
        except TypeError:
            return self.count


class ValidationPasses:
    """The validation passes of one prune, the same whether it runs at the end of ``fit`` or inside it.

    After ``fit``, a pass is ``trainer.validate`` with the fit's data (:func:`validate`); inside ``fit`` (recovery
    epochs follow), a run of the fit's own validation loop that nothing else sees
    (:func:`~lightning_actprune._lightning_compat.validate_in_fit`). With BatchNorm in the model and
    ``recalibration_batches > 0``, :meth:`recalibrate` re-estimates its statistics on the first training batches.

    Args:
        trainer: the Trainer.
        pl_module: its module.
        in_fit: whether ``fit`` goes on after the prune.
        recalibration_batches: how many training batches recalibrate BatchNorm (0: never).
    """

    def __init__(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, in_fit: bool, recalibration_batches: int
    ) -> None:
        self.trainer, self.pl_module, self.in_fit = trainer, pl_module, in_fit
        self.recalibration_batches = recalibration_batches
        # our own validation passes replace the fit's loaders: the training batches are taken now
        self.train_loader = trainer.train_dataloader

    def metrics(self) -> dict[str, float]:
        """One validation pass of the model as it is now."""
        if self.in_fit:
            return synced_metrics(self.trainer, compat.validate_in_fit(self.trainer))
        return validate(self.trainer, self.pl_module)

    @property
    def recalibrates(self) -> bool:
        """Whether the model has BatchNorm layers to recalibrate (and recalibration is on)."""
        return self.recalibration_batches > 0 and bool(batchnorm_layers(self.pl_module))

    def recalibrate(self) -> bool:
        """Re-estimate BatchNorm statistics on the first training batches; ``False`` (with a warning) if it cannot.

        The passes run the user's ``validation_step`` (which knows how to feed a batch to the model) over the fit's
        training loader, with every BatchNorm layer in train mode; under DDP the ranks' statistics are pooled.
        """
        trainer, loader = self.trainer, self.train_loader
        if loader is None or isinstance(loader, (Mapping, list, tuple)):
            why = "the fit has no training loader" if loader is None else "the fit has several training loaders"
            rank_zero_warn(f"ActivationPruning: BatchNorm recalibration skipped: {why}.")
            return False
        limit, trainer.limit_val_batches = trainer.limit_val_batches, 1.0  # our batch count, not the val limit
        try:
            with restoring(self.pl_module, batchnorm_layers(self.pl_module)), recalibrating_batchnorm(self.pl_module):
                batches = FirstBatches(loader, self.recalibration_batches)
                if self.in_fit:
                    compat.validate_in_fit(trainer, batches)
                else:
                    trainer.validate(self.pl_module, dataloaders=batches, verbose=False)
                average_batchnorm_statistics(trainer, self.pl_module)  # identical on every rank
        except Exception as error:
            rank_zero_warn(
                f"ActivationPruning: BatchNorm recalibration failed ({type(error).__name__}: {error}); the pruned"
                " model keeps the running statistics from training."
            )
            return False
        finally:
            trainer.limit_val_batches = limit
        return True

    def metrics_recalibrated(self) -> dict[str, float]:
        """One validation pass of the model recalibrated; its BatchNorm statistics are put back afterwards."""
        if not self.recalibrates:
            return self.metrics()
        with restoring(self.pl_module, batchnorm_layers(self.pl_module), always=True):
            self.recalibrate()
            return self.metrics()

    def metrics_pruned(self, validated: Mapping[str, float] | None) -> tuple[dict[str, float], dict[str, float]]:
        """After the surgery: the final metrics and, when BatchNorm was recalibrated, the metrics before that.

        Args:
            validated: the metrics of this very pruned model from the λ table, if it has them (no recalibration).
        """
        if self.recalibrates:
            metrics_pruned = self.metrics()
            if self.recalibrate():
                return self.metrics(), metrics_pruned
            return metrics_pruned, {}  # recalibration failed (and warned): the surgery's metrics are the last
        if validated is not None:
            return dict(validated), {}
        return self.metrics(), {}


def keeps_parameter_copies(callback: Callback) -> bool:
    """Lightning's weight averaging (``StochasticWeightAveraging``, ``WeightAveraging``/EMA) keeps parameter copies."""
    names = {cls.__name__ for cls in type(callback).__mro__}
    return bool(names & {"StochasticWeightAveraging", "WeightAveraging"})


def has_compiled_modules(module: nn.Module) -> bool:
    """Whether ``module`` holds a ``torch.compile``'d submodule (whose inner modules' hooks may not fire)."""
    optimized = getattr(getattr(torch, "_dynamo", None), "OptimizedModule", None)
    return optimized is not None and any(isinstance(m, optimized) for m in module.modules())


def uncompile(module: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """Swap every ``torch.compile``'d submodule for the module it wraps: hooks and tracing need the eager module.

    Returns:
        ``(parent, attribute, compiled wrapper)`` for each swap, to undo it.
    """
    optimized = getattr(getattr(torch, "_dynamo", None), "OptimizedModule", None)
    if optimized is None:
        return []
    swapped = []
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, optimized):
                setattr(parent, name, child._orig_mod)
                swapped.append((parent, name, child))
    return swapped


def recompile(swapped: list[tuple[nn.Module, str, nn.Module]]) -> None:
    """Undo :func:`uncompile`."""
    for parent, name, wrapper in swapped:
        setattr(parent, name, wrapper)


def weights_fingerprint(trainer: pl.Trainer, module: nn.Module) -> tuple[int, tuple[tuple[int, int, int], ...]]:
    """Changes when a training step runs, or a parameter or buffer is replaced or written in place."""
    tensors = itertools.chain(module.parameters(), module.buffers())
    return trainer.global_step, tuple((id(t), t._version, t.data_ptr()) for t in tensors)


def validate(trainer: pl.Trainer, pl_module: pl.LightningModule, ckpt_path: str | None = None) -> dict[str, float]:
    """One validation pass through the Trainer (on its device, its precision), with the fit's data."""
    data = compat.data_source(trainer.fit_loop.epoch_loop.val_loop)
    source = data.instance
    kwargs: dict[str, Any] = {}
    # several processes: shards that cover every sample exactly once, not Lightning's padded ones
    unrepeated = unrepeated_val_dataloaders(trainer, data)
    if unrepeated is not None:
        kwargs["dataloaders"] = unrepeated
    elif isinstance(source, pl.LightningDataModule):
        kwargs["datamodule"] = source
    elif not isinstance(source, pl.LightningModule):
        kwargs["dataloaders"] = source
    results = trainer.validate(pl_module, ckpt_path=ckpt_path, verbose=False, **kwargs)
    return synced_metrics(trainer, {name: float(value) for result in results for name, value in result.items()})


@contextmanager
def trainer_state_kept(trainer: pl.Trainer) -> Iterator[None]:
    """Leave the Trainer as ``fit`` left it: state, loggers (not written to), metrics, data sources."""
    state = dataclasses.replace(trainer.state)
    loggers = trainer.loggers
    loops = (
        trainer.fit_loop,
        trainer.fit_loop.epoch_loop.val_loop,
        trainer.validate_loop,
        trainer.test_loop,
        trainer.predict_loop,
    )
    sources = [compat.data_source(loop).instance for loop in loops]
    ckpt_path = trainer.ckpt_path
    trainer.loggers = []
    try:
        with compat.logger_metrics_kept(trainer):
            yield
    finally:
        trainer.loggers = loggers
        trainer.state.status, trainer.state.fn, trainer.state.stage = state.status, state.fn, state.stage
        for loop, source in zip(loops, sources, strict=False):
            compat.data_source(loop).instance = source
        compat.set_ckpt_path(trainer, ckpt_path)
