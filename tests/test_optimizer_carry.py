"""Pruning mid-training: the same optimizers carry on, checked against a reference sliced by hand."""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_actprune.core import (
    ActivationPruningError,
    ActivationRecorder,
    ModulePruning,
    PruningPlan,
    apply_plan_with_optimizers,
    find_prunable_layers,
    plan_from_kept,
)
from tests.helpers import ARCHITECTURES, input_shape

# (class, hyper-parameters): every state layout of torch's built-in optimizers that holds per-entry tensors
OPTIMIZERS: list[tuple[type[Optimizer], dict[str, Any]]] = [
    (torch.optim.SGD, {"lr": 0.1}),
    (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-2}),
    (torch.optim.Adam, {"lr": 0.01, "amsgrad": True}),
    (torch.optim.AdamW, {"lr": 0.01, "weight_decay": 0.1}),
    (torch.optim.Adamax, {"lr": 0.01}),
    (torch.optim.NAdam, {"lr": 0.01}),
    (torch.optim.RAdam, {"lr": 0.01}),
    (torch.optim.RMSprop, {"lr": 0.01, "momentum": 0.5, "centered": True}),
    (torch.optim.Adagrad, {"lr": 0.1}),
    (torch.optim.Adadelta, {"lr": 1.0}),
    (torch.optim.ASGD, {"lr": 0.1, "t0": 1}),
    (torch.optim.Rprop, {"lr": 0.01}),
]

# Which entries of each parameter stay, by hand: per parameter name, (dim, kept indices) pairs.
Slicing = dict[str, list[tuple[int, list[int]]]]

MLP_KEPT = {"0": [1, 2, 5, 7, 9], "2": [0, 3, 4, 6]}
MLP_SLICING: Slicing = {
    "0.weight": [(0, MLP_KEPT["0"])],
    "0.bias": [(0, MLP_KEPT["0"])],
    "2.weight": [(0, MLP_KEPT["2"]), (1, MLP_KEPT["0"])],
    "2.bias": [(0, MLP_KEPT["2"])],
    "4.weight": [(1, MLP_KEPT["2"])],
}

CNN_KEPT = {"0": [0, 2], "4": [1, 3, 4]}
CNN_FEATURES = [channel * 16 + position for channel in CNN_KEPT["0"] for position in range(16)]
CNN_SLICING: Slicing = {
    "0.weight": [(0, CNN_KEPT["0"])],
    "0.bias": [(0, CNN_KEPT["0"])],
    "1.weight": [(0, CNN_KEPT["0"])],
    "1.bias": [(0, CNN_KEPT["0"])],
    "1.running_mean": [(0, CNN_KEPT["0"])],
    "1.running_var": [(0, CNN_KEPT["0"])],
    "4.weight": [(0, CNN_KEPT["4"]), (1, CNN_FEATURES)],
    "4.bias": [(0, CNN_KEPT["4"])],
    "6.weight": [(1, CNN_KEPT["4"])],
}


def mlp(hidden: Sequence[int] = (10, 8)) -> nn.Sequential:
    return nn.Sequential(nn.Linear(6, hidden[0]), nn.ReLU(), nn.Linear(*hidden), nn.ReLU(), nn.Linear(hidden[1], 3))


def cnn(channels: int = 4, hidden: int = 5) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(2, channels, 3), nn.BatchNorm2d(channels), nn.ReLU(), nn.Flatten(),
        nn.Linear(channels * 16, hidden), nn.ReLU(), nn.Linear(hidden, 3),
    )  # fmt: skip


MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[], nn.Module], tuple[int, ...], dict, Slicing]] = {
    "mlp": (mlp, lambda: mlp((5, 4)), (6,), MLP_KEPT, MLP_SLICING),
    "cnn": (cnn, lambda: cnn(2, 3), (2, 6, 6), CNN_KEPT, CNN_SLICING),
}


def batches(shape: tuple[int, ...], count: int, seed: int) -> list[tuple[Tensor, Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(16, *shape, generator=generator), torch.randint(0, 3, (16,), generator=generator))
        for _ in range(count)
    ]


