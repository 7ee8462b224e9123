"""Every method the quality benchmark compares; each leaves the model it is given untouched (it prunes a deep copy).

- ours one-shot: the package's plain functions, as ``ActivationPruning(target_params_reduction=r)`` prunes at the
  end of ``fit`` (the default criterion), and the criterion it replaced (per-layer standardised fluctuation);
- ours + recovery: the real callback with ``prune_on: fit_start`` in a ``fit`` of the recovery epochs, with or
  without distillation from the unpruned model;
- after a one-shot prune of a BatchNorm network, its statistics re-estimated on 20 training batches, as the callback
  does by default (for Torch-Pruning's prune too);
- Torch-Pruning as its timm ViT example prunes (``examples/transformers/prune_timm_vit.py``): ``MetaPruner`` with
  the attention's head counts (``num_heads``, head dimensions pruned, ``round_to=2``), the classifier's outputs
  ignored, so the embedding width, head dimensions and FFN width all shrink (an MLP: its hidden widths); Taylor (10
  batches of gradients) or L2 magnitude, global or uniform, ``pruning_ratio`` bisected to the same parameter count;
  then the same epochs of fine-tuning with a fresh Adam;
- from scratch: our pruned architecture, randomly initialised, trained as long as the base plus the recovery.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from benchmarks.common import (
    Evaluator,
    SplitDataModule,
    bisect_ratio,
    gather_statistics,
    quiet_trainer,
    recalibrated,
)
from lightning_actprune import ActivationPruning
from lightning_actprune.core import (
    ThresholdEvaluator,
    apply_plan,
    count_parameters,
    plan_for_reduction,
)

from .models import QualityConfig, build

CRITERIA: dict[str, tuple[Any, bool]] = {
    "default": (None, True),  # the callback's: DefaultCriterion, on its own scale
    "standardised fluctuation": ("fluctuation", True),  # the default before issue 21: z-scores per layer
}
"""Our criteria: ``statistic`` (None: the callback's default) and ``normalize``."""

TP_IMPORTANCES: dict[str, Callable[[], Any]] = {
    "taylor": lambda: tp.importance.GroupTaylorImportance(),
    "l2": lambda: tp.importance.GroupMagnitudeImportance(p=2),
}
RECALIBRATION_BATCHES = 20
"""Training batches BatchNorm statistics are re-estimated on after a one-shot prune (the callback's default)."""
TP_GRADIENT_BATCHES = 10
"""Batches of gradients Taylor importance reads (the example's ``--taylor_batchs`` default)."""
TP_RATIO_STEPS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
TP_BISECTION_STEPS = 8


def widths(model: nn.Module) -> str:
    """What a network kept, as text.

    A ViT's embedding width and ``heads×head_dim/FFN`` per block, a CNN's convolutions' output channels, an MLP's
    hidden widths.
    """
    if not hasattr(model, "vit") and any(isinstance(m, nn.Conv2d) for m in model.modules()):
        return "-".join(str(m.out_channels) for m in model.modules() if isinstance(m, nn.Conv2d))
    if not hasattr(model, "vit"):
        return "-".join([str(m.out_features) for m in model.modules() if isinstance(m, nn.Linear)][:-1])
    vit = model.vit
    blocks = [
        f"{b.attn.num_heads}×{b.attn.head_dim}/{b.mlp.fc1.out_features}"
        for b in vit.blocks  # type: ignore[union-attr]
    ]
    return f"d{vit.cls_token.shape[-1]} " + " ".join(blocks)


def ours_one_shot(
    model: nn.Module, data: SplitDataModule, reductions: list[float], criterion: str, residual: bool = False
) -> dict[float, nn.Module]:
    """Ours with plain functions at each reduction: one statistics pass, one plan per target, applied to copies.

    ``residual``: residual channels compete too (``prune_residual: true``).
    """
    statistic, normalize = CRITERIA[criterion]
    scorer = ActivationPruning(target_params_reduction=0.5, statistic=statistic, normalize=normalize).scorer
    layers, moments, _ = gather_statistics(Evaluator(data), model, prune_residual=residual)
    evaluator = ThresholdEvaluator(copy.deepcopy(model), layers, moments, scorer, min_neurons=1, normalize=normalize)
    pruned = {}
    for reduction in reductions:
        choice = plan_for_reduction(evaluator, reduction)
        if choice.plan is None:
            raise RuntimeError(choice.note)
        pruned[reduction] = copy.deepcopy(model)
        apply_plan(pruned[reduction], choice.plan)
        pruned[reduction] = with_batchnorm_recalibrated(pruned[reduction].eval(), data)
    return pruned


def with_batchnorm_recalibrated(model: nn.Module, data: SplitDataModule) -> nn.Module:
    """``model`` with its BatchNorm statistics re-estimated, as the callback does after a prune by default.

    ``recalibration_batches: 20`` training batches; a network without BatchNorm is returned as it is.
    """
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return model
    return recalibrated(model, data.train_dataloader(), RECALIBRATION_BATCHES)[0]


class EpochTimer(pl.Callback):
    """Seconds of each training epoch (training batches only)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._start = 0.0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.seconds.append(time.perf_counter() - self._start)


def ours_recovered(
    model: nn.Module,
    data: SplitDataModule,
    reduction: float,
    epochs: int,
    distill_weight: float,
    residual: bool = False,
) -> tuple[nn.Module, list[float]]:
    """``ActivationPruning(target_params_reduction=r, prune_on="fit_start", distill_weight=w)`` in a fit of ``epochs``.

    ``residual``: with ``prune_residual: true``.

    Returns:
        The recovered model (eval mode) and the seconds of each training epoch.
    """
    student = copy.deepcopy(model).train()
    pruning = ActivationPruning(
        target_params_reduction=reduction,
        prune_on="fit_start",
        distill_weight=distill_weight,
        pruned_checkpoint=None,
        prune_residual=residual,
    )
    timer = EpochTimer()
    quiet_trainer(max_epochs=epochs, callbacks=[pruning, timer]).fit(student, datamodule=data)
    if not pruning.result or not pruning.result.pruned:
        raise RuntimeError(f"the callback did not prune at {reduction:.0%}")
    return student.eval(), timer.seconds


def _set_head_counts(model: nn.Module, pruner: tp.pruner.MetaPruner) -> None:
    """What the example does after ``pruner.step()``: each attention's head count and width from its ``qkv``."""
    attention = _attention_type()
    for module in model.modules():
        if isinstance(module, attention):
            module.num_heads = pruner.num_heads[module.qkv]
            module.head_dim = module.qkv.out_features // (3 * module.num_heads)
            module.attn_dim = module.num_heads * module.head_dim


def _attention_type() -> type:
    try:
        from timm.models.vision_transformer import Attention
    except ImportError:  # only the ViT needs timm
        return type(None)
    return Attention


def _tp_pruned(model: nn.Module, importance: str, global_pruning: bool, ratio: float, grads: bool) -> nn.Module:
    attention = _attention_type()
    pruned = copy.deepcopy(model)  # a deep copy leaves the gradients behind: Taylor importance reads them
    for copied, original in zip(pruned.parameters(), model.parameters(), strict=True):
        copied.grad = original.grad.clone() if grads and original.grad is not None else None
    num_heads = {m.qkv: m.num_heads for m in pruned.modules() if isinstance(m, attention)}
    pruner = tp.pruner.MetaPruner(
        pruned,
        torch.zeros(1, 784),
        importance=TP_IMPORTANCES[importance](),
        global_pruning=global_pruning,
        pruning_ratio=ratio,
        ignored_layers=[[m for m in pruned.modules() if isinstance(m, nn.Linear)][-1]],  # the classifier
        num_heads=num_heads,
        prune_head_dims=True,
        prune_num_heads=False,
        round_to=2,
    )
    pruner.step()
    _set_head_counts(pruned, pruner)
    pruned.zero_grad(set_to_none=True)
    return pruned.eval()


def torch_pruning_at(
    model: nn.Module, data: SplitDataModule, importance: str, global_pruning: bool, reduction: float
) -> tuple[nn.Module, float]:
    """Torch-Pruning's recipe with the smallest ``pruning_ratio`` (bisected) that removes ``reduction``.

    Returns:
        The pruned copy (eval mode) and the ratio.
    """
    source = copy.deepcopy(model)
    if importance == "taylor":  # gradients of a few training batches, kept on the copy every prune starts from
        source.zero_grad()
        for _, (x, y) in zip(range(TP_GRADIENT_BATCHES), data.train_dataloader(), strict=False):
            F.cross_entropy(source(x), y).backward()
    before = count_parameters(model)

    def prune(ratio: float) -> nn.Module:
        return _tp_pruned(source, importance, global_pruning, ratio, grads=importance == "taylor")

    try:
        pruned, ratio = bisect_ratio(
            prune, lambda m: 1 - count_parameters(m) / before, reduction, TP_RATIO_STEPS, TP_BISECTION_STEPS
        )
    except RuntimeError as error:
        raise RuntimeError(f"Torch-Pruning ({importance}): {error}") from None
    return with_batchnorm_recalibrated(pruned, data), ratio


def fine_tuned(model: nn.Module, data: SplitDataModule, epochs: int) -> tuple[nn.Module, list[float]]:
    """A copy trained ``epochs`` more epochs with a fresh Adam (the model's own ``configure_optimizers``)."""
    tuned = copy.deepcopy(model).train()
    timer = EpochTimer()
    quiet_trainer(max_epochs=epochs, callbacks=[timer]).fit(tuned, datamodule=data)  # type: ignore[arg-type]
    return tuned.eval(), timer.seconds


def from_scratch(pruned: nn.Module, config: QualityConfig, data: SplitDataModule, epochs: int) -> nn.Module:
    """``pruned``'s architecture (every shape kept), randomly initialised and trained ``epochs`` epochs."""
    pl.seed_everything(config.seed, workers=True, verbose=False)
    fresh = copy.deepcopy(pruned)
    reference = build(config)  # the same initialisation scheme, cut to the pruned shapes
    with torch.no_grad():
        for parameter, initial in zip(fresh.parameters(), reference.parameters(), strict=True):
            parameter.copy_(initial[tuple(slice(0, n) for n in parameter.shape)])
        for module in fresh.modules():  # nothing learnt survives: BatchNorm statistics start again too
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.reset_running_stats()
    quiet_trainer(max_epochs=epochs).fit(fresh.train(), datamodule=data)  # type: ignore[arg-type]
    return fresh.eval()
