"""Grouped convolutions and recurrent layers are pruned, not skipped (issue 23).

Grouped convolutions lose the same number of channels from every group (on their input and their output side);
recurrent layers (``nn.LSTM``/``nn.GRU``/``nn.RNN``) lose input columns and hidden units, the same number in every
layer and direction. Every case is checked against the zeroing oracle of ``tests/helpers.py`` (a recurrent unit is
zeroed by zeroing its rows of every gate, written out there by hand), and the pruned models reload and export.
"""

from __future__ import annotations

import copy
import csv
import warnings
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence
from torch.utils.data import DataLoader, TensorDataset

from lightning_actprune import ActivationPruning, ActivationPruningError, load_pruned
from lightning_actprune._counting import parameters_after
from lightning_actprune._grouped import Blocks, equal_count_blocks
from lightning_actprune._recurrent import zero_hidden_units
from lightning_actprune._surgery import pruned_temporarily
from lightning_actprune._types import ModuleSlice
from lightning_actprune.core import (
    ActivationRecorder,
    ModulePruning,
    PrunableLayer,
    PruningPlan,
    apply_plan,
    apply_plan_with_optimizers,
    count_parameters,
    find_prunable_layers,
    plan_from_kept,
    plan_pruning,
)
from tests.helpers import (
    NUM_CLASSES,
    Classifier,
    KeepUnpruned,
    assert_matches_oracle,
    make_data,
    replace_removed_by_means,
)

