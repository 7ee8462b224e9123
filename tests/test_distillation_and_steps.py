"""Issue 21: recovery counted in steps, pruning a trained model at the start of a fit, distillation from the unpruned
model while the pruned one trains."""

import copy

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader

from lightning_actprune import ActivationPruning, ActivationPruningError
from lightning_actprune._distillation import TEACHER_KEY, distillation_loss, distilled_tensor
from tests.helpers import Classifier, MLPModule, make_data, quiet_trainer

WEIGHT, TEMPERATURE = 0.7, 2.0


class PlainSGD(Classifier):
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class ManualSGD(PlainSGD):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        optimizer.zero_grad()
        x, y = batch
        self.manual_backward(F.cross_entropy(self(x), y))
        optimizer.step()


def data(n: int = 96, batch_size: int = 16):
    train = DataLoader(make_data((8,), n=n, seed=0), batch_size=batch_size)  # not shuffled: references replay it
    val = DataLoader(make_data((8,), n=50, seed=1), batch_size=25)
    return train, val


class Watch(Callback):
    """After ActivationPruning: the pruned model, the teacher and the batch of the step right after the prune."""

    def __init__(self, pruning):
        self.pruning, self.pruned, self.batch = pruning, None, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.pruned is None and self.pruning.pruned_at_step is not None:
            self.pruned = copy.deepcopy(pl_module.net)
            distillation = self.pruning._teaching.distillation
            self.teacher = copy.deepcopy(distillation.teacher) if distillation is not None else None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.pruned is not None and self.batch is None:
            self.batch = [t.clone() for t in batch]


class Before(Callback):
    """Before ActivationPruning: the model as the prune finds it."""

    def __init__(self, pruning):
        self.pruning = pruning

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.pruning.pruned_at_step is None:
            self.model = copy.deepcopy(pl_module.net)


def fit(tmp_path, *callbacks, model=None, batch_size=16, **kwargs):
    pl.seed_everything(0)
    model = model or PlainSGD(MLPModule(), lr=0.2)
    options = {"max_steps": 12, "logger": False, "enable_checkpointing": False, **kwargs}
    trainer = quiet_trainer(tmp_path, *callbacks, **options)  # `pruning` is among the callbacks, in its place
    trainer.fit(model, *data(batch_size=batch_size))
    return trainer, model


def test_recovery_steps_prunes_at_max_steps_minus_n_and_trains_the_rest(tmp_path, caplog):
    pruning = ActivationPruning(target_params_reduction=0.4, recovery_steps=5, pruned_checkpoint=None)
    with caplog.at_level("INFO"):
        trainer, model = fit(tmp_path, pruning)
    assert pruning.pruned_at_step == 7  # max_steps - recovery_steps
    assert trainer.global_step == 12
    assert pruning.result.params_reduction >= 0.4
    assert set(pruning.result.metrics_recovered) == {"val_loss", "val_acc"}
    assert sum(p.numel() for p in model.parameters()) == pruning.result.params_after
    assert "pruned at step 7 of 12; the last 5 step(s) train the smaller model" in caplog.text


def test_recovery_steps_inside_one_epoch_with_gradient_accumulation(tmp_path):
    """A run shorter than one epoch: 24 batches, 2 per optimizer step; the prune lands on an optimizer step."""
    pruning = ActivationPruning(threshold=0.05, recovery_steps=2, pruned_checkpoint=None)
    trainer, _ = fit(tmp_path, pruning, max_steps=5, accumulate_grad_batches=2, batch_size=4)
    assert pruning.pruned_at_step == 3
    assert pruning.pruned_at_epoch == 0
    assert trainer.global_step == 5  # of the 12 optimizer steps one epoch holds
    assert pruning.result.metrics_recovered


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"max_epochs": 3},
            r"`recovery_steps=5` prunes at step `max_steps - recovery_steps`: it needs `Trainer\(max_st",
        ),
        ({"max_steps": 5}, r"needs `Trainer\(max_steps\)` > 5; got max_steps=5"),
    ],
)
def test_recovery_steps_needs_max_steps(tmp_path, kwargs, message):
    pruning = ActivationPruning(threshold=0.1, recovery_steps=5)
    trainer = quiet_trainer(tmp_path, pruning, logger=False, **kwargs)
    with pytest.raises(ActivationPruningError, match=message):
        trainer.fit(PlainSGD(MLPModule()), *data())
    assert trainer.global_step == 0


