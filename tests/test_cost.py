"""What makes the prune step cheap computes what the straightforward code computes.

Per-batch sums without copies (every memory layout, signed and non-negative activations, with and without a
workspace), only the moments a statistic reads, the removal order of a target search in tensors, and its parameter
counts by arithmetic: each is compared with a plain reference (NumPy, the Python tuple sort it replaces, the plan
itself and the surgery).
"""

from __future__ import annotations

import dataclasses
import math

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch import nn

from lightning_actprune import ActivationPruning, ActivationPruningError, NeuronScorer
from lightning_actprune._counting import parameters_after
from lightning_actprune._plan import Block, block_floor, consumer_weight_energy, layer_scores
from lightning_actprune._recurrent import RecurrentShape, hidden_units_layer
from lightning_actprune._scoring import (
    _by_input,
    _squared_column_norms,
    input_columns,
    planning_cache,
    recorded_moments,
)
from lightning_actprune._statistics import MOMENTS, ActivationStatistics, Workspace, batch_sums
from lightning_actprune._surgery import pruned_temporarily
from lightning_actprune._sweep import ThresholdEvaluator
from lightning_actprune.core import (
    ActivationRecorder,
    count_parameters,
    find_prunable_layers,
    plan_for_reduction,
    plan_from_kept,
    plan_pruning,
)
from tests.helpers import Classifier, KeepUnpruned, MLPModule, loaders
from tests.test_grouped_and_recurrent import FEATURES, STEPS, Bottleneck, Recurrent, randomised
from tests.test_heads import tiny_encoder, tiny_vit
from tests.test_shared_and_fused import FusedMLP, SharedBlockNet


def numpy_sums(values: np.ndarray) -> np.ndarray:
    """Reference: ``values`` is (samples, channels); the sums of a, |a|, a², a != 0 per channel, in float64."""
    return np.stack([values.sum(0), np.abs(values).sum(0), (values**2).sum(0), (values != 0).sum(0)])


def layouts() -> dict[str, tuple[torch.Tensor, int]]:
    g = torch.Generator().manual_seed(0)
    conv = torch.randn(3, 5, 4, 6, generator=g)
    return {
        "linear": (torch.randn(7, 5, generator=g), -1),
        "tokens": (torch.randn(2, 3, 5, generator=g), -1),
        "conv": (conv, 1),
        "conv_channels_last": (conv.to(memory_format=torch.channels_last), 1),
        "conv_strided": (torch.randn(3, 5, 4, 12, generator=g)[..., ::2], 1),
        "conv1d": (torch.randn(2, 5, 4, generator=g), 1),
        "unbatched_conv1d": (torch.randn(5, 9, generator=g), 0),
    }