STEPS, FEATURES = 6, 5


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def found(model: nn.Module, *inputs: Any) -> tuple[list[PrunableLayer], list[str]]:
    """The prunable layers, found from the inputs a recorder captured, and the package's warnings."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layers = find_prunable_layers(model, inputs if len(inputs) > 1 else inputs[0])
    return layers, [str(w.message) for w in caught if "lightning_actprune" in str(w.message)]


def per_block(layer: PrunableLayer, generator: torch.Generator, fraction: float = 0.5) -> list[int]:
    """Random neurons to keep, as many in each block (a different choice in every block)."""
    size = layer.neurons // layer.groups
    count = max(1, int(size * fraction))
    return [block[int(i)] for block in layer.blocks() for i in torch.randperm(size, generator=generator)[:count]]


def prune_and_compare(model: nn.Module, layers: list[PrunableLayer], *inputs: Any, seed: int = 0) -> Any:
    """Keep random neurons (equal counts per block), prune, and compare with the oracle; the plan."""
    generator = torch.Generator().manual_seed(seed)
    plan = plan_from_kept(layers, {layer.name: per_block(layer, generator) for layer in layers})
    original = copy.deepcopy(model)
    before = count_parameters(model)
    counted = parameters_after(model, plan, before)
    apply_plan(model, plan)
    assert counted == count_parameters(model)
    assert_matches_oracle(model, original, plan, *inputs)
    return plan


# ---------------------------------------------------------------- grouped convolutions


class GroupedBlock(nn.Module):
    """Conv → BN → ReLU → grouped 3x3 conv (4 groups) → BN → ReLU → conv → pooled Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.reduce = nn.Sequential(nn.Conv2d(3, 16, 1), nn.BatchNorm2d(16), nn.ReLU())
        self.grouped = nn.Sequential(nn.Conv2d(16, 12, 3, padding=1, groups=4), nn.BatchNorm2d(12), nn.ReLU())
        self.expand = nn.Conv2d(12, 8, 1)
        self.head = nn.Linear(8, NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(F.relu(self.expand(self.grouped(self.reduce(x)))).mean((2, 3)))


class Bottleneck(nn.Module):
    """A ResNeXt block: 1x1 → grouped 3x3 (cardinality 4) → 1x1, plus the identity; a stem and a head around it."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.conv1, self.bn1 = nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 16, 3, padding=1, groups=4, bias=False), nn.BatchNorm2d(16)
        self.conv3, self.bn3 = nn.Conv2d(16, 8, 1, bias=False), nn.BatchNorm2d(8)
        self.head = nn.Linear(8, NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        x = F.relu(x + self.bn3(self.conv3(y)))
        return self.head(x.mean((2, 3)))


def randomised(model: nn.Module) -> nn.Module:
    """Random BatchNorm statistics and affine parameters, in eval mode: a removed channel's zero must matter."""
    torch.manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
            nn.init.normal_(module.weight)
            nn.init.normal_(module.bias)
    return model.eval()


def test_a_grouped_convolution_loses_an_equal_count_per_group_on_both_sides():
    model, x = randomised(GroupedBlock()), torch.randn(4, 3, 6, 6)
    layers, messages = found(model, x)
    assert messages == []
    assert [(layer.name, layer.neurons, layer.groups) for layer in layers] == [
        ("reduce.0", 16, 4),  # read by the grouped conv: 4 input groups of 4
        ("grouped.0", 12, 4),  # produced by it: 4 output groups of 3
        ("expand", 8, 1),
    ]
    plan = prune_and_compare(model, layers, x)
    assert model.grouped[0].groups == 4
    assert (model.grouped[0].in_channels, model.grouped[0].out_channels) == (8, 4)
    # different positions in every group: the in-channel surgery follows each group's own channels
    removed = next(layer.removed for layer in plan.layers if layer.name == "reduce.0")
    assert len({tuple(i % 4 for i in removed if i // 4 == g) for g in range(4)}) > 1


def test_a_resnext_bottleneck_prunes_its_width_and_refuses_unequal_groups():
    model, x = randomised(Bottleneck()), torch.randn(4, 3, 6, 6)
    layers, messages = found(model, x)
    assert messages == []
    groups = {layer.name: layer.groups for layer in layers}
    assert groups == {"stem.0+conv3": 1, "conv1": 4, "conv2": 4}
    with pytest.raises(ActivationPruningError, match=r"`kept` for conv1 must keep the same number .* of each of its 4"):
        plan_from_kept(layers, {"conv1": [0, 1, 2, 4, 8, 12]})  # 3 in the first group, 1 in the others
    prune_and_compare(model, layers, x, seed=1)
    assert model.conv2.weight.shape == (8, 2, 3, 3)


def test_grouped_blocks_that_are_not_consecutive_are_renumbered():
    conv = nn.Conv2d(8, 6, 3, groups=2)
    # input channel i carries neuron n: group 0 (channels 0-3) holds neurons 0, 1, 4, 5
    piece = ModuleSlice("conv", "in", tuple(range(8)), (0, 1, 4, 5, 2, 3, 6, 7))
    blocks = equal_count_blocks(8, [(conv, piece)])
    assert isinstance(blocks, Blocks)
    assert blocks.groups == 2
    assert blocks.apply(piece).neurons == (0, 1, 2, 3, 4, 5, 6, 7)
    assert blocks.renumbered == (0, 1, 4, 5, 2, 3, 6, 7)
    uneven = ModuleSlice("conv", "in", tuple(range(8)), (0, 1, 2, 3, 4, 5, 6, 0))  # neuron 0 in both groups
    assert (
        equal_count_blocks(8, [(conv, uneven)])
        == "one of its neurons reaches two groups of the grouped convolution conv."
    )


def test_a_grouped_convolution_shared_with_another_layer_is_skipped_with_its_reason():
    class TwoProducers(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)
            self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=4)
            self.head = nn.Linear(8, NUM_CLASSES)

        def forward(self, x: Tensor) -> Tensor:
            x = torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], dim=1)
            return self.head(torch.relu(self.grouped(x)).mean((2, 3)))

    model, x = TwoProducers().eval(), torch.randn(2, 3, 5, 5)
    layers, messages = found(model, x)
    assert [layer.name for layer in layers] == ["grouped"]
    assert messages == [
        "lightning_actprune: not pruning b, a: its channels share the groups of the grouped convolution grouped with"
        " other layers'."
    ]


def test_a_tiny_torchvision_regnet_prunes_its_bottlenecks_exactly():
    models = pytest.importorskip("torchvision.models")
    from torchvision.models.regnet import BlockParams

    torch.manual_seed(0)
    params = BlockParams.from_init_params(depth=4, w_0=16, w_a=8.0, w_m=2.0, group_width=4, se_ratio=0.25)
    model = randomised(models.RegNet(params, num_classes=NUM_CLASSES))
    x = torch.randn(2, 3, 32, 32)
    layers, messages = found(model, x)
    assert messages == []
    grouped = [layer for layer in layers if layer.groups > 1]
    assert {name.rsplit(".", 2)[-2] for layer in grouped for name in layer.producers} >= {"a", "b"}
    prune_and_compare(model, layers, x)


# ---------------------------------------------------------------- recurrent layers


class Recurrent(nn.Module):
    """Linear → ReLU → a recurrent layer → its last step → Linear → ReLU → Linear."""

    def __init__(self, kind: type[nn.RNNBase], **options: Any) -> None:
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(FEATURES, 12), nn.ReLU())
        self.rnn = kind(12, 8, batch_first=True, **options)
        directions = 2 if options.get("bidirectional") else 1
        self.head = nn.Sequential(nn.Linear(directions * (options.get("proj_size") or 8), 10), nn.ReLU())
        self.out = nn.Linear(10, NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        steps, _ = self.rnn(self.embed(x))
        return self.out(self.head(steps[:, -1]))


RECURRENT = {
    "lstm": (nn.LSTM, {}),
    "gru_2_layers_bidirectional": (nn.GRU, {"num_layers": 2, "bidirectional": True}),
    "rnn_relu_2_layers": (nn.RNN, {"num_layers": 2, "nonlinearity": "relu"}),
    "lstm_bidirectional_projection": (nn.LSTM, {"bidirectional": True, "proj_size": 3, "num_layers": 2}),
}


def recorded(model: nn.Module, *inputs: Any) -> tuple[list[PrunableLayer], dict[str, Any]]:
    with ActivationRecorder(model) as recorder, torch.no_grad():
        model(*inputs)
    layers, messages = found(model, recorder.example_inputs)
    assert messages == []
    return layers, recorder.moments()


@pytest.mark.parametrize("name", sorted(RECURRENT))
def test_a_recurrent_layer_loses_input_columns_and_hidden_units_exactly(name):
    kind, options = RECURRENT[name]
    torch.manual_seed(0)
    model, x = Recurrent(kind, **options).eval(), torch.randn(4, STEPS, FEATURES)
    layers, moments = recorded(model, x)
    blocks = options.get("num_layers", 1) * (2 if options.get("bidirectional") else 1)
    assert [(layer.name, layer.neurons, layer.groups) for layer in layers] == [
        ("embed.0", 12, 1),
        ("rnn", 8 * blocks, blocks),
        ("head.0", 10, 1),
    ]
    assert moments["rnn"].mean.shape == (12 + 8 * blocks,)  # its input features, then its units
    plan = prune_and_compare(model, layers, x)
    kept = {layer.name: len(layer.kept) for layer in plan.layers}
    assert model.rnn.input_size == model.embed[0].out_features == kept["embed.0"]
    assert model.rnn.hidden_size * blocks == kept["rnn"] == model.head[0].in_features * blocks // (
        2 if options.get("bidirectional") else 1
    ) or options.get("proj_size")


