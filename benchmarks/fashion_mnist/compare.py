"""The comparisons behind tables 2 and 3, and the rule that picks the recommended setting.

Table 2: every method at equal parameter reduction. Table 3: every setting of our options at each target.
"""

from __future__ import annotations

import math
import statistics as stats
import warnings
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from benchmarks.common import Evaluator, ours_at_reduction, pruned_copy, widths_of
from lightning_actprune.core import ActivationMoments, PrunableLayer, PruningPlan, count_parameters, plan_from_kept

from .measure import nonzero_parameters, state_dict_bytes
from .methods import Variant, lightning_structured, lightning_unstructured, magnitude_kept, random_kept
from .results import Choice, GridRow, MethodRow, Settings, TargetGap, VariantSummary


def _row(
    target: float, method: str, family: str, model: nn.Module, accuracy: float, **extra: Any
) -> tuple[MethodRow, nn.Module]:
    row = MethodRow(
        target=target,
        method=method,
        family=family,
        params=count_parameters(model),
        nonzero=nonzero_parameters(model),
        file_bytes=state_dict_bytes(model),
        test_acc=accuracy,
        **extra,
    )
    return row, model


def compare_at_reduction(
    model: pl.LightningModule,
    layers: Sequence[PrunableLayer],
    moments: Mapping[str, ActivationMoments],
    evaluator: Evaluator,
    target: float,
    settings: Settings,
    example_input: Tensor,
    extra_variants: Sequence[Variant] = (),
) -> list[tuple[MethodRow, nn.Module]]:
    """Every method at (about) the same parameter reduction, each from a copy of the trained ``model``.

    Ours: λ per statistic (and per ``extra_variants``) by :func:`ours_at_reduction`. The alternatives match
    ``mean``'s result: Lightning's ``l1_unstructured`` zeroes as many parameters as ``mean`` removed;
    ``ln_structured``, Torch-Pruning's magnitude importance (with and without bias compensation) and random
    removal keep ``mean``'s per-layer widths.
    """
    rows: list[tuple[MethodRow, nn.Module]] = []
    before = count_parameters(model)
    reference: PruningPlan | None = None
    reference_params = before
    variants = [Variant(s) for s in settings.statistics] + [Variant(s, True) for s in settings.compensated_statistics]
    variants += [v for v in extra_variants if v not in variants]
    for variant in variants:
        threshold, plan, params = ours_at_reduction(
            model, layers, moments, variant.statistic, target, variant.compensate, variant.normalize
        )
        pruned = pruned_copy(model, plan)
        accuracy = evaluator.test_accuracy(pruned)
        method = f"ours ({variant.label})"
        rows.append(_row(target, method, "ours", pruned, accuracy, threshold=threshold, widths=widths_of(plan)))
        if variant == Variant(settings.seed_statistic) or reference is None:
            reference, reference_params = plan, params
    assert reference is not None
    widths = widths_of(reference)
    trainer = evaluator.trainer
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        masked = lightning_unstructured(model, trainer, before - reference_params)
        rows.append(_row(target, "ModelPruning l1_unstructured", "masked", masked, evaluator.test_accuracy(masked)))
        masked = lightning_structured(model, trainer, layers, widths)
        rows.append(
            _row(
                target,
                "ModelPruning ln_structured (L2 rows)",
                "masked",
                masked,
                evaluator.test_accuracy(masked),
                widths=widths,
            )
        )
    for norm in (1, 2):
        kept = magnitude_kept(model, layers, widths, example_input, norm)
        for compensate in (False, True):
            plan = plan_from_kept(layers, kept, moments=moments, model=model, compensate=compensate)
            pruned = pruned_copy(model, plan)
            rows.append(
                _row(
                    target,
                    f"Torch-Pruning magnitude L{norm}{' + compensate' if compensate else ''}",
                    "magnitude",
                    pruned,
                    evaluator.test_accuracy(pruned),
                    widths=widths,
                )
            )
    accuracies = []
    first: nn.Module | None = None
    for seed in settings.random_seeds:
        pruned = pruned_copy(model, plan_from_kept(layers, random_kept(layers, widths, seed)))
        accuracies.append(evaluator.test_accuracy(pruned))
        if first is None:
            first = pruned
    assert first is not None
    std = stats.stdev(accuracies) if len(accuracies) > 1 else 0.0
    rows.append(
        _row(
            target,
            f"random (mean of {len(accuracies)} seeds)",
            "random",
            first,
            stats.fmean(accuracies),
            test_acc_std=std,
            widths=widths,
        )
    )
    return rows


