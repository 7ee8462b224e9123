"""Every feature with the Trainer a user actually has: progress bar on, checkpointing on, the default logger (issue 19).

The other test modules turn the progress bar and the model summary off (``tests/helpers.py::quiet_trainer``): they
only print, and the suite's output stays readable. These tests pass nothing but ``max_epochs``, ``default_root_dir``
and the callbacks to the Trainer, so what a user runs is what runs here; the progress bar is chosen explicitly only
where both of Lightning's bars must be covered.
"""

from __future__ import annotations

import copy
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar, TQDMProgressBar
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from lightning_actprune import ActivationPruning, PrunedCheckpointMixin, pruning_plan_of
from tests.helpers import NUM_CLASSES, Classifier, loaders


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, NUM_CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Model(PrunedCheckpointMixin, Classifier):
    def __init__(self, lr: float = 0.1) -> None:
        super().__init__(Net(), lr=lr)
        self.save_hyperparameters()

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("test_loss", nn.functional.cross_entropy(self(x), y))


class Attention(Classifier):
    """A transformer encoder classifier: heads of `nn.MultiheadAttention` and FFN neurons prune together."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.0, batch_first=True)
        super().__init__(nn.Sequential(nn.Linear(2, 16), nn.TransformerEncoder(layer, 2), Pool(), nn.Linear(16, 3)))


class Pool(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(1)


def defaults(tmp_path: Path, *callbacks: pl.Callback, max_epochs: int = 3) -> pl.Trainer:
    """The Trainer's defaults: progress bar, checkpointing, the default logger (TensorBoard here), model summary."""
    return pl.Trainer(max_epochs=max_epochs, default_root_dir=tmp_path, callbacks=list(callbacks))


def logged_scalars(trainer: pl.Trainer) -> set[str]:
    (events,) = Path(trainer.log_dir).glob("events.out.tfevents.*")
    return set(EventAccumulator(str(events)).Reload().Tags()["scalars"])


@pytest.mark.parametrize("bar", [TQDMProgressBar, RichProgressBar], ids=["tqdm", "rich"])
def test_recovery_with_each_progress_bar_checkpoints_and_resumes(tmp_path, bar):
    """Failed before the fix in 7a9b7d6: ``IndexError`` in ``total_val_batches_current_dataloader`` at the prune."""
    pl.seed_everything(0)
    train, val = loaders((8,))
    pruning = ActivationPruning(target_params_reduction=0.5, recovery_epochs=1)
    trainer = defaults(tmp_path, pruning, bar(), max_epochs=3)
    model = Model()
    trainer.fit(model, train, val)
    result = pruning.result
    assert result is not None
    assert result.params_reduction >= 0.5
    assert set(result.metrics_recovered) == {"val_loss", "val_acc"}
    assert pruning.pruned_at_epoch == 1
    assert "actprune/val_loss_recovered" in logged_scalars(trainer)
    # the default ModelCheckpoint's file of the last epoch holds the pruned model and its plan
    (last,) = Path(trainer.checkpoint_callback.dirpath).glob("*.ckpt")
    assert "actprune_plan" in torch.load(last, weights_only=True)
    reloaded = Model.load_from_checkpoint(last)
    assert pruning_plan_of(reloaded) is not None
    x, _ = next(iter(val))
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(x), model.eval()(x))
    # a fit resumed from it goes on training the smaller model
    more = defaults(tmp_path / "more", ActivationPruning(target_params_reduction=0.5, recovery_epochs=1), bar(),
                    max_epochs=4)  # fmt: skip
    fresh = Model()
    more.fit(fresh, train, val, ckpt_path=last)
    assert more.current_epoch == 4
    assert sum(p.numel() for p in fresh.parameters()) == result.params_after


def test_sweep_and_threshold(tmp_path):
    pl.seed_everything(0)
    train, val = loaders((8,))
    pruning = ActivationPruning(threshold=0.1, sweep=[0.05, 0.1, 0.3], monitor="val_acc")
    trainer = defaults(tmp_path, pruning)
    trainer.fit(Model(), train, val)
    assert [row.threshold for row in pruning.result.sweep] == [0.05, 0.1, 0.3]
    assert {"actprune_sweep.csv", "actprune_sweep.json", "actprune_sweep.png", "pruned.ckpt"} <= {
        p.name for p in Path(trainer.log_dir).iterdir()
    }
    assert "actprune/chosen_threshold" in logged_scalars(trainer)


@pytest.mark.parametrize("sweep", [None, [0.2, 0.4]], ids=["bisection", "table"])
def test_max_metric_drop(tmp_path, sweep):
    pl.seed_everything(0)
    train, val = loaders((8,))
    pruning = ActivationPruning(max_metric_drop=0.05, monitor="val_loss", mode="min", sweep=sweep)
    trainer = defaults(tmp_path, pruning)
    trainer.fit(Model(), train, val)
    result = pruning.result
    assert result.chosen_by in {"max_metric_drop", "none"}
    assert result.metrics_after["val_loss"] - result.metrics_before["val_loss"] <= 0.05
    assert "actprune/params_reduction" in logged_scalars(trainer)


def test_head_pruning(tmp_path):
    pl.seed_everything(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 5, 2, generator=g)
    y = (x[:, :, 0].mean(1) > 0).long() + (x[:, :, 1].mean(1) > 0.3).long()
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    pruning = ActivationPruning(target_params_reduction=0.3)
    trainer = defaults(tmp_path, pruning)
    model = Attention()
    trainer.fit(model, data, data)
    widths = {layer.name: len(layer.kept) for layer in pruning.result.plan.layers}
    heads = {name: kept for name, kept in widths.items() if name.endswith(":heads")}
    assert heads
    assert pruning.result.params_reduction >= 0.3
    assert "actprune/params_after" in logged_scalars(trainer)
    with torch.no_grad():
        model.eval()(x)  # the pruned model runs


def test_prune_best(tmp_path):
    pl.seed_everything(0)
    train, val = loaders((8,))
    best = ModelCheckpoint(monitor="val_loss")
    pruning = ActivationPruning(threshold=0.1, prune_best=True)
    trainer = defaults(tmp_path, pruning, best, max_epochs=4)
    model = Model()
    trainer.fit(model, train, val)
    assert pruning.result is not None
    assert best.best_model_path
    # the pruned model starts from the best checkpoint's weights: its unpruned loss is the best one logged
    assert pruning.result.metrics_before["val_loss"] == pytest.approx(float(best.best_model_score), rel=1e-5)


def test_pruned_checkpoint_loads_and_tests(tmp_path):
    pl.seed_everything(0)
    train, val = loaders((8,))
    pruning = ActivationPruning(threshold=0.1)
    trainer = defaults(tmp_path, pruning)
    model = Model()
    trainer.fit(model, train, val)
    path = pruning.pruned_checkpoint_path
    assert path is not None
    assert Path(path).parent == Path(trainer.log_dir)
    tester = defaults(tmp_path / "test", ActivationPruning(threshold=0.1))
    fresh = Model()
    (metrics,) = tester.test(fresh, val, ckpt_path=path)
    assert "test_loss" in metrics
    unpruned = copy.deepcopy(Model())
    assert sum(p.numel() for p in fresh.parameters()) < sum(p.numel() for p in unpruned.parameters())
