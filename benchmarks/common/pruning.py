"""Pruning helpers the benchmarks share.

Ours as ``target_params_reduction`` chooses the plan, applied to a copy with the package's plain functions; the
BatchNorm recalibration the callback does after a prune; a competitor's ratio found for a parameter reduction.
"""

from __future__ import annotations

import copy
import itertools
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TypeVar

import torch
from torch import Tensor, nn

from lightning_actprune._recalibration import recalibrating_batchnorm
from lightning_actprune.core import (
    ActivationMoments,
    ActivationPruningError,
    PrunableLayer,
    PruningPlan,
    ThresholdEvaluator,
    apply_plan,
    count_parameters,
    plan_for_reduction,
)

ModelT = TypeVar("ModelT", bound=nn.Module)


def pruned_copy(model: nn.Module, plan: PruningPlan) -> nn.Module:
    """A deep copy of ``model`` with ``plan`` applied; ``model`` is untouched."""
    pruned = copy.deepcopy(model)
    apply_plan(pruned, plan)
    return pruned


def widths_of(plan: PruningPlan) -> dict[str, int]:
    """Neurons kept per layer."""
    return {layer.name: len(layer.kept) for layer in plan.layers}


def ours_at_reduction(
    model: nn.Module,
    layers: Sequence[PrunableLayer],
    moments: Mapping[str, ActivationMoments],
    statistic: str,
    target: float,
    compensate: bool = False,
    normalize: bool = False,
) -> tuple[float, PruningPlan, int]:
    """Our plan that removes at least ``target`` of the parameters, as ``target_params_reduction`` chooses it.

    The plan is :func:`lightning_actprune.core.plan_for_reduction` on a
    :class:`~lightning_actprune.core.ThresholdEvaluator` with the same options: neurons go one at a time in the
    evaluator's removal order (ascending score; equal scores broken by RMS activation, then by the next layers'
    weight norm), found by bisection on the plan's size, so the result lands within one neuron of the target. The
    plan is then applied to another copy and its parameters counted. ``compensate`` folds the removed neurons' mean
    activations into their consumers' biases (it changes no parameter count, so the plan removes the same neurons
    as without); ``normalize`` standardises the scores per layer (λ is then in standard deviations and may be
    negative).

    Returns:
        λ (the plan's ``threshold``), the plan and the pruned model's parameter count.

    Raises:
        ActivationPruningError: the target is out of reach (removing every prunable neuron is not enough).
    """
    evaluator = ThresholdEvaluator(
        copy.deepcopy(model), layers, moments, statistic, min_neurons=1, compensate=compensate, normalize=normalize
    )
    choice = plan_for_reduction(evaluator, target)
    if choice.plan is None:
        raise ActivationPruningError(str(choice.note))
    return choice.plan.threshold, choice.plan, count_parameters(pruned_copy(model, choice.plan))


def bisect_ratio(
    prune: Callable[[float], ModelT],
    removed: Callable[[ModelT], float],
    reduction: float,
    ratios: Sequence[float],
    steps: int,
) -> tuple[ModelT, float]:
    """The model ``prune(ratio)`` gives at the smallest ratio found whose ``removed(model)`` reaches ``reduction``.

    ``ratios`` (increasing) are tried in turn until one reaches the reduction, then ``steps`` halvings between it and
    the one before: a large ratio can empty a group, which Torch-Pruning then leaves whole, so the largest ratio is not
    always the most pruned.

    Returns:
        The pruned model and its ratio.

    Raises:
        RuntimeError: no ratio of ``ratios`` reaches the reduction.
    """
    low = 0.0
    for high in ratios:
        best = prune(high)
        if removed(best) >= reduction:
            break
        low = high
    else:
        raise RuntimeError(f"no ratio up to {ratios[-1]} removes {reduction:.0%} of the parameters.")
    for _ in range(steps):
        middle = (low + high) / 2
        candidate = prune(middle)
        if removed(candidate) >= reduction:
            high, best = middle, candidate
        else:
            low = middle
    return best, high


def recalibrated(model: ModelT, batches: Iterable[tuple[Tensor, Tensor]], count: int) -> tuple[ModelT, float]:
    """A copy of ``model`` whose BatchNorm statistics are re-estimated on the first ``count`` of ``batches``.

    What the callback does after the surgery by default (``recalibration_batches=20``): forward passes without
    gradients inside :func:`lightning_actprune._recalibration.recalibrating_batchnorm`, every BatchNorm layer in
    train mode, its running statistics a plain average over the batches; no parameter changes.

    Returns:
        The recalibrated copy (eval mode) and the seconds the recalibration took.
    """
    fresh = copy.deepcopy(model).eval()
    start = time.perf_counter()
    with recalibrating_batchnorm(fresh), torch.no_grad():
        for x, _ in itertools.islice(batches, count):
            fresh(x)
    return fresh, time.perf_counter() - start
