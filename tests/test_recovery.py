"""Recovery epochs inside ``fit`` (issue 13): prune after epoch ``max_epochs - R`` of ``max_epochs``, train on."""

import copy
import csv

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint, StochasticWeightAveraging
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from lightning_actprune import ActivationPruning, ActivationPruningError, load_pruned
from tests.helpers import Classifier, MLPModule, make_data, quiet_trainer

MAX_EPOCHS, RECOVERY = 4, 2


class SGDClassifier(Classifier):
    """SGD with momentum and weight decay, stepped down by a StepLR every epoch."""

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=1e-3)
        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.7)}


class CaptureAtPrune(Callback):
    """Before ActivationPruning: the model, optimizer and scheduler state at the end of the prune epoch."""

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == MAX_EPOCHS - RECOVERY - 1:
            self.model = copy.deepcopy(pl_module.state_dict())
            self.optimizer = copy.deepcopy(trainer.optimizers[0].state_dict())
            self.scheduler = copy.deepcopy(trainer.lr_scheduler_configs[0].scheduler.state_dict())


def data():
    train = DataLoader(make_data((8,), n=96, seed=0), batch_size=16)  # not shuffled: the reference replays it
    val = DataLoader(make_data((8,), n=50, seed=1), batch_size=25)
    return train, val


def fit(tmp_path, pruning, *callbacks, model=None, max_epochs=MAX_EPOCHS, **kwargs):
    pl.seed_everything(0)
    model = model or SGDClassifier(MLPModule(), lr=0.1)
    options = {"enable_checkpointing": False, "gradient_clip_val": 0.5, **kwargs}
    trainer = quiet_trainer(
        tmp_path, *callbacks, pruning, max_epochs=max_epochs, logger=CSVLogger(tmp_path, "csv"), **options
    )
    trainer.fit(model, *data())
    return trainer, model


def hand_sliced(capture: CaptureAtPrune, plan):
    """The reference: slice the weights and SGD's momentum buffers by hand with the plan's kept indices."""
    first, second = (torch.tensor(layer.kept) for layer in plan.layers)
    keep = {  # parameter name -> (dim, kept indices) of every pruned dimension
        "net.net.0.weight": [(0, first)],
        "net.net.0.bias": [(0, first)],
        "net.net.2.weight": [(0, second), (1, first)],
        "net.net.2.bias": [(0, second)],
        "net.net.4.weight": [(1, second)],
    }

    def cut(name, tensor):
        for dim, index in keep.get(name, []):
            tensor = tensor.index_select(dim, index)
        return tensor

    model = Classifier(MLPModule())
    for name, module in [
        ("net.net.0", model.net.net[0]),
        ("net.net.2", model.net.net[2]),
        ("net.net.4", model.net.net[4]),
    ]:
        weight, bias = (
            cut(f"{name}.weight", capture.model[f"{name}.weight"]),
            cut(f"{name}.bias", capture.model[f"{name}.bias"]),
        )
        module.weight, module.bias = torch.nn.Parameter(weight.clone()), torch.nn.Parameter(bias.clone())
        module.in_features, module.out_features = weight.shape[1], weight.shape[0]
    names = [name for name, _ in model.named_parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    state = copy.deepcopy(capture.optimizer)
    state["state"] = {i: {"momentum_buffer": cut(names[i], s["momentum_buffer"])} for i, s in state["state"].items()}
    optimizer.load_state_dict(state)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.7)
    scheduler.load_state_dict(capture.scheduler)
    return model, optimizer, scheduler


