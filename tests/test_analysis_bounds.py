"""Hard architectures by hand (grouped convolutions, a channel shuffle) and the bounds on the analysis (issue 14)."""

import copy
import warnings

import pytest
import torch
from torch import Tensor, nn

from lightning_actprune import _analysis, _grouped, _torch_pruning
from lightning_actprune._counting import parameters_after
from lightning_actprune._surgery import pruned_temporarily
from lightning_actprune.core import apply_plan, count_parameters, find_prunable_layers, plan_from_kept
from tests.helpers import CNN, Residual, assert_matches_oracle


class GroupedConvNet(nn.Module):
    """A ResNeXt-like block: 1x1 conv, a 3x3 conv in 2 groups, 1x1 conv, then a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.expand = nn.Conv2d(8, 6, 1)
        self.head = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.expand(torch.relu(self.grouped(torch.relu(self.stem(x))))))
        return self.head(x.mean((2, 3)))


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    batch, channels, height, width = x.shape
    x = x.view(batch, groups, channels // groups, height, width).transpose(1, 2).contiguous()
    return x.view(batch, channels, height, width)


class ShuffleNet(nn.Module):
    """ShuffleNetV2's unit: split the channels, convolve one half, concatenate, shuffle."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.branch_in = nn.Conv2d(4, 6, 1)
        self.branch_out = nn.Conv2d(6, 4, 1)
        self.after = nn.Conv2d(8, 5, 1)
        self.head = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.stem(x))
        kept, branch = x.chunk(2, dim=1)
        branch = torch.relu(self.branch_out(torch.relu(self.branch_in(branch))))
        x = channel_shuffle(torch.cat([kept, branch], dim=1), 2)
        return self.head(torch.relu(self.after(x)).mean((2, 3)))


def found_and_warned(model: nn.Module, x: Tensor) -> tuple[list, str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layers = find_prunable_layers(model, x)
    return layers, "\n".join(str(w.message) for w in caught)


def assert_half_of_each_prunes_exactly(model: nn.Module, layers: list, x: Tensor) -> None:
    plan = plan_from_kept(layers, {layer.name: range(0, layer.neurons, 2) for layer in layers})
    original = copy.deepcopy(model)
    apply_plan(model, plan)
    assert_matches_oracle(model, original, plan, x)


def test_a_grouped_convolution_loses_an_equal_count_per_group_on_both_sides_exactly():
    torch.manual_seed(0)
    model, x = GroupedConvNet().eval(), torch.randn(4, 3, 6, 6)
    layers, warned = found_and_warned(model, x)
    assert [(layer.name, layer.groups) for layer in layers] == [("stem", 2), ("grouped", 2), ("expand", 1)]
    assert warned == ""
    assert_half_of_each_prunes_exactly(model, layers, x)


def test_a_depthwise_convolution_is_not_a_grouped_one():
    depthwise, grouped = nn.Conv2d(4, 4, 3, groups=4), nn.Conv2d(4, 4, 3, groups=2)
    assert not _grouped.grouped_convolution(depthwise)
    assert _grouped.grouped_convolution(grouped)
    assert not _grouped.grouped_convolution(nn.Conv2d(4, 4, 3))
    assert not _grouped.grouped_convolution(nn.Linear(4, 4))


def test_a_channel_shuffle_prunes_exactly_or_skips_with_a_message():
    torch.manual_seed(0)
    model, x = ShuffleNet().eval(), torch.randn(4, 3, 5, 5)
    layers, warned = found_and_warned(model, x)
    names = [layer.name for layer in layers]
    # the branch's inner layer never reaches the shuffle; everything whose channels are shuffled is skipped, by name
    assert names == ["branch_in", "after"]
    # the halves of stem's chunk are read apart: a plan could shrink them unequally, which chunk(2) cannot follow
    assert "not pruning stem+branch_out: its neurons reach a torch.split/chunk of its features into pieces" in warned
    assert_half_of_each_prunes_exactly(model, layers, x)


def test_a_group_that_grows_past_the_limit_is_skipped_with_a_message(monkeypatch):
    # group "0": 4 channels flattened into 144 features, 140 indices beyond one per neuron; group "3": 64 neurons in
    # 3 members, 192 indices but none beyond one per neuron and member (a wide legitimate group: no false alarm)
    monkeypatch.setattr(_torch_pruning, "GROUP_INDEX_LIMIT", 100)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(144, 64), nn.ReLU(), nn.Linear(64, 2)
    )
    message = r"not pruning 0: tracing its group failed: GroupTooLarge: .* past 100 indices beyond one per neuron"
    with pytest.warns(UserWarning, match=message):
        layers = find_prunable_layers(model, torch.randn(4, 1, 6, 6))
    assert [layer.name for layer in layers] == ["3"]


def test_groups_past_the_time_budget_are_skipped_with_one_message(monkeypatch):
    monkeypatch.setattr(_torch_pruning, "ANALYSIS_SECONDS", 0.0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert find_prunable_layers(model, torch.randn(4, 4)) == []
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    assert "not pruning 4, 2, 0" in messages[0]
    assert "ran past its 0 s budget" in messages[0]


def test_failing_alone_finds_every_failure_with_few_checks():
    checks = []

    def passes(chunk):
        checks.append(list(chunk))
        return not {3, 17} & set(chunk)

    assert _analysis.failing_alone(list(range(32)), passes) == [3, 17]
    assert len(checks) < 32
    assert _analysis.failing_alone([], passes) == []


@pytest.mark.parametrize("kind", ["cnn", "residual", "grouped"])
def test_the_parameter_count_of_a_plan_equals_the_count_after_surgery(kind):
    torch.manual_seed(0)
    model = {"cnn": CNN, "residual": Residual, "grouped": GroupedConvNet}[kind]().eval()
    image = getattr(model, "image", (3, 6, 6))
    layers = find_prunable_layers(model, torch.randn(4, *image))
    before = count_parameters(model)
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        kept = {  # random neurons, as many from each block of a grouped convolution's layer
            layer.name: [
                block[int(i)]
                for block in layer.blocks()
                for i in torch.randperm(len(block), generator=generator)[: len(block) // 2 + 1]
            ]
            for layer in layers
        }
        plan = plan_from_kept(layers, kept)
        counted = parameters_after(model, plan, before)
        assert counted is not None
        with pruned_temporarily(model, plan):
            assert counted == count_parameters(model)
