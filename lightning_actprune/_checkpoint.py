"""Pruned models survive: the plan travels in every checkpoint, and fresh full-size models shrink before loading.

A pruned model's class still builds the full-size layers, so its checkpoint cannot be loaded with a plain
``load_state_dict``. Every checkpoint of a pruned model therefore carries the :class:`PruningPlan` (plain ints,
floats and strings under the top-level key ``"actprune_plan"``), and every loading path shrinks a freshly built
model to that plan before the weights are copied:

- ``MyModule.load_from_checkpoint(path)``: :class:`PrunedCheckpointMixin`, or :func:`shrink_to_checkpoint`
  called from ``on_load_checkpoint`` (Lightning runs it before ``load_state_dict``);
- ``trainer.validate/test/predict(model, ckpt_path=path)``: the :class:`ActivationPruning` callback on the Trainer
  does it, or the mixin;
- plain PyTorch: :func:`load_pruned`, which also reads the files :func:`export_pruned` writes.

Everything is read with ``torch.load(..., weights_only=True)``: no module or class is ever pickled.
"""

from __future__ import annotations

import os
import warnings
import weakref
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_actprune import _lightning_compat as compat
from lightning_actprune._errors import ActivationPruningError
from lightning_actprune._huggingface import sync_pretrained_configs
from lightning_actprune._module_plan import (
    _ATTRIBUTE,
    _relative,
    _remember,
    pruning_plan_of,
)
from lightning_actprune._surgery import apply_plan, restoring
from lightning_actprune._types import PruningPlan, PruningResult, SweepRow

PLAN_KEY = "actprune_plan"
"""The top-level checkpoint key that holds :meth:`PruningPlan.to_dict` of the model in the checkpoint."""


ModuleT = TypeVar("ModuleT", bound=nn.Module)
PathLike = str | os.PathLike[str]


def _plan_in(checkpoint: Mapping[str, Any], source: str) -> PruningPlan | None:
    data = checkpoint.get(PLAN_KEY)
    if data is None:
        return None
    try:
        return PruningPlan.from_dict(data)
    except (KeyError, TypeError, ValueError) as error:
        raise ActivationPruningError(
            f"{source} has a malformed `{PLAN_KEY}` ({type(error).__name__}: {error}); it was not written by"
            " lightning_actprune."
        ) from None


def _shape_mismatches(module: nn.Module, state_dict: Mapping[str, Any]) -> list[str]:
    mismatches = []
    for name, tensor in module.state_dict().items():
        saved = state_dict.get(name)
        if isinstance(saved, Tensor) and isinstance(tensor, Tensor) and saved.shape != tensor.shape:
            mismatches.append(f"{name}: model {tuple(tensor.shape)}, checkpoint {tuple(saved.shape)}")
    return mismatches


def _fit_to_state(
    module: nn.Module,
    plan: PruningPlan | None,
    state_dict: Mapping[str, Any],
    source: str,
    pruned_checkpoint: str | None = None,
) -> PruningPlan | None:
    """Shrink ``module`` to ``plan`` when its shapes are not yet those of ``state_dict``; loads no weights."""
    name = type(module).__name__
    mismatches = _shape_mismatches(module, state_dict)
    if not mismatches:
        if plan is not None:
            _remember(module, plan)
        return plan
    shown = "; ".join(mismatches[:3]) + ("; …" if len(mismatches) > 3 else "")
    current = pruning_plan_of(module)
    if plan is None:
        if current is None:
            return None  # not a pruning matter: load_state_dict reports it
        instead = (
            f"load the pruned checkpoint {pruned_checkpoint!r} instead"
            if pruned_checkpoint
            else "load the checkpoint written after pruning (`pruned.ckpt` in the log directory) instead"
        )
        raise ActivationPruningError(
            f"{source} holds the unpruned {name} (saved before pruning; {shown}), but this {name} has been pruned:"
            f" {instead}, or load {source} into a fresh, full-size {name}."
        )
    if current is not None:
        raise ActivationPruningError(
            f"cannot load {source} into this {name}: it was already pruned differently ({shown}). Load it into a"
            f" fresh, full-size {name}."
        )
    with restoring(module, plan.touched_modules):  # the shrink stays only if it gives the checkpoint's shapes
        try:
            apply_plan(module, plan)
        except ActivationPruningError as error:
            raise ActivationPruningError(
                f"cannot shrink {name} to the pruning plan in {source}: {error} Load it into a fresh {name} built"
                " with the same arguments as the model that was pruned."
            ) from None
        mismatches = _shape_mismatches(module, state_dict)
        if mismatches:
            raise ActivationPruningError(
                f"cannot load {source} into this {name}: its pruning plan does not give the model the checkpoint's"
                f" shapes ({'; '.join(mismatches[:3])}). Was the model already pruned, or built with other"
                f" arguments? Load it into a fresh {name} built like the one that was pruned."
            )
    _remember(module, plan)
    return plan


