"""The pruning methods compared: ours, Torch-Pruning's magnitude importance, random removal, ``ModelPruning``.

Ours is the package's plain functions (:func:`benchmarks.common.ours_at_reduction`); the others are here, and the
settings of our options (:class:`Variant`). Each method returns a pruned copy (or the neurons to keep) and never
touches the model it is given.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import lightning.pytorch as pl
import torch
import torch_pruning as tp
from lightning.pytorch.callbacks import ModelPruning
from torch import Tensor, nn

from lightning_actprune.core import PrunableLayer


def _top(scores: Tensor, count: int) -> list[int]:
    order = torch.argsort(scores, descending=True, stable=True)
    return sorted(int(i) for i in order[:count])


def magnitude_kept(
    model: nn.Module, layers: Sequence[PrunableLayer], widths: Mapping[str, int], example_input: Tensor, norm: int
) -> dict[str, list[int]]:
    """Keep, per layer, the ``widths[layer]`` neurons with the largest Torch-Pruning magnitude importance.

    The importance is ``tp.importance.GroupMagnitudeImportance(p=norm)`` over the neuron's whole coupled group
    (its row of weights in the producing layer and its column in the consuming layer), Torch-Pruning's default
    criterion.
    """
    graph = tp.DependencyGraph()
    with torch.enable_grad():
        graph.build_dependency(model, example_inputs=example_input)
    importance = tp.importance.GroupMagnitudeImportance(p=norm)
    kept: dict[str, list[int]] = {}
    for layer in layers:
        producer_name = layer.producers[0]
        producer = model.get_submodule(producer_name)
        prune_out = tp.prune_linear_out_channels if isinstance(producer, nn.Linear) else tp.prune_conv_out_channels
        channels = producer.weight.shape[0]
        group = graph.get_pruning_group(producer, prune_out, idxs=list(range(channels)))
        channel_scores = importance(group)
        scores = torch.zeros(layer.neurons, dtype=torch.float64)
        (out_slice,) = [s for s in layer.slices if s.module == producer_name and s.dim == "out"]
        for channel, neuron in zip(out_slice.indices, out_slice.neurons, strict=True):
            scores[neuron] = float(channel_scores[channel])
        kept[layer.name] = _top(scores, widths[layer.name])
    return kept


def random_kept(layers: Sequence[PrunableLayer], widths: Mapping[str, int], seed: int) -> dict[str, list[int]]:
    """Keep ``widths[layer]`` neurons per layer, drawn uniformly at random (seeded)."""
    generator = torch.Generator().manual_seed(seed)
    return {
        layer.name: sorted(int(i) for i in torch.randperm(layer.neurons, generator=generator)[: widths[layer.name]])
        for layer in layers
    }


def _linear_parameters(model: nn.Module) -> list[tuple[nn.Module, str]]:
    return [(m, name) for m in model.modules() if isinstance(m, nn.Linear) for name in ("weight", "bias")]


def lightning_unstructured(model: pl.LightningModule, trainer: pl.Trainer, amount: int) -> pl.LightningModule:
    """A copy pruned by Lightning's ``ModelPruning("l1_unstructured")``: the ``amount`` smallest weights zeroed.

    Global over every ``Linear`` weight and bias, applied once to the trained weights and made permanent (what the
    callback does at the end of training), without the lottery-ticket reset.
    """
    pruned = copy.deepcopy(model)
    pruning = ModelPruning(
        "l1_unstructured",
        parameters_to_prune=_linear_parameters(pruned),
        amount=amount,
        use_global_unstructured=True,
        use_lottery_ticket_hypothesis=False,
    )
    pruning.setup(trainer, pruned, "fit")
    pruning.apply_pruning(amount)
    pruning.make_pruning_permanent(pruned)
    return pruned


def lightning_structured(
    model: pl.LightningModule,
    trainer: pl.Trainer,
    layers: Sequence[PrunableLayer],
    widths: Mapping[str, int],
    norm: int = 2,
) -> pl.LightningModule:
    """A copy pruned by Lightning's ``ModelPruning("ln_structured")`` on the same layers, to the same widths.

    Per producing layer, the rows (output neurons) of its weight with the smallest L``norm`` norm are zeroed; the
    bias and the next layer's columns stay, as ``ModelPruning`` only masks the named tensor.
    """
    pruned = copy.deepcopy(model)
    for layer in layers:
        for producer in layer.producers:
            module = pruned.get_submodule(producer)
            amount = layer.neurons - widths[layer.name]
            if amount == 0:
                continue
            pruning = ModelPruning(
                "ln_structured",
                parameters_to_prune=[(module, "weight")],
                amount=amount,
                use_global_unstructured=False,
                use_lottery_ticket_hypothesis=False,
                pruning_norm=norm,
                pruning_dim=0,
            )
            pruning.setup(trainer, pruned, "fit")
            pruning.apply_pruning(amount)
            pruning.make_pruning_permanent(pruned)
    return pruned


class Variant(NamedTuple):
    """One setting of our options: the statistic, bias compensation, per-layer normalisation of the scores."""

    statistic: str
    compensate: bool = False
    normalize: bool = False

    @property
    def label(self) -> str:
        """The options as text: ``"mean"``, ``"mean, compensate"``, ``"std, compensate, normalize"``."""
        return ", ".join([self.statistic] + ["compensate"] * self.compensate + ["normalize"] * self.normalize)

    def distance(self, seed: Variant) -> int:
        """How many of the three settings differ from ``seed``'s: the rule's measure of simplicity."""
        return (
            (self.statistic != seed.statistic)
            + (self.compensate != seed.compensate)
            + (self.normalize != seed.normalize)
        )


def option_grid(statistics: Sequence[str]) -> list[Variant]:
    """Every statistic × compensate × normalize, the seed's settings (no compensation, raw scores) first."""
    return [Variant(s, c, n) for s in statistics for c in (False, True) for n in (False, True)]
