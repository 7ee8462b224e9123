"""The methods compared on the ResNet: ours (one-shot, recalibrated, recovered in ``fit``) and Torch-Pruning's.

Torch-Pruning's copy is also fine-tuned the way its README does. The one-shot methods return a pruned copy and
never touch the model they are given.
"""

from __future__ import annotations

import copy
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import lightning.pytorch as pl
import torch
import torch_pruning as tp
from torch import Tensor, nn

from benchmarks.common import quiet_trainer
from lightning_actprune import ActivationPruning
from lightning_actprune.core import PrunableLayer, PruningPlan, count_parameters

from .models import ResNetClassifier

M = TypeVar("M", bound=nn.Module)
L = TypeVar("L", bound=pl.LightningModule)


def torch_pruning_copy(model: M, example_input: Tensor, pruning_ratio: float) -> M:
    """A copy pruned as Torch-Pruning's README shows: ``MetaPruner`` with ``GroupMagnitudeImportance(p=2)``.

    Every coupled group loses ``pruning_ratio`` of its channels (the final Linear, ``head``, is ignored), those
    with the smallest L2 norm over the whole group; the BatchNorm statistics are sliced, not re-estimated.
    """
    pruned = copy.deepcopy(model).eval()
    with torch.enable_grad():
        pruner = tp.pruner.MetaPruner(
            pruned,
            example_input,
            importance=tp.importance.GroupMagnitudeImportance(p=2),
            pruning_ratio=pruning_ratio,
            ignored_layers=[pruned.get_submodule("head")],
        )
        pruner.step()
    return pruned


def torch_pruning_at_reduction(model: M, example_input: Tensor, target: float, steps: int = 14) -> tuple[float, M]:
    """The smallest ``pruning_ratio`` (bisection, ``steps`` halvings) whose copy removes at least ``target``.

    Returns:
        The ratio and its pruned copy.
    """
    before = count_parameters(model)
    # Torch-Pruning skips a group that a ratio would empty, so near 1 the size grows again: search below that
    low, high = 0.0, 0.75
    best = torch_pruning_copy(model, example_input, high)
    if 1 - count_parameters(best) / before < target:
        raise ValueError(f"Torch-Pruning cannot remove {target:.0%} of the parameters (pruning_ratio up to {high}).")
    for _ in range(steps):
        middle = (low + high) / 2
        candidate = torch_pruning_copy(model, example_input, middle)
        if 1 - count_parameters(candidate) / before >= target:
            high, best = middle, candidate
        else:
            low = middle
    return high, best


class EpochTimer(pl.Callback):
    """Seconds spent in training steps (forward, backward, optimizer) per epoch: data loading and validation excluded.

    Attributes:
        seconds: one entry per training epoch, in order.
    """

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._batch_started = 0.0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.seconds.append(0.0)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch_started = time.perf_counter()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.seconds[-1] += time.perf_counter() - self._batch_started


def fit_with_recovery(
    build: Callable[[], L],
    datamodule: pl.LightningDataModule,
    epochs: int,
    seed: int,
    target: float,
    recalibration_batches: int = 20,
    recovery_epochs: int = 1,
    statistic: str | None = None,
    normalize: bool | None = None,
) -> tuple[L, ActivationPruning, EpochTimer]:
    """A fresh ``build()`` trained ``epochs + recovery_epochs`` epochs with the callback pruning after ``epochs``.

    The same seed and trainer as the unpruned network's training, plus
    ``ActivationPruning(target_params_reduction=target, recovery_epochs=recovery_epochs)`` (BatchNorm recalibration
    on, no checkpoint written; the λ table, if any, goes to a temporary directory) and an :class:`EpochTimer`.

    Returns:
        The pruned, recovered model (eval mode), the callback (its ``result`` has the metrics) and the timer.
    """
    pl.seed_everything(seed, workers=True, verbose=False)
    model = build()
    pruning = ActivationPruning(
        target_params_reduction=target,
        recovery_epochs=recovery_epochs,
        statistic=statistic,
        normalize=normalize,
        recalibration_batches=recalibration_batches,
        pruned_checkpoint=None,
    )
    timer = EpochTimer()
    with tempfile.TemporaryDirectory() as root:
        trainer = quiet_trainer(max_epochs=epochs + recovery_epochs, callbacks=[timer, pruning], default_root_dir=root)
        trainer.fit(model, datamodule=datamodule)
    return model.eval(), pruning, timer


def fine_tuned(model: L, datamodule: pl.LightningDataModule, epochs: int, seed: int) -> tuple[L, float]:
    """A copy of ``model`` trained ``epochs`` more epochs with a fresh optimizer (its ``configure_optimizers``).

    How Torch-Pruning's README goes on after ``pruner.step()``: an ordinary training loop on the pruned model.

    Returns:
        The fine-tuned copy (eval mode) and the seconds the training took.
    """
    tuned = copy.deepcopy(model).train()  # Lightning keeps modules in the mode it finds them: BatchNorm must train
    pl.seed_everything(seed, workers=True, verbose=False)
    start = time.perf_counter()
    quiet_trainer(max_epochs=epochs).fit(tuned, datamodule=datamodule)
    return tuned.eval(), time.perf_counter() - start


def channels_of(model: nn.Module, layers: Sequence[PrunableLayer]) -> dict[str, int]:
    """Output channels of each group's first producer in ``model`` (pruned by any tool): the group's width."""
    channels = {}
    for layer in layers:
        producer = model.get_submodule(layer.producers[0])
        assert isinstance(producer, nn.Conv2d | nn.Linear), f"{layer.producers[0]} is a {type(producer).__name__}"
        channels[layer.name] = producer.out_channels if isinstance(producer, nn.Conv2d) else producer.out_features
    return channels


def group_channels(plan: PruningPlan) -> dict[str, int]:
    """Channels kept per prunable group."""
    return {layer.name: len(layer.kept) for layer in plan.layers}


def scratch_widths(model: ResNetClassifier, channels: dict[str, int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The ``widths`` and ``hidden`` of a :class:`ResNetClassifier` the size of the pruned one.

    Stage ``i``'s output width is its group with ``stages.i.conv2``'s output (the stem and the shortcuts are
    coupled to it), its hidden width that of ``stages.i.conv1``.
    """
    stages = len(model.stages)
    widths = []
    for i in range(stages):
        (name,) = [n for n in channels if f"stages.{i}.conv2" in n.split("+")]
        widths.append(channels[name])
    hidden = tuple(channels[f"stages.{i}.conv1"] for i in range(stages))
    return tuple(widths), hidden
