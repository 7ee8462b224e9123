"""The parameter count a plan leaves, by arithmetic on the shapes: the λ search sizes many plans, surgery is slow."""

from __future__ import annotations

from collections import defaultdict

from torch import nn

from lightning_actprune._types import PruningPlan


def _after(module: nn.Module, removed_out: int, removed_in: int) -> int | None:
    """Parameters ``module`` keeps without ``removed_out`` outputs and ``removed_in`` inputs; ``None``: unknown."""
    bias = getattr(module, "bias", None)
    if isinstance(module, nn.Linear):
        kept_out = module.out_features - removed_out
        return kept_out * (module.in_features - removed_in) + (kept_out if bias is not None else 0)
    if isinstance(module, nn.modules.conv._ConvNd) and module.groups == 1 and not module.transposed:
        kept_out = module.out_channels - removed_out
        kernel = module.weight[0, 0].numel()
        return kept_out * (module.in_channels - removed_in) * kernel + (kept_out if bias is not None else 0)
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and removed_in == 0:
        return (module.num_features - removed_out) * (2 if module.affine else 0)
    return None


def parameters_after(model: nn.Module, plan: PruningPlan, params_before: int) -> int | None:
    """``count_parameters`` of ``model`` pruned by ``plan``, or ``None`` when a module's count is not known here.

    Known: ``Linear``, ungrouped ``Conv``, ``BatchNorm`` whose parameters are their own (not shared). Plans with
    bias updates are not counted (they may add a bias).
    """
    if plan.bias_updates:
        return None
    removed: dict[str, dict[str, int]] = defaultdict(lambda: {"out": 0, "in": 0})
    for operation in plan.operations:
        removed[operation.module][operation.dim] += len(operation.indices)
    params = params_before
    for name, counts in removed.items():
        module = model.get_submodule(name)
        after = _after(module, counts["out"], counts["in"])
        if after is None:
            return None
        params -= sum(p.numel() for p in module.parameters(recurse=False)) - after
    return params
