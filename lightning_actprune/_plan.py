"""Which neurons go: scores per neuron, and the plan that keeps those reaching λ (pure functions)."""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from lightning_actprune._errors import ActivationPruningError
from lightning_actprune._scoring import (
    MomentStatistic,
    NeuronScorer,
    Scale,
    _squared_column_norms,
    as_scorer,
    index_tensor,
    input_columns,
    planning_cache,
)
from lightning_actprune._statistics import ActivationMoments
from lightning_actprune._types import BiasUpdate, LayerPlan, ModulePruning, PrunableLayer, PruningPlan


def consumer_weight_energy(layer: PrunableLayer, model: nn.Module, norms: dict[str, Tensor] | None = None) -> Tensor:
    """``Σ ‖W[:, f]‖²`` per neuron, over every consumer weight column (and kernel position) that reads it.

    How strongly the next layers listen to a neuron: the tie-break between neurons whose activation statistics
    are equal (e.g. neurons that never fire).

    ``norms`` caches each consumer's column norms across calls (a DenseNet layer is read by every later one).

    Returns:
        A float64 CPU tensor with one value per neuron.
    """
    norms = {} if norms is None else norms
    energy = torch.zeros(layer.neurons, dtype=torch.float64)
    for consumer in layer.consumers:
        if consumer.module not in norms:
            module = model.get_submodule(consumer.module)
            norms[consumer.module] = _squared_column_norms(module).detach().cpu().to(torch.float64)
        energy.index_add_(0, index_tensor(consumer.neurons), norms[consumer.module][index_tensor(consumer.indices)])
    return energy


def layer_scores(
    layer: PrunableLayer,
    moments: Mapping[str, ActivationMoments],
    statistic: str | NeuronScorer,
    model: nn.Module | None = None,
    normalize: bool = False,
) -> Tensor:
    """The score of every neuron of ``layer``: its statistic, the largest over the layers that consume it.

    A neuron that reaches several consumers (a residual stream) stays when any of them sees it active: the
    group's score is the maximum over consumers. A conv channel flattened into a Linear is averaged over its
    positions. ``fluctuation`` (FLAP) is the activation variance times the squared norm of the consumer's weight
    column, summed over a neuron's positions: the energy the neuron's fluctuations put into the consumer's
    output, in squared output units.

    Args:
        layer: a prunable layer.
        moments: the moments of every measured layer input, by module name.
        statistic: one of :data:`lightning_actprune.STATISTICS`, or your own :class:`NeuronScorer`.
        model: the model, needed for ``fluctuation`` and your own scorers (the weights).
        normalize: put the scores on one scale within the layer, as the scorer's ``scale`` says: ``(s - mean) / std``
            (λ in standard deviations, may be negative) or ``s / mean`` (λ in multiples of the layer's mean score).

    Returns:
        A float64 tensor with one score per neuron (on the moments' device for the built-in statistics).
    """
    scorer = as_scorer(statistic)
    if isinstance(scorer, MomentStatistic):
        scores = scorer(layer, moments)
    elif model is None:
        raise ActivationPruningError(f"`statistic={scorer.name!r}` needs the model: the weights it reads.")
    else:
        scores = scorer(layer, moments, model)
    if not isinstance(scores, Tensor) or tuple(scores.shape) != (layer.neurons,):
        shape = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise ActivationPruningError(
            f"`statistic={scorer.name!r}` must return one score per neuron, a tensor of shape ({layer.neurons},)"
            f" for {layer.name}; got {shape}."
        )
    scores = scores.detach().to(torch.float64)
    return rescaled(scores, scores, scorer.scale) if normalize else scores


def rescaled(scores: Tensor, reference: Tensor, scale: Scale) -> Tensor:
    """``scores`` on the scale of ``reference`` (the scores of their layer, or of every layer pooled with it).

    ``"std"``: ``(s - mean) / std``; ``"mean"``: ``s / mean``. Zeros when ``reference`` has no spread (``"std"``) or
    a mean that is not positive (``"mean"``): no unit can then be told from another.

    Example:
        >>> rescaled(torch.tensor([1.0, 3.0]), torch.tensor([1.0, 3.0]), "mean")
        tensor([0.5000, 1.5000])
    """
    if scale == "mean":
        mean = reference.mean()
        return scores / mean if mean > 0 else torch.zeros_like(scores)
    spread = reference.std(unbiased=False)
    return (scores - reference.mean()) / spread if spread > 0 else torch.zeros_like(scores)


