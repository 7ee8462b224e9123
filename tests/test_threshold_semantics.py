"""λ means what the user wrote; the end of fit never crashes for a legitimate outcome (issue 11)."""

import copy
import csv
import math
import re

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from lightning_actprune import ActivationPruning
from lightning_actprune.core import count_parameters
from tests.helpers import NUM_CLASSES, Classifier, loaders


class KeepCopy(Callback):
    """Keeps a deep copy of the trained, unpruned model (runs before the pruning callback)."""

    def on_fit_end(self, trainer, pl_module):
        self.model = copy.deepcopy(pl_module)


def hidden_means(net: nn.Sequential, val) -> list[torch.Tensor]:
    """The reference: each hidden layer's mean activation over the validation set, at the next Linear's input."""
    sums, count, inputs = None, 0, []
    hooks = [m.register_forward_pre_hook(lambda _m, a: inputs.append(a[0])) for m in net[2::2]]
    with torch.no_grad():
        for x, _ in val:
            inputs.clear()
            net(x)
            batch = [a.double().sum(0) for a in inputs]
            sums = batch if sums is None else [s + b for s, b in zip(sums, batch, strict=True)]
            count += len(x)
    for hook in hooks:
        hook.remove()
    return [s / count for s in sums]


def mlp(activation: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    return nn.Sequential(nn.Linear(8, 24), activation(), nn.Linear(24, 16), activation(), nn.Linear(16, NUM_CLASSES))


def fit(tmp_path, net, *callbacks, max_epochs=3, lr=0.05):
    pl.seed_everything(0)
    keep = KeepCopy()
    trainer = pl.Trainer(  # quiet, as in `quiet_trainer` (see its docstring); the loggers are the test's own
        max_epochs=max_epochs,
        accelerator="cpu",
        logger=[CSVLogger(tmp_path, name="csv"), TensorBoardLogger(tmp_path, name="tb")],
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        callbacks=[keep, *callbacks],
    )
    model = Classifier(net, lr=lr)
    train, val = loaders((8,))
    trainer.fit(model, train, val)
    return trainer, model, keep.model, val


@pytest.mark.parametrize("activation", [nn.ReLU, nn.Tanh])
def test_a_written_threshold_is_a_mean_activation_unless_a_statistic_is_named(tmp_path, caplog, activation):
    # tanh means are negative for some neurons: a negative λ is in the same units and removes exactly those below it
    threshold = 0.15 if activation is nn.ReLU else -0.02
    pruning = ActivationPruning(threshold=threshold, pruned_checkpoint=None)
    with caplog.at_level("INFO"):
        _, model, unpruned, val = fit(tmp_path, mlp(activation), pruning)
    assert pruning.effective_statistic == "mean"
    plan = pruning.result.plan
    assert (plan.statistic, plan.normalize, plan.threshold) == ("mean", False, threshold)
    for layer, means in zip(plan.layers, hidden_means(unpruned.net, val), strict=True):
        expected = [i for i, m in enumerate(means.tolist()) if m >= threshold]
        assert list(layer.kept) == expected, layer.name
        assert 0 < len(expected) < len(means), "the test λ must remove some neurons and keep some"
    assert f"Activation pruning, λ = {threshold:g} (mean activation): parameters" in caplog.text
    assert model.net[0].out_features == len(plan.layers[0].kept)


def test_a_chosen_threshold_uses_fluctuation_over_the_layer_mean_and_says_so(tmp_path, caplog):
    pruning = ActivationPruning(target_params_reduction=0.3, pruned_checkpoint=None)
    with caplog.at_level("INFO"):
        fit(tmp_path, mlp(), pruning)
    plan = pruning.result.plan
    assert (pruning.effective_statistic, plan.statistic, plan.normalize) == ("fluctuation", "fluctuation", True)
    assert plan.scale == "mean"
    assert 0 < plan.threshold < 1  # below the layer mean: the units that carry less than an average one go first
    chosen = "chosen by target_params_reduction: parameters"
    assert f"λ = {plan.threshold:.4g} × the layer mean of fluctuation, {chosen}" in caplog.text
    named = ActivationPruning(target_params_reduction=0.3, statistic="fluctuation", pruned_checkpoint=None)
    with caplog.at_level("INFO"):
        fit(tmp_path / "named", mlp(), named)
    assert named.result.plan.scale == "std"  # a statistic the user names is standardised, λ in standard deviations
    assert f"λ = {named.result.plan.threshold:.4g} std of standardised fluctuation per layer, {chosen}" in caplog.text
    # a table for a budget lists parameter reductions and keeps the criterion the callback picks λ by
    assert ActivationPruning(max_metric_drop=0.1, monitor="val_acc", sweep=[0.3, 0.5]).effective_statistic == (
        "fluctuation"
    )
    assert ActivationPruning(max_metric_drop=0.1, monitor="val_acc").effective_statistic == "fluctuation"
    assert ActivationPruning(threshold=0.1, statistic="rms").effective_statistic == "rms"


def test_max_metric_drop_with_no_admissible_threshold_keeps_the_model_and_still_writes_the_table(tmp_path):
    sweep = [0.8, 0.9, 0.95]  # each removes most of the network
    pruning = ActivationPruning(max_metric_drop=0.0, monitor="val_loss", mode="min", sweep=sweep)
    with pytest.warns(
        UserWarning,
        match=r"no λ keeps `val_loss` within `max_metric_drop=0`.*reductions evaluated"
        r" \(-80%, -90%, -95%\) is \d",
    ):
        trainer, model, unpruned, _ = fit(tmp_path, mlp(), pruning, max_epochs=20, lr=0.2)
    for name, tensor in unpruned.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    result = pruning.result
    assert not result.pruned
    assert result.chosen_by == "none"
    assert [row.target for row in result.sweep] == sweep
    assert result.params_after == result.params_before == count_parameters(model)
    assert pruning.pruned_checkpoint_path is None
    log_dir = trainer.log_dir
    names = {"actprune_sweep.csv", "actprune_sweep.json", "actprune_sweep.png"}
    assert all((tmp_path / "csv" / "version_0" / n).exists() for n in names), log_dir
    with open(tmp_path / "csv" / "version_0" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("actprune/chosen_threshold")]
    assert len(rows) == 1
    assert math.isnan(float(rows[0]["actprune/chosen_threshold"]))
    assert float(rows[0]["actprune/params_reduction"]) == 0.0
    (events,) = (tmp_path / "tb" / "version_0").glob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(events)).Reload()
    assert math.isnan(accumulator.Scalars("actprune/chosen_threshold")[0].value)
    assert "chose no λ" in result.summary()


