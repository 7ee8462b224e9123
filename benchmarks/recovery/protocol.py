"""The protocol: a resumable data order, the probe callback, the base training and every method compared.

Every function leaves the models it is given untouched (it works on deep copies or on a model it builds).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import Tensor, nn
from torch.utils.data import DataLoader, Sampler

from benchmarks.common import (
    Evaluator,
    MLPClassifier,
    SplitDataModule,
    TrainConfig,
    bisect_ratio,
    gather_statistics,
    quiet_trainer,
)
from lightning_actprune import ActivationPruning
from lightning_actprune.core import PruningPlan, ThresholdEvaluator, apply_plan, count_parameters, plan_for_reduction

TP_IMPORTANCES: dict[str, Callable[[], Any]] = {
    "magnitude": lambda: tp.importance.GroupMagnitudeImportance(p=2),
    "taylor": lambda: tp.importance.GroupTaylorImportance(),
}
TP_MAX_RATIO = 0.95
"""The largest ``pruning_ratio`` tried (−95 % of the MLP's parameters needs about 0.9 per layer)."""


class EpochShuffle(Sampler[int]):
    """A permutation per epoch, seeded by ``(seed, epoch)``: a resumed fit sees the order an uninterrupted one does.

    Lightning calls :meth:`set_epoch` before every training epoch (with the epoch's index, restored on resume).
    """

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Use epoch ``epoch``'s permutation."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size


class EpochSeededDataModule(SplitDataModule):
    """:class:`~benchmarks.common.SplitDataModule` whose training order is :class:`EpochShuffle`'s."""

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train_set, batch_size=self.batch_size, sampler=EpochShuffle(len(self.train_set), self.seed)
        )


def test_accuracy(model: nn.Module, loader: DataLoader) -> float:
    """Accuracy of a plain forward over ``loader``; the model's training mode is put back."""
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        hits = torch.cat([model(x).argmax(-1) == y for x, y in loader])
    model.train(was_training)
    return float(hits.float().mean())


def hidden_widths(model: nn.Module) -> list[int]:
    """Output features of every ``Linear`` but the last."""
    return [m.out_features for m in model.modules() if isinstance(m, nn.Linear)][:-1]


class EpochProbe(pl.Callback):
    """Per training epoch: seconds spent on the training batches, then test accuracy and size at the epoch's end.

    Put it after :class:`~lightning_actprune.ActivationPruning` in ``callbacks``: at the prune epoch it then sees
    the pruned model.
    """

    def __init__(self, test_loader: DataLoader) -> None:
        self.test_loader = test_loader
        self.seconds: list[float] = []
        self.test_acc: list[float] = []
        self.params: list[int] = []
        self._started: float | None = None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._started = time.perf_counter()

    def _stop(self) -> None:
        if self._started is not None:
            self.seconds.append(time.perf_counter() - self._started)
            self._started = None

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop()  # the epoch's training batches are done; validation is not timed

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop()
        self.test_acc.append(test_accuracy(pl_module, self.test_loader))
        self.params.append(count_parameters(pl_module))


def _fit(
    model: pl.LightningModule,
    datamodule: SplitDataModule,
    epochs: int,
    callbacks: Sequence[pl.Callback] = (),
    ckpt_path: Path | None = None,
) -> EpochProbe:
    probe = EpochProbe(datamodule.test_dataloader())
    trainer = quiet_trainer(max_epochs=epochs, callbacks=[*callbacks, probe])
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    return probe


def train_base(
    datamodule: SplitDataModule, config: TrainConfig, checkpoint: Path
) -> tuple[MLPClassifier, EpochProbe, float, bool]:
    """The unpruned MLP after ``config.epochs`` epochs, resumed from the checkpoint after ``epochs - 1`` (written once).

    Returns:
        The model (eval mode), the probe of its last epoch, the seconds spent writing the checkpoint (0 if it was
        cached) and whether it was.
    """
    cached = checkpoint.is_file()
    seconds = 0.0
    if not cached:
        pl.seed_everything(config.seed, workers=True, verbose=False)
        model = MLPClassifier(config.sizes, config.lr)
        trainer = quiet_trainer(max_epochs=config.epochs - 1)
        start = time.perf_counter()
        trainer.fit(model, datamodule=datamodule)
        seconds = time.perf_counter() - start
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(checkpoint)
    model = MLPClassifier(config.sizes, config.lr)
    probe = _fit(model, datamodule, config.epochs, ckpt_path=checkpoint)
    return model.eval(), probe, seconds + sum(probe.seconds), cached