def train(
    model: nn.Module,
    optimizer: Optimizer,
    scheduler: Any,
    data: list[tuple[Tensor, Tensor]],
    scaler: torch.amp.GradScaler | None = None,
) -> None:
    """Plain steps with gradient clipping and a scheduler; with ``scaler``, bfloat16 autocast and loss scaling."""
    model.train()
    for x, y in data:
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=scaler is not None):
            loss = F.cross_entropy(model(x), y)
        if scaler is None:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.5)
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.5)
            scaler.step(optimizer)
            scaler.update()
        scheduler.step()


def hand_slice(tensor: Tensor, slices: list[tuple[int, list[int]]]) -> Tensor:
    for dim, kept in slices:
        tensor = tensor.index_select(dim, torch.tensor(kept))
    return tensor


def make_scheduler(optimizer: Optimizer, name: str) -> Any:
    if name == "mlp":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.05, total_steps=20, cycle_momentum=False)


def plan_for(model: nn.Module, input_shape: tuple[int, ...], kept: dict[str, list[int]]) -> PruningPlan:
    return plan_from_kept(find_prunable_layers(model, torch.randn(4, *input_shape)), kept)


@functools.cache
def model_plan(name: str) -> PruningPlan:
    """The plan keeping the hand-chosen neurons: it depends on the architecture only, so it is traced once."""
    make, _, shape, kept, _ = MODELS[name]
    return plan_for(make(), shape, kept)


def reference_after_prune(
    name: str, model: nn.Module, optimizer: Optimizer, scheduler: Any
) -> tuple[nn.Module, Optimizer, Any]:
    """The small model, a new optimizer and scheduler, all sliced by hand from the unpruned ones."""
    _, make_small, _, _, slicing = MODELS[name]
    small = make_small()
    small.load_state_dict({k: hand_slice(v, slicing.get(k, [])) for k, v in model.state_dict().items()})
    names = [n for n, _ in model.named_parameters()]
    saved = optimizer.state_dict()
    # clones: load_state_dict keeps tensors of the right dtype and device, which the original optimizer updates
    state = {
        i: {k: hand_slice(v, slicing.get(names[i], []) if v.dim() > 0 else []).clone() for k, v in s.items()}
        for i, s in saved["state"].items()
    }
    small_optimizer = type(optimizer)(small.parameters())
    small_scheduler = make_scheduler(small_optimizer, name)
    small_optimizer.load_state_dict({"state": state, "param_groups": saved["param_groups"]})
    small_scheduler.load_state_dict(scheduler.state_dict())
    return small, small_optimizer, small_scheduler


def label(optimizer_class: type[Optimizer], hyper: dict[str, Any]) -> str:
    return "-".join([optimizer_class.__name__, *(key for key in hyper if key != "lr")])


ORACLE_CASES = [
    *(pytest.param(*optimizer, name, False, id=f"{label(*optimizer)}-{name}") for optimizer in OPTIMIZERS
      for name in sorted(MODELS)),
    # mixed precision changes the gradients, not the state: two optimizers show the scaler keeps working
    *(pytest.param(*OPTIMIZERS[i], name, True, id=f"{label(*OPTIMIZERS[i])}-{name}-bf16-scaler") for i in (1, 2)
      for name in sorted(MODELS)),
]  # fmt: skip


@pytest.mark.parametrize(("optimizer_class", "hyper", "name", "amp"), ORACLE_CASES)
def test_training_on_equals_a_reference_sliced_by_hand(
    optimizer_class: type[Optimizer], hyper: dict[str, Any], name: str, amp: bool
) -> None:
    make, _, shape, _, _ = MODELS[name]
    torch.manual_seed(0)
    model = make()
    optimizer = optimizer_class(model.parameters(), **hyper)
    scheduler = make_scheduler(optimizer, name)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8) if amp else None
    train(model, optimizer, scheduler, batches(shape, 3, seed=1), scaler)
    plan = model_plan(name)

    reference, reference_optimizer, reference_scheduler = reference_after_prune(name, model, optimizer, scheduler)
    reference_scaler = copy.deepcopy(scaler)
    apply_plan_with_optimizers(model, plan, optimizer)
    later = batches(shape, 4, seed=2)
    train(model, optimizer, scheduler, later, scaler)
    train(reference, reference_optimizer, reference_scheduler, later, reference_scaler)

    for (key, value), expected in zip(model.state_dict().items(), reference.state_dict().values(), strict=True):
        torch.testing.assert_close(value, expected, msg=lambda m, key=key: f"{key}: {m}")
    assert optimizer.param_groups[0]["lr"] == reference_optimizer.param_groups[0]["lr"]