def shrink_to_checkpoint(module: nn.Module, checkpoint: Mapping[str, Any]) -> PruningPlan | None:
    """Shrink a fresh, full-size ``module`` to the pruning plan in ``checkpoint``; call it from ``on_load_checkpoint``.

    Lightning calls ``on_load_checkpoint`` before ``load_state_dict``, so this is all a LightningModule needs for
    ``MyModule.load_from_checkpoint(path)`` and ``trainer.test(model, ckpt_path=path)`` to load a pruned
    checkpoint. It does nothing when the module already has the checkpoint's shapes or the checkpoint has no plan,
    and loads no weights.

    Args:
        module: the module the checkpoint's ``state_dict`` is for.
        checkpoint: the loaded checkpoint dict.

    Returns:
        The checkpoint's plan, or None if it has none.

    Raises:
        ActivationPruningError: the module was already pruned differently, or the checkpoint holds the unpruned
            model while ``module`` was pruned, or the plan does not fit the module; the module is left unchanged.

    Example::

        class MyModule(L.LightningModule):
            def on_load_checkpoint(self, checkpoint):
                shrink_to_checkpoint(self, checkpoint)
    """
    plan = _plan_in(checkpoint, "the checkpoint")
    plan = _fit_to_state(module, plan, checkpoint.get("state_dict", {}), "the checkpoint")
    _configs_in_step(module, plan)
    return plan


class PrunedCheckpointMixin:
    """Opt a LightningModule in to loading and saving pruned checkpoints, in one line.

    ``on_load_checkpoint`` shrinks a fresh, full-size model to the checkpoint's plan before Lightning loads the
    weights (:func:`shrink_to_checkpoint`); ``on_save_checkpoint`` writes the model's plan into every checkpoint,
    also when no :class:`ActivationPruning` is on the Trainer (fine-tuning a pruned model, weights-only saves).
    If your module overrides these hooks, call ``super()`` in them.

    Example::

        class MyModule(PrunedCheckpointMixin, L.LightningModule): ...

        model = MyModule.load_from_checkpoint("pruned.ckpt")
    """

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Shrink to the checkpoint's pruning plan; see :func:`shrink_to_checkpoint`."""
        parent = getattr(super(), "on_load_checkpoint", None)
        if parent is not None:
            parent(checkpoint)
        if not isinstance(self, nn.Module):
            raise TypeError(f"PrunedCheckpointMixin must be mixed into an nn.Module; got {type(self).__name__}.")
        shrink_to_checkpoint(self, checkpoint)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Write the model's pruning plan (if it was pruned) under ``"actprune_plan"``."""
        parent = getattr(super(), "on_save_checkpoint", None)
        if parent is not None:
            parent(checkpoint)
        plan = pruning_plan_of(self) if isinstance(self, nn.Module) else None
        if plan is not None:
            checkpoint[PLAN_KEY] = plan.to_dict()


