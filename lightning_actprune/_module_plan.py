"""The plan a pruned module carries: how it was cut from the full-size model, composed over several prunings.

Plain functions on a module's ``__dict__`` and on :class:`PruningPlan` values; the checkpoint loaders and the Hugging
Face config keeping both build on them.
"""

from __future__ import annotations

from torch import nn

from lightning_actprune._types import BiasUpdate, LayerPlan, ModulePruning, PruningPlan

_ATTRIBUTE = "_actprune_plan"  # where a pruned module keeps the plan that made it from the full-size model


def pruning_plan_of(module: nn.Module) -> PruningPlan | None:
    """The plan that turned a full-size ``module`` into its current shape, or None if it was not pruned.

    :class:`ActivationPruning` records it when it prunes (composed with any earlier pruning), and every loader of
    this package records the plan of the checkpoint it loaded. It travels with ``copy.deepcopy`` and pickling, and
    it is what :func:`export_pruned` and the checkpoints of a pruned model carry.

    Args:
        module: any module.

    Returns:
        The plan, with module names relative to ``module``; None for a module this package did not prune or load.

    Example:
        >>> import torch
        >>> pruning_plan_of(torch.nn.Linear(2, 2)) is None
        True
    """
    plan = module.__dict__.get(_ATTRIBUTE)
    return plan if isinstance(plan, PruningPlan) else None


def _remember(module: nn.Module, plan: PruningPlan) -> None:
    module.__dict__[_ATTRIBUTE] = plan


def _record_pruning(module: nn.Module, plan: PruningPlan) -> PruningPlan:
    """After ``plan`` was applied to ``module``: remember the plan from the full-size model, and return it."""
    earlier = pruning_plan_of(module)
    full = plan if earlier is None else _compose(earlier, plan)
    _remember(module, full)
    return full


def _to_original(indices: tuple[int, ...], removed: tuple[int, ...]) -> list[int]:
    """Indices into a dimension that already lost ``removed``, as indices into the original dimension."""
    gone = sorted(removed)
    result = []
    for index in indices:
        original = index
        for r in gone:
            if r > original:
                break
            original += 1
        result.append(original)
    return result


def _compose(first: PruningPlan, then: PruningPlan) -> PruningPlan:
    """One plan equivalent to applying ``first`` to a full-size model and then ``then`` to the result."""
    removed: dict[tuple[str, str], tuple[int, ...]] = {(o.module, o.dim): o.indices for o in first.operations}
    merged = {key: set(indices) for key, indices in removed.items()}
    for o in then.operations:
        key = (o.module, o.dim)
        merged.setdefault(key, set()).update(_to_original(o.indices, removed.get(key, ())))
    layers = {layer.name: layer for layer in first.layers}
    for layer in then.layers:
        before = layers.get(layer.name)
        if before is None:
            layers[layer.name] = layer
        else:
            layers[layer.name] = LayerPlan(layer.name, before.neurons, tuple(before.kept[i] for i in layer.kept))
    operations = tuple(
        ModulePruning(module, dim, tuple(sorted(indices)))  # type: ignore[arg-type]
        for (module, dim), indices in merged.items()
    )
    return PruningPlan(
        then.threshold, then.statistic, tuple(layers.values()), operations, _compose_biases(first, then), then.normalize
    )


def _compose_biases(first: PruningPlan, then: PruningPlan) -> tuple[BiasUpdate, ...]:
    """Bias updates are added to the consumers' full-size biases: ``then``'s are spread over the outputs kept."""
    removed_outputs = {o.module: o.indices for o in first.operations if o.dim == "out"}
    deltas = {b.module: list(b.delta) for b in first.bias_updates}
    for update in then.bias_updates:
        gone = removed_outputs.get(update.module, ())
        full = deltas.setdefault(update.module, [0.0] * (len(update.delta) + len(gone)))
        for index, value in zip(_to_original(tuple(range(len(update.delta))), gone), update.delta, strict=True):
            full[index] += value
    return tuple(BiasUpdate(module, tuple(delta)) for module, delta in deltas.items())


def _relative(plan: PruningPlan, submodule: str) -> PruningPlan:
    """The part of ``plan`` inside ``submodule``, with names relative to it."""
    if not submodule:
        return plan
    prefix = submodule + "."
    operations = tuple(
        ModulePruning(o.module[len(prefix) :], o.dim, o.indices) for o in plan.operations if o.module.startswith(prefix)
    )
    layers = tuple(
        LayerPlan("+".join(n[len(prefix) :] for n in layer.name.split("+")), layer.neurons, layer.kept)
        for layer in plan.layers
        if all(n.startswith(prefix) for n in layer.name.split("+"))
    )
    biases = tuple(
        BiasUpdate(b.module[len(prefix) :], b.delta) for b in plan.bias_updates if b.module.startswith(prefix)
    )
    return PruningPlan(plan.threshold, plan.statistic, layers, operations, biases, plan.normalize)