def test_the_oracle_sees_a_lost_state() -> None:
    """The reference differs from training on with a reset optimizer: the oracle above can fail."""
    torch.manual_seed(0)
    model = mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    scheduler = make_scheduler(optimizer, "mlp")
    train(model, optimizer, scheduler, batches((6,), 3, seed=1))
    reference, reference_optimizer, reference_scheduler = reference_after_prune("mlp", model, optimizer, scheduler)
    reset = copy.deepcopy(reference)
    reset_optimizer = torch.optim.Adam(reset.parameters(), lr=0.01)
    later = batches((6,), 4, seed=2)
    train(reference, reference_optimizer, reference_scheduler, later)
    train(reset, reset_optimizer, make_scheduler(reset_optimizer, "mlp"), later)
    assert not torch.allclose(reference[0].weight, reset[0].weight)


def convs(groups: int, transposed: bool = False) -> nn.Sequential:
    middle = nn.ConvTranspose2d(6, 4, 2, stride=2) if transposed else nn.Conv2d(6, 6, 3, groups=groups, padding=1)
    return nn.Sequential(nn.Conv2d(1, 6, 1), nn.ReLU(), middle, nn.ReLU(), nn.Conv2d(middle.out_channels, 3, 1))


# written by hand: a transposed conv is not found prunable (its weight is (in, out, ...)), and a grouped conv is
# pruned along its outputs only, one channel per group
HAND_PLANS = {
    "transposed": PruningPlan(
        0.0, "mean", (), (ModulePruning("0", "out", (1, 3, 5)), ModulePruning("2", "in", (1, 3, 5)),
        ModulePruning("2", "out", (2,)), ModulePruning("4", "in", (2,)))
    ),
    "grouped": PruningPlan(0.0, "mean", (), (ModulePruning("2", "out", (1, 4)), ModulePruning("4", "in", (1, 4)))),
}  # fmt: skip
LAYOUTS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    **{name: (architecture, input_shape(architecture())) for name, architecture in ARCHITECTURES.items()},
    "depthwise": (lambda: convs(groups=6), (1, 5, 5)),
    "grouped": (lambda: convs(groups=2), (1, 5, 5)),
    "transposed": (lambda: convs(1, transposed=True), (1, 5, 5)),
}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_state_that_equals_its_parameter_still_does_after_the_surgery(name: str) -> None:
    """Whatever the layer layout, every state entry follows its parameter entry."""
    make, shape = LAYOUTS[name]
    torch.manual_seed(0)
    model = make()
    x = torch.randn(4, *shape)
    optimizer = torch.optim.Adam(model.parameters())
    model(x).sum().backward()
    optimizer.step()
    for p in model.parameters():
        optimizer.state[p]["exp_avg"] = p.detach().clone()
        optimizer.state[p]["exp_avg_sq"] = p.detach().square()
    if name in HAND_PLANS:
        plan = HAND_PLANS[name]
    else:
        layers = find_prunable_layers(model, x)
        plan = plan_from_kept(layers, {layer.name: range(0, layer.neurons, 2) for layer in layers})
    shapes_before = [p.shape for p in model.parameters()]

    apply_plan_with_optimizers(model, plan, optimizer)

    assert [p.shape for p in model.parameters()] != shapes_before
    assert optimizer.param_groups[0]["params"] == list(model.parameters())
    for p in model.parameters():
        assert torch.equal(optimizer.state[p]["exp_avg"], p.detach())
        assert torch.equal(optimizer.state[p]["exp_avg_sq"], p.detach().square())


def trained_mlp(optimizer_class: type[Optimizer] = torch.optim.Adam, **hyper: Any) -> tuple[nn.Module, Optimizer]:
    torch.manual_seed(0)
    model = mlp()
    optimizer = optimizer_class(model.parameters(), **hyper)
    train(model, optimizer, make_scheduler(optimizer, "mlp"), batches((6,), 2, seed=1))
    return model, optimizer


