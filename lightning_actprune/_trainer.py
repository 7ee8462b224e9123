"""The callback's dealings with the Trainer: validation passes that leave no trace, compiled modules, data."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_actprune import _lightning_compat as compat
from lightning_actprune._distributed import synced_metrics, unrepeated_val_dataloaders


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


def keeps_parameter_copies(callback: Callback) -> bool:
    """Lightning's weight averaging (``StochasticWeightAveraging``, ``WeightAveraging``/EMA) keeps parameter copies."""
    names = {cls.__name__ for cls in type(callback).__mro__}
    return bool(names & {"StochasticWeightAveraging", "WeightAveraging"})


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


def validate(trainer: pl.Trainer, pl_module: pl.LightningModule, ckpt_path: str | None = None) -> dict[str, float]:
    """One validation pass through the Trainer (on its device, its precision), with the fit's data."""
    source = compat.data_source(trainer.fit_loop.epoch_loop.val_loop).instance
    kwargs: dict[str, Any] = {}
    # several processes: shards that cover every sample exactly once, not Lightning's padded ones
    unrepeated = unrepeated_val_dataloaders(trainer, compat.data_source(trainer.fit_loop.epoch_loop.val_loop))
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
