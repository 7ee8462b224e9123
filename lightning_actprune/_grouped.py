"""Grouped convolutions (ResNeXt, RegNet): channels go an equal number from every group, never whole groups.

A convolution with ``groups = G`` joins the ``k``-th block of ``in_channels / G`` inputs only to the ``k``-th block of
``out_channels / G`` outputs. It stays a grouped convolution with ``G`` groups after a surgery that removes the same
number of channels from every block: output channels are rows of the weight; input channels are columns *of their
own group's rows*, so each group keeps its own surviving channels, wherever they sit in the group. (Torch-Pruning's
in-channel pruner keeps the first ``kept / G`` columns of every group instead, which is only right when the same
positions go in every group.) Removing whole groups would couple a group's inputs with its outputs, two layers'
neurons in one unit, which a plan of neurons does not express; equal counts per group reach the same widths.

The neurons of a :class:`PrunableLayer` that reaches grouped convolutions are split into the blocks those
convolutions see (:func:`equal_count_blocks`); the plan keeps the same count in each (``PrunableLayer.groups``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_actprune._types import ModuleSlice


def is_depthwise(module: nn.Module) -> bool:
    """A plain depthwise convolution: one input and one output channel per group."""
    return isinstance(module, nn.modules.conv._ConvNd) and module.groups == module.in_channels == module.out_channels


def grouped_convolution(module: Any) -> bool:
    """A convolution whose channels are split into groups, other than a plain depthwise one (one channel each)."""
    if not isinstance(module, nn.modules.conv._ConvNd) or module.groups == 1:
        return False
    return not is_depthwise(module)


def couples_wrongly(module: Any) -> bool:
    """A grouped convolution that Torch-Pruning takes for a depthwise one (``groups == out_channels != in_channels``).

    Its graph then ties each output channel to the input channel of the same index, which is not what the
    convolution joins.
    """
    return (
        grouped_convolution(module)
        and module.groups == module.out_channels
        and module.out_channels > 1
        and not module.transposed
    )


def _kept(parameter: Tensor, keep: Tensor, dim: int) -> nn.Parameter:
    """``parameter`` with only ``keep`` along ``dim``, a new parameter; its gradient follows (as in Torch-Pruning)."""
    pruned = nn.Parameter(parameter.detach().index_select(dim, keep.to(parameter.device)).clone())
    pruned.requires_grad_(parameter.requires_grad)
    if parameter.grad is not None:
        pruned.grad = parameter.grad.index_select(dim, keep.to(parameter.device)).clone()
    return pruned


def _per_group(removed: Sequence[int], size: int, groups: int, what: str) -> list[list[int]]:
    """The kept positions inside each group; every group must lose the same number and keep at least one."""
    gone = {int(i) for i in removed}
    per = size // groups
    kept = [[p for p in range(per) if g * per + p not in gone] for g in range(groups)]
    counts = sorted({len(k) for k in kept})
    if len(counts) > 1 or counts[0] == 0:
        raise ValueError(
            f"a grouped convolution ({groups} groups of {per} {what} channels) must lose the same number of channels"
            f" from every group and keep at least one in each; the removal keeps {counts} per group"
        )
    return kept


class GroupedConvPruner:
    """The surgery of a grouped convolution: an equal number of output or input channels from every group."""

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        """Remove output channels ``idxs``: weight rows and bias entries; the number of groups stays."""
        conv: Any = layer
        kept = _per_group(idxs, conv.out_channels, conv.groups, "output")
        per = conv.out_channels // conv.groups
        keep = torch.tensor([g * per + p for g, positions in enumerate(kept) for p in positions], dtype=torch.long)
        conv.weight = _kept(conv.weight, keep, 0)
        if conv.bias is not None:
            conv.bias = _kept(conv.bias, keep, 0)
        conv.out_channels = len(keep)
        return layer

    def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        """Remove input channels ``idxs``: in each group's rows, the columns of that group's removed channels."""
        conv: Any = layer
        kept = _per_group(idxs, conv.in_channels, conv.groups, "input")
        rows = conv.out_channels // conv.groups
        weight = conv.weight
        pieces = []
        for g, positions in enumerate(kept):
            block = weight[g * rows : (g + 1) * rows]
            pieces.append(block.detach().index_select(1, torch.tensor(positions, device=weight.device)))
        pruned = nn.Parameter(torch.cat(pieces).clone())
        pruned.requires_grad_(weight.requires_grad)
        if weight.grad is not None:
            grads = [
                weight.grad[g * rows : (g + 1) * rows].index_select(1, torch.tensor(p, device=weight.device))
                for g, p in enumerate(kept)
            ]
            pruned.grad = torch.cat(grads).clone()
        conv.weight = pruned
        conv.in_channels = len(kept[0]) * conv.groups
        return layer

    def get_out_channels(self, layer: nn.Module) -> int:
        """The output channels."""
        return int(layer.out_channels)  # type: ignore[arg-type]

    def get_in_channels(self, layer: nn.Module) -> int:
        """The input channels."""
        return int(layer.in_channels)  # type: ignore[arg-type]


GROUPED_CONV_PRUNER = GroupedConvPruner()


class Blocks:
    """How a layer's neurons split into blocks that keep equal counts: ``groups`` and the neurons' new numbers.

    Attributes:
        groups: the number of blocks (1: no grouped convolution constrains the layer).
        renumbered: for each old neuron number, its new one; the neurons of block ``b`` are numbered
            ``b * size … (b + 1) * size - 1``.
    """

    def __init__(self, groups: int, renumbered: Sequence[int]) -> None:
        self.groups = groups
        self.renumbered = tuple(renumbered)

    def apply(self, piece: ModuleSlice) -> ModuleSlice:
        """``piece`` with its neurons renumbered."""
        return piece._replace(neurons=tuple(self.renumbered[n] for n in piece.neurons))


def equal_count_blocks(neurons: int, slices: Sequence[tuple[nn.Module, ModuleSlice]]) -> Blocks | str:
    """The blocks of equal counts the grouped convolutions among ``slices`` impose on ``neurons``, or why none fit.

    Each grouped convolution's slice labels every neuron it carries with the group it falls in (on its input or
    output side); neurons with the same labels everywhere form a block. Every block must hold as many neurons as
    the others: then removing the same number from every block removes the same number from every group of every
    convolution. A convolution whose other channels belong to other layers would tie those layers' counts to this
    one's, which a layer cannot say: such a layer is refused. Blocks are numbered by their lowest neuron and
    renumbered to consecutive ranges (the identity when the groups already are; a reordering of the channels before
    the convolution may interleave them).
    """
    labels: dict[int, list[int | None]] = {n: [] for n in range(neurons)}
    for module, piece in slices:
        if not grouped_convolution(module) or couples_wrongly(module):
            continue
        conv: Any = module
        channels = conv.out_channels if piece.dim == "out" else conv.in_channels
        if len(set(piece.indices)) < channels:  # the other groups' counts would have to follow another layer's
            return f"its channels share the groups of the grouped convolution {piece.module} with other layers'."
        per = channels // conv.groups
        seen: dict[int, int] = {}
        for index, neuron in zip(piece.indices, piece.neurons, strict=True):
            group = index // per
            if seen.setdefault(neuron, group) != group:
                return f"one of its neurons reaches two groups of the grouped convolution {piece.module}."
        for n in range(neurons):
            labels[n].append(seen.get(n))
    if not any(any(label is not None for label in values) for values in labels.values()):
        return Blocks(1, range(neurons))
    classes: dict[tuple[int | None, ...], list[int]] = defaultdict(list)
    for n in range(neurons):
        classes[tuple(labels[n])].append(n)
    sizes = sorted({len(members) for members in classes.values()})
    if len(sizes) > 1:
        return (
            f"the groups of the grouped convolutions it reaches split its {neurons} neurons unevenly"
            f" (blocks of {', '.join(map(str, sizes))})."
        )
    if sizes[0] == 1:
        return "each group of the grouped convolution it reaches holds one of its channels: only whole groups could go."
    renumbered = [0] * neurons
    ordered = sorted(classes.values(), key=lambda members: members[0])
    for block, members in enumerate(ordered):
        for position, n in enumerate(members):
            renumbered[n] = block * sizes[0] + position
    return Blocks(len(ordered), renumbered)
