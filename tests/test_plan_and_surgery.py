import copy
import warnings

import pytest
import torch
from torch import nn

from lightning_actprune import ActivationPruningError, PruningPlan
from lightning_actprune.core import (
    ActivationMoments,
    ActivationRecorder,
    ModulePruning,
    PrunableLayer,
    apply_plan,
    count_parameters,
    find_prunable_layers,
    layer_scores,
    plan_pruning,
)
from tests.helpers import ARCHITECTURES, input_shape, replace_removed_by_means, zero_removed_inputs


def record(model: nn.Module, x: torch.Tensor) -> ActivationRecorder:
    model.eval()
    with ActivationRecorder(model) as recorder, torch.no_grad():
        model(x)
    return recorder


def measure(model: nn.Module, x: torch.Tensor) -> tuple[list[PrunableLayer], dict[str, ActivationMoments]]:
    """The prunable layers of ``model`` and their statistics over ``x``."""
    recorder = record(model, x)
    return find_prunable_layers(model, recorder.example_inputs), recorder.moments()


def median_threshold(layers, moments, statistic="mean") -> float:
    scores = torch.cat([layer_scores(layer, moments, statistic) for layer in layers])
    return float(scores.median())


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("statistic", ["mean", "rms", "nonzero_fraction"])
def test_oracle_pruned_equals_original_with_removed_inputs_zeroed(architecture, statistic):
    torch.manual_seed(0)
    model = ARCHITECTURES[architecture]().eval()
    x = torch.randn(20, *input_shape(model))
    layers, moments = measure(model, x)
    plan = plan_pruning(layers, moments, median_threshold(layers, moments, statistic), statistic)
    assert 0 < plan.neurons_after < plan.neurons_before

    original = copy.deepcopy(model)
    params_before = count_parameters(model)
    apply_plan(model, plan)
    handles = zero_removed_inputs(original, plan)
    with torch.no_grad():
        torch.testing.assert_close(model(x), original(x))
    for h in handles:
        h.remove()
    assert count_parameters(model) == sum(p.numel() for p in model.parameters()) < params_before
    for layer in plan.layers:
        for producer in layer.name.split("+"):
            weight = model.get_submodule(producer).weight
            assert weight.shape[0] == len(layer.kept)


def test_residual_group_couples_stem_and_block_and_keeps_a_channel_any_consumer_needs():
    model = ARCHITECTURES["residual"]().eval()
    x = torch.randn(10, *input_shape(model))
    recorder = record(model, x)
    layers = {layer.name: layer for layer in find_prunable_layers(model, recorder.example_inputs)}
    assert set(layers) == {"stem.0+conv2", "conv1"}
    residual = layers["stem.0+conv2"]
    assert {c.module for c in residual.consumers} == {"conv1", "head"}
    moments = recorder.moments()
    per_consumer = [layer_scores(
        type(residual)(residual.name, residual.neurons, residual.producers, (c,)), moments, "mean"
    ) for c in residual.consumers]  # fmt: skip
    torch.testing.assert_close(layer_scores(residual, moments, "mean"), torch.maximum(*per_consumer))


def test_output_layer_is_never_pruned_and_names_follow_modules():
    model = ARCHITECTURES["mlp_modules"]()
    layers = find_prunable_layers(model, torch.randn(4, 8))
    assert [layer.name for layer in layers] == ["net.0", "net.2"]
    assert [layer.neurons for layer in layers] == [16, 12]


def test_flattened_conv_channels_map_to_their_positions():
    model = ARCHITECTURES["cnn"]()
    layers = {layer.name: layer for layer in find_prunable_layers(model, torch.randn(2, 1, 8, 8))}
    (fc_slice,) = layers["features.4"].consumers
    assert fc_slice.module == "fc"
    assert fc_slice.neurons[:8] == (0, 0, 0, 0, 1, 1, 1, 1)


def test_min_neurons_keeps_the_most_active():
    model = ARCHITECTURES["mlp_modules"]().eval()
    x = torch.randn(30, 8)
    layers, moments = measure(model, x)
    plan = plan_pruning(layers, moments, threshold=1e9, min_neurons=3)
    for layer, layer_plan in zip(layers, plan.layers, strict=False):
        top3 = torch.topk(layer_scores(layer, moments, "mean"), 3).indices.sort().values.tolist()
        assert list(layer_plan.kept) == top3