def ours_one_shot(model: pl.LightningModule, datamodule: SplitDataModule, reduction: float) -> nn.Module:
    """What ``ActivationPruning(target_params_reduction=reduction)`` does at the end of ``fit``, with plain functions.

    Statistics on the validation split, the callback's default criterion for a target reduction (its ``scorer``:
    fluctuation over each layer's mean), the fewest neurons that remove ``reduction`` of the parameters; applied to a
    copy.
    """
    layers, moments, _ = gather_statistics(Evaluator(datamodule), model)
    scorer = ActivationPruning(target_params_reduction=reduction).scorer
    evaluator = ThresholdEvaluator(copy.deepcopy(model), layers, moments, scorer, min_neurons=1, normalize=True)
    choice = plan_for_reduction(evaluator, reduction)
    if choice.plan is None:
        raise RuntimeError(choice.note)
    return _applied(model, choice.plan)


def _applied(model: nn.Module, plan: PruningPlan) -> nn.Module:
    pruned = copy.deepcopy(model)
    apply_plan(pruned, plan)
    return pruned.eval()


def ours_with_recovery(
    config: TrainConfig,
    datamodule: SplitDataModule,
    checkpoint: Path,
    reduction: float,
    recovery_epochs: int,
    optimizer_state: str = "carry",
) -> tuple[MLPClassifier, EpochProbe]:
    """A fit of ``E + R`` epochs with ``ActivationPruning(target_params_reduction, recovery_epochs=R)``.

    It resumes from the base checkpoint (after ``E - 1`` epochs): epoch ``E`` trains the unpruned model, the callback
    prunes at its end, and ``R`` epochs train the smaller model with the same optimizer (its state carried, reset for
    the pruned parameters or dropped, as ``optimizer_state`` says).
    """
    model = MLPClassifier(config.sizes, config.lr)
    pruning = ActivationPruning(
        target_params_reduction=reduction,
        recovery_epochs=recovery_epochs,
        pruned_checkpoint=None,
        optimizer_state=optimizer_state,  # type: ignore[arg-type]
    )
    probe = _fit(model, datamodule, config.epochs + recovery_epochs, [pruning], ckpt_path=checkpoint)
    return model.eval(), probe


def _tp_pruned(
    model: pl.LightningModule,
    importance: str,
    global_pruning: bool,
    ratio: float,
    example: Tensor,
    grad_batches: list[Any],
) -> pl.LightningModule:
    pruned = copy.deepcopy(model)
    if importance == "taylor":  # Taylor importance reads the gradients of a few training batches (its README)
        pruned.zero_grad()
        for x, y in grad_batches:
            F.cross_entropy(pruned(x), y).backward()
    linears = [m for m in pruned.modules() if isinstance(m, nn.Linear)]
    pruner = tp.pruner.MetaPruner(
        pruned,
        example,
        importance=TP_IMPORTANCES[importance](),
        global_pruning=global_pruning,
        pruning_ratio=ratio,
        ignored_layers=[linears[-1]],
    )
    pruner.step()
    pruned.zero_grad(set_to_none=True)
    return pruned.eval()


def torch_pruning_at(
    model: pl.LightningModule,
    datamodule: SplitDataModule,
    importance: str,
    global_pruning: bool,
    reduction: float,
    grad_batches: int,
    steps: int,
) -> pl.LightningModule:
    """Torch-Pruning's ``MetaPruner`` with the smallest ``pruning_ratio`` (bisected) that removes ``reduction``."""
    if importance not in TP_IMPORTANCES:
        raise ValueError(f"`importance` can be one of {', '.join(TP_IMPORTANCES)}; got {importance!r}.")
    example = next(iter(datamodule.val_dataloader()))[0][:1]
    batches = [batch for _, batch in zip(range(grad_batches), datamodule.train_dataloader(), strict=False)]
    before = count_parameters(model)

    def prune(ratio: float) -> pl.LightningModule:
        return _tp_pruned(model, importance, global_pruning, ratio, example, batches)

    # near 1, MetaPruner would empty a layer and prunes nothing instead: bisect below that cliff
    try:
        best, _ = bisect_ratio(prune, lambda m: 1 - count_parameters(m) / before, reduction, (TP_MAX_RATIO,), steps)
    except RuntimeError as error:
        raise RuntimeError(f"Torch-Pruning ({importance}): {error}") from None
    return best


def fine_tune(model: pl.LightningModule, datamodule: SplitDataModule, epochs: int) -> EpochProbe:
    """Train a pruned copy for ``epochs`` epochs with a fresh Adam (the model's own ``configure_optimizers``)."""
    tuned = copy.deepcopy(model).train()
    return _fit(tuned, datamodule, epochs)


def from_scratch(config: TrainConfig, datamodule: SplitDataModule, widths: Sequence[int], epochs: int) -> EpochProbe:
    """An MLP with these hidden ``widths`` trained from random initialisation (same seed and recipe)."""
    pl.seed_everything(config.seed, workers=True, verbose=False)
    model = MLPClassifier((config.sizes[0], *widths, config.sizes[-1]), config.lr)
    return _fit(model, datamodule, epochs)