def test_same_optimizer_keeps_hyper_parameters_scalars_and_round_trips() -> None:
    model, optimizer = trained_mlp(lr=0.01, betas=(0.8, 0.9), weight_decay=0.01)
    groups_before = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    steps_before = [optimizer.state[p]["step"].clone() for p in model.parameters()]
    params_list = optimizer.param_groups[0]["params"]
    state_object = optimizer.state

    apply_plan_with_optimizers(model, plan_for(model, (6,), MLP_KEPT), [optimizer])

    assert [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups] == groups_before
    assert optimizer.param_groups[0]["params"] is params_list  # changed in place: aliases (LBFGS) stay valid
    assert optimizer.state is state_object
    assert optimizer.param_groups[0]["params"] == list(model.parameters())
    assert set(optimizer.state) == set(model.parameters())
    for p, step in zip(model.parameters(), steps_before, strict=True):
        assert torch.equal(optimizer.state[p]["step"], step)
        assert optimizer.state[p]["exp_avg"].shape == p.shape
        assert optimizer.state[p]["exp_avg_sq"].shape == p.shape

    fresh = torch.optim.Adam(model.parameters())
    fresh.load_state_dict(optimizer.state_dict())
    for p, q in zip(model.parameters(), fresh.param_groups[0]["params"], strict=True):
        for key in ("step", "exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(fresh.state[q][key], optimizer.state[p][key])
    assert fresh.param_groups[0]["betas"] == (0.8, 0.9)


def test_param_groups_stay_apart_and_frozen_parameters_are_left_out() -> None:
    torch.manual_seed(0)
    model = mlp()
    model[0].requires_grad_(False)
    weights = [model[2].weight, model[4].weight]
    optimizer = torch.optim.SGD(
        [{"params": weights, "lr": 0.1}, {"params": [model[2].bias, model[4].bias], "lr": 0.01}], momentum=0.9
    )
    train(model, optimizer, make_scheduler(optimizer, "mlp"), batches((6,), 2, seed=1))
    state_before = dict(optimizer.state)
    lrs = [g["lr"] for g in optimizer.param_groups]

    apply_plan_with_optimizers(model, plan_for(model, (6,), MLP_KEPT), optimizer)

    assert [g["lr"] for g in optimizer.param_groups] == lrs == [0.05, 0.005]  # StepLR halved them
    assert optimizer.param_groups[0]["params"] == [model[2].weight, model[4].weight]
    assert optimizer.param_groups[1]["params"] == [model[2].bias, model[4].bias]
    assert model[0].weight.shape == (5, 6)
    assert not model[0].weight.requires_grad
    assert len(optimizer.state) == len(state_before) == 4
    momentum = optimizer.state[model[2].weight]["momentum_buffer"]
    expected = hand_slice(state_before[weights[0]]["momentum_buffer"], MLP_SLICING["2.weight"])
    assert torch.equal(momentum, expected)


def test_a_compensating_bias_joins_its_weights_group_and_trains() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 3, bias=False))
    optimizer = torch.optim.Adam([{"params": [model[0].weight]}, {"params": [model[2].weight, model[0].bias]}])
    x = torch.randn(32, 6)
    F.cross_entropy(model(x), torch.randint(0, 3, (32,))).backward()
    optimizer.step()
    with ActivationRecorder(model) as recorder, torch.no_grad():
        model(x)
    layers = find_prunable_layers(model, x)
    plan = plan_from_kept(layers, {"0": [0, 1, 2]}, moments=recorder.moments(), model=model, compensate=True)

    apply_plan_with_optimizers(model, plan, optimizer)

    bias = model[2].bias
    assert optimizer.param_groups[1]["params"] == [model[2].weight, bias, model[0].bias]  # next to its weight
    assert bias not in optimizer.state
    before = bias.detach().clone()
    optimizer.zero_grad()
    F.cross_entropy(model(x), torch.randint(0, 3, (32,))).backward()
    optimizer.step()
    assert not torch.equal(bias.detach(), before)
    assert optimizer.state[bias]["exp_avg"].shape == (3,)