def test_the_recorder_measures_every_unit_at_every_step_against_a_loop_reference():
    """A 2-layer bidirectional LSTM with a projection, its cell units' o ⊙ tanh(c) computed step by step here."""
    torch.manual_seed(0)
    lstm = nn.LSTM(3, 4, num_layers=2, bidirectional=True, proj_size=2, batch_first=True).eval()
    x = torch.randn(5, 6, 3)

    def direction(inputs: Tensor, suffix: str, reverse: bool) -> tuple[Tensor, Tensor]:
        w_ih, w_hh, w_hr = (getattr(lstm, f"{k}{suffix}") for k in ("weight_ih", "weight_hh", "weight_hr"))
        bias = getattr(lstm, f"bias_ih{suffix}") + getattr(lstm, f"bias_hh{suffix}")
        h, c = torch.zeros(inputs.shape[0], 2), torch.zeros(inputs.shape[0], 4)
        cells, outputs = [None] * inputs.shape[1], [None] * inputs.shape[1]
        for t in reversed(range(inputs.shape[1])) if reverse else range(inputs.shape[1]):
            i, f, g, o = (inputs[:, t] @ w_ih.t() + h @ w_hh.t() + bias).chunk(4, dim=1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            cells[t] = torch.sigmoid(o) * torch.tanh(c)
            h = cells[t] @ w_hr.t()
            outputs[t] = h
        return torch.stack(cells, 1), torch.stack(outputs, 1)

    units, inputs = [], x
    with torch.no_grad():
        for layer in range(2):
            (fc, fo), (bc, bo) = direction(inputs, f"_l{layer}", False), direction(inputs, f"_l{layer}_reverse", True)
            units += [fc, bc]
            inputs = torch.cat([fo, bo], dim=-1)
        reference = torch.cat([x, *units], dim=-1).reshape(-1, 3 + 16).double()
        torch.testing.assert_close(lstm(x)[0], inputs)
        wrapped = nn.Sequential(lstm)
        with ActivationRecorder(wrapped) as recorder:
            wrapped(x)
    moments = recorder.moments()["0"]
    torch.testing.assert_close(moments.mean, reference.mean(0))
    torch.testing.assert_close(moments.mean_square, reference.square().mean(0))
    assert float(moments.num_values) == 5 * 6


@pytest.mark.parametrize("kind", [nn.LSTM, nn.GRU, nn.RNN])
def test_a_unit_whose_gate_rows_are_zero_keeps_a_zero_state_at_every_step(kind):
    torch.manual_seed(0)
    rnn = kind(3, 5, num_layers=2, bidirectional=True, batch_first=True).eval()
    zero_hidden_units(rnn, [1, 5 + 3, 10 + 0, 15 + 4])  # one unit of each (layer, direction)
    with torch.no_grad():
        output, state = rnn(torch.randn(2, 7, 3))
    assert output[..., [0 + 0, 5 + 4]].abs().max() == 0  # the second layer's units, both directions, every step
    final = state[0] if isinstance(state, tuple) else state
    assert final[0, :, 1].abs().max() == final[1, :, 3].abs().max() == 0


def test_an_lstm_left_with_exactly_proj_size_units_keeps_one_silent_placeholder():
    torch.manual_seed(0)
    model, x = Recurrent(nn.LSTM, proj_size=3).eval(), torch.randn(4, STEPS, FEATURES)
    layers, _ = recorded(model, x)
    rnn = next(layer for layer in layers if layer.name == "rnn")
    plan = plan_from_kept(layers, {"rnn": [0, 4, 6]})  # 3 units: PyTorch's LSTM cannot run h and c equally wide
    original = copy.deepcopy(model)
    counted = parameters_after(model, plan, count_parameters(model))
    apply_plan(model, plan)
    assert model.rnn.hidden_size == 4
    assert counted == count_parameters(model)
    assert_matches_oracle(model, original, plan, x)
    assert rnn.neurons == 8


class FinalState(nn.Module):
    """A GRU (2 layers) whose final state of the last layer, ``h_n[-1]`` (or of another: ``read``), the head reads."""

    def __init__(self, bidirectional: bool = False, read: int = -1) -> None:
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(FEATURES, 12), nn.ReLU())
        self.rnn = nn.GRU(12, 8, num_layers=2, batch_first=True, bidirectional=bidirectional)
        self.out = nn.Linear(8, NUM_CLASSES)
        self.read = read

    def forward(self, x: Tensor) -> Tensor:
        _, state = self.rnn(self.embed(x))
        return self.out(state[self.read])


