"""The methods compared on the ResNet: ours (one-shot, then BatchNorm recalibration) and Torch-Pruning's own pruner.

Each returns a pruned copy and never touches the model it is given.
"""

from __future__ import annotations

import copy
import itertools
import time
from collections.abc import Iterable, Sequence
from typing import TypeVar

import torch
import torch_pruning as tp
from torch import Tensor, nn

from lightning_actprune._recalibration import recalibrating_batchnorm
from lightning_actprune.core import PrunableLayer, PruningPlan, count_parameters

from .models import ResNetClassifier

M = TypeVar("M", bound=nn.Module)


def recalibrated(model: M, batches: Iterable[tuple[Tensor, Tensor]], count: int) -> tuple[M, float]:
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


def torch_pruning_copy(model: M, example_input: Tensor, pruning_ratio: float) -> M:
    """A copy pruned as Torch-Pruning's README shows: ``MetaPruner`` with ``GroupMagnitudeImportance(p=2)``.

    Every coupled group loses ``pruning_ratio`` of its channels (the final Linear, ``head``, is ignored), those
    with the smallest L2 norm over the whole group; the BatchNorm statistics are sliced, not re-estimated.
    """
    pruned = copy.deepcopy(model).eval()
    with torch.enable_grad():
        pruner = tp.pruner.MetaPruner(
            pruned,
            example_input,
            importance=tp.importance.GroupMagnitudeImportance(p=2),
            pruning_ratio=pruning_ratio,
            ignored_layers=[pruned.get_submodule("head")],
        )
        pruner.step()
    return pruned


def torch_pruning_at_reduction(model: M, example_input: Tensor, target: float, steps: int = 14) -> tuple[float, M]:
    """The smallest ``pruning_ratio`` (bisection, ``steps`` halvings) whose copy removes at least ``target``.

    Returns:
        The ratio and its pruned copy.
    """
    before = count_parameters(model)
    # Torch-Pruning skips a group that a ratio would empty, so near 1 the size grows again: search below that
    low, high = 0.0, 0.75
    best = torch_pruning_copy(model, example_input, high)
    if 1 - count_parameters(best) / before < target:
        raise ValueError(f"Torch-Pruning cannot remove {target:.0%} of the parameters (pruning_ratio up to {high}).")
    for _ in range(steps):
        middle = (low + high) / 2
        candidate = torch_pruning_copy(model, example_input, middle)
        if 1 - count_parameters(candidate) / before >= target:
            high, best = middle, candidate
        else:
            low = middle
    return high, best


def channels_of(model: nn.Module, layers: Sequence[PrunableLayer]) -> dict[str, int]:
    """Output channels of each group's first producer in ``model`` (pruned by any tool): the group's width."""
    channels = {}
    for layer in layers:
        producer = model.get_submodule(layer.producers[0])
        assert isinstance(producer, nn.Conv2d | nn.Linear), f"{layer.producers[0]} is a {type(producer).__name__}"
        channels[layer.name] = producer.out_channels if isinstance(producer, nn.Conv2d) else producer.out_features
    return channels


def group_channels(plan: PruningPlan) -> dict[str, int]:
    """Channels kept per prunable group."""
    return {layer.name: len(layer.kept) for layer in plan.layers}


def scratch_widths(model: ResNetClassifier, channels: dict[str, int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The ``widths`` and ``hidden`` of a :class:`ResNetClassifier` the size of the pruned one.

    Stage ``i``'s output width is its group with ``stages.i.conv2``'s output (the stem and the shortcuts are
    coupled to it), its hidden width that of ``stages.i.conv1``.
    """
    stages = len(model.stages)
    widths = []
    for i in range(stages):
        (name,) = [n for n in channels if f"stages.{i}.conv2" in n.split("+")]
        widths.append(channels[name])
    hidden = tuple(channels[f"stages.{i}.conv1"] for i in range(stages))
    return tuple(widths), hidden