def test_threshold_zero_removes_nothing_and_plan_round_trips():
    model = ARCHITECTURES["cnn"]().eval()
    x = torch.randn(10, 1, 8, 8)
    recorder = record(model, x)
    plan = plan_pruning(find_prunable_layers(model, x), recorder.moments(), threshold=0.0)
    assert plan.operations == ()
    assert plan.neurons_after == plan.neurons_before
    plan = plan_pruning(find_prunable_layers(model, x), recorder.moments(), threshold=0.3)
    assert PruningPlan.from_dict(plan.to_dict()) == plan


@pytest.mark.parametrize(
    ("layers", "exclude", "message"),
    [
        (["nope*"], (), r"`layers` pattern 'nope\*' matches no prunable layer; prunable layers are: net.0, net.2"),
        (None, ["net.*"], r"leave no layer to prune; prunable layers are: net.0, net.2"),
    ],
)
def test_layer_selection_errors(layers, exclude, message):
    with pytest.raises(ActivationPruningError, match=message):
        find_prunable_layers(ARCHITECTURES["mlp_modules"](), torch.randn(2, 8), layers=layers, exclude=exclude)


def test_excluding_a_layer_that_is_never_pruned_is_harmless():
    model = ARCHITECTURES["mlp_modules"]()
    names = [layer.name for layer in find_prunable_layers(model, torch.randn(2, 8), exclude=["net.4", "x.*"])]
    assert names == ["net.0", "net.2"]


def test_layer_selection_with_patterns():
    model = ARCHITECTURES["mlp_modules"]()
    assert [x.name for x in find_prunable_layers(model, torch.randn(2, 8), layers=["net.2"])] == ["net.2"]
    assert [x.name for x in find_prunable_layers(model, torch.randn(2, 8), exclude=["net.2"])] == ["net.0"]


def test_apply_plan_rejects_a_plan_for_another_model_and_leaves_it_untouched():
    model = ARCHITECTURES["mlp_modules"]()
    state = copy.deepcopy(model.state_dict())
    plan = PruningPlan(0.1, "mean", (), (ModulePruning("net.0", "out", (1,)), ModulePruning("net.2", "in", (99,))))
    with pytest.raises(ActivationPruningError, match=r"removes indices \[99\].*'net.2', which has 16 inputs"):
        apply_plan(model, plan)
    missing = PruningPlan(0.1, "mean", (), (ModulePruning("nope", "out", (1,)),))
    with pytest.raises(ActivationPruningError, match=r"prunes 'nope', which MLPModule does not have"):
        apply_plan(model, missing)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, state[name])


class RefusesToShrink(nn.Linear):
    """A Linear whose input cannot be pruned: the surgery fails half-way, after other modules were cut."""

    def __setattr__(self, name, value):
        if name == "in_features" and hasattr(self, "in_features"):
            raise RuntimeError("in_features is fixed")
        super().__setattr__(name, value)


def test_failed_surgery_restores_every_touched_module_exactly():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), RefusesToShrink(4, 2))
    weights = list(model.parameters())
    state = copy.deepcopy(model.state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    plan = PruningPlan(0.1, "mean", (), (ModulePruning("0", "out", (1,)), ModulePruning("2", "in", (1,))))
    with pytest.raises(ActivationPruningError, match=r"pruning '2' failed \(RuntimeError: in_features is fixed\)"):
        apply_plan(model, plan)
    assert all(a is b for a, b in zip(model.parameters(), weights, strict=False))
    assert model[0].out_features == 4
    assert model[0].weight.shape == (4, 3)
    assert all(torch.equal(t, state[k]) for k, t in model.state_dict().items())
    assert optimizer.param_groups[0]["params"][0] is model[0].weight


def test_frozen_parameters_stay_frozen():
    model = ARCHITECTURES["mlp_modules"]().eval()
    model.net[0].requires_grad_(False)
    x = torch.randn(16, 8)
    layers, moments = measure(model, x)
    apply_plan(model, plan_pruning(layers, moments, median_threshold(layers, moments)))
    assert not model.net[0].weight.requires_grad
    assert model.net[2].weight.requires_grad
    assert all(not p.requires_grad for p in model.net[0].parameters())


# --- bias compensation and fluctuation ------------------------------------------------------------------------------


@pytest.mark.parametrize("architecture", ["mlp_modules", "mlp_functional", "mlp_batchnorm_dropout", "residual"])
def test_compensation_oracle_is_exact_for_linear_and_unpadded_consumers(architecture):
    torch.manual_seed(0)
    model = ARCHITECTURES[architecture]().eval()
    if architecture == "residual":  # make every conv consumer unpadded-equivalent: 1x1 kernels
        model = Residual1x1().eval()
    x = torch.randn(20, *input_shape(model))
    layers, moments = measure(model, x)
    plan = plan_pruning(layers, moments, median_threshold(layers, moments), model=model, compensate=True)
    assert plan.bias_updates
    original = copy.deepcopy(model)
    apply_plan(model, plan)
    replace_removed_by_means(original, plan, moments)
    with torch.no_grad():
        torch.testing.assert_close(model(x), original(x), rtol=1e-5, atol=1e-5)


class Residual1x1(nn.Module):
    image = (1, 6, 6)

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 6, 3, padding=1)
        self.conv1, self.conv2 = nn.Conv2d(6, 6, 1), nn.Conv2d(6, 6, 1, bias=False)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(x + self.conv2(torch.relu(self.conv1(x))))
        return self.head(x.mean(dim=(2, 3)))


