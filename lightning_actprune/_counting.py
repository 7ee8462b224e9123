"""The parameter count a plan leaves, by arithmetic on the shapes: the λ search sizes many plans, surgery is slow."""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from lightning_actprune._grouped import is_depthwise
from lightning_actprune._recurrent import RecurrentShape, parameters_kept
from lightning_actprune._residual import (
    PARAMETER_OWNER_PRUNER,
    layer_norm_after,
    layer_norm_over_features,
    owned_parameters_after,
    rms_norm_over_features,
)
from lightning_actprune._scoring import index_tensor
from lightning_actprune._torch_pruning import module_pruner
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
        if is_depthwise(module):  # its inputs are its outputs: the surgery removes both, and whole groups
            return kept_out * kernel + (kept_out if bias is not None else 0)
        # grouped: every group loses as many input channels (the surgery refuses anything else), the groups stay
        kept_in_per_group = (module.in_channels - removed_in) // module.groups
        return kept_out * kept_in_per_group * kernel + (kept_out if bias is not None else 0)
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and removed_in == 0:
        return (module.num_features - removed_out) * (2 if module.affine else 0)
    if isinstance(module, nn.MultiheadAttention) and removed_in == 0:
        return _packed_projection_after(module, removed_out)
    if layer_norm_over_features(module) or rms_norm_over_features(module):  # residual channels: one set of them
        return layer_norm_after(module, removed_out + removed_in)
    if removed_in == 0 and module_pruner(module) is PARAMETER_OWNER_PRUNER:  # a cls_token, pos_embed, gamma
        return owned_parameters_after(module, removed_out)
    return None


def _packed_projection_after(module: nn.MultiheadAttention, removed_rows: int) -> int | None:
    """What a ``nn.MultiheadAttention`` keeps of its own parameters (the packed q/k/v) without ``removed_rows`` rows.

    Its out projection is a ``Linear`` of its own, counted apart. Only the layout head pruning accepts is known: one
    packed ``in_proj_weight``, no ``bias_k``/``bias_v``.
    """
    weight = module.in_proj_weight
    if weight is None or module.bias_k is not None or module.bias_v is not None:
        return None
    rows = weight.shape[0] - removed_rows
    return rows * weight.shape[1] + (rows if module.in_proj_bias is not None else 0)


class _Removed(NamedTuple):
    """What a module loses: ``outputs``, ``inputs``, and of those inputs the ``features`` of a recurrent layer.

    A recurrent layer's inputs are its input features (below ``input_size``) and its hidden units (the rest).
    """

    outputs: int
    inputs: int
    features: int = 0


def _kept(module: nn.Module, removed: _Removed) -> int | None:
    """Parameters ``module`` keeps after ``removed``; ``None``: not known here (or not a valid removal)."""
    if isinstance(module, nn.RNNBase):  # its inputs are features and hidden units: counted apart
        return None if removed.outputs else parameters_kept(module, removed.features, removed.inputs - removed.features)
    return _after(module, removed.outputs, removed.inputs)


def parameters_after(model: nn.Module, plan: PruningPlan, params_before: int) -> int | None:
    """``count_parameters`` of ``model`` pruned by ``plan``, or ``None`` when a module's count is not known here.

    Known: ``Linear``, ``Conv`` (grouped and depthwise too), recurrent layers, ``BatchNorm`` whose parameters are
    their own (not shared), the packed q/k/v of ``nn.MultiheadAttention``. Plans with bias updates are not counted
    (they may add a bias).
    """
    if plan.bias_updates:
        return None
    removed: dict[str, dict[str, list[int]]] = defaultdict(lambda: {"out": [], "in": []})
    for operation in plan.operations:
        removed[operation.module][operation.dim] += operation.indices
    modules = {name: _with_own_count(model.get_submodule(name)) for name in removed}
    lost = {}
    for name, indices in removed.items():
        module = modules[name][0]
        features = _feature_count(module)
        below = sum(1 for i in indices["in"] if i < features) if features else 0
        lost[name] = _Removed(len(indices["out"]), len(indices["in"]), below)
    return _counted(modules, lost, params_before)


def _feature_count(module: nn.Module) -> int:
    """A recurrent layer's ``input_size`` (its inputs below it are features, the rest hidden units); else 0."""
    return RecurrentShape.of(module).inputs if isinstance(module, nn.RNNBase) else 0


def _with_own_count(module: nn.Module) -> tuple[nn.Module, int]:
    return module, sum(p.numel() for p in module.parameters(recurse=False))


def _counted(
    modules: Mapping[str, tuple[nn.Module, int]], removed: Mapping[str, _Removed], params_before: int
) -> int | None:
    """``params_before`` less what each module loses with ``removed``; ``None`` if one count is unknown.

    ``modules`` holds each module with its own parameter count, by name.
    """
    params = params_before
    for name, lost in removed.items():
        module, own = modules[name]
        after = _kept(module, lost)
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
    microseconds instead of a pass over every index. A recurrent layer's input features and hidden units are kept
    apart, as its count needs both.

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
        self._modules = {module: _with_own_count(model.get_submodule(module)) for module, _ in pieces}
        # per (module, dim): when each touched index goes, sorted; and of a recurrent layer's inputs, its features'
        self._first_removed: dict[tuple[str, str], list[int]] = {}
        self._features_removed: dict[str, list[int]] = {}
        for (module, dim), parts in pieces.items():
            indices = torch.cat([index for index, _ in parts])
            first = torch.full((int(indices.max()) + 1 if len(indices) else 0,), never, dtype=torch.long)
            # an index two slices share goes with the first unit that removes it (the plan takes their union)
            first.scatter_reduce_(0, indices, torch.cat([position for _, position in parts]), "amin")
            touched = torch.zeros_like(first, dtype=torch.bool)
            touched[indices] = True
            self._first_removed[(module, dim)] = first[touched].sort().values.tolist()
            features = _feature_count(self._modules[module][0]) if dim == "in" else 0
            if features:
                self._features_removed[module] = first[:features][touched[:features]].sort().values.tolist()

    def removed(self, count: int) -> dict[str, _Removed]:
        """What each touched module loses with the first ``count`` units removed."""
        lost: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
        for (module, dim), first in self._first_removed.items():
            gone = bisect.bisect_left(first, count)
            if gone:
                lost[module][0 if dim == "out" else 1] += gone
                if dim == "in" and module in self._features_removed:
                    lost[module][2] += bisect.bisect_left(self._features_removed[module], count)
        return {name: _Removed(*values) for name, values in lost.items()}

    def parameters_after(self, count: int) -> int | None:
        """``count_parameters`` after removing the first ``count`` units; ``None`` when a module's count is unknown."""
        return _counted(self._modules, self.removed(count), self.params_before)