def export_pruned(module: nn.Module, path: PathLike, *, plan: PruningPlan | None = None, submodule: str = "") -> None:
    """Write ``module``'s ``state_dict`` and pruning plan to one file, for deployment without Lightning.

    The file is a dict ``{"state_dict": ..., "actprune_plan": ...}`` of tensors and plain values:
    :func:`load_pruned` (or ``torch.load(path, weights_only=True)``) reads it back.

    Args:
        module: a pruned module (or one that was never pruned: the file then holds no plan).
        path: the file to write.
        plan: the plan from the full-size model; default: the one recorded on ``module``
            (:func:`pruning_plan_of`).
        submodule: export only this submodule of ``module`` (e.g. ``"net"``), with names relative to it.

    Raises:
        ActivationPruningError: ``submodule`` does not exist.

    Example:
        >>> import tempfile, torch
        >>> from lightning_actprune.core import ModulePruning, PruningPlan
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        >>> plan = PruningPlan(0.1, "mean", (), (ModulePruning("0", "out", (1, 2)), ModulePruning("2", "in", (1, 2))))
        >>> apply_plan(model, plan)
        >>> path = tempfile.mkdtemp() + "/model.pt"
        >>> export_pruned(model, path, plan=plan)
        >>> fresh = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        >>> load_pruned(fresh, path)[0].weight.shape
        torch.Size([2, 3])
    """
    plan = plan if plan is not None else pruning_plan_of(module)
    if submodule:
        try:
            target = module.get_submodule(submodule)
        except AttributeError:
            raise ActivationPruningError(
                f"`submodule` must name a submodule of {type(module).__name__}; got {submodule!r}."
            ) from None
    else:
        target = module
    payload: dict[str, Any] = {"state_dict": target.state_dict()}
    if plan is not None:
        payload[PLAN_KEY] = _relative(plan, submodule).to_dict()
    torch.save(payload, path)


def load_pruned(
    module: ModuleT,
    path: PathLike,
    *,
    submodule: str = "",
    strict: bool = True,
    map_location: str | torch.device | None = "cpu",
) -> ModuleT:
    """Shrink a freshly built, full-size ``module`` to the plan in ``path`` and load the weights; plain PyTorch.

    Reads the files :func:`export_pruned` writes and any Lightning checkpoint of a pruned model (e.g. the
    ``pruned.ckpt`` that :class:`ActivationPruning` writes), with ``torch.load(..., weights_only=True)``.
    A file without a plan loads like ``load_state_dict``.

    Args:
        module: a new instance of the class that was pruned, built with the same arguments.
        path: the file.
        submodule: ``module`` is this submodule of the model that was saved (e.g. load the ``"net"`` of a
            LightningModule's checkpoint into a bare ``nn.Sequential``).
        strict: passed to ``load_state_dict``.
        map_location: passed to ``torch.load``.

    Returns:
        ``module``, pruned and loaded.

    Raises:
        ActivationPruningError: the file holds no ``state_dict``, the plan does not fit ``module``, or ``module``
            was already pruned differently; ``module`` is left unchanged.

    Example::

        model = load_pruned(MyNet(), "pruned.pt")
        net = load_pruned(MyNet(), "runs/version_0/pruned.ckpt", submodule="net")
    """
    checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    source = repr(os.fspath(path))
    if isinstance(checkpoint, Mapping) and all(isinstance(v, Tensor) for v in checkpoint.values()):
        checkpoint = {"state_dict": checkpoint}  # a bare state_dict
    if not isinstance(checkpoint, Mapping) or not isinstance(checkpoint.get("state_dict"), Mapping):
        found = sorted(checkpoint) if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
        raise ActivationPruningError(f"{source} holds no `state_dict`; found {found}.")
    state_dict = dict(checkpoint["state_dict"])
    plan = _plan_in(checkpoint, source)
    if submodule:
        prefix = submodule + "."
        state_dict = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if not state_dict:
            raise ActivationPruningError(f"`submodule` {submodule!r} matches no weight in {source}.")
        plan = _relative(plan, submodule) if plan is not None else None
    # all or nothing: a load that fails after the shrinking leaves the module as it came
    remembered = module.__dict__.get(_ATTRIBUTE)
    try:
        with restoring(module, plan.touched_modules if plan is not None else ()):
            _fit_to_state(module, plan, state_dict, source)
            module.load_state_dict(state_dict, strict=strict)
    except BaseException:
        module.__dict__.pop(_ATTRIBUTE, None)
        if remembered is not None:
            module.__dict__[_ATTRIBUTE] = remembered
        raise
    _configs_in_step(module, plan)
    return module