def snapshot(model: nn.Module, optimizers: Sequence[Optimizer]) -> tuple[dict, list, list]:
    parameters = dict(model.named_parameters())
    groups = [[list(g["params"]) for g in o.param_groups] for o in optimizers]
    states = [{p: {k: v.clone() if isinstance(v, Tensor) else v for k, v in s.items()} for p, s in o.state.items()}
              for o in optimizers]  # fmt: skip
    return parameters, groups, states


def assert_unchanged(model: nn.Module, optimizers: Sequence[Optimizer], saved: tuple[dict, list, list]) -> None:
    parameters, groups, states = saved
    assert parameters.keys() == dict(model.named_parameters()).keys()
    assert all(p is parameters[n] for n, p in model.named_parameters())
    assert [[list(g["params"]) for g in o.param_groups] for o in optimizers] == groups
    for optimizer, state in zip(optimizers, states, strict=True):
        assert optimizer.state.keys() == state.keys()
        for p, s in state.items():
            assert optimizer.state[p].keys() == s.keys()
            for key, value in s.items():
                assert torch.equal(optimizer.state[p][key], value) if isinstance(value, Tensor) else True


def test_adafactors_factored_moments_cannot_be_carried_and_nothing_changes() -> None:
    model, optimizer = trained_mlp(torch.optim.Adafactor, lr=0.01)
    saved = snapshot(model, [optimizer])
    with pytest.raises(ActivationPruningError, match=r"'row_var' of 0\.weight \(shape \(10, 6\)\).*shape \(10, 1\)"):
        apply_plan_with_optimizers(model, plan_for(model, (6,), MLP_KEPT), optimizer)
    assert_unchanged(model, [optimizer], saved)
    assert model[0].out_features == 10


def test_an_inconsistent_state_in_the_second_optimizer_restores_the_first_too() -> None:
    torch.manual_seed(0)
    model = mlp()
    first = torch.optim.SGD(model[0].parameters(), lr=0.1, momentum=0.9)
    second = torch.optim.Adam([*model[2].parameters(), *model[4].parameters()])
    train(model, first, make_scheduler(first, "mlp"), batches((6,), 1, seed=1))
    second.step()
    second.state[model[2].bias]["history"] = [torch.zeros(8)]
    saved = snapshot(model, [first, second])
    with pytest.raises(ActivationPruningError, match=r"'history' of 2\.bias .*it is list"):
        apply_plan_with_optimizers(model, plan_for(model, (6,), MLP_KEPT), [first, second])
    assert_unchanged(model, [first, second], saved)


def test_lbfgs_history_cannot_be_carried() -> None:
    model, _ = trained_mlp(torch.optim.SGD, lr=0.1)
    lbfgs = torch.optim.LBFGS(model.parameters(), history_size=3, max_iter=2)
    x, y = batches((6,), 1, seed=3)[0]

    def closure() -> Tensor:
        lbfgs.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    lbfgs.step(closure)
    saved = snapshot(model, [lbfgs])
    with pytest.raises(ActivationPruningError, match=r"of 0\.weight .*cannot be sliced exactly"):
        apply_plan_with_optimizers(model, plan_for(model, (6,), MLP_KEPT), lbfgs)
    assert_unchanged(model, [lbfgs], saved)


def test_bad_arguments_name_themselves() -> None:
    model, optimizer = trained_mlp()
    plan = plan_for(model, (6,), MLP_KEPT)
    for bad, received in (([optimizer.state_dict()], "dict"), (None, "NoneType"), (model.parameters(), "generator")):
        with pytest.raises(
            ActivationPruningError, match=rf"`optimizers` must be a torch\.optim\.Optimizer .* got {received}"
        ):
            apply_plan_with_optimizers(model, plan, bad)  # type: ignore[arg-type]
    missing = PruningPlan(0.0, "mean", (), (*plan.operations[:1], plan.operations[0]._replace(module="nope")))
    saved = snapshot(model, [optimizer])
    with pytest.raises(ActivationPruningError, match="prunes 'nope'"):
        apply_plan_with_optimizers(model, missing, optimizer)
    assert_unchanged(model, [optimizer], saved)