@pytest.mark.parametrize("layout", list(layouts()))
@pytest.mark.parametrize("sign", ["signed", "non_negative", "with_nan"])
@pytest.mark.parametrize("workspace", [None, Workspace()], ids=["allocated", "workspace"])
def test_batch_sums_match_numpy_in_every_layout(layout, sign, workspace):
    values, channel_dim = layouts()[layout]
    values = {"signed": values, "non_negative": torch.relu(values), "with_nan": values.clone()}[sign]
    if sign == "with_nan":
        values.select(channel_dim, 2).select(0, 0)[...] = math.nan  # channel 2, first sample (or position)
    flat = values.movedim(channel_dim, -1).reshape(-1, 5).double().numpy()
    sums, count = batch_sums(values, channel_dim, MOMENTS, workspace)
    assert count == flat.shape[0]
    expected = torch.from_numpy(numpy_sums(flat))
    if sign == "with_nan":  # every sum of the channel is NaN, so that the recorder refuses it (NaN != 0 is moot)
        assert sums[:3, 2].isnan().all()
        sums, expected = sums[:, [0, 1, 3, 4]], expected[:, [0, 1, 3, 4]]
    torch.testing.assert_close(sums.double(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("moments", [("mean",), ("mean_square",), ("mean_abs", "nonzero_fraction"), ()])
def test_batch_sums_of_some_moments_are_those_of_all(moments):
    values, channel_dim = layouts()["conv"]
    every, _ = batch_sums(values, channel_dim)
    some, _ = batch_sums(values, channel_dim, moments)
    rows = [MOMENTS.index(m) for m in moments]
    assert torch.equal(some, every[rows])


def test_a_metric_accumulates_only_its_moments_and_returns_the_others_as_nan():
    metric = ActivationStatistics(num_neurons=2, moments=["mean_square", "mean"])
    assert metric.moments == ("mean", "mean_square")
    metric.update(torch.tensor([[1.0, -2.0], [3.0, 0.0]]))
    moments = metric.compute()
    torch.testing.assert_close(moments.mean, torch.tensor([2.0, -1.0], dtype=torch.float64))
    torch.testing.assert_close(moments.mean_square, torch.tensor([5.0, 2.0], dtype=torch.float64))
    assert moments.mean_abs.isnan().all()
    assert moments.nonzero_fraction.isnan().all()
    with pytest.raises(ActivationPruningError, match=r"`moments` can hold mean, mean_abs, mean_square, .*'median'"):
        ActivationStatistics(num_neurons=2, moments=["median"])


def test_recorded_moments_are_what_the_prune_reads():
    assert recorded_moments("fluctuation") == ("mean", "mean_square")
    assert recorded_moments("mean") == ("mean", "mean_square")  # the tie-break of a target search reads the RMS
    assert recorded_moments("nonzero_fraction") == ("mean_square", "nonzero_fraction")
    assert recorded_moments("rms", compensate=True) == ("mean", "mean_square")

    class Custom(NeuronScorer):
        def __call__(self, layer, moments, model):
            return moments[layer.consumers[0].module].mean_abs

    assert recorded_moments(Custom()) == MOMENTS  # a scorer of one's own reads what it likes


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU(),  # depthwise
        nn.Conv2d(8, 12, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(48, 16), nn.ReLU(),
        nn.Linear(16, 4),
    ).eval()  # fmt: skip


@pytest.mark.parametrize("statistic", ["fluctuation", "mean", "nonzero_fraction"])
def test_recording_only_the_moments_a_statistic_reads_gives_the_same_plan(statistic):
    model = small_cnn()
    x = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with ActivationRecorder(model) as full, torch.no_grad():
        model(x)
    with ActivationRecorder(model, moments=recorded_moments(statistic)) as some, torch.no_grad():
        model(x)
    some.check_finite()
    layers = find_prunable_layers(model, x)
    normalize = statistic == "fluctuation"
    for threshold in (-0.5, 0.0, 0.3):
        assert plan_pruning(layers, some.moments(), threshold, statistic, model=model, normalize=normalize) == (
            plan_pruning(layers, full.moments(), threshold, statistic, model=model, normalize=normalize)
        )
    evaluators = [
        ThresholdEvaluator(model, layers, recorder.moments(), statistic, 1, normalize=normalize)
        for recorder in (some, full)
    ]
    assert evaluators[0].removal_order() == evaluators[1].removal_order()


def reference_removal_order(evaluator: ThresholdEvaluator) -> list[tuple[float, tuple[tuple[str, int], ...]]]:
    """The removal order as the tuple sort it replaced computes it, one Python tuple per neuron."""
    keys = {}
    for layer in evaluator.layers:
        rms = layer_scores(layer, evaluator.moments, "rms")
        energy = consumer_weight_energy(layer, evaluator.model)
        scores = evaluator._scores[layer.name]
        keys[layer.name] = [(float(scores[i]), float(rms[i]), float(energy[i])) for i in range(layer.neurons)]
    position = {layer.name: p for p, layer in enumerate(evaluator.layers)}
    floors = {layer.name: block_floor(layer, evaluator.min_neurons) for layer in evaluator.layers}
    ties = list(evaluator.ties)
    tied = {block.layer for tie in ties for block in tie}
    for layer in evaluator.layers:
        if layer.name not in tied:
            ties.append([Block(layer.name, range(layer.neurons))])
            floors[layer.name] = min(evaluator.min_neurons, layer.neurons)
    keyed = []
    for tie in ties:
        ranks_of = [sorted(block.neurons, key=lambda i, b=block: (*keys[b.layer][i], i)) for block in tie]
        first = min(position[block.layer] for block in tie)
        for tier in range(len(tie[0].neurons) - floors[tie[0].layer]):
            members = tuple((block.layer, ranks[tier]) for block, ranks in zip(tie, ranks_of, strict=True))
            mean = [sum(keys[name][i][k] for name, i in members) / len(members) for k in range(3)]
            keyed.append(((*mean, first, members[0][1]), members))
    keyed.sort(key=lambda unit: unit[0])
    return [(key[0], members) for key, members in keyed]


def dead_mlp() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                          nn.Linear(16, 3)).eval()  # fmt: skip
    with torch.no_grad():
        model[0].bias[:6] = -100.0  # six neurons that never fire: equal scores, ordered by the tie-breaks
    return model


@pytest.mark.parametrize(
    ("groups", "tied", "min_neurons"),
    [(1, [], 1), (4, [], 1), (1, [["0", "4"]], 2), (4, [["2", "4"]], 3)],
    ids=["plain", "grouped", "tied", "grouped_and_tied"],
)
def test_the_removal_order_is_the_tuple_sort_it_replaces(groups, tied, min_neurons):
    model = dead_mlp()
    x = torch.randn(32, 6, generator=torch.Generator().manual_seed(1))
    with ActivationRecorder(model) as recorder, torch.no_grad():
        model(x)
    layers = [dataclasses.replace(layer, groups=groups) if layer.name == "0" else layer for layer in
              find_prunable_layers(model, x)]  # fmt: skip
    for statistic, normalize in (("fluctuation", True), ("mean", False)):
        evaluator = ThresholdEvaluator(model, layers, recorder.moments(), statistic, min_neurons, normalize=normalize,
                                       tied=tied)  # fmt: skip
        order = [(unit.score, unit.members) for unit in evaluator.removal_order()]
        assert order == reference_removal_order(evaluator)
        assert len({unit.score for unit in evaluator.removal_order()}) < len(order)  # equal scores were broken


@pytest.mark.parametrize("build", [small_cnn, dead_mlp], ids=["depthwise_cnn", "mlp"])
def test_the_counts_of_a_target_search_are_those_of_its_plans_and_of_the_surgery(build):
    model = build()
    x = torch.randn(4, 3, 8, 8) if build is small_cnn else torch.randn(8, 6)
    with ActivationRecorder(model) as recorder, torch.no_grad():
        model(x)
    layers = find_prunable_layers(model, x)
    evaluator = ThresholdEvaluator(model, layers, recorder.moments(), "fluctuation", 1, normalize=True)
    counts = evaluator.removal_counts()
    assert counts is not None
    before = count_parameters(model)
    units = len(evaluator.removal_order())
    for count in sorted({0, 1, 2, units // 3, units // 2, units - 1, units}):
        plan = evaluator.plan_removing(count)
        counted = counts.parameters_after(count)
        assert counted is not None  # the depthwise convolution is counted by arithmetic too
        assert counted == parameters_after(model, plan, before)
        with pruned_temporarily(model, plan):
            assert counted == count_parameters(model)
    compensating = ThresholdEvaluator(model, layers, recorder.moments(), "fluctuation", 1, compensate=True)
    assert compensating.removal_counts() is None  # a bias update may add a bias: sized by the surgery
    assert plan_for_reduction(compensating, 0.3).plan is not None


# --- main's layers: recurrent hidden units, grouped convolutions, shared and fused layers, attention heads ---


def _recurrent(kind: type[nn.RNNBase], **options: object) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return Recurrent(kind, **options).eval(), torch.randn(4, STEPS, FEATURES)


def _bottleneck() -> tuple[nn.Module, torch.Tensor]:
    return randomised(Bottleneck()), torch.randn(4, 3, 6, 6)


def _shared() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return SharedBlockNet().eval(), torch.randn(16, 8)


def _fused() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return FusedMLP().eval(), torch.randn(16, 8)


MODELS = {
    "gru_2_layers_bidirectional": lambda: _recurrent(nn.GRU, num_layers=2, bidirectional=True),
    "lstm_projection": lambda: _recurrent(nn.LSTM, num_layers=2, bidirectional=True, proj_size=3),
    "resnext_bottleneck": _bottleneck,
    "shared_block": _shared,
    "fused_gate_up": _fused,
    "vit_heads": tiny_vit,
    "torch_attention_heads": tiny_encoder,
}


def _recorded(build: str) -> tuple[nn.Module, list, dict, dict]:
    """The model, its layers, every moment, and only those the default statistic reads (recorded apart)."""
    model, x = MODELS[build]()
    with ActivationRecorder(model) as every, torch.no_grad():
        model(x)
    with ActivationRecorder(model, moments=recorded_moments("fluctuation")) as some, torch.no_grad():
        model(x)
    some.check_finite()
    return model, find_prunable_layers(model, every.example_inputs), every.moments(), some.moments()


@pytest.mark.parametrize("build", list(MODELS))
def test_main_s_layers_keep_their_plans_with_only_the_moments_read_and_their_counts_by_arithmetic(build):
    model, layers, moments, some = _recorded(build)
    assert layers
    before = count_parameters(model)
    evaluator = ThresholdEvaluator(model, layers, moments, "fluctuation", 1, normalize=True)
    assert evaluator.removal_order() == ThresholdEvaluator(model, layers, some, "fluctuation", 1,
                                                            normalize=True).removal_order()  # fmt: skip
    assert [(u.score, u.members) for u in evaluator.removal_order()] == reference_removal_order(evaluator)
    counts = evaluator.removal_counts()
    assert counts is not None
    units = len(evaluator.removal_order())
    for count in sorted({0, 1, units // 3, units // 2, units - 1, units}):
        plan = evaluator.plan_removing(count)
        counted = counts.parameters_after(count)
        assert counted == parameters_after(model, plan, before)  # None alike: a count the surgery must give
        if counted is not None:
            with pruned_temporarily(model, plan):
                assert counted == count_parameters(model)
    if build in ("gru_2_layers_bidirectional", "lstm_projection", "resnext_bottleneck", "shared_block",
                 "torch_attention_heads"):  # fmt: skip
        assert counts.parameters_after(units // 2) is not None  # counted by arithmetic, not by surgery
    choice = plan_for_reduction(evaluator, 0.3)
    assert choice.plan is not None
    with pruned_temporarily(model, choice.plan):
        assert choice.reduction == pytest.approx(1 - count_parameters(model) / before)


def _by_input_loop(module: nn.Module, over_kernel) -> torch.Tensor:
    """Reference: the loop over groups that :func:`_by_input` replaced."""
    weight = module.weight.detach()
    per_pair = over_kernel(weight.flatten(2))
    groups = module.groups
    out_channels, in_per_group = per_pair.shape
    out_per_group = out_channels // groups
    joined = torch.zeros(in_per_group * groups, out_channels, dtype=weight.dtype)
    for g in range(groups):
        rows = slice(g * out_per_group, (g + 1) * out_per_group)
        joined[g * in_per_group : (g + 1) * in_per_group, rows] = per_pair[rows].t()
    return joined


@pytest.mark.parametrize(("groups", "in_channels", "out_channels"), [(1, 6, 4), (2, 6, 4), (3, 6, 9), (6, 6, 6)])
def test_column_norms_of_grouped_convolutions_match_the_loop_over_groups(groups, in_channels, out_channels):
    torch.manual_seed(0)
    conv = nn.Conv2d(in_channels, out_channels, 3, groups=groups)
    square = lambda kernel: kernel.square().sum(-1)  # noqa: E731
    torch.testing.assert_close(_by_input(conv, square), _by_input_loop(conv, square), rtol=0, atol=0)
    torch.testing.assert_close(input_columns(conv), _by_input_loop(conv, lambda k: k.sum(-1)), rtol=0, atol=0)
    torch.testing.assert_close(_squared_column_norms(conv), _by_input_loop(conv, square).sum(1), rtol=0, atol=0)


def test_the_planning_cache_computes_norms_once_and_sees_a_surgery():
    model, _ = MODELS["gru_2_layers_bidirectional"]()
    rnn = model.rnn
    with planning_cache():
        first = _squared_column_norms(rnn)
        assert _squared_column_norms(rnn) is first  # computed once
        with pruned_temporarily(model, plan_from_kept([hidden_units_layer("rnn", RecurrentShape.of(rnn))],
                                                      {"rnn": list(range(0, 32, 2))})):  # fmt: skip
            assert _squared_column_norms(rnn).shape != first.shape  # new parameters: computed again
        torch.testing.assert_close(_squared_column_norms(rnn), first)
    torch.testing.assert_close(_squared_column_norms(rnn), first)


def test_the_callback_records_only_the_moments_its_prune_reads_and_plans_as_from_all(tmp_path, monkeypatch):
    """Trainer defaults (bar, checkpoint, logger): the statistics pass records what the plan and compensation read."""
    captured: list[dict] = []
    moments_of = ActivationRecorder.moments

    def spy(self: ActivationRecorder) -> dict:
        captured.append(moments_of(self))
        return captured[-1]

    monkeypatch.setattr(ActivationRecorder, "moments", spy)
    torch.manual_seed(0)
    model, keep = Classifier(MLPModule()), KeepUnpruned()
    pruning = ActivationPruning(threshold=0.6, statistic="nonzero_fraction", compensate=True, layers=["net.net.0"])
    trainer = pl.Trainer(max_epochs=2, default_root_dir=tmp_path, callbacks=[keep, pruning])
    train, val = loaders((8,))
    trainer.fit(model, train, val)
    assert pruning.result is not None
    planned_from = captured[-1]

    unpruned = keep.model
    with ActivationRecorder(unpruned) as recorder, torch.no_grad():
        for x, _ in val:
            unpruned(x)
    reference = recorder.moments()
    assert set(planned_from) == set(reference)
    read = recorded_moments("nonzero_fraction", compensate=True)
    assert read == ("mean", "mean_square", "nonzero_fraction")
    for name, moments in reference.items():
        for field, value in moments._asdict().items():
            if field in read or field == "num_values":
                torch.testing.assert_close(planned_from[name]._asdict()[field], value)
            else:
                assert planned_from[name]._asdict()[field].isnan().all(), (name, field)
    layers = find_prunable_layers(unpruned, recorder.example_inputs, ["net.net.0"])
    expected = plan_pruning(layers, reference, 0.6, "nonzero_fraction", model=unpruned, compensate=True)
    assert pruning.result.plan.to_dict() == expected.to_dict()
    assert 0 < len(expected.layers[0].kept) < layers[0].neurons


def test_the_collector_is_held_off_during_the_analysis_and_put_back_after_it_even_on_error():
    import gc

    from lightning_actprune._gc import collection_paused

    model, x = _fused()
    seen = []
    handle = model.register_forward_hook(lambda *_: seen.append(gc.isenabled()))
    try:
        assert find_prunable_layers(model, x)
    finally:
        handle.remove()
    assert seen
    assert not any(seen)  # every forward of the analysis ran with the collector off
    assert gc.isenabled()
    with pytest.raises(ValueError, match="inside"), collection_paused():
        raise ValueError("inside")
    assert gc.isenabled()
    gc.disable()
    try:
        with collection_paused():
            pass
        assert not gc.isenabled()  # a caller that had it off keeps it off
    finally:
        gc.enable()