def _bias_updates(
    layers: Sequence[PrunableLayer],
    removed: Mapping[str, set[int]],
    moments: Mapping[str, ActivationMoments],
    model: nn.Module,
) -> tuple[BiasUpdate, ...]:
    """What each consumer's bias must absorb so its output stays as if the removed inputs were at their mean."""
    deltas: dict[str, Tensor] = {}
    for layer in layers:
        for consumer in layer.consumers:
            features = [f for f, n in zip(consumer.indices, consumer.neurons, strict=True) if n in removed[layer.name]]
            if not features or consumer.module not in moments:
                continue
            module = model.get_submodule(consumer.module)
            index = torch.tensor(features)
            means = moments[consumer.module].mean.detach().cpu().to(torch.float64)[index]
            columns = input_columns(module).cpu().to(torch.float64)[index]  # (removed, out)
            delta = means @ columns
            deltas[consumer.module] = deltas[consumer.module] + delta if consumer.module in deltas else delta
    return tuple(BiasUpdate(name, tuple(float(v) for v in delta)) for name, delta in deltas.items())


def plan_pruning(
    layers: Sequence[PrunableLayer],
    moments: Mapping[str, ActivationMoments],
    threshold: float,
    statistic: str | NeuronScorer = "mean",
    min_neurons: int = 1,
    model: nn.Module | None = None,
    compensate: bool = False,
    normalize: bool = False,
    tied: Sequence[Sequence[str]] = (),
) -> PruningPlan:
    """Select, in every layer, the neurons whose statistic is below ``threshold``, keeping ``min_neurons``.

    Blocks that must keep equal counts (a layer's ``groups``, the sets in ``tied``) each keep the mean of the counts
    λ alone would keep in them, their highest-scoring neurons (see :func:`equal_count_ties`).

    Args:
        layers: from :func:`find_prunable_layers`.
        moments: from :meth:`ActivationRecorder.moments`.
        threshold: λ.
        statistic: one of :data:`lightning_actprune.STATISTICS`, or your own :class:`NeuronScorer` (the plan records
            its ``name``).
        min_neurons: the fewest neurons a layer keeps; the highest-scoring ones stay.
        model: the model (needed for ``fluctuation``, your own scorers and ``compensate``).
        compensate: fold each removed neuron's mean activation into its consumers' biases, so a neuron that is
            nearly constant is removed almost without a trace.
        normalize: standardise scores per layer before comparing with λ (see :func:`layer_scores`).
        tied: sets of layer names that keep the same number of neurons (every layer of a set has the same
            ``neurons`` and ``groups``).

    Returns:
        The plan, as plain data.

    Raises:
        ActivationPruningError: a layer's scores are NaN/Inf or were never recorded; ``tied`` is inconsistent.

    Example:
        >>> import torch
        >>> from lightning_actprune.core import ActivationRecorder, find_prunable_layers
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        >>> x = torch.randn(8, 3)
        >>> with ActivationRecorder(model) as rec, torch.no_grad():
        ...     _ = model(x)
        >>> plan = plan_pruning(find_prunable_layers(model, x), rec.moments(), threshold=1e9)
        >>> plan.neurons_after
        1
    """
    ties = equal_count_ties(layers, tied)
    scorer = as_scorer(statistic)
    scores = _all_scores(layers, moments, scorer, model, normalize)
    scored_by = _scored_by(layers, scorer, model, normalize)
    name, scale = scorer.name, scorer.scale
    return _plan_at(
        layers, scores, threshold, name, min_neurons, moments, model, compensate, normalize, ties, scored_by, scale
    )


def _all_scores(
    layers: Sequence[PrunableLayer],
    moments: Mapping[str, ActivationMoments],
    statistic: str | NeuronScorer,
    model: nn.Module | None,
    normalize: bool,
) -> dict[str, Tensor]:
    """Every layer's scores, on the CPU; they do not depend on λ, so one computation serves every λ.

    With ``normalize``, the layers the scorer pools (:meth:`NeuronScorer.pooled_layers`) are put on one scale together
    (:func:`rescaled` with the scores of all of their neurons as reference, per criterion); the others each on their
    own.
    """
    scorer = as_scorer(statistic)
    pooled = _scored_by(layers, scorer, model, normalize)
    scores = {}
    with planning_cache():  # a consumer read by several layers has its weight norms computed once
        for layer in layers:
            values = layer_scores(layer, moments, scorer, model, normalize and layer.name not in pooled).cpu()
            if not bool(torch.isfinite(values).all()):
                raise ActivationPruningError(
                    f"the {scorer.name} of {layer.name} contains NaN or Inf; cannot prune on it."
                )
            scores[layer.name] = values
    for criterion in set(pooled.values()):
        names = [name for name, c in pooled.items() if c == criterion]
        together = torch.cat([scores[name] for name in names])
        for name in names:
            scores[name] = rescaled(scores[name], together, scorer.scale)
    return scores


