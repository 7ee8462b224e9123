"""The parameter count a plan leaves, by arithmetic on the shapes: the λ search sizes many plans, surgery is slow."""

from __future__ import annotations

from collections import defaultdict

from torch import nn

from lightning_actprune._grouped import is_depthwise
from lightning_actprune._recurrent import parameters_after as recurrent_parameters_after
from lightning_actprune._types import PruningPlan


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
    return None


def parameters_after(model: nn.Module, plan: PruningPlan, params_before: int) -> int | None:
    """``count_parameters`` of ``model`` pruned by ``plan``, or ``None`` when a module's count is not known here.

    Known: ``Linear``, ``Conv`` (grouped and depthwise too), recurrent layers, ``BatchNorm`` whose parameters are
    their own (not shared). Plans with
    bias updates are not counted (they may add a bias).
    """
    if plan.bias_updates:
        return None
    removed: dict[str, dict[str, list[int]]] = defaultdict(lambda: {"out": [], "in": []})
    for operation in plan.operations:
        removed[operation.module][operation.dim] += operation.indices
    params = params_before
    for name, indices in removed.items():
        module = model.get_submodule(name)
        if isinstance(module, nn.RNNBase):  # its inputs are features and hidden units: the indices say which
            after = recurrent_parameters_after(module, indices["in"]) if not indices["out"] else None
        else:
            after = _after(module, len(indices["out"]), len(indices["in"]))
        if after is None:
            return None
        params -= sum(p.numel() for p in module.parameters(recurse=False)) - after
    return params
