"""Removing neurons for real: weight matrices shrink, with Torch-Pruning's per-layer pruners."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from lightning_actprune._errors import ActivationPruningError
from lightning_actprune._gc import collection_paused_during
from lightning_actprune._grn import rescale_response_norms, response_norm_channels
from lightning_actprune._heads import attribute_holders, head_pruner, heads_snapshot, sync_head_counts
from lightning_actprune._recurrent import add_to_bias as add_to_recurrent_bias
from lightning_actprune._recurrent import refresh_flat_weights
from lightning_actprune._residual import keep_layer_norm_widths, layer_norm_widths, rescale_rms_norms, rms_norm_widths
from lightning_actprune._torch_pruning import module_pruner
from lightning_actprune._types import PruningPlan


def _submodule(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ActivationPruningError(f"the plan prunes {name!r}, which {type(model).__name__} does not have.") from None


def _found(modules: Mapping[str, nn.Module], model: nn.Module, name: str) -> nn.Module:
    """``name`` from ``dict(model.named_modules(remove_duplicate=False))``, else as :func:`_submodule` finds it."""
    module = modules.get(name)
    return module if module is not None else _submodule(model, name)


class ModuleSnapshot:
    """The exact state of some modules (parameter and buffer objects, size attributes), to restore on failure.

    The original tensors are kept by reference, not copied: pruning replaces them with smaller ones and never
    writes into them, so restoring puts back the very objects an optimizer or a tied module still holds. The
    attention modules whose head counts follow the named projections are snapshotted with them.

    Args:
        model: the model.
        names: names of the modules to snapshot.
    """

    def __init__(self, model: nn.Module, names: Iterable[str]) -> None:
        self._saved: list[tuple[nn.Module, type[nn.Module], dict[str, Any], dict[str, Any], dict[str, Any]]] = []
        names = list(names)
        holders = attribute_holders(model, names)
        modules = dict(model.named_modules(remove_duplicate=False))  # one walk, not one lookup per name
        for name in dict.fromkeys([*names, *holders]):
            module = _found(modules, model, name)
            attributes = {k: v for k, v in vars(module).items() if not k.startswith("_")}
            saved = (module, type(module), dict(module._parameters), dict(module._buffers), attributes)
            self._saved.append(saved)
        self._heads = [heads_snapshot(_found(modules, model, name)) for name in holders]

    def restore(self) -> None:
        """Put every snapshotted module back exactly as it was."""
        for module, kind, parameters, buffers, attributes in self._saved:
            module.__class__ = kind  # a pruned nn.MultiheadAttention changes class
            module._parameters.clear()
            module._parameters.update(parameters)
            module._buffers.clear()
            module._buffers.update(buffers)
            for added in [k for k in vars(module) if not k.startswith("_") and k not in attributes]:
                del vars(module)[added]  # set by the surgery (a pruned LayerNorm's `full_width`)
            vars(module).update(attributes)
            if isinstance(module, nn.RNNBase):  # it runs on a list of its weights, which must follow them
                refresh_flat_weights(module)
        for heads in self._heads:  # the heads' state and the hook that cuts per-head inputs
            heads.restore()


@contextmanager
def restoring(model: nn.Module, names: Iterable[str], always: bool = False) -> Iterator[ModuleSnapshot]:
    """Run a block that changes some modules; put them back exactly if it fails (or, with ``always``, in any case).

    The one "change, then restore" primitive: a temporary prune, a surgery that must be all-or-nothing, a
    BatchNorm recalibration that is only measured.

    Args:
        model: the model.
        names: the modules the block may change.
        always: restore after a successful block too.

    Yields:
        The snapshot (its :meth:`ModuleSnapshot.restore` may also be called inside the block).
    """
    snapshot = ModuleSnapshot(model, names)
    try:
        yield snapshot
    except BaseException:
        snapshot.restore()
        raise
    if always:
        snapshot.restore()


@contextmanager
def pruned_temporarily(model: nn.Module, plan: PruningPlan) -> Iterator[None]:
    """Inside the block ``model`` is pruned by ``plan``; afterwards it is exactly the model it was.

    Example:
        >>> from lightning_actprune._types import ModulePruning
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> plan = PruningPlan(0.1, "mean", (), (ModulePruning("0", "out", (0,)), ModulePruning("2", "in", (0,))))
        >>> with pruned_temporarily(net, plan):
        ...     inside = net[0].out_features
        >>> inside, net[0].out_features
        (3, 4)
    """
    with restoring(model, plan.touched_modules, always=True):
        apply_plan(model, plan)
        yield


def _pruner(module: nn.Module) -> Any:
    """The surgery for this kind of layer (or for a packed q/k/v parameter), or None."""
    return head_pruner(module) or module_pruner(module)


def _size_along(module: nn.Module, dim: str) -> int | None:
    pruner = _pruner(module)
    if pruner is None:
        return None
    size = pruner.get_out_channels(module) if dim == "out" else pruner.get_in_channels(module)
    return None if size is None else int(size)


@collection_paused_during
def apply_plan(model: nn.Module, plan: PruningPlan) -> None:
    """Physically remove the planned neurons from ``model``, in place; all-or-nothing.

    Every module named in the plan is checked first (it exists, and every index is in range); the surgery
    then runs, and if any step fails every touched module is restored exactly before the error propagates.
    Parameters keep their ``requires_grad`` flag.

    Args:
        model: the module the plan was made for (the same names and, before pruning, the same sizes).
        plan: from :func:`plan_pruning`.

    Raises:
        ActivationPruningError: the plan does not fit the model (a missing module, an index out of range);
            the model is untouched.

    Example:
        >>> import torch
        >>> from lightning_actprune.core import PruningPlan, ModulePruning
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        >>> plan = PruningPlan(0.1, "mean", (), (ModulePruning("0", "out", (1, 2)), ModulePruning("2", "in", (1, 2))))
        >>> apply_plan(model, plan)
        >>> model[0].weight.shape, model[2].weight.shape
        (torch.Size([2, 3]), torch.Size([2, 2]))
    """
    modules = dict(model.named_modules(remove_duplicate=False))  # one walk, not one lookup per operation
    for operation in plan.operations:
        module = _found(modules, model, operation.module)
        size = _size_along(module, operation.dim)
        if size is None:
            raise ActivationPruningError(f"cannot prune {operation.module!r} ({type(module).__name__}).")
        bad = [i for i in operation.indices if not 0 <= i < size]
        if bad or len(operation.indices) >= size:
            raise ActivationPruningError(
                f"the plan removes indices {list(operation.indices)[:8]}… of {operation.module!r}, which has"
                f" {size} {operation.dim}puts: was the model already pruned, or built with other sizes?"
            )

    for update in plan.bias_updates:
        module = _submodule(model, update.module)
        outputs = _size_along(module, "out")
        if outputs != len(update.delta):
            raise ActivationPruningError(
                f"the plan's bias update of {update.module!r} has {len(update.delta)} values; the module has"
                f" {outputs} outputs: was the model already pruned, or built with other sizes?"
            )

    current = "the model"
    response_norms = response_norm_channels(model, plan.touched_modules)
    layer_norms = layer_norm_widths(modules, plan.touched_modules)
    rms_norms = rms_norm_widths(modules, plan.touched_modules)
    try:
        with restoring(model, plan.touched_modules):
            # biases first, on the full-size consumers: the surgery then keeps the entries of the outputs that stay
            for update in plan.bias_updates:
                current = repr(update.module)
                _add_to_bias(model.get_submodule(update.module), update.delta)
            for operation in plan.operations:
                current = repr(operation.module)
                module = _found(modules, model, operation.module)
                flags = {name: p.requires_grad for name, p in module.named_parameters(recurse=False)}
                pruner = _pruner(module)  # exists: every operation was checked above
                prune = pruner.prune_out_channels if operation.dim == "out" else pruner.prune_in_channels
                prune(module, list(operation.indices))
                for name, p in module.named_parameters(recurse=False):
                    p.requires_grad_(flags.get(name, True))
            current = "the attention modules' head counts"
            sync_head_counts(model, plan)
            current = "the global response normalisations' scales"
            rescale_response_norms(model, response_norms)
            current = "the layer norms' widths"
            keep_layer_norm_widths(modules, layer_norms)
            current = "the RMS norms' scales"
            rescale_rms_norms(modules, rms_norms)
    except Exception as error:
        raise ActivationPruningError(
            f"pruning {current} failed ({type(error).__name__}: {error}); the model was restored."
        ) from error


def _add_to_bias(module: nn.Module, delta: tuple[float, ...]) -> None:
    """A new bias parameter (created when the module had none); the old tensor is left untouched for restoring."""
    if isinstance(module, nn.RNNBase):
        add_to_recurrent_bias(module, torch.tensor(delta))
        return
    weight = module.get_parameter("weight")
    values = torch.tensor(delta, dtype=weight.dtype, device=weight.device)
    bias = getattr(module, "bias", None)
    if bias is None:
        module.bias = nn.Parameter(values, requires_grad=weight.requires_grad)
    else:
        module.bias = nn.Parameter(bias.detach() + values, requires_grad=bias.requires_grad)