def _scored_by(
    layers: Sequence[PrunableLayer], statistic: str | NeuronScorer, model: nn.Module | None, normalize: bool
) -> dict[str, str]:
    """The layers another criterion scored, pooled when standardised (only then: raw scales would not compare)."""
    if not normalize or model is None:
        return {}
    return dict(as_scorer(statistic).pooled_layers(layers, model))


class Block(NamedTuple):
    """Neurons of one layer that keep as many neurons as the other blocks of their tie."""

    layer: str
    neurons: range


Tie = list[Block]
"""Blocks that keep equal numbers of neurons (see :func:`equal_count_ties`)."""


def equal_count_ties(layers: Sequence[PrunableLayer], tied: Sequence[Sequence[str]] = ()) -> list[Tie]:
    """The sets of blocks that must keep equal numbers of neurons.

    A layer with ``groups > 1`` is one tie of its blocks (a grouped convolution's channel groups, the query heads of
    each key/value head); a set of layer names in ``tied`` is one tie of all its layers' blocks (the same width in
    every transformer block). Names of layers that are not in ``layers`` (excluded, or not prunable) are ignored.

    Raises:
        ActivationPruningError: a layer is in two sets, or the layers of a set differ in neurons or groups.
    """
    by_name = {layer.name: layer for layer in layers}
    ties: list[Tie] = []
    placed: set[str] = set()
    for names in tied:
        members = [by_name[name] for name in dict.fromkeys(names) if name in by_name]
        twice = [m.name for m in members if m.name in placed]
        if twice:
            raise ActivationPruningError(f"`tied` names {', '.join(twice)} in two sets; a layer can be in one.")
        shapes = {(m.neurons, m.groups) for m in members}
        if len(shapes) > 1:
            shown = ", ".join(f"{m.name} ({m.neurons} neurons, {m.groups} groups)" for m in members)
            raise ActivationPruningError(f"`tied` layers must have equal neurons and groups; got {shown}.")
        placed.update(m.name for m in members)
        if len(members) > 1 or (members and members[0].groups > 1):
            ties.append([Block(m.name, block) for m in members for block in m.blocks()])
    for layer in layers:
        if layer.groups > 1 and layer.name not in placed:
            ties.append([Block(layer.name, block) for block in layer.blocks()])
    return ties


