"""Pruning in the middle of training: the optimizers carry on with the smaller parameters."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_actprune._errors import ActivationPruningError
from lightning_actprune._surgery import _pruner, _submodule, apply_plan, restoring
from lightning_actprune._types import PruningPlan

_PLAIN_STATE = (int, float, bool, str, type(None))

OPTIMIZER_STATES = ("carry", "reset", "fresh")
"""What the optimizers keep of their state at a prune inside ``fit`` (``optimizer_state``):

- ``carry``: every state tensor shaped like its parameter is sliced with the kept entries, scalar state stays;
- ``reset``: the parameters the prune changed start afresh (their state is dropped: Adam's moments and step count
  begin again for them, as for a parameter it has never stepped), the others keep theirs;
- ``fresh``: every parameter's state is dropped, as in a new optimizer (the hyper-parameters, param groups and
  learning-rate schedulers stay).
"""


def _index_probe(module: nn.Module) -> nn.Module:
    """A shallow copy of ``module`` whose parameters hold their own flat indices, for the pruners to slice.

    ``arange`` in float64 on the CPU (exact up to 2**53; the pruners wrap their results in ``nn.Parameter``, which
    needs floats). The copy has its own parameter, buffer and attribute dicts, so the pruners' assignments
    never reach the module; buffers and hooks are shared, not copied.
    """
    probe = copy.copy(module)
    probe._parameters = {
        name: None if p is None else nn.Parameter(torch.arange(p.numel(), dtype=torch.float64).reshape(p.shape))
        for name, p in module._parameters.items()
    }
    probe._buffers = dict(module._buffers)
    probe._modules = dict(module._modules)
    return probe


def _surviving_entries(
    model: nn.Module, plan: PruningPlan, names: Sequence[str] | None = None
) -> dict[tuple[str, str], Tensor]:
    """For every parameter the plan touches, the flat index of each old entry that survives, in the new shape.

    The plan's operations are replayed on an index probe of each module with the very pruners the surgery uses:
    whatever they do (outputs, inputs, transposed or depthwise convs, several operations on one module), the
    probe's parameters then say where each entry of the pruned parameter came from.

    Args:
        model: the unpruned model.
        plan: the plan.
        names: replay only these of the touched modules (default: all of them).
    """
    surviving: dict[tuple[str, str], Tensor] = {}
    for name in plan.touched_modules if names is None else names:
        module = _submodule(model, name)
        probe = _index_probe(module)
        pruner = _pruner(probe)
        try:
            for operation in plan.operations:
                if operation.module == name and pruner is not None:  # no pruner: apply_plan says so, clearly
                    prune = pruner.prune_out_channels if operation.dim == "out" else pruner.prune_in_channels
                    prune(probe, list(operation.indices))
        except Exception as error:
            raise ActivationPruningError(
                f"cannot follow the optimizer state of {name!r} through the plan ({type(error).__name__}: {error})."
            ) from error
        for parameter_name, p in probe.named_parameters(recurse=False):
            surviving[(name, parameter_name)] = p.detach().long()
    return surviving


def _carried_state(state: Mapping[str, Any], old: Tensor, entries: Tensor, label: str) -> dict[str, Any]:
    """``state`` of ``old`` for its pruned successor: tensors shaped like it sliced, scalars kept."""
    carried: dict[str, Any] = {}
    for key, value in state.items():
        if isinstance(value, Tensor) and value.shape == old.shape:
            carried[key] = value.flatten()[entries.to(value.device)]
        elif (isinstance(value, Tensor) and value.dim() == 0) or isinstance(value, _PLAIN_STATE):
            carried[key] = value
        else:
            what = f"a tensor of shape {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__
            raise ActivationPruningError(
                f"cannot carry the optimizer state {key!r} of {label} (shape {tuple(old.shape)}): it is {what},"
                " neither a scalar nor shaped like the parameter, so it cannot be sliced exactly."
            )
    return carried


def _as_optimizers(optimizers: Optimizer | Sequence[Optimizer]) -> list[Optimizer]:
    if isinstance(optimizers, Optimizer):
        return [optimizers]
    found: list[Any] = list(optimizers) if isinstance(optimizers, list | tuple) else [optimizers]
    for optimizer in found:
        if not isinstance(optimizer, Optimizer):
            raise ActivationPruningError(
                f"`optimizers` must be a torch.optim.Optimizer or a list of them; got {type(optimizer).__name__}."
            )
    return found


def apply_plan_with_optimizers(
    model: nn.Module, plan: PruningPlan, optimizers: Optimizer | Sequence[Optimizer], state: str = "carry"
) -> None:
    """Prune ``model`` like :func:`apply_plan` and let the same optimizers train the smaller parameters.

    Each optimizer keeps its hyper-parameters and param groups (so a learning-rate scheduler attached to it keeps
    stepping); every pruned parameter is replaced in place in its group by the new, smaller one, and its state
    follows: each state tensor shaped like the parameter (Adam's ``exp_avg``, SGD's ``momentum_buffer``, …) keeps
    the entries that survive, scalar state (``step``) stays as it is. A bias that bias compensation creates joins
    the group of its layer's weight, right after it, with empty state. Parameters in no optimizer (frozen ones) are
    just pruned.

    All-or-nothing: when a state cannot be carried (a tensor neither scalar nor shaped like its parameter, as in
    ``Adafactor``'s factored moments or ``LBFGS``'s history), the model and the optimizers are restored exactly.

    Call it between two optimizer steps. A ``GradScaler`` needs nothing; a ``DistributedDataParallel`` wrapper
    still holds the old parameters and must be rebuilt.

    Args:
        model: the model being trained.
        plan: from :func:`plan_pruning` or :func:`plan_from_kept`, made for ``model``.
        optimizers: the optimizer (or optimizers) training ``model``.
        state: what the optimizers keep of their state (:data:`OPTIMIZER_STATES`): ``"carry"`` slices it as above;
            ``"reset"`` drops the state of every parameter the prune changed (they start afresh, the others keep
            theirs); ``"fresh"`` drops every parameter's state, as a new optimizer would have none.

    Raises:
        ActivationPruningError: the plan does not fit the model, some optimizer state cannot be carried (with
            ``"carry"``), or ``state`` is unknown; the model and the optimizers are untouched.

    Example:
        >>> import torch
        >>> from lightning_actprune.core import ModulePruning, PruningPlan
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        >>> optimizer = torch.optim.Adam(model.parameters())
        >>> model(torch.randn(5, 3)).sum().backward()
        >>> optimizer.step()
        >>> plan = PruningPlan(0.1, "mean", (), (ModulePruning("0", "out", (1, 2)), ModulePruning("2", "in", (1, 2))))
        >>> apply_plan_with_optimizers(model, plan, optimizer)
        >>> optimizer.state[model[0].weight]["exp_avg"].shape
        torch.Size([2, 3])
    """
    if state not in OPTIMIZER_STATES:
        raise ActivationPruningError(f"`optimizer_state` can be one of {', '.join(OPTIMIZER_STATES)}; got {state!r}.")
    saved = OptimizerSnapshot(optimizers)
    before = {name: dict(_submodule(model, name).named_parameters(recurse=False)) for name in plan.touched_modules}
    # only the modules whose parameters an optimizer trains have state to carry (none after `fit`)
    trained = {p for optimizer in saved.optimizers for group in optimizer.param_groups for p in group["params"]}
    carried = [name for name, parameters in before.items() if any(p in trained for p in parameters.values())]
    surviving = _surviving_entries(model, plan, carried)
    try:
        with restoring(model, plan.touched_modules):
            apply_plan(model, plan)
            for optimizer in saved.optimizers:
                _carry(optimizer, model, before, surviving, keep=state == "carry")
                if state == "fresh":
                    optimizer.state.clear()
    except Exception:
        saved.restore()
        raise


class OptimizerSnapshot:
    """Which parameters each optimizer's groups hold, and its state entries, to restore after a failed prune.

    Like :class:`ModuleSnapshot`, it keeps references: a carry builds new state tensors and never writes into the
    old ones.

    Args:
        optimizers: an optimizer or a list of them (may be empty).
    """

    def __init__(self, optimizers: Optimizer | Sequence[Optimizer]) -> None:
        self.optimizers = _as_optimizers(optimizers)
        self._saved = [([list(g["params"]) for g in o.param_groups], dict(o.state)) for o in self.optimizers]

    def restore(self) -> None:
        """Put every optimizer back as it was: the same parameter objects in its groups, the same state."""
        for optimizer, (params, state) in zip(self.optimizers, self._saved, strict=True):
            for group, group_params in zip(optimizer.param_groups, params, strict=True):
                group["params"][:] = group_params
            optimizer.state.clear()
            optimizer.state.update(state)


def _carry(
    optimizer: Optimizer,
    model: nn.Module,
    before: Mapping[str, Mapping[str, nn.Parameter]],
    surviving: Mapping[tuple[str, str], Tensor],
    keep: bool = True,
) -> None:
    """Point ``optimizer`` at the pruned parameters; everything is computed before the optimizer changes.

    ``keep=False``: the pruned parameters start without state (nothing is sliced, so any state is accepted).
    """
    groups = {p: group for group in optimizer.param_groups for p in group["params"]}
    replaced: dict[Tensor, Tensor] = {}
    new_state: dict[Tensor, dict[str, Any]] = {}
    created: list[tuple[dict[str, Any], Tensor, Tensor]] = []
    for module_name, old_parameters in before.items():
        after = dict(model.get_submodule(module_name).named_parameters(recurse=False))
        for parameter_name, old in old_parameters.items():
            if parameter_name not in after and old in groups:
                raise ActivationPruningError(
                    f"cannot carry the optimizer state of {module_name}.{parameter_name}: the surgery removed it."
                )
        for parameter_name, new in after.items():
            previous = old_parameters.get(parameter_name)
            if previous is None:  # made by the surgery (a compensating bias): it trains along with its weight
                weight = old_parameters.get("weight")
                if weight is not None and weight in groups:
                    created.append((groups[weight], after["weight"], new))
            elif previous is not new and previous in groups:
                entries = surviving[(module_name, parameter_name)]
                label = f"{module_name}.{parameter_name}"
                if entries.shape != new.shape:
                    raise ActivationPruningError(
                        f"cannot carry the optimizer state of {label}: the surgery made it {tuple(new.shape)}, the"
                        f" replayed plan {tuple(entries.shape)}."
                    )
                replaced[previous] = new
                if keep and previous in optimizer.state:
                    new_state[new] = _carried_state(optimizer.state[previous], previous, entries, label)

    for group in optimizer.param_groups:
        group["params"][:] = [replaced.get(p, p) for p in group["params"]]
    for replaced_parameter in replaced:
        optimizer.state.pop(replaced_parameter, None)
    optimizer.state.update(new_state)
    for group, anchor, parameter in created:  # right after its weight: the order model.parameters() gives
        position = next(i for i, member in enumerate(group["params"]) if member is anchor)  # not list.index: ==
        group["params"].insert(position + 1, parameter)
