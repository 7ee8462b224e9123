"""Every method compared, and the clocks that time them; each function leaves the models it is given untouched.

- the base: ``E - 1`` epochs written to a checkpoint once; every fit below resumes from it, so each costs only its
  own last epochs, and the training order of every epoch is a permutation seeded by the epoch's index
  (:class:`~.data.EpochShuffle`), which makes a resumed fit the same computation as an uninterrupted one;
- ours one-shot: the real callback, ``ActivationPruning(target_params_reduction=r)``, at the end of a ``fit`` of
  ``E`` epochs (defaults otherwise);
- ours + recovery: ``ActivationPruning(target_params_reduction=r, recovery_epochs=R)`` in a ``fit`` of ``E + R``
  epochs (the same AdamW goes on, its state sliced); with ``gqa_unit`` set, the other unit of grouped-query attention;
- ours + recovery by steps: ``ActivationPruning(target_params_reduction=r, recovery_steps=N)`` in a ``fit`` of
  ``max_steps = E·S + N`` (the prune at step ``E·S``, the end of epoch ``E``), with or without distillation
  (``distill_weight``, ``distill_temperature``); the seconds of every training step after the prune are timed;
- Torch-Pruning's LLM recipe (``examples/LLMs/prune_llm.py`` of VainF/Torch-Pruning, re-implemented here):
  ``MetaPruner`` with the attention projections' head counts (``num_heads``, ``prune_num_heads=True``,
  ``prune_head_dims=False``, ``head_pruning_ratio`` = ``pruning_ratio``), local ranking, ``round_to=4``, the LM head
  ignored, with its magnitude (``GroupMagnitudeImportance(p=2, group_reduction="mean")``) or Taylor importance; the
  ratio is bisected until the model has at most the parameters ours has; then ``R`` epochs with a fresh AdamW;
- from scratch (optional): ours' pruned architecture with fresh random weights, trained ``E + R`` epochs.
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch.utils.data import DataLoader

from benchmarks.common import quiet_trainer
from lightning_actprune import ActivationPruning
from lightning_actprune.core import PruningResult, apply_plan, count_parameters

from .data import IGNORE_INDEX, CorpusDataModule
from .model import ByteLM, ModelConfig, attention_modules, evaluate, sync_attention

TP_IMPORTANCES: dict[str, Callable[[], Any]] = {
    "magnitude": lambda: tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean"),
    "taylor": lambda: tp.importance.GroupTaylorImportance(),
}
TP_SCOPES = ("recipe", "ffn", "hidden")
"""What Torch-Pruning may prune: ``recipe`` heads and FFN neurons (its LLM recipe with the hidden size kept), ``ffn``
FFN neurons only (q, k and v ignored: the heads stay), ``hidden`` the recipe as its script runs
it (the hidden size too)."""
TP_MAX_RATIO = 0.95
"""The largest ``pruning_ratio`` tried: every layer keeps some FFN neurons and one query head per key/value head."""


class EpochClock(pl.Callback):
    """Per training epoch: seconds of its training batches (validation not timed), then, optionally, the test loss.

    Put it after :class:`~lightning_actprune.ActivationPruning` in ``callbacks``: at the prune epoch it then sees
    the pruned model. ``snapshot_epoch`` (0-based) keeps a copy of the model at that epoch's end.
    """

    def __init__(self, test_loader: DataLoader | None = None, snapshot_epoch: int | None = None) -> None:
        self.test_loader, self.snapshot_epoch = test_loader, snapshot_epoch
        self.seconds: list[float] = []
        self.test_loss: list[float] = []
        self.val_loss: list[float] = []
        self.snapshot: ByteLM | None = None
        self._started: float | None = None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._started = time.perf_counter()

    def _stop(self) -> None:
        if self._started is not None:
            self.seconds.append(time.perf_counter() - self._started)
            self._started = None

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking and "val_loss" in trainer.callback_metrics:
            self.val_loss.append(float(trainer.callback_metrics["val_loss"]))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop()
        if self.test_loader is not None:
            self.test_loss.append(evaluate(pl_module, self.test_loader))
        if trainer.current_epoch == self.snapshot_epoch:
            self.snapshot = copy.deepcopy(pl_module)  # type: ignore[assignment]


class HookTimer(pl.Callback):
    """Seconds that the callbacks between a ``HookTimer(start=True)`` and a ``HookTimer(start=False)`` spend in a hook.

    ``started`` is shared by the pair, so put the start before and the stop after the timed callbacks.
    """

    def __init__(self, hook: str, start: bool, started: list[float], seconds: list[float]) -> None:
        self.start, self.started, self.seconds = start, started, seconds
        setattr(self, hook, self._tick)

    def _tick(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *_: Any) -> None:
        if self.start:
            self.started[:] = [time.perf_counter()]
        elif self.started:
            self.seconds.append(time.perf_counter() - self.started[0])


def timed_hook(hook: str, *callbacks: pl.Callback) -> tuple[list[pl.Callback], list[float]]:
    """``callbacks`` between two :class:`HookTimer` on ``hook``, and the list their seconds go to."""
    started: list[float] = []
    seconds: list[float] = []
    return [HookTimer(hook, True, started, seconds), *callbacks, HookTimer(hook, False, started, seconds)], seconds


def _trainer(
    steps_per_epoch: int,
    epochs: int,
    callbacks: Sequence[pl.Callback],
    root: Path,
    validate: bool = True,
    max_steps: int = -1,
) -> pl.Trainer:
    return quiet_trainer(
        max_epochs=epochs,
        max_steps=max_steps,
        limit_train_batches=steps_per_epoch,
        limit_val_batches=None if validate else 0,
        callbacks=list(callbacks),
        default_root_dir=root,
    )


def train_base(
    config: ModelConfig,
    datamodule: CorpusDataModule,
    seed: int,
    epochs: int,
    steps_per_epoch: int,
    checkpoint: Path,
) -> tuple[float, bool]:
    """Write the checkpoint after ``epochs - 1`` epochs (weights, AdamW state, loop state) unless it exists.

    These epochs are not validated (validation passes cost as much as many steps); the fits that resume from the
    checkpoint are.

    Returns:
        The seconds it took, and whether the checkpoint was already there.
    """
    if checkpoint.is_file():
        return 0.0, True
    pl.seed_everything(seed, workers=True, verbose=False)
    model = ByteLM(config)
    trainer = _trainer(steps_per_epoch, epochs - 1, [], checkpoint.parent, validate=False)
    started = time.perf_counter()
    trainer.fit(model, datamodule=datamodule)
    seconds = time.perf_counter() - started
    if trainer.interrupted or trainer.global_step != (epochs - 1) * steps_per_epoch:
        # Lightning returns from an interrupted fit (Ctrl-C, SIGTERM): never cache a half-trained base
        raise RuntimeError(f"the base's training stopped at step {trainer.global_step}; no checkpoint written.")
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    trainer.save_checkpoint(checkpoint)
    return seconds, False


def fit_from(
    config: ModelConfig,
    datamodule: CorpusDataModule,
    checkpoint: Path,
    epochs: int,
    steps_per_epoch: int,
    callbacks: Sequence[pl.Callback] = (),
    max_steps: int = -1,
) -> ByteLM:
    """A full-size model resumed from the base checkpoint and trained until ``epochs`` epochs, with ``callbacks``.

    ``max_steps > 0``: until that global step instead (``epochs`` is then ``-1``: no limit).
    """
    model = ByteLM(config)
    trainer = _trainer(steps_per_epoch, epochs, callbacks, checkpoint.parent, max_steps=max_steps)
    trainer.fit(model, datamodule=datamodule, ckpt_path=checkpoint)
    return model.eval()


def ours(
    config: ModelConfig,
    datamodule: CorpusDataModule,
    checkpoint: Path,
    epochs: int,
    steps_per_epoch: int,
    reduction: float,
    recovery_epochs: int = 0,
    gqa_unit: str | None = None,
) -> tuple[ByteLM, PruningResult, EpochClock, float, list[str]]:
    """A fit with ``ActivationPruning(target_params_reduction=reduction, recovery_epochs=…)`` (defaults otherwise).

    ``gqa_unit``: the unit of grouped-query attention (``None``: the package's default, not passed).

    Returns:
        The model (eval mode), the callback's result, the epoch clock (test loss after every epoch, the prune epoch's
        after the prune), the seconds the callback spent in the hook where it pruned (a resumed fit's first epoch is
        the prune epoch), and the package's warnings.
    """
    options = {} if gqa_unit is None else {"gqa_unit": gqa_unit}
    pruning = ActivationPruning(
        target_params_reduction=reduction, recovery_epochs=recovery_epochs, pruned_checkpoint=None, **options
    )
    hook = "on_train_epoch_end" if recovery_epochs else "on_fit_end"
    timed, seconds = timed_hook(hook, pruning)
    clock = EpochClock(datamodule.test_dataloader() if recovery_epochs else None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = fit_from(config, datamodule, checkpoint, epochs + recovery_epochs, steps_per_epoch, [*timed, clock])
    messages = _package_messages(caught)
    if pruning.result is None or not pruning.result.pruned:
        raise RuntimeError(f"ActivationPruning did not prune to -{reduction:.0%}: {messages}")
    return model, pruning.result, clock, seconds[0] if recovery_epochs else seconds[-1], messages


def _package_messages(caught: Sequence[warnings.WarningMessage]) -> list[str]:
    return sorted({str(w.message) for w in caught if str(w.message).startswith("lightning_actprune")})


STEP_FIT_EPOCH_SHIFT = 1
"""How many epoch indices further Lightning (2.6) resumes a ``max_steps`` fit from the base checkpoint."""


class StepClock(pl.Callback):
    """The test loss right after a prune inside ``fit``, and the seconds of every training step after it.

    Put it after the :class:`~lightning_actprune.ActivationPruning` it watches (``pruning``): the prune happens in
    that callback's ``on_train_batch_end``, so this one sees the prune step end with the model already pruned. A
    step's seconds run from ``on_train_batch_start`` to ``on_train_batch_end`` (forward, backward, optimizer step;
    not the data loading); the prune step's own seconds (which hold the prune) are not among them.
    """

    def __init__(self, pruning: ActivationPruning, test_loader: DataLoader) -> None:
        self.pruning, self.test_loader = pruning, test_loader
        self.steps_before_prune = 0
        """Training steps of this ``fit`` up to and including the prune step."""
        self.test_loss_after_prune: float | None = None
        self.seconds: list[float] = []
        self.first_epoch: int | None = None
        """Lightning's index of the fit's first training epoch."""
        self._started = 0.0

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.first_epoch is None:
            self.first_epoch = trainer.current_epoch
        self._started = time.perf_counter()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        seconds = time.perf_counter() - self._started
        if self.test_loss_after_prune is not None:
            self.seconds.append(seconds)
            return
        self.steps_before_prune += 1
        if self.pruning.pruned_at_step is not None:  # the prune step
            self.test_loss_after_prune = evaluate(pl_module, self.test_loader)


def ours_by_steps(
    config: ModelConfig,
    datamodule: CorpusDataModule,
    checkpoint: Path,
    epochs: int,
    steps_per_epoch: int,
    reduction: float,
    recovery_steps: int,
    distill_weight: float = 0.0,
    distill_temperature: float = 2.0,
) -> tuple[ByteLM, PruningResult, StepClock, float, list[str]]:
    """A fit of ``max_steps = epochs · steps_per_epoch + recovery_steps`` with ``recovery_steps`` (and distillation).

    The prune is at step ``epochs · steps_per_epoch``, the last step of epoch ``epochs``: the same weights as the
    prune at that epoch's end, from statistics of a validation pass of the callback's own. Lightning resumes a fit
    with ``max_steps`` from a checkpoint written at an epoch's end one epoch index further than a fit with
    ``max_epochs`` (``FitLoop.restarting`` is true for iteration-based training), so the data module is shifted back
    by :data:`STEP_FIT_EPOCH_SHIFT`: every step sees the batches the epoch-based fits see (checked).

    Returns:
        The model (eval mode), the callback's result, the step clock (test loss right after the prune, seconds of
        each recovery step), the seconds the callback spent in the step where it pruned, and the package's warnings.
    """
    options = {"distill_weight": distill_weight, "distill_temperature": distill_temperature} if distill_weight else {}
    pruning = ActivationPruning(
        target_params_reduction=reduction, recovery_steps=recovery_steps, pruned_checkpoint=None, **options
    )
    timed, seconds = timed_hook("on_train_batch_end", pruning)
    clock = StepClock(pruning, datamodule.test_dataloader())
    max_steps = epochs * steps_per_epoch + recovery_steps
    shifted = datamodule.shifted(datamodule.epoch_offset - STEP_FIT_EPOCH_SHIFT)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = fit_from(config, shifted, checkpoint, -1, steps_per_epoch, [*timed, clock], max_steps=max_steps)
    messages = _package_messages(caught)
    if clock.first_epoch != epochs - 1 + STEP_FIT_EPOCH_SHIFT:
        expected = epochs - 1 + STEP_FIT_EPOCH_SHIFT
        raise RuntimeError(
            f"the step-based fit started at epoch index {clock.first_epoch}, expected {expected} (the epoch-based"
            " fits start at epochs - 1): its batches would not be theirs; adjust STEP_FIT_EPOCH_SHIFT."
        )
    if pruning.result is None or not pruning.result.pruned or clock.test_loss_after_prune is None:
        raise RuntimeError(f"ActivationPruning did not prune to -{reduction:.0%} inside the fit: {messages}")
    if len(clock.seconds) != recovery_steps:
        raise RuntimeError(f"{len(clock.seconds)} steps after the prune; expected recovery_steps={recovery_steps}.")
    return model, pruning.result, clock, seconds[clock.steps_before_prune - 1], messages


def _tp_pruned(model: ByteLM, importance: str, ratio: float, example: torch.Tensor, scope: str) -> ByteLM:
    pruned = copy.deepcopy(model)
    for copied, source in zip(pruned.parameters(), model.parameters(), strict=True):
        if source.grad is not None:  # deepcopy leaves them out; Taylor importance reads them
            copied.grad = source.grad.clone()
    net = pruned.model
    num_heads = {}
    for _, attention in attention_modules(net):
        num_heads[attention.q_proj] = attention.q_proj.out_features // attention.head_dim
        num_heads[attention.k_proj] = attention.k_proj.out_features // attention.head_dim
        num_heads[attention.v_proj] = attention.v_proj.out_features // attention.head_dim
    # the recipe ignores only the LM head and so prunes the hidden size too; ignoring the embedding keeps it; ignoring
    # q, k and v (the roots of the attention group) keeps the heads
    ignored = [net.lm_head] if scope == "hidden" else [net.lm_head, net.model.embed_tokens]
    if scope == "ffn":
        ignored += [projection for projection in num_heads if projection not in ignored]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Unwrapped parameters detected")
        pruner = tp.pruner.MetaPruner(
            net,
            example_inputs={"input_ids": example},
            importance=TP_IMPORTANCES[importance](),
            global_pruning=False,
            pruning_ratio=ratio,
            ignored_layers=ignored,
            num_heads=num_heads,
            prune_num_heads=True,
            prune_head_dims=False,
            head_pruning_ratio=ratio,
            round_to=4,
        )
        for group in pruner.step(interactive=True):
            group.prune()
    sync_attention(net)
    if scope == "hidden":
        net.config.hidden_size = net.lm_head.in_features
    pruned.zero_grad(set_to_none=True)
    return pruned.eval()


def with_taylor_gradients(model: ByteLM, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> ByteLM:
    """A copy whose parameters hold the summed gradients of the mean next-byte loss on ``batches``."""
    copied = copy.deepcopy(model).train()
    copied.zero_grad()
    for inputs, targets in batches:
        F.cross_entropy(copied(inputs).flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX).backward()
    return copied.eval()


def torch_pruning_at(
    model: ByteLM,
    importance: str,
    max_params: int,
    example: torch.Tensor,
    gradient_batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    steps: int,
    scope: str = "recipe",
) -> tuple[ByteLM, float, float, float]:
    """The recipe with a ``pruning_ratio`` (bisected) whose model has at most ``max_params`` parameters.

    ``scope``: what it may prune (:data:`TP_SCOPES`). The parameter count is not monotone in the ratio (with 4 query
    heads per key/value head, Torch-Pruning 1.6.1 removes heads up to a ratio of 0.5 and none above it), so the
    bisection finds a ratio whose count is at most ``max_params`` and, in its last interval, the closest to it.

    Returns:
        The pruned model (eval mode), its ratio, the seconds of the whole search and of one prune at that ratio.
    """
    if importance not in TP_IMPORTANCES:
        raise ValueError(f"`importance` can be one of {', '.join(TP_IMPORTANCES)}; got {importance!r}.")
    if scope not in TP_SCOPES:
        raise ValueError(f"`scope` can be one of {', '.join(TP_SCOPES)}; got {scope!r}.")
    started = time.perf_counter()
    source = with_taylor_gradients(model, gradient_batches) if importance == "taylor" else model

    def prune(ratio: float) -> ByteLM:
        return _tp_pruned(source, importance, ratio, example, scope)

    low, high = 0.0, TP_MAX_RATIO
    best = prune(high)
    if count_parameters(best) > max_params:
        raise RuntimeError(f"Torch-Pruning ({importance}) cannot go below {max_params:,} parameters.")
    for _ in range(steps):
        middle = (low + high) / 2
        candidate = prune(middle)
        if count_parameters(candidate) <= max_params:
            high, best = middle, candidate
        else:
            low = middle
    search = time.perf_counter() - started
    started = time.perf_counter()
    prune(high)
    return best, high, search, time.perf_counter() - started


def fine_tune(
    model: ByteLM, datamodule: CorpusDataModule, epochs: int, steps_per_epoch: int, root: Path
) -> tuple[ByteLM, EpochClock]:
    """Train a copy for ``epochs`` epochs with a fresh AdamW (the module's own ``configure_optimizers``)."""
    tuned = copy.deepcopy(model).train()
    clock = EpochClock()
    _trainer(steps_per_epoch, epochs, [clock], root).fit(tuned, datamodule=datamodule)
    return tuned.eval(), clock


def from_scratch(
    config: ModelConfig,
    result: PruningResult,
    datamodule: CorpusDataModule,
    seed: int,
    epochs: int,
    steps_per_epoch: int,
    root: Path,
) -> tuple[ByteLM, EpochClock]:
    """Ours' pruned architecture (the plan applied to a freshly initialised model) trained for ``epochs`` epochs."""
    pl.seed_everything(seed, workers=True, verbose=False)
    model = ByteLM(config)
    apply_plan(model, result.plan)
    clock = EpochClock()
    _trainer(steps_per_epoch, epochs, [clock], root).fit(model, datamodule=datamodule)
    return model.eval(), clock
