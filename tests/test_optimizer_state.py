"""``optimizer_state``: what the optimizer keeps of its state at a prune inside ``fit`` (carry, reset, fresh)."""

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

from lightning_actprune import ActivationPruning, ActivationPruningError
from lightning_actprune._optimizer import apply_plan_with_optimizers
from lightning_actprune.core import find_prunable_layers, plan_from_kept
from tests.helpers import Classifier, MLPModule, make_data
from tests.test_cli import callback_config, parse, pruning_callback

MAX_EPOCHS, RECOVERY, BATCHES = 3, 1, 6
PRUNED = ["net.net.0.weight", "net.net.0.bias", "net.net.2.weight", "net.net.2.bias", "net.net.4.weight"]
"""The parameters a prune of both hidden layers of ``MLPModule`` changes; ``net.net.4.bias`` stays as it is."""


class AdamClassifier(Classifier):
    """Adam (per-parameter step counts and moments) with a StepLR schedule."""

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters(), lr=self.lr)
        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.5)}


class AdamState(Callback):
    """The optimizer's state per parameter name at the end of the prune epoch (before or after the prune: its place)."""

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == MAX_EPOCHS - RECOVERY - 1:
            self.state = named_state(trainer, pl_module)
            self.lr = trainer.optimizers[0].param_groups[0]["lr"]


def named_state(trainer, pl_module):
    (optimizer,) = trainer.optimizers
    return {
        name: {k: v.clone() for k, v in optimizer.state[p].items()}
        for name, p in pl_module.named_parameters()
        if p in optimizer.state
    }


def recover(tmp_path, state, **trainer_options):
    """A real fit: prune both hidden layers after epoch 2 of 3 and recover one epoch with ``optimizer_state=state``."""
    pl.seed_everything(0)
    model = AdamClassifier(MLPModule(), lr=0.01)
    before, after = AdamState(), AdamState()
    pruning = ActivationPruning(
        target_params_reduction=0.4, recovery_epochs=RECOVERY, optimizer_state=state, pruned_checkpoint=None
    )
    options = {"callbacks": [before, pruning, after], "max_epochs": MAX_EPOCHS, **trainer_options}
    trainer = pl.Trainer(default_root_dir=tmp_path, accelerator="cpu", **options)
    train = DataLoader(make_data((8,), n=96, seed=0), batch_size=16)
    trainer.fit(model, train, DataLoader(make_data((8,), n=50, seed=1), batch_size=25))
    assert {layer.name for layer in pruning.result.plan.layers} == {"net.net.0", "net.net.2"}
    return trainer, model, before, after


def test_reset_drops_the_state_of_the_pruned_parameters_only_and_they_start_afresh(tmp_path):
    trainer, model, before, after = recover(tmp_path, "reset")  # the Trainer's defaults: bar, checkpoint, logger
    assert set(before.state) == {*PRUNED, "net.net.4.bias"}
    assert set(after.state) == {"net.net.4.bias"}  # right after the prune
    for key, value in before.state["net.net.4.bias"].items():
        assert torch.equal(after.state["net.net.4.bias"][key], value), key
    steps = {name: int(s["step"]) for name, s in named_state(trainer, model).items()}
    assert steps == {**dict.fromkeys(PRUNED, RECOVERY * BATCHES), "net.net.4.bias": MAX_EPOCHS * BATCHES}
    assert after.lr == before.lr


def test_fresh_drops_every_state_and_keeps_the_param_groups_and_the_scheduler(tmp_path):
    trainer, model, before, after = recover(tmp_path, "fresh", enable_progress_bar=False, logger=False)
    assert before.state
    assert after.state == {}
    (optimizer,) = trainer.optimizers
    assert optimizer.param_groups[0]["params"] == list(model.parameters())  # the same groups, the new parameters
    assert trainer.lr_scheduler_configs[0].scheduler.optimizer is optimizer
    assert after.lr == before.lr
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01 * 0.5**MAX_EPOCHS)
    steps = {name: int(s["step"]) for name, s in named_state(trainer, model).items()}
    assert steps == dict.fromkeys(steps, RECOVERY * BATCHES)
    assert len(steps) == len(PRUNED) + 1


def test_carry_slices_every_state_and_the_step_counts_go_on(tmp_path):
    trainer, model, before, after = recover(tmp_path, "carry", enable_progress_bar=False, logger=False)
    assert set(after.state) == set(before.state)
    for name, state in after.state.items():
        assert int(state["step"]) == int(before.state[name]["step"]) == (MAX_EPOCHS - RECOVERY) * BATCHES
    steps = {name: int(s["step"]) for name, s in named_state(trainer, model).items()}
    assert steps == dict.fromkeys(steps, MAX_EPOCHS * BATCHES)


@pytest.mark.parametrize("state", ["carry", "reset", "fresh"])
def test_apply_plan_with_optimizers_states_on_a_plain_adam(state):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2), torch.nn.Linear(2, 2))
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(5, 3)).sum().backward()
    optimizer.step()
    untouched = optimizer.state[model[3].weight]["exp_avg"].clone()
    plan = plan_from_kept(find_prunable_layers(model, torch.randn(1, 3)), {"0": [0, 2]})
    apply_plan_with_optimizers(model, plan, optimizer, state)
    has_state = [p in optimizer.state for p in model.parameters()]
    expected = {"carry": [True] * 6, "reset": [False, False, False, True, True, True], "fresh": [False] * 6}[state]
    assert has_state == expected
    if state != "fresh":
        assert torch.equal(optimizer.state[model[3].weight]["exp_avg"], untouched)
    model(torch.randn(5, 3)).sum().backward()
    optimizer.step()  # trains on: the state that is missing begins again


def test_optimizer_state_from_yaml_and_bad_values(tmp_path, capsys):
    config = callback_config(tmp_path, "{target_params_reduction: 0.5, recovery_epochs: 1, optimizer_state: reset}")
    assert pruning_callback(parse(config)).optimizer_state == "reset"
    assert ActivationPruning(threshold=0.1).optimizer_state == "carry"
    message = r"`optimizer_state` can be one of carry, reset, fresh; got 'zero'"
    with pytest.raises(ActivationPruningError, match=message):
        ActivationPruning(threshold=0.1, optimizer_state="zero")  # type: ignore[arg-type]
    with pytest.raises(ActivationPruningError, match=message):
        apply_plan_with_optimizers(MLPModule(), plan_from_kept([], {}), [], "zero")
    with pytest.raises(SystemExit):  # jsonargparse checks the Literal first: the argument, allowed values, value
        parse(callback_config(tmp_path, "{threshold: 0.1, optimizer_state: zero}"))
    error = capsys.readouterr().err
    assert "optimizer_state" in error
    assert "Literal['carry', 'reset', 'fresh']. Got value: zero" in error