def test_training_goes_on_with_the_same_optimizer_sliced_like_a_hand_made_reference(tmp_path):
    capture = CaptureAtPrune()
    pruning = ActivationPruning(threshold=0.1, recovery_epochs=RECOVERY, pruned_checkpoint=None)
    trainer, model = fit(tmp_path, pruning, capture)
    plan = pruning.result.plan
    assert 0 < plan.neurons_after < plan.neurons_before
    assert pruning.pruned_at_epoch == MAX_EPOCHS - RECOVERY - 1
    reference, optimizer, scheduler = hand_sliced(capture, plan)
    # Lightning stepped the epoch's scheduler at its last batch, before the prune: the capture has it already
    train, _ = data()
    for _ in range(RECOVERY):
        for batch_idx, batch in enumerate(train):
            optimizer.zero_grad()
            reference.training_step(batch, batch_idx).backward()
            torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
            optimizer.step()
        scheduler.step()
    for (name, mine), (_, theirs) in zip(model.named_parameters(), reference.named_parameters(), strict=True):
        torch.testing.assert_close(mine, theirs, msg=name)
    # the very optimizer Lightning made, its hyper-parameters and the scheduler pointing at it
    (carried,) = trainer.optimizers
    assert carried.param_groups[0]["params"][0] is model.net.net[0].weight
    assert carried.param_groups[0]["momentum"] == 0.9
    assert trainer.lr_scheduler_configs[0].scheduler.optimizer is carried
    assert carried.param_groups[0]["lr"] == pytest.approx(0.1 * 0.7**MAX_EPOCHS)


def test_report_has_the_metrics_before_after_pruning_and_after_recovery(tmp_path, caplog):
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=-1)
    pruning = ActivationPruning(target_params_reduction=0.5, recovery_epochs=RECOVERY)
    with caplog.at_level("INFO"):
        trainer, model = fit(tmp_path, pruning, checkpoints, enable_checkpointing=True)
    result = pruning.result
    assert set(result.metrics_recovered) == set(result.metrics_after) == set(result.metrics_before)
    assert result.params_after == sum(p.numel() for p in model.parameters())
    x, y = make_data((8,), n=50, seed=1).tensors
    with torch.no_grad():
        accuracy = (model.eval()(x).argmax(1) == y).float().mean().item()
    assert result.metrics_recovered["val_acc"] == pytest.approx(accuracy)
    with open(tmp_path / "csv" / "version_0" / "metrics.csv") as f:
        (row,) = [r for r in csv.DictReader(f) if r.get("actprune/val_acc_recovered")]
    assert float(row["actprune/val_acc_recovered"]) == pytest.approx(accuracy)
    assert float(row["actprune/val_acc_after"]) == pytest.approx(result.metrics_after["val_acc"])
    assert int(row["step"]) == trainer.global_step
    assert "after recovery" in caplog.text
    assert "pruned after epoch 2 of 4; the last 2 epoch(s) train the smaller model" in caplog.text
    # checkpoints written after the prune carry the plan and the sliced optimizer state; they reload shrunk
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert last["actprune_plan"]["layers"] == result.plan.to_dict()["layers"]
    momentum = last["optimizer_states"][0]["state"][0]["momentum_buffer"]
    assert momentum.shape == model.net.net[0].weight.shape
    before = torch.load(tmp_path / "ckpt" / "epoch=0-step=6.ckpt", weights_only=True)
    assert "actprune_plan" not in before
    reloaded = load_pruned(SGDClassifier(MLPModule()), pruning.pruned_checkpoint_path)
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(x), model(x))


def test_early_stopping_starts_counting_afresh_at_the_prune(tmp_path):
    # the common setup: stop when val_loss has not improved for one epoch; the prune makes it worse at once
    stopping = EarlyStopping(monitor="val_loss", patience=1, mode="min")
    pruning = ActivationPruning(target_params_reduction=0.7, recovery_epochs=RECOVERY, pruned_checkpoint=None)
    trainer, _ = fit(tmp_path, pruning, stopping)
    assert trainer.current_epoch == MAX_EPOCHS  # both recovery epochs ran
    assert stopping.wait_count <= 1
    assert pruning.result.metrics_recovered