def test_prune_on_fit_start_prunes_the_weights_fit_starts_with(tmp_path):
    pl.seed_everything(0)
    trained = PlainSGD(MLPModule(), lr=0.2)
    first = quiet_trainer(tmp_path / "train", max_epochs=3, logger=False)
    first.fit(trained, *data())
    checkpoint = tmp_path / "trained.ckpt"
    first.save_checkpoint(checkpoint)
    (before,) = first.validate(trained, data()[1], verbose=False)

    pruning = ActivationPruning(target_params_reduction=0.5, prune_on="fit_start", pruned_checkpoint=None)
    second = quiet_trainer(tmp_path / "recover", pruning, max_epochs=5, logger=False)
    model = PlainSGD(MLPModule(), lr=0.2)  # fresh: the checkpoint's weights are what fit starts with
    second.fit(model, *data(), ckpt_path=checkpoint)
    result = pruning.result
    assert pruning.pruned_at_epoch == 3  # at the start of the resumed fit, before its first step
    assert pruning.pruned_at_step == first.global_step
    assert result.metrics_before["val_loss"] == pytest.approx(before["val_loss"])
    assert result.params_reduction >= 0.5
    assert result.metrics_recovered
    assert second.current_epoch == 5


@pytest.mark.parametrize("module", [PlainSGD, ManualSGD], ids=["automatic", "manual"])
def test_a_distilled_step_equals_the_loss_plus_the_weighted_kl_to_the_unpruned_model(tmp_path, module):
    pruning = ActivationPruning(
        threshold=0.1, recovery_steps=1, distill_weight=WEIGHT, distill_temperature=TEMPERATURE, pruned_checkpoint=None
    )
    before, watch = Before(pruning), Watch(pruning)
    _, model = fit(tmp_path, before, pruning, watch, model=module(MLPModule(), lr=0.2), max_steps=6)
    assert pruning.pruned_at_step == 5
    assert watch.batch is not None
    # the teacher is the model as the prune found it, frozen and in eval mode
    for (name, taught), (_, unpruned) in zip(
        watch.teacher.named_parameters(), before.model.named_parameters(), strict=True
    ):
        torch.testing.assert_close(taught, unpruned, msg=name)
        assert not taught.requires_grad
    # the reference: one SGD step on cross-entropy + weight × T² × KL(teacher ‖ student) of the softened logits
    reference = watch.pruned
    x, y = watch.batch
    logits = reference(x)
    with torch.no_grad():
        teacher = before.model.eval()(x)
    soft = F.kl_div(
        F.log_softmax(logits / TEMPERATURE, -1), F.log_softmax(teacher / TEMPERATURE, -1), log_target=True,
        reduction="batchmean",
    )  # fmt: skip
    (F.cross_entropy(logits, y) + WEIGHT * TEMPERATURE**2 * soft).backward()
    with torch.no_grad():
        for p in reference.parameters():
            p -= 0.2 * p.grad
    for (name, mine), (_, theirs) in zip(model.net.named_parameters(), reference.named_parameters(), strict=True):
        torch.testing.assert_close(mine, theirs, msg=name)
    assert pruning._teaching.distillation is None  # released at the end of fit
    assert not hasattr(model, "__dict__") or "training_step" not in vars(model)  # the wrapper is gone


