"""Blocks that keep equal numbers of neurons: a layer's ``groups`` and ``tied`` layers, in plans and target searches."""

import dataclasses

import pytest
import torch
from torch import nn

from lightning_actprune import ActivationPruningError
from lightning_actprune.core import (
    ActivationRecorder,
    ThresholdEvaluator,
    apply_plan,
    find_prunable_layers,
    plan_for_reduction,
    plan_from_kept,
    plan_pruning,
)
from tests.helpers import assert_matches_oracle


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)).eval()


def measured(model: nn.Module):
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))
    with ActivationRecorder(model) as recorder, torch.no_grad():
        model(x)
    return find_prunable_layers(model, x), recorder.moments(), x


def grouped(layers, name: str, groups: int):
    return [dataclasses.replace(layer, groups=groups) if layer.name == name else layer for layer in layers]


def kept_per_block(plan, name: str, groups: int, neurons: int = 16) -> list[int]:
    (layer,) = [layer for layer in plan.layers if layer.name == name]
    size = neurons // groups
    return [sum(1 for i in layer.kept if b * size <= i < (b + 1) * size) for b in range(groups)]


def test_a_grouped_layer_keeps_the_mean_count_of_its_blocks_highest_scores_first():
    model = mlp()
    layers, moments, x = measured(model)
    free = plan_pruning(layers, moments, threshold=0.3, statistic="rms")
    counts = kept_per_block(free, "0", 4)
    assert len(set(counts)) > 1  # λ alone would keep unequal counts: the rule has work to do
    plan = plan_pruning(grouped(layers, "0", 4), moments, threshold=0.3, statistic="rms")
    expected = int(sum(counts) / 4 + 0.5)
    assert kept_per_block(plan, "0", 4) == [expected] * 4
    rms = moments["2"].mean_square.sqrt()
    (layer,) = [layer for layer in plan.layers if layer.name == "0"]
    for b in range(4):
        block = range(4 * b, 4 * b + 4)
        top = sorted(block, key=lambda i: (-float(rms[i]), i))[:expected]
        assert sorted(i for i in layer.kept if i in block) == sorted(top)
    # the other layer is planned as without groups
    assert [x.kept for x in plan.layers if x.name == "2"] == [x.kept for x in free.layers if x.name == "2"]
    reference = mlp()
    apply_plan(model, plan)
    assert_matches_oracle(model, reference, plan, x)


def test_tied_layers_keep_the_same_count_and_each_keeps_its_own_best():
    model = mlp()
    layers, moments, _ = measured(model)
    plan = plan_pruning(layers, moments, threshold=0.2, statistic="rms", tied=[["0", "2"]])
    widths = {layer.name: len(layer.kept) for layer in plan.layers}
    assert widths["0"] == widths["2"]
    free = plan_pruning(layers, moments, threshold=0.2, statistic="rms")
    free_widths = [len(layer.kept) for layer in free.layers]
    assert free_widths[0] != free_widths[1]
    assert widths["0"] == int(sum(free_widths) / 2 + 0.5)


def test_the_floor_is_per_block():
    model = mlp()
    layers, moments, _ = measured(model)
    plan = plan_pruning(grouped(layers, "0", 4), moments, threshold=1e9, statistic="rms", min_neurons=6)
    assert kept_per_block(plan, "0", 4) == [2, 2, 2, 2]  # ceil(6 / 4) per block
    plan = plan_pruning(grouped(layers, "0", 4), moments, threshold=1e9, statistic="rms", min_neurons=1)
    assert kept_per_block(plan, "0", 4) == [1, 1, 1, 1]  # every group keeps one


def test_a_target_removes_whole_tiers_and_sizes_them_for_real():
    model = mlp()
    layers, moments, _ = measured(model)
    layers = grouped(layers, "0", 4)
    evaluator = ThresholdEvaluator(model, layers, moments, "rms", min_neurons=1, tied=[])
    order = evaluator.removal_order()
    tiers = [unit for unit in order if unit.members[0][0] == "0"]
    assert len(tiers) == 3  # 4 blocks of 4, one stays in each
    assert all(len(unit.members) == 4 for unit in tiers)
    assert all(len(unit.members) == 1 for unit in order if unit.members[0][0] == "2")
    assert [u.score for u in order] == sorted(u.score for u in order)
    choice = plan_for_reduction(evaluator, 0.4)
    assert choice.plan is not None
    assert choice.reduction >= 0.4
    counts = kept_per_block(choice.plan, "0", 4)
    assert len(set(counts)) == 1
    before = sum(p.numel() for p in model.parameters())
    apply_plan(model, choice.plan)
    assert 1 - sum(p.numel() for p in model.parameters()) / before == pytest.approx(choice.reduction)


def test_tied_widths_in_a_target_search():
    model = mlp()
    layers, moments, _ = measured(model)
    evaluator = ThresholdEvaluator(model, layers, moments, "rms", min_neurons=2, tied=[["0", "2"]])
    choice = plan_for_reduction(evaluator, 0.5)
    assert choice.plan is not None
    assert len({len(layer.kept) for layer in choice.plan.layers}) == 1


def test_inconsistent_equal_count_requests_are_refused():
    model = mlp()
    layers, moments, _ = measured(model)
    with pytest.raises(ActivationPruningError, match=r"must keep the same number .* of each of its 4 groups"):
        plan_from_kept(grouped(layers, "0", 4), {"0": [0, 1, 4]})
    with pytest.raises(ActivationPruningError, match=r"`tied` names 0 in two sets"):
        plan_pruning(layers, moments, threshold=0.1, statistic="rms", tied=[["0", "2"], ["0"]])
    narrower = grouped(layers, "2", 2)
    with pytest.raises(ActivationPruningError, match=r"`tied` layers must have equal neurons and groups"):
        plan_pruning(narrower, moments, threshold=0.1, statistic="rms", tied=[["0", "2"]])
    with pytest.raises(ValueError, match="cannot form 3 equal groups"):
        grouped(layers, "0", 3)
