"""What the loggers get beyond the ``actprune/*`` metrics: the λ table and its plot, in each logger's own form."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.loggers import Logger, MLFlowLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from lightning_actprune._checkpoint import _save_pruned_checkpoint
from lightning_actprune._config import PruningSettings
from lightning_actprune._huggingface import sync_pretrained_configs
from lightning_actprune._report import (
    PruningResult,
    format_sweep_table,
    plot_sweep,
    sweep_columns,
    sweep_records,
    write_sweep_files,
)


def publish(
    trainer: pl.Trainer, pl_module: pl.LightningModule, result: PruningResult, settings: PruningSettings
) -> str | None:
    """Report a result and save the pruned model (``pruned_checkpoint``); the path written, or None.

    The model is pruned and validated already: a failure here is a warning, never an undone pruning.
    """
    try:
        report(trainer, result, settings.monitor)
    except Exception as error:
        if not result.pruned:
            raise
        rank_zero_warn(f"ActivationPruning: the model is pruned, but reporting failed: {type(error).__name__}: {error}")
    filename = settings.pruned_checkpoint
    if not result.pruned or filename is None:
        return None
    try:
        path = _save_pruned_checkpoint(trainer, pl_module, filename)
    except Exception as error:
        rank_zero_warn(
            f"ActivationPruning: the model is pruned, but saving `pruned_checkpoint={filename!r}` failed:"
            f" {type(error).__name__}: {error}"
        )
        return None
    rank_zero_info(f"ActivationPruning: saved the pruned model to {path}")
    return path


def report(trainer: pl.Trainer, result: PruningResult, monitor: str | None) -> None:
    """Report a result: the ``actprune/*`` numbers to every logger, the summary and the λ table to the console.

    Rank zero also writes the table's files into the log directory, and each logger gets the table and the plot in
    its own form (:func:`send_sweep`).
    """
    metrics = result.to_metrics()
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)
    rank_zero_info(result.summary())
    if not result.sweep:
        return
    rank_zero_info(format_sweep_table(result))
    log_dir = trainer.log_dir  # a broadcast: every rank must ask, or rank zero waits forever
    if not trainer.is_global_zero:
        return
    paths = write_sweep_files(result, log_dir or trainer.default_root_dir, monitor)
    for logger in trainer.loggers:
        send_sweep(logger, result, paths, monitor, trainer.global_step)


def send_sweep(logger: Logger, result: PruningResult, paths: list[Path], monitor: str | None, step: int) -> None:
    """TensorBoard gets the figure and the table as text; MLflow the files as artifacts; W&B a table and the plot.

    Other loggers get only the keys.
    """
    if isinstance(logger, TensorBoardLogger):
        figure = plot_sweep(result, monitor)
        if figure is not None:
            logger.experiment.add_figure("actprune/sweep", figure, global_step=step)
        table = format_sweep_table(result)
        logger.experiment.add_text("actprune/sweep", "    " + table.replace("\n", "\n    "), global_step=step)
    elif isinstance(logger, MLFlowLogger):
        for path in paths:
            logger.experiment.log_artifact(logger.run_id, str(path))
    elif isinstance(logger, WandbLogger):
        __send_sweep_to_wandb(logger, result, paths, step)


def __send_sweep_to_wandb(logger: WandbLogger, result: PruningResult, paths: list[Path], step: int) -> None:
    """The λ table as a ``wandb.Table`` and the written plot as an image, both under ``actprune/sweep``."""
    records = sweep_records(result)
    columns = sweep_columns(records)
    logger.log_table("actprune/sweep", columns=columns, data=[[r.get(c) for c in columns] for r in records], step=step)
    images = [str(path) for path in paths if path.suffix == ".png"]
    if images:
        caption = f"applied λ={result.plan.threshold:.4g} ({result.plan.statistic})"
        logger.log_image("actprune/sweep_plot", images=images, step=step, caption=[caption])


def keep_configs_in_step(model: nn.Module, uniform_widths: bool) -> None:
    """After a prune, Hugging Face configs state the pruned widths (:func:`sync_pretrained_configs`).

    What a config cannot state is said (a warning when the widths were meant to be uniform, an info line otherwise);
    a failure is a warning, never an undone pruning.
    """
    try:
        unstated = sync_pretrained_configs(model)
    except Exception as error:
        rank_zero_warn(f"ActivationPruning: the model is pruned, but its config was not updated: {error!r}")
        return
    say = rank_zero_warn if uniform_widths else rank_zero_info  # expected when widths are free
    for message in unstated:
        say(f"ActivationPruning: {message}")