def test_distillation_with_accumulation_and_bf16_logs_its_term_and_reports_the_teacher(tmp_path, caplog):
    pruning = ActivationPruning(target_params_reduction=0.5, recovery_steps=4, distill_weight=1.0)
    with caplog.at_level("INFO"):
        trainer, _ = fit(
            tmp_path, pruning, max_steps=10, accumulate_grad_batches=2, precision="bf16-mixed",
            logger=pl.loggers.CSVLogger(tmp_path, "csv"),
        )  # fmt: skip
    assert "the teacher holds" in caplog.text
    assert "distillation ended; the teacher's" in caplog.text
    term = trainer.callback_metrics["actprune/distillation_epoch"]
    assert torch.isfinite(term)
    assert float(term) > 0


def test_resuming_mid_recovery_distils_from_the_checkpoint_teacher_and_ends_where_one_run_ends(tmp_path):
    def run(root, ckpt_path=None, **kwargs):
        pl.seed_everything(0)
        pruning = ActivationPruning(
            target_params_reduction=0.5, recovery_epochs=2, distill_weight=0.5, pruned_checkpoint=None
        )
        saving = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, filename="{epoch}")
        trainer = quiet_trainer(root, pruning, saving, max_epochs=4, logger=False, **kwargs)
        model = PlainSGD(MLPModule(), lr=0.2)
        trainer.fit(model, *data(), ckpt_path=ckpt_path)
        return model, pruning

    whole, _ = run(tmp_path / "whole", enable_checkpointing=True)
    middle = tmp_path / "ckpt" / "epoch=2.ckpt"  # written after the first recovery epoch
    saved = torch.load(middle, weights_only=True)
    assert saved[TEACHER_KEY]["root"] in {"", "net"}
    assert "actprune_plan" in saved
    resumed, _ = run(tmp_path / "resumed", ckpt_path=middle, enable_checkpointing=True)
    for (name, a), (_, b) in zip(whole.named_parameters(), resumed.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, msg=name)


def test_distillation_needs_training_after_the_prune_and_a_valid_output():
    with pytest.raises(ActivationPruningError, match=r"`distill_weight=0.5` distils while the pruned model trains"):
        ActivationPruning(threshold=0.1, distill_weight=0.5)
    with pytest.raises(ActivationPruningError, match=r"set at most one of `recovery_epochs`, `recovery_steps`"):
        ActivationPruning(threshold=0.1, recovery_epochs=1, recovery_steps=3)
    with pytest.raises(ActivationPruningError, match=r"`distill_temperature` must be > 0; got 0"):
        ActivationPruning(threshold=0.1, recovery_epochs=1, distill_weight=1.0, distill_temperature=0)
    with pytest.raises(ActivationPruningError, match=r"`prune_on` can be one of fit_end, fit_start; got 'start'"):
        ActivationPruning(threshold=0.1, prune_on="start")
    with pytest.raises(ActivationPruningError, match=r"`distill_output='scores'` names no tensor of the output"):
        distilled_tensor({"logits": torch.zeros(2, 3)}, "scores")


def test_distilled_tensor_and_loss():
    logits = torch.randn(2, 5, 7)
    assert distilled_tensor(logits, None) is logits
    assert distilled_tensor({"loss": torch.tensor(1.0), "logits": logits}, None) is logits
    assert distilled_tensor((logits, None), None) is logits
    student, teacher = torch.randn(4, 6), torch.randn(4, 6)
    expected = (
        sum(
            (teacher[i] / 2).softmax(-1) @ ((teacher[i] / 2).log_softmax(-1) - (student[i] / 2).log_softmax(-1))
            for i in range(4)
        )
        / 4
        * 4
    )
    torch.testing.assert_close(distillation_loss(student, teacher, 2.0), expected)
    with pytest.raises(ActivationPruningError, match=r"the pruned model's output \(4, 5\) and the teacher's"):
        distillation_loss(torch.zeros(4, 5), torch.zeros(4, 6), 1.0)
