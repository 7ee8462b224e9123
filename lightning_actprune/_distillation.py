"""Distillation from the unpruned model while the pruned one trains on (recovery).

The teacher is a frozen copy, in eval mode and on the same device, of the module the training step calls (the
outermost one; the last when it calls several), taken just before the prune. Each time the pruned module runs in
training, the teacher runs on the same inputs without gradients, and ``weight × T² × KL(teacher ‖ student)`` of the
outputs softened by the temperature ``T`` joins the loss: added to what ``training_step`` returns (automatic
optimization) or to the loss given to ``manual_backward`` (manual optimization). Gradient accumulation, mixed
precision and DDP need nothing else: the term is part of the loss Lightning scales, and every rank holds a teacher.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_actprune._config import PruningSettings
from lightning_actprune._errors import ActivationPruningError
from lightning_actprune._statistics import map_tensors
from lightning_actprune._types import model_size_mb

TEACHER_KEY = "actprune_teacher"
"""Where a checkpoint of the recovery keeps the teacher: its module name and weights (plain tensors)."""


def distilled_tensor(output: Any, field: str | None) -> Tensor:
    """The tensor to distil from a module's output: the ``field`` of a structure, or the output / its ``logits``."""
    if field is not None:
        value = output.get(field) if isinstance(output, Mapping) else getattr(output, field, None)
        if not isinstance(value, Tensor):
            raise ActivationPruningError(
                f"`distill_output={field!r}` names no tensor of the output, a {type(output).__name__}"
                f"{' with keys ' + ', '.join(map(str, output)) if isinstance(output, Mapping) else ''}."
            )
        return value
    if isinstance(output, Tensor):
        return output
    logits = output.get("logits") if isinstance(output, Mapping) else getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    tensors: list[Tensor] = []

    def collect(tensor: Tensor) -> Tensor:
        tensors.append(tensor)
        return tensor

    map_tensors(collect, _as_containers(output))
    if not tensors:
        raise ActivationPruningError(
            f"the output to distil is a {type(output).__name__} with no tensor; name one with `distill_output`."
        )
    return tensors[0]


def _as_containers(output: Any) -> Any:
    """Nested tuples, lists and dicts of ``output`` (a dataclass such as a ``ModelOutput`` as a dict)."""
    if dataclasses.is_dataclass(output) and not isinstance(output, type):
        return {f.name: _as_containers(getattr(output, f.name)) for f in dataclasses.fields(output)}
    return output


def distillation_loss(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """``T² · KL(softmax(teacher / T) ‖ softmax(student / T))`` over the last dimension, averaged over the rest.

    Example:
        >>> logits = torch.tensor([[2.0, 0.0, -1.0]])
        >>> float(distillation_loss(logits, logits, temperature=2.0))
        0.0
    """
    if student.shape != teacher.shape:
        raise ActivationPruningError(
            f"the pruned model's output {tuple(student.shape)} and the teacher's {tuple(teacher.shape)} differ: the"
            " output to distil must keep its shape (name another with `distill_output`)."
        )
    s = student.float().reshape(-1, student.shape[-1]) / temperature
    t = teacher.float().reshape(-1, teacher.shape[-1]) / temperature
    kl = F.kl_div(F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1), log_target=True, reduction="batchmean")
    return kl * temperature**2


def frozen_copy(module: nn.Module, trainer: pl.Trainer | None) -> nn.Module:
    """A copy of ``module`` for inference only: eval mode, no gradients; the Trainer it refers to is not copied."""
    memo = {} if trainer is None else {id(trainer): trainer}
    teacher = copy.deepcopy(module, memo)
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


