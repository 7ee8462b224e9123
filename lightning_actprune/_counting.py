"""The parameter count a plan leaves, by arithmetic on the shapes: the λ search sizes many plans, surgery is slow."""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from lightning_actprune._scoring import index_tensor
from lightning_actprune._types import PrunableLayer, PruningPlan


def _after(module: nn.Module, removed_out: int, removed_in: int) -> int | None:
    """Parameters ``module`` keeps without ``removed_out`` outputs and ``removed_in`` inputs; ``None``: unknown."""
    bias = getattr(module, "bias", None)
    if isinstance(module, nn.Linear):
        kept_out = module.out_features - removed_out
        return kept_out * (module.in_features - removed_in) + (kept_out if bias is not None else 0)
    if isinstance(module, nn.modules.conv._ConvNd) and not module.transposed:
        kept_out = module.out_channels - removed_out
        kernel = module.weight[0, 0].numel()
        if module.groups == 1:
            return kept_out * (module.in_channels - removed_in) * kernel + (kept_out if bias is not None else 0)
        if module.groups == module.in_channels == module.out_channels and removed_in == 0:
            # depthwise: Torch-Pruning removes a channel's input with its output (one filter per channel)
            return kept_out * kernel + (kept_out if bias is not None else 0)
        return None
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and removed_in == 0:
        return (module.num_features - removed_out) * (2 if module.affine else 0)
    return None


def parameters_after(model: nn.Module, plan: PruningPlan, params_before: int) -> int | None:
    """``count_parameters`` of ``model`` pruned by ``plan``, or ``None`` when a module's count is not known here.

    Known: ``Linear``, ungrouped and depthwise ``Conv``, ``BatchNorm`` whose parameters are their own (not shared).
    Plans with bias updates are not counted (they may add a bias).
    """
    if plan.bias_updates:
        return None
    removed: dict[str, dict[str, int]] = defaultdict(lambda: {"out": 0, "in": 0})
    for operation in plan.operations:
        removed[operation.module][operation.dim] += len(operation.indices)
    modules = {name: _with_own_count(model.get_submodule(name)) for name in removed}
    return _counted(modules, {name: (counts["out"], counts["in"]) for name, counts in removed.items()}, params_before)


def _with_own_count(module: nn.Module) -> tuple[nn.Module, int]:
    return module, sum(p.numel() for p in module.parameters(recurse=False))


def _counted(
    modules: Mapping[str, tuple[nn.Module, int]], removed: Mapping[str, tuple[int, int]], params_before: int
) -> int | None:
    """``params_before`` less what each module loses with ``(outputs, inputs)`` removed; ``None`` if one is unknown.

    ``modules`` holds each module with its own parameter count, by name.
    """
    params = params_before
    for name, (removed_out, removed_in) in removed.items():
        module, own = modules[name]
        after = _after(module, removed_out, removed_in)
        if after is None:
            return None
        params -= own - after
    return params


class RemovalCounts:
    """The parameter count after removing the first ``k`` units of a removal order, for any ``k``, without a plan.

    For every module index a layer's slices touch, the position in the order of the first unit that removes it is
    kept, sorted per ``(module, dim)``: the indices ``k`` units remove are those at positions below ``k`` (one binary
    search each), and :func:`parameters_after`'s arithmetic turns them into parameters. The same count as building
    the plan with :func:`~lightning_actprune._plan.plan_from_kept` and calling :func:`parameters_after` on it, in
    microseconds instead of a pass over every index.

    Args:
        model: the unpruned model.
        layers: the prunable layers.
        order: each unit's neurons, ``(layer name, neuron index)``, in the order they go.
        params_before: ``count_parameters(model)``.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[PrunableLayer],
        order: Sequence[Sequence[tuple[str, int]]],
        params_before: int,
    ) -> None:
        self.params_before = params_before
        never = len(order)  # the position of a neuron no unit removes (each layer's `min_neurons`)
        listed = {layer.name: [never] * layer.neurons for layer in layers}
        for step, members in enumerate(order):
            for name, neuron in members:
                listed[name][neuron] = step
        positions = {name: torch.tensor(values, dtype=torch.long) for name, values in listed.items()}
        pieces: dict[tuple[str, str], list[tuple[Tensor, Tensor]]] = defaultdict(list)
        for layer in layers:
            for piece in layer.slices:
                removed_at = positions[layer.name][index_tensor(piece.neurons)]
                pieces[(piece.module, piece.dim)].append((index_tensor(piece.indices), removed_at))
        self._first_removed: dict[tuple[str, str], list[int]] = {}
        for key, parts in pieces.items():
            indices = torch.cat([index for index, _ in parts])
            first = torch.full((int(indices.max()) + 1 if len(indices) else 0,), never, dtype=torch.long)
            # an index two slices share goes with the first unit that removes it (the plan takes their union)
            first.scatter_reduce_(0, indices, torch.cat([position for _, position in parts]), "amin")
            touched = torch.zeros_like(first, dtype=torch.bool)
            touched[indices] = True
            self._first_removed[key] = first[touched].sort().values.tolist()
        self._modules = {module: _with_own_count(model.get_submodule(module)) for module, _ in self._first_removed}

    def removed(self, count: int) -> dict[str, tuple[int, int]]:
        """``(outputs, inputs)`` each touched module loses with the first ``count`` units removed."""
        removed: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for (module, dim), first in self._first_removed.items():
            lost = bisect.bisect_left(first, count)
            if lost:
                removed[module][0 if dim == "out" else 1] += lost
        return {name: (out, inputs) for name, (out, inputs) in removed.items()}

    def parameters_after(self, count: int) -> int | None:
        """``count_parameters`` after removing the first ``count`` units; ``None`` when a module's count is unknown."""
        return _counted(self._modules, self.removed(count), self.params_before)
