"""The λ table: evaluate many thresholds from one statistics pass, and choose λ for the user."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from lightning_actprune._errors import ActivationPruningError
from lightning_actprune._plan import PrunableLayer, PruningPlan, _all_scores, _plan_at
from lightning_actprune._report import SweepRow, count_parameters, model_size_mb
from lightning_actprune._statistics import ActivationMoments
from lightning_actprune._surgery import ModuleSnapshot, apply_plan

Validate = Callable[[], Mapping[str, float]]
"""Runs one validation pass over the current model and returns its metrics."""


class ThresholdEvaluator:
    """Prunes a model at any λ and restores it exactly, from statistics gathered once.

    Each :meth:`size` costs one surgery and one restore; each :meth:`evaluate` adds one validation pass. The
    unpruned parameters are kept by reference (:class:`ModuleSnapshot`), never copied.

    Args:
        model: the module the layers were found in.
        layers: from :func:`find_prunable_layers`.
        moments: from :meth:`ActivationRecorder.moments`.
        statistic: the statistic compared with λ.
        min_neurons: the fewest neurons a layer keeps.
        validate: one validation pass of ``model`` (only needed by :meth:`evaluate`).
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[PrunableLayer],
        moments: Mapping[str, ActivationMoments],
        statistic: str,
        min_neurons: int,
        validate: Validate | None = None,
        compensate: bool = False,
        normalize: bool = False,
    ) -> None:
        self.model = model
        self.layers = layers
        self.moments = moments
        self.statistic = statistic
        self.min_neurons = min_neurons
        self.validate = validate
        self.compensate = compensate
        self.normalize = normalize
        self.params_before = count_parameters(model)
        # the scores do not depend on λ: computed once here, not again for every λ of a table or bisection
        self._scores = _all_scores(layers, moments, statistic, model, normalize)

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
        )

    def candidates(self) -> list[float]:
        """Every λ at which the plan changes, ascending.

        The lowest legal λ (0, or the lowest score when scores are normalised), then just above each distinct
        score above it.
        """
        scores = torch.cat(list(self._scores.values()))
        lowest = float(scores.min()) if self.normalize else 0.0
        distinct = sorted({float(s) for s in scores.tolist() if s >= lowest})
        return [lowest] + [math.nextafter(s, math.inf) for s in distinct]

    def _pruned(self, threshold: float, validate: bool) -> SweepRow:
        plan = self.plan(threshold)
        snapshot = ModuleSnapshot(self.model, plan.touched_modules)
        apply_plan(self.model, plan)
        try:
            params = count_parameters(self.model)
            metrics: Mapping[str, float] = {}
            if validate:
                if self.validate is None:
                    raise ActivationPruningError("evaluating a threshold needs a `validate` function.")
                metrics = dict(self.validate())
            return SweepRow(
                threshold=threshold,
                params=params,
                params_kept=params / self.params_before if self.params_before else 1.0,
                size_mb=model_size_mb(self.model),
                neurons={layer.name: len(layer.kept) for layer in plan.layers},
                metrics=metrics,
            )
        finally:
            snapshot.restore()

    def size(self, threshold: float) -> SweepRow:
        """Sizes after pruning at λ, without validation; the model is restored."""
        return self._pruned(threshold, validate=False)

    def evaluate(self, threshold: float) -> SweepRow:
        """Sizes and validation metrics after pruning at λ; the model is restored."""
        return self._pruned(threshold, validate=True)


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
    low, high = 0, len(candidates) - 1  # reduction(high) >= target
    while low < high:
        middle = (low + high) // 2
        if reduction(middle) >= target:
            high = middle
        else:
            low = middle + 1
    return candidates[high]


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