def test_the_final_state_of_one_direction_is_followed_and_of_two_is_skipped_with_its_reason():
    torch.manual_seed(0)
    x = torch.randn(4, STEPS, FEATURES)
    model = FinalState().eval()
    layers, _ = recorded(model, x)
    assert [layer.name for layer in layers] == ["embed.0", "rnn"]
    prune_and_compare(model, layers, x)

    layers, messages = found(FinalState(bidirectional=True).eval(), x)
    assert [layer.name for layer in layers] == ["embed.0"]
    assert messages == [
        "lightning_actprune: not pruning rnn: its final state h_n (or c_n) is read and it is bidirectional: only one"
        " direction's final state is followed (the output sequence is, in both directions)."
    ]

    # the first layer's final state is taken for the last layer's by the tracer: the zeroing check catches it
    layers, messages = found(FinalState(read=0).eval(), x)
    assert [layer.name for layer in layers] == ["embed.0"]
    assert messages == [
        "lightning_actprune: not pruning rnn: removing its neurons does not equal zeroing them (an operation between it"
        " and its consumers mixes its neurons, e.g. attention (Q·K, softmax) or a normalisation over them)."
    ]


class Packed(nn.Module):
    """Padded sequences of different lengths, packed through an LSTM, padded again; the last real step of each."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(FEATURES, 12), nn.ReLU())
        self.rnn = nn.LSTM(12, 8, batch_first=True, bidirectional=True)
        self.out = nn.Linear(16, NUM_CLASSES)

    def forward(self, x: Tensor, lengths: Tensor) -> Tensor:
        packed = pack_padded_sequence(self.embed(x), lengths, batch_first=True, enforce_sorted=False)
        steps, _ = pad_packed_sequence(self.rnn(packed)[0], batch_first=True)
        return self.out(steps[torch.arange(len(lengths)), lengths - 1])


def test_packed_sequences_prune_exactly():
    torch.manual_seed(0)
    model, x, lengths = Packed().eval(), torch.randn(4, STEPS, FEATURES), torch.tensor([3, 6, 2, 5])
    layers, moments = recorded(model, x, lengths)
    assert [(layer.name, layer.groups) for layer in layers] == [("embed.0", 1), ("rnn", 2)]
    assert float(moments["rnn"].num_values) == int(lengths.sum())  # the padding is never measured
    assert isinstance(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False), PackedSequence)
    prune_and_compare(model, layers, x, lengths)


def test_a_pruned_recurrent_model_reloads_and_exports_to_onnx(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx.reference import ReferenceEvaluator

    from lightning_actprune import export_pruned

    torch.manual_seed(0)
    model, x = Recurrent(nn.GRU, num_layers=2, bidirectional=True).eval(), torch.randn(2, STEPS, FEATURES)
    layers, moments = recorded(model, x)
    plan = plan_pruning(layers, moments, threshold=0.0, statistic="fluctuation", model=model, normalize=True)
    assert 0 < plan.neurons_after < plan.neurons_before
    apply_plan(model, plan)
    export_pruned(model, tmp_path / "pruned.pt", plan=plan)
    reloaded = load_pruned(Recurrent(nn.GRU, num_layers=2, bidirectional=True), tmp_path / "pruned.pt").eval()
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(reloaded(x), expected, rtol=0, atol=0)
    path = tmp_path / "pruned.onnx"
    torch.onnx.export(model, (x,), str(path), input_names=["inputs"], dynamo=False)
    onnx.checker.check_model(str(path))
    (exported,) = ReferenceEvaluator(str(path)).run(None, {"inputs": x.numpy()})
    torch.testing.assert_close(torch.from_numpy(exported), expected, rtol=1e-4, atol=1e-4)


def test_compensation_folds_a_removed_input_feature_into_the_recurrent_biases_exactly():
    torch.manual_seed(0)
    model, x = Recurrent(nn.LSTM, num_layers=2, bidirectional=True).eval(), torch.randn(4, STEPS, FEATURES)
    layers, moments = recorded(model, x)
    embed = [layer for layer in layers if layer.name == "embed.0"]
    plan = plan_pruning(embed, moments, threshold=0.3, model=model, compensate=True)
    assert [update.module for update in plan.bias_updates] == ["rnn"]
    assert 0 < plan.neurons_after < 12
    original = copy.deepcopy(model)
    apply_plan(model, plan)
    replace_removed_by_means(original, plan, moments)  # the held features enter every gate linearly: exact
    with torch.no_grad():
        torch.testing.assert_close(model(x), original(x))
    no_bias = Recurrent(nn.GRU, bias=False).eval()
    layers, moments = recorded(no_bias, x)
    plan = plan_pruning([layers[0]], moments, threshold=0.3, model=no_bias, compensate=True)
    with pytest.raises(ActivationPruningError, match=r"bias compensation needs the biases of GRU .*bias=False"):
        apply_plan(no_bias, plan)


def test_adam_state_follows_every_recurrent_parameter_through_the_surgery():
    torch.manual_seed(0)
    model, x = Recurrent(nn.LSTM, num_layers=2, bidirectional=True).eval(), torch.randn(4, STEPS, FEATURES)
    layers, _ = recorded(model, x)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(x).sum().backward()
    optimizer.step()
    for p in model.parameters():  # each state entry equals its parameter entry: it must still after the surgery
        optimizer.state[p]["exp_avg"] = p.detach().clone()
        optimizer.state[p]["exp_avg_sq"] = p.detach().square()
    plan = plan_from_kept(layers, {layer.name: per_block(layer, torch.Generator().manual_seed(3)) for layer in layers})
    apply_plan_with_optimizers(model, plan, optimizer)
    assert model.rnn.hidden_size == 4
    for p in model.parameters():
        torch.testing.assert_close(optimizer.state[p]["exp_avg"], p.detach())
        torch.testing.assert_close(optimizer.state[p]["exp_avg_sq"], p.detach().square())
    model.train()
    F.cross_entropy(model(x), torch.zeros(4, dtype=torch.long)).backward()
    optimizer.step()  # the carried state fits the new parameters


def test_a_failed_or_temporary_prune_leaves_the_recurrent_layer_computing_as_before():
    torch.manual_seed(0)
    model, x = Recurrent(nn.GRU, num_layers=2).eval(), torch.randn(4, STEPS, FEATURES)
    layers, _ = recorded(model, x)
    with torch.no_grad():
        before = model(x)
        plan = plan_from_kept(
            layers, {layer.name: per_block(layer, torch.Generator().manual_seed(0)) for layer in layers}
        )
        with pruned_temporarily(model, plan):
            assert model.rnn.hidden_size == 4
        torch.testing.assert_close(model(x), before, rtol=0, atol=0)  # the weights it runs on are the restored ones
    # written by hand (the planner keeps the blocks equal): 3 units of the first layer, 1 of the second
    unequal = PruningPlan(0.0, "mean", (), (ModulePruning("rnn", "in", (12 + 1, 12 + 2, 12 + 3, 12 + 8 + 1)),))
    with pytest.raises(ActivationPruningError, match="every one must keep the same number of units"):
        apply_plan(model, unequal)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=0, atol=0)


# ---------------------------------------------------------------- the callback, with the Trainer's defaults


class Sequences(Classifier):
    """A GRU classifier of sequences: projection → ReLU → GRU → last step → head."""

    def __init__(self) -> None:
        super().__init__(nn.Identity(), lr=0.01)
        self.net = nn.ModuleDict(
            {"proj": nn.Linear(FEATURES, 16), "rnn": nn.GRU(16, 24, batch_first=True), "head": nn.Linear(24, 3)}
        )

    def forward(self, x: Tensor) -> Tensor:
        steps, _ = self.net["rnn"](F.relu(self.net["proj"](x)))
        return self.net["head"](steps[:, -1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def sequence_loaders() -> tuple[DataLoader, DataLoader]:
    def data(n: int, seed: int) -> TensorDataset:
        flat = make_data((STEPS * FEATURES,), n=n, seed=seed)
        return TensorDataset(flat.tensors[0].reshape(n, STEPS, FEATURES), flat.tensors[1])

    return DataLoader(data(96, 0), batch_size=16, shuffle=True), DataLoader(data(48, 1), batch_size=16)


def test_a_gru_classifier_loses_hidden_units_in_a_default_trainer_and_recovers(tmp_path):
    pl.seed_everything(0)
    model, keep = Sequences(), KeepUnpruned()
    pruning = ActivationPruning(target_params_reduction=0.3, recovery_epochs=1)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=3,
        default_root_dir=tmp_path,
        logger=CSVLogger(tmp_path, "csv"),
        callbacks=[keep, pruning],
    )
    trainer.fit(model, *sequence_loaders())
    result = pruning.result
    assert result.pruned
    assert result.params_reduction >= 0.3
    kept = {layer.name: len(layer.kept) for layer in result.plan.layers}
    assert model.net["rnn"].hidden_size == kept["net.rnn"] < 24
    assert model.net["head"].in_features == model.net["rnn"].hidden_size
    assert "val_acc" in result.metrics_recovered
    with open(trainer.logger.log_dir + "/metrics.csv") as handle:
        logged = {key for row in csv.DictReader(handle) for key, value in row.items() if value}
    assert {"actprune/params_reduction", "actprune/val_acc_recovered"} <= logged
    reloaded = load_pruned(Sequences(), pruning.pruned_checkpoint_path).eval()
    x = torch.randn(3, STEPS, FEATURES)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), model(x), rtol=0, atol=0)