class Distillation:
    """A teacher attached to the module it teaches: its hook computes the term, wrappers add it to the loss.

    Args:
        teacher: the frozen copy of ``root`` as it was before the prune.
        root: the name of the taught module inside the LightningModule (``""``: the LightningModule itself).
        weight: the term's weight.
        temperature: the softening temperature.
        field: the output field to distil (see :func:`distilled_tensor`).
    """

    def __init__(self, teacher: nn.Module, root: str, weight: float, temperature: float, field: str | None) -> None:
        self.teacher, self.root = teacher, root
        self.weight, self.temperature, self.field = weight, temperature, field
        self._pending: list[Tensor] = []
        self._handles: list[RemovableHandle] = []
        self._wrapped: list[tuple[nn.Module, str]] = []
        self._module: pl.LightningModule | None = None

    @property
    def attached(self) -> bool:
        """Whether it is teaching (between :meth:`attach` and :meth:`detach`)."""
        return bool(self._handles)

    @property
    def memory_mb(self) -> float:
        """The teacher's parameters and buffers, in MB."""
        return model_size_mb(self.teacher)

    def attach(self, pl_module: pl.LightningModule) -> None:
        """Start teaching ``pl_module``'s module ``root``."""
        self.teacher.to(next((p.device for p in pl_module.parameters()), torch.device("cpu")))
        student = pl_module.get_submodule(self.root)
        self._handles.append(student.register_forward_hook(self._teach, with_kwargs=True))
        self._module = pl_module
        name = "training_step" if pl_module.automatic_optimization else "manual_backward"
        original = getattr(pl_module, name)
        wrapper = self._adding_to_returned_loss(original) if name == "training_step" else self._adding_to_loss(original)
        setattr(pl_module, name, wrapper)  # an instance attribute: Lightning looks the hook up on the instance
        self._wrapped.append((pl_module, name))

    def detach(self) -> None:
        """Stop teaching; the teacher is released."""
        for handle in self._handles:
            handle.remove()
        for module, name in self._wrapped:
            vars(module).pop(name, None)
        self._handles, self._wrapped, self._pending, self._module = [], [], [], None
        self.teacher = nn.Module()

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps: the module name and the teacher's weights, as plain tensors."""
        return {"root": self.root, "state_dict": self.teacher.state_dict()}

    def _teach(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        if not module.training or not torch.is_grad_enabled():  # validation, inference: no teaching
            return
        with torch.no_grad():
            taught = self.teacher(*args, **kwargs)
        student, teacher = distilled_tensor(output, self.field), distilled_tensor(taught, self.field)
        self._pending.append(self.weight * distillation_loss(student, teacher, self.temperature))

    def _take(self) -> Tensor | None:
        """The term of this step (the sum over the taught module's calls), logged as ``actprune/distillation``."""
        pending, self._pending = self._pending, []
        if not pending:
            return None
        term = torch.stack(pending).sum()
        if self._module is not None:
            self._module.log("actprune/distillation", term.detach(), on_step=True, on_epoch=True)
        return term

    def _adding_to_returned_loss(self, training_step: Any) -> Any:
        @functools.wraps(training_step)
        def step(*args: Any, **kwargs: Any) -> Any:
            output = training_step(*args, **kwargs)
            term = self._take()
            if term is None or output is None:
                return output
            if isinstance(output, Tensor):
                return output + term
            if isinstance(output, Mapping) and isinstance(output.get("loss"), Tensor):
                return {**output, "loss": output["loss"] + term}
            raise ActivationPruningError(
                "`distill_weight` adds to the loss `training_step` returns; it returned a"
                f" {type(output).__name__} without a tensor `loss`."
            )

        return step

    def _adding_to_loss(self, manual_backward: Any) -> Any:
        @functools.wraps(manual_backward)
        def backward(loss: Tensor, *args: Any, **kwargs: Any) -> None:
            term = self._take()
            manual_backward(loss if term is None else loss + term, *args, **kwargs)

        return backward


class Teaching:
    """The teacher of one ``fit``'s recovery: prepared before the prune or restored from a checkpoint, then released.

    Args:
        settings: ``distill_weight`` (0: no teaching), ``distill_temperature``, ``distill_output``.
    """

    def __init__(self, settings: PruningSettings) -> None:
        self.settings = settings
        self.distillation: Distillation | None = None

    def prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule, called: list[str]) -> None:
        """Just before a prune: the module the training step calls (``called``'s last), frozen as it is now."""
        if not self.settings.distill_weight:
            return
        root = (called or [""])[-1]
        self.distillation = self._distillation(frozen_copy(pl_module.get_submodule(root), trainer), root)

    def restore(self, trainer: pl.Trainer, module: nn.Module, checkpoint: Mapping[str, Any]) -> None:
        """On loading a checkpoint of the recovery into a fresh, full-size model: its teacher comes back."""
        state = checkpoint.get(TEACHER_KEY)
        if state is None or not self.settings.distill_weight or trainer.state.fn != TrainerFn.FITTING:
            return
        teacher = frozen_copy(module.get_submodule(state["root"]), trainer)
        teacher.load_state_dict(state["state_dict"])
        self.distillation = self._distillation(teacher, state["root"])

    def start(self, pl_module: pl.LightningModule) -> None:
        """Teach ``pl_module`` with the prepared or restored teacher, saying what it costs; nothing if there is none."""
        distillation = self.distillation
        if distillation is None or distillation.attached:
            return
        distillation.attach(pl_module)
        taught = f"`{distillation.root}`" if distillation.root else type(pl_module).__name__
        rank_zero_info(
            f"ActivationPruning: the unpruned {taught} teaches the pruned one (distill_weight="
            f"{self.settings.distill_weight:g}, T={self.settings.distill_temperature:g}); the teacher holds"
            f" {distillation.memory_mb:.3g} MB until the end of fit."
        )

    def save(self, checkpoint: dict[str, Any]) -> None:
        """Put the teacher in a checkpoint written while it teaches."""
        if self.distillation is not None and self.distillation.attached:
            checkpoint[TEACHER_KEY] = self.distillation.state()

    def stop(self) -> None:
        """Release the teacher (the end of ``fit``, teardown, an exception)."""
        distillation, self.distillation = self.distillation, None
        if distillation is not None and distillation.attached:
            memory = distillation.memory_mb
            distillation.detach()
            rank_zero_info(f"ActivationPruning: distillation ended; the teacher's {memory:.3g} MB are released.")

    def _distillation(self, teacher: nn.Module, root: str) -> Distillation:
        settings = self.settings
        return Distillation(
            teacher, root, settings.distill_weight, settings.distill_temperature, settings.distill_output
        )