def grid_at_reduction(
    model: nn.Module,
    layers: Sequence[PrunableLayer],
    moments: Mapping[str, ActivationMoments],
    evaluator: Evaluator,
    target: float,
    variants: Sequence[Variant],
) -> list[tuple[GridRow, Tensor]]:
    """Every variant at ``target``: λ from a ``ThresholdEvaluator`` with its options, applied to a copy, tested.

    Returns:
        Per variant, its row and which test examples the pruned model classifies correctly.
    """
    rows: list[tuple[GridRow, Tensor]] = []
    for variant in variants:
        threshold, plan, params = ours_at_reduction(
            model, layers, moments, variant.statistic, target, variant.compensate, variant.normalize
        )
        correct = evaluator.test_correct(pruned_copy(model, plan))
        row = GridRow(target, *variant, threshold, params, widths_of(plan), float(correct.float().mean()))
        rows.append((row, correct))
    return rows


def summarize_grid(rows: Sequence[tuple[GridRow, Tensor]], seed: Variant, z: float = 1.96) -> Choice:
    """Each variant's accuracy averaged over the targets, compared with the best and the seed's, and the choice.

    The comparisons are paired on the test examples: for variants ``a`` and ``b``, example ``i`` contributes
    ``d_i`` = (times ``a`` got it right − times ``b`` did) / number of targets, so the difference of the mean
    accuracies is ``mean(d)`` and its standard error ``std(d) / sqrt(n)``. That is the test-set sampling noise
    (the same trained model, the same statistics); it says nothing about another training seed.

    The rule: the variant with the best mean accuracy, unless variants within noise of it (difference at most
    ``z`` standard errors) exist that are closer to ``seed`` (fewer of statistic, compensate, normalize changed);
    then the closest of those, the most accurate among equally close ones.

    Returns:
        Per variant its summary (the accuracy per target, the mean, the difference to the best and to the seed with
        their standard errors, ``within_noise``, ``distance`` from the seed, and per target the gap to that target's
        best), the best variant's and the recommended one's labels, and the rule.
    """
    scores: dict[Variant, list[Tensor]] = defaultdict(list)
    accuracy: dict[Variant, dict[str, float]] = defaultdict(dict)
    per_target: dict[str, dict[Variant, Tensor]] = defaultdict(dict)
    for row, correct in rows:
        variant = Variant(row.statistic, row.compensate, row.normalize)
        scores[variant].append(correct.double())
        accuracy[variant][str(row.target)] = row.test_acc
        per_target[str(row.target)][variant] = correct.double()
    per_example = {variant: torch.stack(values).mean(0) for variant, values in scores.items()}
    means = {variant: float(score.mean()) for variant, score in per_example.items()}
    best = max(means, key=lambda v: (means[v], -v.distance(seed)))
    best_at = {t: max(accuracy, key=lambda v: (accuracy[v][t], -v.distance(seed))) for t in per_target}

    def paired(a: Tensor, b: Tensor) -> tuple[float, float]:
        difference = a - b
        return float(difference.mean()), float(difference.std() / math.sqrt(len(difference)))

    summary = []
    for variant in per_example:
        gap, gap_se = paired(per_example[best], per_example[variant])
        gain, gain_se = paired(per_example[variant], per_example[seed]) if seed in per_example else (math.nan, math.nan)
        below_target_best = {
            t: TargetGap(*paired(correct[best_at[t]], correct[variant]), best=best_at[t].label)
            for t, correct in per_target.items()
        }
        summary.append(
            VariantSummary(
                *variant,
                label=variant.label,
                test_acc=accuracy[variant],
                mean_test_acc=means[variant],
                below_best=gap,
                below_best_se=gap_se,
                within_noise=gap <= z * gap_se,
                over_seed=gain,
                over_seed_se=gain_se,
                distance=variant.distance(seed),
                below_target_best=below_target_best,
            )
        )
    eligible = [s for s in summary if s.within_noise]
    chosen = min(eligible, key=lambda s: (s.distance, -s.mean_test_acc))
    return Choice(
        variants=summary,
        best=best.label,
        recommended=chosen.label,
        seed=seed.label,
        z=z,
        test_examples=len(next(iter(per_example.values()))),
        rule=(
            "the best accuracy averaged over the targets, unless a setting closer to the seed's (fewer of statistic,"
            f" compensate, normalize changed) is within {z:g} paired standard errors of it; then the closest such"
            " setting, the most accurate among equally close ones"
        ),
    )