def _configs_in_step(module: nn.Module, plan: PruningPlan | None) -> None:
    """After a shrink to ``plan``: the Hugging Face models inside ``module`` get configs that state their widths."""
    if plan is None:
        return
    try:
        sync_pretrained_configs(module)
    except Exception as error:  # the weights are loaded: a config left behind is a warning, never a failed load
        warnings.warn(
            f"lightning_actprune: the pruned model loaded, but its config was not updated: {error!r}", stacklevel=3
        )


# ---- the callback's side: writing, guarding the Trainer's loading, its own state ----------------------------


def _add_plan(checkpoint: dict[str, Any], trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """Put the model's plan in a checkpoint; drop optimizer states that belong to the unpruned parameters."""
    plan = pruning_plan_of(pl_module)
    if plan is None:
        return
    checkpoint[PLAN_KEY] = plan.to_dict()
    # After pruning at the end of fit, the Trainer's optimizers still hold the unpruned parameters: their state
    # cannot be restored into an optimizer of the pruned model.
    current = {id(p) for p in pl_module.parameters()}
    stale = any(id(p) not in current for o in trainer.optimizers for g in o.param_groups for p in g["params"])
    if stale:
        checkpoint.pop("optimizer_states", None)
        checkpoint.pop("lr_schedulers", None)


def _save_pruned_checkpoint(trainer: pl.Trainer, pl_module: pl.LightningModule, filename: str) -> str:
    """Write a weights-only Lightning checkpoint of the pruned model with its plan; returns the path."""
    directory = trainer.log_dir or trainer.default_root_dir
    path = os.path.join(directory, filename)
    # `trainer.save_checkpoint(weights_only=True)` skips the callbacks' `on_save_checkpoint`, where the plan is
    # added; the optimizer states of the unpruned parameters are not worth saving.
    checkpoint = compat.dump_checkpoint(trainer, weights_only=True)
    _add_plan(checkpoint, trainer, pl_module)
    trainer.strategy.save_checkpoint(checkpoint, path)  # writes on global rank zero only
    trainer.strategy.barrier("ActivationPruning.save_pruned_checkpoint")
    return path


def _watch_loading(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    pruned_checkpoint: Callable[[], str | None],
    full_size: Callable[[nn.Module, Mapping[str, Any]], None] | None = None,
) -> RemovableHandle:
    """Before the Trainer loads a checkpoint into ``pl_module``: shrink it to the checkpoint's plan, or explain.

    ``full_size(module, checkpoint)`` is called first, while the fresh module still has its full size (the teacher of
    a distillation is rebuilt from it).
    """
    trainer_ref, watched = weakref.ref(trainer), weakref.ref(pl_module)

    def before_load(module: nn.Module, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
        trainer = trainer_ref()
        if prefix or trainer is None or module is not watched():  # a copy of the module carries the hook too
            return
        checkpoint = compat.loaded_checkpoint(trainer)
        saved = checkpoint.get("state_dict") if checkpoint else None
        if not isinstance(saved, Mapping) or saved.keys() != state_dict.keys():
            return  # not the Trainer restoring this checkpoint into the model
        source = f"checkpoint {os.fspath(trainer.ckpt_path)!r}" if trainer.ckpt_path else "the checkpoint"
        plan = _plan_in(checkpoint, source)
        if plan is not None and trainer.state.fn == TrainerFn.FITTING and "optimizer_states" not in checkpoint:
            raise ActivationPruningError(
                f"{source} holds a pruned model without optimizer state, so `fit` cannot resume from it. To"
                f" fine-tune the pruned model, load it (`{type(module).__name__}.load_from_checkpoint` with"
                " PrunedCheckpointMixin, or `load_pruned`) and call `trainer.fit(model)` without `ckpt_path`."
            )
        if full_size is not None:
            full_size(module, checkpoint)
        _configs_in_step(module, _fit_to_state(module, plan, state_dict, source, pruned_checkpoint()))

    return pl_module.register_load_state_dict_pre_hook(before_load)


def _legacy_state(callback: Callback, trainer: pl.Trainer, checkpoint: Mapping[str, Any]) -> dict[str, Any] | None:
    """The state 0.1.0 saved under the class name, if it is ``callback``'s and its own key holds none.

    Lightning looks only under :attr:`Callback.state_key` (its fallback, ``_legacy_state_key``, is the class object
    of checkpoints older than 1.5). The old entry belongs to ``callback`` when it is the only instance of its class on
    the Trainer, or else when it was written with the same ``layers`` and ``exclude``.
    """
    states = checkpoint.get("callbacks") or {}
    state = states.get(type(callback).__qualname__)
    if callback.state_key in states or not isinstance(state, dict):
        return None
    # `Trainer.callbacks` is public but set in `__init__` without an annotation
    alone = sum(type(other) is type(callback) for other in getattr(trainer, "callbacks", [])) == 1
    layers, exclude = getattr(callback, "layers", None), getattr(callback, "exclude", [])
    same = state.get("layers") == layers and (state.get("exclude") or []) == exclude
    return state if alone or same else None


def _floats(values: Mapping[str, Any]) -> dict[str, float]:
    return {str(k): float(v) for k, v in values.items()}


def _result_state(result: PruningResult | None) -> dict[str, Any] | None:
    if result is None:
        return None
    return {
        "params_before": int(result.params_before),
        "params_after": int(result.params_after),
        "size_mb_before": float(result.size_mb_before),
        "size_mb_after": float(result.size_mb_after),
        "metrics_before": _floats(result.metrics_before),
        "metrics_after": _floats(result.metrics_after),
        "metrics_pruned": _floats(result.metrics_pruned),
        "metrics_recovered": _floats(result.metrics_recovered),
        "chosen_by": str(result.chosen_by),
        "sweep": [
            {
                "threshold": float(row.threshold),
                "params": int(row.params),
                "params_kept": float(row.params_kept),
                "size_mb": float(row.size_mb),
                "neurons": {str(k): int(v) for k, v in row.neurons.items()},
                "metrics": _floats(row.metrics),
                "target": None if row.target is None else float(row.target),
            }
            for row in result.sweep
        ],
    }


def _result_from_state(plan: Mapping[str, Any] | None, numbers: Mapping[str, Any] | None) -> PruningResult | None:
    if plan is None or numbers is None:
        return None  # no pruning yet, or written before the callback saved its result's numbers
    return PruningResult(
        plan=PruningPlan.from_dict(plan),
        params_before=int(numbers["params_before"]),
        params_after=int(numbers["params_after"]),
        size_mb_before=float(numbers["size_mb_before"]),
        size_mb_after=float(numbers["size_mb_after"]),
        metrics_before=_floats(numbers.get("metrics_before", {})),
        metrics_after=_floats(numbers.get("metrics_after", {})),
        metrics_pruned=_floats(numbers.get("metrics_pruned", {})),
        metrics_recovered=_floats(numbers.get("metrics_recovered", {})),
        sweep=tuple(SweepRow(**row) for row in numbers.get("sweep", ())),
        chosen_by=str(numbers.get("chosen_by", "threshold")),
    )