def test_fit_ending_before_the_prune_epoch_prunes_at_the_end_without_recovery(tmp_path):
    class StopAfterFirstEpoch(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            trainer.should_stop = True

    pruning = ActivationPruning(threshold=0.1, recovery_epochs=RECOVERY, pruned_checkpoint=None)
    with pytest.warns(UserWarning, match=r"`fit` ended before the prune epoch"):
        fit(tmp_path, pruning, StopAfterFirstEpoch())
    assert pruning.result.pruned
    assert pruning.pruned_at_epoch is None
    assert pruning.result.metrics_recovered == {}


def test_settings_recovery_cannot_work_with_fail_before_training(tmp_path):
    with pytest.raises(ActivationPruningError, match=r"needs `Trainer\(max_epochs\)` > 2 and no `max_steps`; got"):
        fit(tmp_path, ActivationPruning(threshold=0.1, recovery_epochs=2), max_epochs=2)
    with pytest.raises(ActivationPruningError, match=r"cannot be combined with StochasticWeightAveraging"):
        fit(tmp_path, ActivationPruning(threshold=0.1, recovery_epochs=2), StochasticWeightAveraging(swa_lrs=0.01))
    with pytest.raises(ActivationPruningError, match=r"`prune_best=True` cannot be combined with `recovery_epochs`"):
        ActivationPruning(threshold=0.1, recovery_epochs=1, prune_best=True)
    with pytest.raises(ActivationPruningError, match=r"`recovery_epochs` must be an int >= 0; got -1"):
        ActivationPruning(threshold=0.1, recovery_epochs=-1)


@pytest.mark.parametrize("gradual_keys", [False, True], ids=["current", "with-gradual-pruning-keys"])
def test_resuming_during_recovery_ends_with_the_weights_of_an_uninterrupted_run(tmp_path, gradual_keys):
    class Interrupt(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            if trainer.current_epoch == MAX_EPOCHS - RECOVERY:  # the first recovery epoch
                trainer.should_stop = True

    _, uninterrupted = fit(tmp_path / "a", ActivationPruning(threshold=0.1, recovery_epochs=RECOVERY))
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = ActivationPruning(threshold=0.1, recovery_epochs=RECOVERY)
    fit(tmp_path / "b", first, Interrupt(), checkpoints, enable_checkpointing=True)
    if gradual_keys:  # written while `pruning_steps` existed (up to commit 14d8739): those keys are ignored
        saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
        (state,) = [s for key, s in saved["callbacks"].items() if key.startswith("ActivationPruning")]
        step = {"epoch": MAX_EPOCHS - RECOVERY - 1, "params_after": 1, "size_mb_after": 0.1, "metrics_after": {}}
        state.update(pruning_steps=1, pruning_steps_done=1)
        state["result"]["steps"] = [step]
        torch.save(saved, tmp_path / "ckpt" / "last.ckpt")
    second = ActivationPruning(threshold=0.1, recovery_epochs=RECOVERY)
    trainer = quiet_trainer(tmp_path / "c", second, max_epochs=MAX_EPOCHS, logger=False, gradient_clip_val=0.5)
    resumed = SGDClassifier(MLPModule(), lr=0.1)  # full size: the checkpoint's plan shrinks it before loading
    trainer.fit(resumed, *data(), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert second.pruned_at_epoch == MAX_EPOCHS - RECOVERY - 1
    for (name, mine), (_, theirs) in zip(resumed.named_parameters(), uninterrupted.named_parameters(), strict=True):
        torch.testing.assert_close(mine, theirs, msg=name)


def test_manual_optimization_with_two_optimizers_carries_both(tmp_path):
    class TwoOptimizers(Classifier):
        def __init__(self):
            super().__init__(MLPModule())
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            first, second = self.optimizers()
            loss = F.cross_entropy(self(batch[0]), batch[1])
            first.zero_grad()
            second.zero_grad()
            self.manual_backward(loss)
            first.step()
            second.step()

        def configure_optimizers(self):
            layers = self.net.net
            return (
                torch.optim.Adam([*layers[0].parameters(), *layers[4].parameters()], lr=0.01),
                torch.optim.SGD(layers[2].parameters(), lr=0.1, momentum=0.9),
            )

    pruning = ActivationPruning(threshold=0.1, recovery_epochs=RECOVERY, pruned_checkpoint=None)
    trainer, model = fit(tmp_path, pruning, model=TwoOptimizers(), gradient_clip_val=None)
    first, second = trainer.optimizers
    assert [p.shape for p in first.param_groups[0]["params"]] == [
        p.shape for p in (*model.net.net[0].parameters(), *model.net.net[4].parameters())
    ]
    assert second.state[model.net.net[2].weight]["momentum_buffer"].shape == model.net.net[2].weight.shape
    assert pruning.result.metrics_recovered


def test_recovery_with_batchnorm_recalibration_and_max_metric_drop_over_a_sweep(tmp_path):
    from tests.helpers import CNN

    train = DataLoader(make_data(CNN.image, n=96, seed=0), batch_size=16)
    val = DataLoader(make_data(CNN.image, n=48, seed=1), batch_size=24)
    sweep = [0.2, 0.5]  # a table for a budget lists parameter reductions
    pruning = ActivationPruning(
        max_metric_drop=1.0, monitor="val_loss", mode="min", sweep=sweep, statistic="fluctuation",
        recalibration_batches=2, recovery_epochs=1, pruned_checkpoint=None,
    )  # fmt: skip
    pl.seed_everything(0)
    model = SGDClassifier(CNN(), lr=0.05)
    trainer = quiet_trainer(tmp_path, pruning, max_epochs=3, logger=False, enable_checkpointing=False)
    trainer.fit(model, train, val)
    result = pruning.result
    assert pruning.pruned_at_epoch == 1
    assert result.chosen_by == "max_metric_drop"
    assert [row.target for row in result.sweep] == sweep
    assert set(result.metrics_pruned) == set(result.metrics_after) == set(result.metrics_recovered)
    assert result.params_after == sum(p.numel() for p in model.parameters()) < result.params_before
    assert trainer.current_epoch == 3


def test_a_checkpoint_from_before_the_prune_is_not_loaded_into_the_pruned_model_by_accident(tmp_path):
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1)
    pruning = ActivationPruning(threshold=0.1, recovery_epochs=RECOVERY, pruned_checkpoint=None)
    trainer, model = fit(tmp_path, pruning, checkpoints, enable_checkpointing=True)
    before_prune = tmp_path / "ckpt" / "epoch=0-step=6.ckpt"
    pruned = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ActivationPruningError, match=r"epoch=0-step=6.ckpt.* (unpruned|full-size|was pruned)"):
        trainer.validate(model, DataLoader(make_data((8,), n=50, seed=1), batch_size=25), ckpt_path=before_prune)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, pruned[name]), name
    # into a fresh full-size model it loads as the unpruned model it is
    fresh = SGDClassifier(MLPModule())
    trainer.validate(fresh, DataLoader(make_data((8,), n=50, seed=1), batch_size=25), ckpt_path=before_prune)
    assert fresh.net.net[0].weight.shape[0] == 16


@pytest.mark.parametrize(
    "options",
    [{"accumulate_grad_batches": 2}, {"precision": "bf16-mixed"}, {"compile": True}],
    ids=["gradient-accumulation", "bf16-mixed", "torch-compile"],
)
def test_recovery_keeps_gradient_accumulation_mixed_precision_and_compiled_modules_working(tmp_path, options):
    options = dict(options)
    model = SGDClassifier(MLPModule(), lr=0.1)
    if options.pop("compile", False):
        model.net = torch.compile(model.net)
    pruning = ActivationPruning(target_params_reduction=0.5, recovery_epochs=RECOVERY, pruned_checkpoint=None)
    trainer, model = fit(tmp_path, pruning, model=model, **options)
    result = pruning.result
    assert pruning.pruned_at_epoch == MAX_EPOCHS - RECOVERY - 1
    assert result.params_after == sum(p.numel() for p in model.parameters()) < result.params_before
    assert result.metrics_recovered["val_loss"] < result.metrics_after["val_loss"]  # the recovery epochs trained it
    (optimizer,) = trainer.optimizers
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {id(p) for p in model.parameters()}