def block_floor(layer: PrunableLayer, min_neurons: int) -> int:
    """The fewest neurons each block of ``layer`` keeps, so that the layer keeps ``min_neurons`` (and each block 1)."""
    return min(layer.neurons // layer.groups, max(1, math.ceil(min_neurons / layer.groups)))


def _equalise(
    keep: Mapping[str, Tensor], scores: Mapping[str, Tensor], ties: Sequence[Tie], floors: Mapping[str, int]
) -> None:
    """Make every block of each tie keep the same number of neurons: the mean count, its highest-scoring ones."""
    for tie in ties:
        counts = [int(keep[block.layer][block.neurons.start : block.neurons.stop].sum()) for block in tie]
        count = max(floors[tie[0].layer], math.floor(sum(counts) / len(counts) + 0.5))
        for block in tie:
            values, mask = scores[block.layer], keep[block.layer]
            ranked = sorted(block.neurons, key=lambda i: (-float(values[i]), i))
            mask[block.neurons.start : block.neurons.stop] = False
            mask[ranked[:count]] = True


def _plan_at(
    layers: Sequence[PrunableLayer],
    scores: Mapping[str, Tensor],
    threshold: float,
    statistic: str,
    min_neurons: int,
    moments: Mapping[str, ActivationMoments],
    model: nn.Module | None,
    compensate: bool,
    normalize: bool,
    ties: Sequence[Tie] = (),
    scored_by: Mapping[str, str] | None = None,
    scale: Scale = "std",
) -> PruningPlan:
    """The plan at λ from scores already computed by :func:`_all_scores`; ``ties`` keep equal counts.

    ``scored_by``: the layers another criterion than ``statistic`` scored (:func:`_scored_by`), and ``scale`` the
    scorer's (with ``normalize``), for the plan.
    """
    keep: dict[str, Tensor] = {}
    for layer in layers:
        values = scores[layer.name]
        keep[layer.name] = values >= threshold
        floor = min(min_neurons, layer.neurons)
        if int(keep[layer.name].sum()) < floor:
            order = sorted(range(layer.neurons), key=lambda i: (-float(values[i]), i))
            keep[layer.name][order[:floor]] = True
    _equalise(keep, scores, ties, {layer.name: block_floor(layer, min_neurons) for layer in layers})
    kept = {name: [int(i) for i in torch.nonzero(mask).flatten()] for name, mask in keep.items()}
    plan = plan_from_kept(layers, kept, moments=moments, model=model, compensate=compensate)
    return _stamped(plan, layers, threshold, statistic, normalize, scored_by or {}, scale)


def _stamped(
    plan: PruningPlan,
    layers: Sequence[PrunableLayer],
    threshold: float,
    statistic: str,
    normalize: bool,
    scored_by: Mapping[str, str],
    scale: Scale,
) -> PruningPlan:
    """``plan`` with what chose it.

    λ, the statistic, whether and how scores were put on one scale, and the layers another criterion scored (in the
    order of ``layers``).
    """
    scored = tuple((layer.name, scored_by[layer.name]) for layer in layers if layer.name in scored_by)
    return dataclasses.replace(
        plan, threshold=float(threshold), statistic=statistic, normalize=normalize, scored_by=scored, scale=scale
    )


def plan_from_kept(
    layers: Sequence[PrunableLayer],
    kept: Mapping[str, Sequence[int]],
    moments: Mapping[str, ActivationMoments] | None = None,
    model: nn.Module | None = None,
    compensate: bool = False,
) -> PruningPlan:
    """The plan that keeps the given neurons of every layer, whatever chose them (a threshold, a magnitude, …).

    Args:
        layers: from :func:`find_prunable_layers`.
        kept: per layer name, the indices of the neurons that stay (a layer not listed keeps all).
        moments: from :meth:`ActivationRecorder.moments`; needed with ``compensate``.
        model: the unpruned model; needed with ``compensate``.
        compensate: fold the removed neurons' mean activations into their consumers' biases.

    Returns:
        A plan whose ``threshold`` is NaN and ``statistic`` empty (:func:`plan_pruning` fills them in).

    Raises:
        ActivationPruningError: an index is out of range, or ``compensate`` lacks ``moments``/``model``.
    """
    if compensate and (model is None or moments is None):
        raise ActivationPruningError("`compensate=True` needs the model and the moments: consumers' weights and means.")
    plans: list[LayerPlan] = []
    removals: dict[tuple[str, str], set[int]] = defaultdict(set)
    removed_neurons: dict[str, set[int]] = {}
    for layer in layers:
        keep = sorted({int(i) for i in kept.get(layer.name, range(layer.neurons))})
        if keep and not 0 <= keep[0] <= keep[-1] < layer.neurons:
            raise ActivationPruningError(
                f"`kept` for {layer.name} must be indices in [0, {layer.neurons}); got {keep[0]}..{keep[-1]}."
            )
        if layer.groups > 1:
            counts = {sum(1 for i in keep if i in block) for block in layer.blocks()}
            if len(counts) > 1 or 0 in counts:
                raise ActivationPruningError(
                    f"`kept` for {layer.name} must keep the same number (at least 1) of each of its {layer.groups}"
                    f" groups of {layer.neurons // layer.groups} neurons; got {sorted(counts)} per group."
                )
        plans.append(LayerPlan(layer.name, layer.neurons, tuple(keep)))
        removed = set(range(layer.neurons)) - set(keep)
        removed_neurons[layer.name] = removed
        for piece in layer.slices:
            removals[(piece.module, piece.dim)].update(
                idx for idx, neuron in zip(piece.indices, piece.neurons, strict=True) if neuron in removed
            )
    operations = tuple(
        ModulePruning(module, dim, tuple(sorted(indices)))  # type: ignore[arg-type]
        for (module, dim), indices in removals.items()
        if indices
    )
    bias_updates: tuple[BiasUpdate, ...] = ()
    if compensate and model is not None and moments is not None:
        bias_updates = _bias_updates(layers, removed_neurons, moments, model)
    return PruningPlan(math.nan, "", tuple(plans), operations, bias_updates)