@pytest.mark.parametrize("padding", [0, 1])
def test_compensation_into_a_conv_is_exact_where_no_padding_is_read(padding):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=padding, bias=False)).eval()
    x = torch.randn(16, 1, 10, 10)
    layers, moments = measure(model, x)
    plan = plan_pruning(layers, moments, median_threshold(layers, moments), model=model, compensate=True)
    original = copy.deepcopy(model)
    apply_plan(model, plan)
    assert model[2].bias is not None  # created: the consumer had none
    replace_removed_by_means(original, plan, moments)
    with torch.no_grad():
        pruned, reference = model(x), original(x)
    torch.testing.assert_close(pruned[..., 1:-1, 1:-1], reference[..., 1:-1, 1:-1], rtol=1e-5, atol=1e-5)
    border_error = (pruned - reference).abs()[..., 0, :].max()
    if padding:
        assert border_error > 1e-3  # the padded border saw zeros where the oracle has means: approximate there
    else:
        assert border_error < 1e-5


def test_fluctuation_is_variance_times_squared_weight_column_norm():
    model = nn.Sequential(nn.Linear(2, 2), nn.Identity(), nn.Linear(2, 1))
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(2))
        model[0].bias.zero_()
        model[2].weight.copy_(torch.tensor([[3.0, 0.5]]))
    x = torch.tensor([[0.0, 1.0], [4.0, 1.0], [0.0, 3.0], [4.0, 3.0]])  # neuron 0: var 4; neuron 1: var 1
    recorder = record(model, x)
    (layer,) = find_prunable_layers(model, x)
    scores = layer_scores(layer, recorder.moments(), "fluctuation", model)
    torch.testing.assert_close(scores, torch.tensor([4.0 * 9.0, 1.0 * 0.25], dtype=torch.float64))
    with pytest.raises(ActivationPruningError, match="needs the model"):
        layer_scores(layer, recorder.moments(), "fluctuation")


def test_normalize_standardises_each_layer():
    model = ARCHITECTURES["mlp_modules"]().eval()
    x = torch.randn(30, 8)
    recorder = record(model, x)
    for layer in find_prunable_layers(model, x):
        scores = layer_scores(layer, recorder.moments(), "rms", normalize=True)
        torch.testing.assert_close(scores.mean().item(), 0.0, atol=1e-9, rtol=0)
        torch.testing.assert_close(scores.std(unbiased=False).item(), 1.0)


def test_compensated_plan_round_trips_and_rejects_a_mismatched_model():
    model = ARCHITECTURES["mlp_modules"]().eval()
    x = torch.randn(30, 8)
    recorder = record(model, x)
    layers = find_prunable_layers(model, x)
    plan = plan_pruning(layers, recorder.moments(), 0.1, model=model, compensate=True)
    assert PruningPlan.from_dict(plan.to_dict()) == plan
    other = nn.Module()
    other.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 14), nn.GELU(), nn.Linear(14, 3))
    state = copy.deepcopy(other.state_dict())
    with pytest.raises(ActivationPruningError, match=r"bias update of 'net.2' has 12 values; the module has 14"):
        apply_plan(other, plan)
    assert all(torch.equal(t, state[k]) for k, t in other.state_dict().items())


def test_a_layer_with_a_single_neuron_can_be_planned_and_pruned_again():
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 1), nn.ReLU(), nn.Linear(1, 3)).eval()
    x = torch.randn(10, 8)
    recorder = record(model, x)
    assert recorder.moments()["4"].mean.shape == (1,)
    plan = plan_pruning(find_prunable_layers(model, x), recorder.moments(), threshold=1e9)
    assert [len(layer.kept) for layer in plan.layers] == [1, 1]
    apply_plan(model, plan)
    assert model[0].out_features == 1


