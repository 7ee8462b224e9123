"""BatchNorm recalibration after pruning (issue 13, part 1): oracle against a hand-made reference."""

import copy
import csv

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader

from lightning_actprune import ActivationPruning
from lightning_actprune._recalibration import recalibrating_batchnorm
from lightning_actprune._surgery import apply_plan
from tests.helpers import ARCHITECTURES, Classifier, KeepUnpruned, input_shape, make_data, quiet_trainer


def reference_recalibration(model: nn.Module, batches: list[torch.Tensor]) -> None:
    """By hand: every BatchNorm gets the average of the per-batch means and unbiased variances it sees."""
    inputs: dict[nn.Module, list[torch.Tensor]] = {}
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    hooks = [m.register_forward_pre_hook(lambda m, a: inputs.setdefault(m, []).append(a[0])) for m in norms]
    model.train()
    with torch.no_grad():
        for x in batches:
            model(x)
    for hook in hooks:
        hook.remove()
    for norm in norms:
        per_batch = [a.transpose(0, 1).flatten(1) for a in inputs[norm]]  # (channels, values)
        norm.running_mean = torch.stack([a.mean(1) for a in per_batch]).mean(0)
        norm.running_var = torch.stack([a.var(1, unbiased=True) for a in per_batch]).mean(0)


def test_recalibration_averages_batch_statistics_and_leaves_the_old_tensors_alone():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 6))
    net.append(nn.BatchNorm1d(6, momentum=0.3))
    unused = nn.BatchNorm1d(3)
    net.add_module("unused", unused)  # never called in forward: keeps its statistics
    forward = nn.Sequential(*list(net)[:6])
    net.eval()
    old = {name: buffer for name, buffer in net.named_buffers()}
    old_values = {name: buffer.clone() for name, buffer in old.items()}
    batches = [torch.randn(16, 4) * 2 + 1 for _ in range(3)]
    reference = copy.deepcopy(forward)
    reference[3].p = 0.0  # dropout off, as in eval mode inside the context
    reference_recalibration(reference, batches)
    with recalibrating_batchnorm(net) as names, torch.no_grad():
        for x in batches:
            forward(x)
    assert names == ["1", "5", "unused"]
    for index in (1, 5):
        torch.testing.assert_close(net[index].running_mean, reference[index].running_mean)
        torch.testing.assert_close(net[index].running_var, reference[index].running_var)
        assert int(net[index].num_batches_tracked) == 3
    assert (net[1].momentum, net[5].momentum, net.training, net[1].training) == (0.1, 0.3, False, False)
    for name, buffer in old.items():
        assert torch.equal(buffer, old_values[name]), name  # written into fresh tensors
    assert unused.running_mean is old["unused.running_mean"]


def fit(tmp_path, pruning, architecture="cnn", epochs=4):
    pl.seed_everything(0)
    shape = input_shape(ARCHITECTURES[architecture]())
    train = DataLoader(make_data(shape, n=128, seed=0), batch_size=16)  # not shuffled: the reference sees the same
    val = DataLoader(make_data(shape, n=64, seed=1), batch_size=32)
    keep = KeepUnpruned()
    logger = CSVLogger(tmp_path, name="csv")
    trainer = quiet_trainer(tmp_path, keep, pruning, max_epochs=epochs, logger=logger, enable_checkpointing=False)
    model = Classifier(ARCHITECTURES[architecture](), lr=0.1)
    trainer.fit(model, train, val)
    return model, keep.model, train


@pytest.mark.parametrize("architecture", ["cnn", "mlp_batchnorm_dropout", "residual"])
def test_callback_recalibrates_on_training_batches_and_reports_both_steps(tmp_path, caplog, architecture):
    pruning = ActivationPruning(target_params_reduction=0.4, recalibration_batches=3, pruned_checkpoint=None)
    with caplog.at_level("INFO"):
        model, unpruned, train = fit(tmp_path, pruning, architecture)
    result = pruning.result
    # the reference: the same plan applied by hand, BatchNorm re-estimated by hand on the first 3 training batches
    reference = copy.deepcopy(unpruned)
    apply_plan(reference, result.plan)
    stale = copy.deepcopy(reference)
    reference_recalibration(reference.net, [x for x, _ in list(train)[:3]])
    for (name, mine), (_, theirs) in zip(model.named_buffers(), reference.named_buffers(), strict=True):
        if "running" in name:
            torch.testing.assert_close(mine, theirs, msg=name)
    for (name, mine), (_, theirs) in zip(model.named_parameters(), stale.named_parameters(), strict=True):
        assert torch.equal(mine, theirs), name  # no parameter changes
    x = torch.cat([x for x, _ in train])
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), reference.eval()(x))
    assert set(result.metrics_pruned) == set(result.metrics_after) == {"val_loss", "val_acc"}
    with open(tmp_path / "csv" / "version_0" / "metrics.csv") as f:
        (row,) = [r for r in csv.DictReader(f) if r.get("actprune/val_acc_pruned")]
    assert float(row["actprune/val_acc_pruned"]) == pytest.approx(result.metrics_pruned["val_acc"])
    assert float(row["actprune/val_acc_after"]) == pytest.approx(result.metrics_after["val_acc"])
    assert "after surgery -> " in caplog.text
    assert " after BatchNorm recalibration" in caplog.text


def test_zero_batches_turns_recalibration_off(tmp_path):
    pruning = ActivationPruning(target_params_reduction=0.4, recalibration_batches=0, pruned_checkpoint=None)
    model, unpruned, _ = fit(tmp_path, pruning)
    reference = copy.deepcopy(unpruned)
    apply_plan(reference, pruning.result.plan)
    for (name, mine), (_, theirs) in zip(model.named_buffers(), reference.named_buffers(), strict=True):
        assert torch.equal(mine, theirs), name
    assert pruning.result.metrics_pruned == {}


def test_recalibration_failure_is_a_warning_and_keeps_the_trained_statistics(tmp_path):
    class FailsOnTrainingBatches(Classifier):
        def validation_step(self, batch, batch_idx):
            if self.trainer.validating and batch[0].shape[0] == 16:  # training batches have 16 samples
                raise RuntimeError("validation_step cannot take training batches")
            return super().validation_step(batch, batch_idx)

    pl.seed_everything(0)
    pruning = ActivationPruning(target_params_reduction=0.4, recalibration_batches=2, pruned_checkpoint=None)
    keep = KeepUnpruned()
    # the defaults are off as in `quiet_trainer` (see its docstring): this test checks the model, not the output
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[keep, pruning])  # fmt: skip
    model = FailsOnTrainingBatches(ARCHITECTURES["cnn"]())
    shape = ARCHITECTURES["cnn"].image
    data = DataLoader(make_data(shape, n=64, seed=0), batch_size=16), DataLoader(make_data(shape, n=32), batch_size=32)
    with pytest.warns(UserWarning, match=r"BatchNorm recalibration failed \(RuntimeError: validation_step cannot"):
        trainer.fit(model, *data)
    reference = copy.deepcopy(keep.model)
    apply_plan(reference, pruning.result.plan)
    for (name, mine), (_, theirs) in zip(model.named_buffers(), reference.named_buffers(), strict=True):
        assert torch.equal(mine, theirs), name