class DeadNeurons(nn.Module):
    """An MLP whose first hidden layer has 30 neurons that never fire: all of their statistics tie at zero."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 48), nn.ReLU(), nn.Linear(48, 16), nn.ReLU(), nn.Linear(16, NUM_CLASSES))
        with torch.no_grad():
            self.net[0].weight[:30] = 0  # ReLU(0·x − 1) = 0 with zero gradient: they stay dead while training
            self.net[0].bias[:30] = -1

    def forward(self, x):
        return self.net(x)


@pytest.mark.parametrize("statistic", [None, "mean"])
def test_target_params_reduction_breaks_ties_to_land_on_the_target(tmp_path, caplog, statistic):
    # each dead neuron holds 8 + 1 + 16 = 25 of 1,331 parameters (1.9%); all 30 (56%) tie at the lowest score
    target = 0.3
    pruning = ActivationPruning(target_params_reduction=target, statistic=statistic, pruned_checkpoint=None)
    with caplog.at_level("INFO"):
        _, model, _, _ = fit(tmp_path, DeadNeurons(), pruning)
    result = pruning.result
    assert target <= result.params_reduction <= target + 0.02
    assert result.params_reduction == 1 - count_parameters(model) / result.params_before
    removed = set(result.plan.layers[0].removed)
    assert removed <= set(range(30)), "only dead neurons go before any live one"
    ((tied, going),) = re.findall(r"splits (\d+) neurons with equal scores: (\d+) of them go", caplog.text)
    assert int(tied) >= 30
    # the dead neurons of the first layer that go are among the tied ones (a later layer may have dead ones too)
    assert len(removed) <= int(going) <= sum(len(layer.removed) for layer in result.plan.layers)


def test_target_params_reduction_out_of_reach_warns_and_keeps_the_model(tmp_path):
    pruning = ActivationPruning(target_params_reduction=0.99, min_neurons=4)
    with pytest.warns(UserWarning, match=r"`target_params_reduction=0.99` is out of reach: .* by 0\.\d+"):
        _, model, unpruned, _ = fit(tmp_path, mlp(), pruning)
    assert not pruning.result.pruned
    for name, tensor in unpruned.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name


def test_results_and_plans_print_in_a_few_lines(tmp_path):
    pruning = ActivationPruning(threshold=0.05, sweep=[0.0, 0.05], pruned_checkpoint=None)
    fit(tmp_path, DeadNeurons(), pruning)
    result = pruning.result
    text = repr(result)
    assert len(text.splitlines()) <= 3
    assert len(text) < 600
    assert "net.net.0 48 -> " in text
    assert "chosen_by='threshold'" in text
    assert "kept" not in text  # widths, never index lists
    assert repr(result.plan) in text
    assert repr(result.plan.layers[0]) == f"LayerPlan('net.net.0', 48 -> {len(result.plan.layers[0].kept)})"