def test_plan_from_kept_builds_the_surgery_and_compensation_for_any_criterion():
    from lightning_actprune.core import plan_from_kept

    torch.manual_seed(0)
    model = ARCHITECTURES["mlp_functional"]().eval()
    x = torch.randn(40, 8)
    layers, moments = measure(model, x)
    threshold_plan = plan_pruning(layers, moments, 0.2, model=model, compensate=True)
    kept = {layer.name: layer.kept for layer in threshold_plan.layers}
    plan = plan_from_kept(layers, kept, moments=moments, model=model, compensate=True)
    assert plan.operations == threshold_plan.operations
    assert plan.bias_updates == threshold_plan.bias_updates
    by_magnitude = {"fc1": torch.topk(model.fc1.weight.norm(dim=1), 5).indices.tolist()}
    plan = plan_from_kept(layers, by_magnitude)
    assert [len(layer.kept) for layer in plan.layers] == [5, 12]
    with pytest.raises(ActivationPruningError, match=r"`kept` for fc2 must be indices in \[0, 12\); got 0..12"):
        plan_from_kept(layers, {"fc2": [0, 12]})
    with pytest.raises(ActivationPruningError, match=r"`compensate=True` needs the model and the moments"):
        plan_from_kept(layers, kept, compensate=True)


class MixesNeurons(nn.Module):
    """A functional operation between two Linears: Torch-Pruning calls them all "element-wise"."""

    def __init__(self, operation):
        super().__init__()
        self.fc1, self.fc2, self.out = nn.Linear(6, 8), nn.Linear(8, 5), nn.Linear(5, 3)
        self.operation = operation

    def forward(self, x):
        return self.out(torch.relu(self.fc2(self.operation(torch.relu(self.fc1(x))))))


@pytest.mark.parametrize(
    ("operation", "mixes"),
    [
        (lambda h: torch.softmax(h, -1), True),
        (lambda h: torch.nn.functional.layer_norm(h, (8,)), True),
        (lambda h: h - h.mean(-1, keepdim=True), True),
        (lambda h: torch.sigmoid(h) * 2 + 1, False),
        (lambda h: torch.nn.functional.dropout(h, 0.5, training=False), False),
    ],
    ids=["softmax", "layer_norm", "centering", "scalar_ops", "dropout"],
)
def test_functional_operations_that_mix_neurons_are_skipped_with_a_warning(operation, mixes):
    model = MixesNeurons(operation)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        names = [layer.name for layer in find_prunable_layers(model, torch.randn(10, 6))]
    skipped = [str(w.message) for w in caught if "removing its neurons does not equal zeroing them" in str(w.message)]
    assert names == (["fc2"] if mixes else ["fc1", "fc2"])
    assert len(skipped) == (1 if mixes else 0)
    assert all("not pruning fc1" in message for message in skipped)


class NeedsTheWholeBatch(nn.Module):
    """Reshapes with the batch size baked in: tracing on a few samples fails, so the whole batch is used."""

    def __init__(self):
        super().__init__()
        self.fc1, self.out = nn.Linear(8, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.out(torch.relu(self.fc1(x.reshape(32, 8))))


def test_tracing_uses_a_few_samples_and_falls_back_to_the_whole_batch():
    from lightning_actprune._analysis import _few_samples

    model = ARCHITECTURES["cnn"]()
    (images,), _ = _few_samples(model, ((torch.randn(40, 1, 8, 8),), {}))
    assert images.shape == (8, 1, 8, 8)
    assert [layer.name for layer in find_prunable_layers(NeedsTheWholeBatch(), torch.randn(32, 8))] == ["fc1"]


@pytest.mark.parametrize(
    "module",
    [nn.Linear(5, 3), nn.Conv2d(4, 6, 3), nn.Conv2d(4, 6, 3, groups=2), nn.Conv1d(6, 6, 3, groups=6)],
    ids=["linear", "conv", "grouped_conv", "depthwise_conv"],
)
def test_weight_columns_per_input_against_a_loop_reference(module):
    from lightning_actprune._plan import _squared_column_norms, input_columns

    weight = module.weight.detach()
    groups = getattr(module, "groups", 1)
    outputs, per_group = weight.shape[0], weight.shape[1]
    columns, norms = torch.zeros(per_group * groups, outputs), torch.zeros(per_group * groups)
    for feature in range(per_group * groups):
        group = feature // per_group
        rows = slice(group * (outputs // groups), (group + 1) * (outputs // groups))
        joining = weight[rows, feature % per_group]  # every weight from this input to its group's outputs
        columns[feature, rows] = joining.reshape(joining.shape[0], -1).sum(-1)
        norms[feature] = joining.square().sum()
    torch.testing.assert_close(input_columns(module), columns)
    torch.testing.assert_close(_squared_column_norms(module), norms)
