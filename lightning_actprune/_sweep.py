"""The λ table: evaluate many thresholds from one statistics pass, and choose λ for the user."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from lightning_actprune._counting import RemovalCounts, parameters_after
from lightning_actprune._errors import ActivationPruningError
from lightning_actprune._gc import collection_paused_during
from lightning_actprune._plan import (
    Block,
    _all_scores,
    _plan_at,
    _scored_by,
    _stamped,
    block_floor,
    consumer_weight_energy,
    equal_count_ties,
    layer_scores,
    plan_from_kept,
)
from lightning_actprune._scoring import NeuronScorer, as_scorer, planning_cache
from lightning_actprune._statistics import ActivationMoments
from lightning_actprune._surgery import pruned_temporarily
from lightning_actprune._types import PrunableLayer, PruningPlan, SweepRow, count_parameters, model_size_mb


class RemovalUnit(NamedTuple):
    """Neurons that go together in a target search: one neuron, or one tier of blocks that keep equal counts."""

    score: float
    members: tuple[tuple[str, int], ...]
    """``(layer name, neuron index)`` of each neuron."""


Validate = Callable[[], Mapping[str, float]]
"""Runs one validation pass over the current model and returns its metrics."""


class ThresholdEvaluator:
    """Prunes a model at any λ and restores it exactly, from statistics gathered once.

    Each :meth:`size` costs one surgery and one restore; each :meth:`evaluate` adds one validation pass. The
    unpruned parameters are kept by reference (:func:`pruned_temporarily`), never copied.

    Args:
        model: the module the layers were found in.
        layers: from :func:`find_prunable_layers`.
        moments: from :meth:`ActivationRecorder.moments`.
        statistic: the statistic compared with λ: a name of :data:`STATISTICS` or a :class:`NeuronScorer`.
        min_neurons: the fewest neurons a layer keeps.
        validate: one validation pass of ``model`` (only needed by :meth:`evaluate`).
        compensate: fold removed neurons' mean activations into their consumers' biases.
        normalize: put scores on one scale per layer (as the scorer's ``scale`` says, see :func:`layer_scores`).
        tied: sets of layer names that keep the same number of neurons (see :func:`plan_pruning`).
    """

    @collection_paused_during
    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[PrunableLayer],
        moments: Mapping[str, ActivationMoments],
        statistic: str | NeuronScorer,
        min_neurons: int,
        validate: Validate | None = None,
        compensate: bool = False,
        normalize: bool = False,
        tied: Sequence[Sequence[str]] = (),
    ) -> None:
        self.model = model
        self.layers = layers
        self.moments = moments
        scorer = as_scorer(statistic)
        self.statistic = scorer.name  # what the plans record
        self.scale = scorer.scale
        self.min_neurons = min_neurons
        self.validate = validate
        self.compensate = compensate
        self.normalize = normalize
        self.ties = equal_count_ties(layers, tied)
        self.params_before = count_parameters(model)
        # the scores do not depend on λ: computed once here, not again for every λ of a table or bisection
        self._scores = _all_scores(layers, moments, statistic, model, normalize)
        self._scored_by = _scored_by(layers, statistic, model, normalize)
        self._order: list[RemovalUnit] | None = None
        self._counts: RemovalCounts | None = None

    def plan(self, threshold: float) -> PruningPlan:
        """The plan at λ (the same as :func:`plan_pruning` with these settings)."""
        return _plan_at(
            self.layers,
            self._scores,
            threshold,
            self.statistic,
            self.min_neurons,
            self.moments,
            self.model,
            self.compensate,
            self.normalize,
            self.ties,
            self._scored_by,
            self.scale,
        )

    def candidates(self) -> list[float]:
        """Every λ at which the plan changes, ascending.

        A λ that removes nothing (0, or the lowest score when scores can be negative: normalised scores, or the
        mean of GELU/SiLU/tanh outputs), then just above each distinct score above it.
        """
        scores = torch.cat(list(self._scores.values()))
        lowest = min(float(scores.min()), 0.0) if not self.normalize else float(scores.min())
        distinct = sorted({float(s) for s in scores.tolist() if s >= lowest})
        return [lowest] + [math.nextafter(s, math.inf) for s in distinct]

    def removal_order(self) -> list[RemovalUnit]:
        """Every unit that may go, in the order a growing λ removes them.

        A unit is one neuron, or, where blocks must keep equal counts (a layer's ``groups``, ``tied`` layers), one
        tier: the r-th lowest-scoring neuron of every block of the tie, scored by the mean of their scores.
        Ascending score; units with equal scores (e.g. every neuron that never fires) are ordered by their RMS
        activation, then by how strongly the next layers read them (:func:`consumer_weight_energy`), then by layer
        and index, so a target can be met one unit at a time instead of a whole tied block at once. The
        ``min_neurons`` neurons each layer keeps (the last in this order) are not listed.
        """
        if self._order is None:
            keys = self._tie_break_keys()
            position = {layer.name: p for p, layer in enumerate(self.layers)}
            floors = {layer.name: block_floor(layer, self.min_neurons) for layer in self.layers}
            ties = self.ties
            tied = {block.layer for tie in ties for block in tie}
            for layer in self.layers:  # a layer of its own: one block whose floor is `min_neurons`
                if layer.name not in tied:
                    ties = [*ties, [Block(layer.name, range(layer.neurons))]]
                    floors[layer.name] = min(self.min_neurons, layer.neurons)
            members: list[tuple[tuple[str, int], ...]] = []
            sort_keys = []
            for tie in ties:
                tiers = len(tie[0].neurons) - floors[tie[0].layer]
                first = min(position[block.layer] for block in tie)
                tie_members, tie_keys = _tiers(tie, keys, tiers, first)
                members += tie_members
                sort_keys.append(tie_keys)
            keyed = torch.cat(sort_keys) if sort_keys else torch.zeros(0, 5, dtype=torch.float64)
            order = _lexsort(keyed.unbind(1)).tolist()
            scores = keyed[:, 0].tolist()
            self._order = [RemovalUnit(scores[j], members[j]) for j in order]
        return self._order

    def _tie_break_keys(self) -> dict[str, torch.Tensor]:
        """Per layer, ``(neurons, 3)``: the score, the RMS activation and the consumers' weight energy."""
        keys = {}
        norms: dict[str, torch.Tensor] = {}
        with planning_cache():
            for layer in self.layers:
                rms = layer_scores(layer, self.moments, "rms").cpu()
                energy = consumer_weight_energy(layer, self.model, norms)
                keys[layer.name] = torch.stack([self._scores[layer.name], rms, energy], dim=1)
        return keys

    def removal_counts(self) -> RemovalCounts | None:
        """The parameter counts of :meth:`plan_removing`'s plans, by arithmetic.

        ``None`` with ``compensate``: a bias update may add a bias, so those plans are sized by surgery.
        """
        if self.compensate:
            return None
        if self._counts is None:
            members = [unit.members for unit in self.removal_order()]
            with planning_cache():
                self._counts = RemovalCounts(self.model, self.layers, members, self.params_before)
        return self._counts

    def plan_removing(self, count: int) -> PruningPlan:
        """The plan removing the first ``count`` neurons of :meth:`removal_order`.

        Its ``threshold`` lies between the last removed neuron's score and the next one's (the lowest candidate
        when ``count`` is 0); where ``count`` splits a block of equal scores, it is that score: the neurons below
        it go, and the first of those at it.
        """
        order = self.removal_order()
        removed: dict[str, set[int]] = {layer.name: set() for layer in self.layers}
        for unit in order[:count]:
            for name, index in unit.members:
                removed[name].add(index)
        kept = {layer.name: [i for i in range(layer.neurons) if i not in removed[layer.name]] for layer in self.layers}
        plan = plan_from_kept(self.layers, kept, self.moments, self.model, self.compensate)
        threshold = self.candidates()[0] if not count else order[count - 1].score
        following = order[count].score if count < len(order) else math.inf
        if count and following != threshold:
            threshold = (threshold + following) / 2 if math.isfinite(following) else math.nextafter(threshold, math.inf)
        return _stamped(plan, self.layers, threshold, self.statistic, self.normalize, self._scored_by, self.scale)

    def _pruned(self, threshold: float | PruningPlan, validate: bool) -> SweepRow:
        plan = threshold if isinstance(threshold, PruningPlan) else self.plan(threshold)
        with pruned_temporarily(self.model, plan):
            params = count_parameters(self.model)
            metrics: Mapping[str, float] = {}
            if validate:
                if self.validate is None:
                    raise ActivationPruningError("evaluating a threshold needs a `validate` function.")
                metrics = dict(self.validate())
            return SweepRow(
                threshold=plan.threshold,
                params=params,
                params_kept=params / self.params_before if self.params_before else 1.0,
                size_mb=model_size_mb(self.model),
                neurons={layer.name: len(layer.kept) for layer in plan.layers},
                metrics=metrics,
            )

    def size(self, threshold: float | PruningPlan) -> SweepRow:
        """Sizes after pruning at λ (or with the given plan), without validation; the model is restored."""
        return self._pruned(threshold, validate=False)

    def evaluate(self, threshold: float | PruningPlan) -> SweepRow:
        """Sizes and validation metrics after pruning at λ (or with the plan); the model is restored."""
        return self._pruned(threshold, validate=True)


def _lexsort(columns: Sequence[torch.Tensor]) -> torch.Tensor:
    """The permutation that sorts by the first column, equal values by the second, …: Python's order of tuples."""
    order = torch.arange(len(columns[0]))
    for column in reversed(columns):
        order = order[torch.sort(column[order], stable=True).indices]
    return order


def _tiers(
    tie: Sequence[Block], keys: Mapping[str, torch.Tensor], tiers: int, first: int
) -> tuple[list[tuple[tuple[str, int], ...]], torch.Tensor]:
    """The lowest ``tiers`` tiers of a tie: each one's neurons, and its sort key.

    Tier r holds the r-th lowest neuron of every block; it is keyed by the mean of their score, RMS and energy
    (one block: its neuron's own), then by the tie's first layer's position ``first`` and the first block's neuron.

    Returns:
        The members of every tier, and a ``(tiers, 5)`` float64 tensor of their keys.
    """
    ranks = [_ranked(keys[block.layer], block.neurons)[:tiers].tolist() for block in tie]
    names = [block.layer for block in tie]
    members = [tuple(zip(names, tier, strict=True)) for tier in zip(*ranks, strict=True)]
    if len(tie) == 1:
        values = keys[names[0]][ranks[0]]
    else:  # in Python's arithmetic, summing the blocks in order
        means = [[sum(float(keys[name][i, k]) for name, i in tier) / len(tier) for k in range(3)] for tier in members]
        values = torch.tensor(means, dtype=torch.float64).reshape(-1, 3)
    where = torch.tensor([[first, index] for index in ranks[0]], dtype=torch.float64).reshape(-1, 2)
    return members, torch.cat([values, where], dim=1)


def _ranked(keys: torch.Tensor, neurons: range) -> torch.Tensor:
    """The neurons of a block, lowest first by their keys (``keys`` rows), then by index."""
    index = torch.arange(neurons.start, neurons.stop)
    block = keys[neurons.start : neurons.stop]
    return index[_lexsort([block[:, 0], block[:, 1], block[:, 2], index])]


def threshold_for_reduction(evaluator: ThresholdEvaluator, target: float) -> float:
    """The smallest λ that removes at least ``target`` of the parameters, by bisection on the plan (no validation).

    Raises:
        ActivationPruningError: even removing every prunable neuron (down to ``min_neurons``) is not enough.
    """
    candidates = evaluator.candidates()

    def reduction(index: int) -> float:
        return 1.0 - evaluator.size(candidates[index]).params_kept

    best = reduction(len(candidates) - 1)
    if best < target:
        raise ActivationPruningError(
            f"`target_params_reduction={target:g}` is out of reach: removing every prunable neuron"
            f" (keeping `min_neurons`) reduces the parameters by {best:.4f}."
        )
    return candidates[_first_reaching(reduction, len(candidates) - 1, target)]


def _first_reaching(reduction: Callable[[int], float], last: int, target: float) -> int:
    """The smallest index in ``[0, last]`` whose ``reduction`` is at least ``target`` (it is at ``last``)."""
    low, high = 0, last
    while low < high:
        middle = (low + high) // 2
        if reduction(middle) >= target:
            high = middle
        else:
            low = middle + 1
    return high


@dataclass(frozen=True)
class ReductionChoice:
    """What :func:`plan_for_reduction` found.

    Attributes:
        plan: the plan that meets the target with the fewest neurons removed; ``None`` when out of reach.
        reduction: the fraction of parameters ``plan`` removes (the most any plan can remove, when out of reach).
        note: why the target is missed by more than :data:`REDUCTION_TOLERANCE`, or ``None``.
        tied: ``(removed, tied)`` when the last λ splits a block of neurons with equal scores, else ``None``.
    """

    plan: PruningPlan | None
    reduction: float
    note: str | None = None
    tied: tuple[int, int] | None = None


REDUCTION_TOLERANCE = 0.02
"""How far above ``target_params_reduction`` a result may land without a warning."""


@collection_paused_during
def plan_for_reduction(evaluator: ThresholdEvaluator, target: float) -> ReductionChoice:
    """The fewest neurons that remove at least ``target`` of the parameters, by bisection on the plan's size.

    Neurons go in :meth:`ThresholdEvaluator.removal_order`; no validation pass is spent. Each count is sized by
    pruning the model for real, so every unit costs what it truly holds: an attention head (a neuron of a
    ``<attention>:heads`` layer) its q/k/v rows and out-projection columns, an FFN neuron its row and column.

    Ties in the score are broken one neuron at a time, so the result lands within one neuron's parameters of the
    target; a larger miss (one neuron of a wide coupled group) is explained in ``note``. Out of reach (the
    ``min_neurons`` floors and the layers that cannot be pruned hold too many parameters): ``plan`` is ``None``.
    """
    order = evaluator.removal_order()
    reductions: dict[int, float] = {}  # each count costs a surgery: the bisection and the report share them
    counts = evaluator.removal_counts()

    def reduction(count: int) -> float:
        if count not in reductions:
            params = counts.parameters_after(count) if counts is not None else None
            if params is None:  # compensating, or a module the arithmetic does not know: the plan itself is sized
                plan = evaluator.plan_removing(count)
                params = parameters_after(evaluator.model, plan, evaluator.params_before)
                if params is None:  # a module whose count needs the surgery
                    reductions[count] = 1.0 - evaluator.size(plan).params_kept
                    return reductions[count]
            reductions[count] = 1.0 - params / evaluator.params_before
        return reductions[count]

    most = reduction(len(order))
    if most < target:
        return ReductionChoice(
            None,
            most,
            f"`target_params_reduction={target:g}` is out of reach: removing every prunable neuron"
            f" (keeping `min_neurons={evaluator.min_neurons}` per layer) reduces the parameters by {most:.4f};"
            " the rest is in layers that are not pruned (the output layer, excluded or unprunable groups).",
        )
    high = _first_reaching(reduction, len(order), target)
    achieved = reduction(high)
    note = None
    if achieved - target > REDUCTION_TOLERANCE:
        name = order[high - 1].members[0][0]
        note = (
            f"`target_params_reduction={target:g}` removed {achieved:.4f} of the parameters: the last neuron"
            f" removed (of {name}) takes {achieved - reduction(high - 1):.4f} of them with it (coupled layers)."
        )
    tied = None
    if high:
        last = order[high - 1].score
        equal = [unit for unit in order if unit.score == last]
        removed = sum(1 for unit in order[:high] if unit.score == last)
        tied = (removed, len(equal)) if removed < len(equal) else None
    return ReductionChoice(evaluator.plan_removing(high), achieved, note, tied)


def metric_drop(before: float, after: float, mode: str) -> float:
    """How much worse ``after`` is than ``before``: positive is worse (``mode`` is ``"max"`` or ``"min"``)."""
    return before - after if mode == "max" else after - before


def choose_within_drop(
    rows: Sequence[SweepRow], monitor: str, before: float, max_drop: float, mode: str
) -> SweepRow | None:
    """The row with the largest parameter reduction whose ``monitor`` got worse by at most ``max_drop``."""
    allowed = [r for r in rows if monitor in r.metrics and metric_drop(before, r.metrics[monitor], mode) <= max_drop]
    return min(allowed, key=lambda r: (r.params, -r.threshold), default=None)


def search_within_drop(
    evaluator: ThresholdEvaluator, monitor: str, before: float, max_drop: float, mode: str
) -> list[SweepRow]:
    """Bisection over the distinct λ for the largest one whose metric drop stays within ``max_drop``.

    Assumes the metric worsens as λ grows (true in the large; a non-monotone metric can make it stop early, never
    pick a λ over budget). It costs at most ``1 + ceil(log2(n + 1))`` validation passes for ``n`` distinct scores.

    Returns:
        Every row it evaluated, ascending in λ.
    """
    candidates = evaluator.candidates()
    rows: dict[int, SweepRow] = {}

    def ok(index: int) -> bool:
        rows[index] = evaluator.evaluate(candidates[index])
        return metric_drop(before, rows[index].metrics[monitor], mode) <= max_drop

    low, high = 0, len(candidates) - 1  # invariant once low passes: ok(low)
    if ok(low):
        while low < high:
            middle = (low + high + 1) // 2
            if ok(middle):
                low = middle
            else:
                high = middle - 1
    return [rows[i] for i in sorted(rows)]
