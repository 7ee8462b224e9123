"""A real multi-process DDP run of ActivationPruning on CPU, for ``tests/test_distributed.py``.

Run as ``python -m tests.ddp_script OUT_DIR`` from the repository root: Lightning's launcher starts the other
ranks by running the same command again. Every rank writes what it saw to ``OUT_DIR/rank{r}.pt``:

1. a fit with an uneven validation split (33 samples, batches of 16, 2 ranks: 17 + 16 samples, 2 + 1 batches)
   and a λ table: the unpruned weights, the pruned weights, the plan, the statistics the callback planned from,
   the metrics before and after, whether the process group was up when ``on_fit_end`` ran;
2. a fit from a datamodule, logging with ``sync_dist=True``, whose ranks are made to plan different prunings:
   the error each rank raised, its weights before and after;
3. a fit of a BatchNorm model with recalibration: each rank's own recalibrated statistics (before the ranks
   pool them) and the pruned model's state;
4. a fit with recovery epochs: pruned after epoch 1 of 4, the DDP wrapper rebuilt, two epochs of training on the
   smaller model: its final weights and the training loss of every recovery step.
"""

from __future__ import annotations

import copy
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from torch.utils.data import DataLoader

import lightning_actprune._trainer as trainer_module
from lightning_actprune import ActivationPruning, ActivationPruningError
from lightning_actprune.core import ActivationRecorder
from tests.helpers import Classifier, MLPBatchNormDropout, MLPModule, make_data, quiet_trainer

VAL_SIZE = 33
VAL_BATCH_SIZE = 16
THRESHOLD = 0.1
SWEEP = [0.05, 0.1, 0.2]
COLLECTIVE_TIMEOUT_S = 30


class Record(Callback):
    """Before ActivationPruning: the unpruned weights, whether the process group is still up, and the batches
    this rank validates in each of the callback's own validation passes (the ones after fit)."""

    def __init__(self, seen: dict[str, Any]) -> None:
        self.seen = seen
        seen["samples_per_pass"] = []

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.seen["distributed_at_fit_end"] = torch.distributed.is_initialized()
        self.seen["world_size"] = trainer.world_size
        self.seen["unpruned"] = copy.deepcopy(pl_module.state_dict())

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.VALIDATING:
            self.seen["samples_per_pass"].append([])

    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int, *_: Any
    ) -> None:
        if trainer.state.fn == TrainerFn.VALIDATING:
            self.seen["samples_per_pass"][-1].append(len(batch[0]))


class RankDependentPruning(ActivationPruning):
    """Makes every rank choose another λ: the plans differ, which the callback must refuse before any surgery."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        object.__setattr__(self, "threshold", 0.05 + 0.3 * trainer.global_rank)  # the settings are frozen


def spy_on_statistics(captured: list[Any]) -> None:
    """Keep every result of ``ActivationRecorder.moments`` (the statistics the plan is made from)."""
    moments = ActivationRecorder.moments

    def spy(self: ActivationRecorder) -> Any:
        result = moments(self)
        captured.append({name: m._asdict() for name, m in result.items()})
        return result

    ActivationRecorder.moments = spy  # type: ignore[method-assign]


def spy_on_recalibration(captured: list[Any]) -> None:
    """Keep each rank's recalibrated BatchNorm statistics as they are before the ranks pool them."""
    average = trainer_module.average_batchnorm_statistics

    def spy(trainer: pl.Trainer, model: torch.nn.Module) -> None:
        captured.append({k: v.clone() for k, v in model.state_dict().items() if "running" in k})
        average(trainer, model)

    trainer_module.average_batchnorm_statistics = spy  # type: ignore[assignment]


def trainer_for(out: Path, *callbacks: Callback, max_epochs: int = 3) -> pl.Trainer:
    return quiet_trainer(
        out,
        *callbacks,
        devices=2,
        strategy=DDPStrategy(timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S)),  # a hang becomes an error
        max_epochs=max_epochs,
        logger=CSVLogger(out, name="csv"),
        enable_checkpointing=False,
    )


def loaders() -> tuple[DataLoader, DataLoader]:
    train = DataLoader(make_data((8,), n=96, seed=0), batch_size=16, shuffle=True)
    val = DataLoader(make_data((8,), n=VAL_SIZE, seed=1), batch_size=VAL_BATCH_SIZE)
    return train, val


def main(out: Path) -> None:
    statistics: list[Any] = []
    spy_on_statistics(statistics)

    pl.seed_everything(0)
    seen: dict[str, Any] = {}
    pruning = ActivationPruning(threshold=THRESHOLD, statistic="mean", monitor="val_acc", sweep=SWEEP)
    model = Classifier(MLPModule())
    trainer = trainer_for(out, Record(seen), pruning)
    trainer.fit(model, *loaders())
    assert pruning.result is not None
    seen["pruned"] = model.state_dict()
    seen["plan"] = pruning.result.plan.to_dict()
    seen["metrics_before"] = dict(pruning.result.metrics_before)
    seen["metrics_after"] = dict(pruning.result.metrics_after)
    seen["statistics"] = statistics[-1]
    seen["log_dir"] = trainer.log_dir

    pl.seed_everything(0)
    disagreeing: dict[str, Any] = {}
    model = Classifier(MLPModule(), sync_dist=True)  # one collective per validation epoch, on every rank
    train, val = loaders()
    data = pl.LightningDataModule.from_datasets(train.dataset, val.dataset, batch_size=VAL_BATCH_SIZE)
    trainer = trainer_for(out / "disagree", Record(disagreeing), RankDependentPruning(threshold=0.1))
    try:
        trainer.fit(model, datamodule=data)
    except ActivationPruningError as error:
        disagreeing["error"] = str(error)
    disagreeing["after"] = model.state_dict()
    seen["disagreeing"] = disagreeing

    local: list[Any] = []
    spy_on_recalibration(local)
    pl.seed_everything(0)
    model = Classifier(MLPBatchNormDropout())
    pruning = ActivationPruning(threshold=THRESHOLD, recalibration_batches=2, pruned_checkpoint=None)
    trainer_for(out / "batchnorm", pruning).fit(model, *loaders())
    seen["batchnorm"] = {
        "local": local[-1],
        "pruned": model.state_dict(),
        "metrics_pruned": dict(pruning.result.metrics_pruned),
        "metrics_after": dict(pruning.result.metrics_after),
    }

    losses: list[float] = []
    pl.seed_everything(0)
    model = LossRecorder(MLPModule(), losses)
    pruning = ActivationPruning(target_params_reduction=0.5, recovery_epochs=2, pruned_checkpoint=None)
    recovery_trainer = trainer_for(out / "recovery", pruning, max_epochs=4)
    recovery_trainer.fit(model, *loaders())
    seen["recovery"] = {
        "final": model.state_dict(),
        "losses": losses,
        "steps_per_epoch": recovery_trainer.num_training_batches,
        "pruned_at_epoch": pruning.pruned_at_epoch,
        "metrics_after": dict(pruning.result.metrics_after),
        "metrics_recovered": dict(pruning.result.metrics_recovered),
    }

    torch.save(seen, out / f"rank{trainer.global_rank}.pt")


class LossRecorder(Classifier):
    """Keeps every training step's loss (this rank's batch)."""

    def __init__(self, net: torch.nn.Module, losses: list[float]) -> None:
        super().__init__(net, lr=0.2)
        self.losses = losses

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        self.losses.append(float(loss))
        return loss


if __name__ == "__main__":
    main(Path(sys.argv[1]))
