"""Every access to Lightning's private internals, in one place.

Lightning's own callbacks get by with hooks and ``trainer.strategy``; ActivationPruning cannot: it re-validates
with the fit's own data, shards that data without repeats, writes a weights-only checkpoint with the callbacks'
state, and leaves the Trainer as ``fit`` left it. Each function below reaches one private object or attribute,
says since which Lightning version it is known to exist, and has a test in ``tests/test_lightning_compat.py``
that names what moved when a Lightning release moves it. ``pyproject.toml`` bounds ``lightning`` to the minor
versions CI runs (the lowest declared and the newest).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.strategies import Strategy
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from lightning.pytorch.trainer.connectors.data_connector import _DataLoaderSource, _request_dataloader
from lightning.pytorch.trainer.states import RunningStage, TrainerFn
from lightning.pytorch.utilities.data import _update_dataloader
from torch.utils.data import DataLoader, Sampler

__all__ = [
    "data_source",
    "dump_checkpoint",
    "epoch_validation_metrics",
    "launches_processes",
    "loaded_checkpoint",
    "logger_metrics_kept",
    "request_dataloader",
    "requires_distributed_sampler",
    "restart_early_stopping",
    "set_ckpt_path",
    "update_dataloader",
    "validate_in_fit",
]


def data_source(loop: object) -> _DataLoaderSource:
    """Where a loop's data comes from: ``loop._data_source``, whose ``instance`` is a module, datamodule or loaders.

    Reaches ``_DataLoaderSource`` on ``trainer.fit_loop``, ``fit_loop.epoch_loop.val_loop``, ``validate_loop``,
    ``test_loop`` and ``predict_loop`` (Lightning >= 2.0).
    """
    return loop._data_source  # type: ignore[attr-defined]


def request_dataloader(source: _DataLoaderSource) -> Any:
    """The loaders ``source`` gives, as Lightning requests them: ``data_connector._request_dataloader`` (>= 2.0).

    Lightning records the ``DataLoader`` constructor arguments while it calls the hook, so that
    :func:`update_dataloader` can re-create a loader with another sampler.
    """
    return _request_dataloader(source)


def requires_distributed_sampler(trainer: pl.Trainer, loader: DataLoader) -> bool:
    """Whether Lightning would shard ``loader`` with a ``DistributedSampler``.

    Reaches ``trainer._data_connector._requires_distributed_sampler`` (Lightning >= 2.0): true under a
    distributed strategy with ``use_distributed_sampler=True``, unless the loader is already sharded or iterates
    an ``IterableDataset``.
    """
    return bool(trainer._data_connector._requires_distributed_sampler(loader))


def update_dataloader(loader: DataLoader, sampler: Sampler | Iterable, mode: RunningStage) -> DataLoader:
    """``loader`` re-created with ``sampler``: ``lightning.pytorch.utilities.data._update_dataloader`` (>= 2.0)."""
    return _update_dataloader(loader, sampler, mode=mode)


def launches_processes(strategy: Strategy) -> bool:
    """Whether ``strategy`` trains in spawned or forked workers (``ddp_spawn``, ``ddp_notebook``, XLA).

    Reaches ``lightning.pytorch.strategies.launchers.multiprocessing._MultiProcessingLauncher`` (>= 2.0), the
    base class of these launchers.
    """
    return isinstance(strategy.launcher, _MultiProcessingLauncher)


@contextmanager
def logger_metrics_kept(trainer: pl.Trainer) -> Iterator[None]:
    """Restore, on exit, the metrics the Trainer holds: callback, logged and progress-bar metrics.

    Reaches ``trainer._logger_connector._callback_metrics``, ``._logged_metrics`` and ``._progress_bar_metrics``
    (Lightning >= 2.0). The public ``trainer.callback_metrics`` cannot stand in: reading it merges the running
    results, and it cannot be set.
    """
    connector = trainer._logger_connector
    callback_metrics = dict(connector._callback_metrics)
    logged_metrics = dict(connector._logged_metrics)
    progress_bar_metrics = dict(connector._progress_bar_metrics)
    try:
        yield
    finally:
        connector._callback_metrics = callback_metrics
        connector._logged_metrics = logged_metrics
        connector._progress_bar_metrics = progress_bar_metrics


def set_ckpt_path(trainer: pl.Trainer, ckpt_path: str | Path | None) -> None:
    """Set what ``trainer.ckpt_path`` returns, as ``fit``/``validate`` do, without the user-managed flag.

    Reaches ``trainer._checkpoint_connector._ckpt_path`` (Lightning >= 2.0); the public setter would also mark
    the path as the user's (``_user_managed``), which changes the next ``fit``'s choice of checkpoint.
    """
    trainer._checkpoint_connector._ckpt_path = ckpt_path


def dump_checkpoint(trainer: pl.Trainer, weights_only: bool) -> dict[str, Any]:
    """The checkpoint ``trainer.save_checkpoint`` would write, as a dict that can be added to before it is written.

    Reaches ``trainer._checkpoint_connector.dump_checkpoint`` (Lightning >= 2.0). With ``weights_only=True`` it
    holds the model's state and what the LightningModule's ``on_save_checkpoint`` adds, but neither the callbacks'
    state nor the optimizers'.
    """
    return trainer._checkpoint_connector.dump_checkpoint(weights_only=weights_only)


def loaded_checkpoint(trainer: pl.Trainer) -> dict[str, Any]:
    """The checkpoint the Trainer is restoring (empty when none): ``trainer._checkpoint_connector._loaded_checkpoint``.

    Known since Lightning 2.0; set while ``fit``/``validate``/``test``/``predict`` restore from ``ckpt_path``.
    """
    return trainer._checkpoint_connector._loaded_checkpoint


def validate_in_fit(trainer: pl.Trainer, dataloaders: Any = None) -> dict[str, float]:
    """One pass of the fit's own validation loop in the middle of ``fit``, invisible to everything else.

    ``trainer.validate`` cannot run inside ``fit``; this runs ``trainer.fit_loop.epoch_loop.val_loop`` (public
    attributes, Lightning >= 2.0) with the Trainer's ``state.fn`` set to ``VALIDATING``, so that callbacks which act
    on validation while fitting (``ModelCheckpoint``, ``EarlyStopping``) skip this pass, and with
    ``trainer.validate_loop`` pointing at that loop meanwhile: under ``VALIDATING`` the Trainer answers
    ``num_val_batches`` (what progress bars size their bar by) and ``val_dataloaders`` from ``validate_loop``, which
    never ran inside ``fit``. No logger is attached,
    and with the logger connector's metrics (``_callback_metrics``, ``_logged_metrics``, ``_progress_bar_metrics``),
    the loop's ``batch_progress`` and, when ``dataloaders`` replaces the data, the loop's private
    ``_combined_loader`` (Lightning >= 2.0) put back afterwards.

    Args:
        trainer: a Trainer inside ``fit``.
        dataloaders: an iterable of batches to validate on instead of the fit's validation data.

    Returns:
        The metrics logged by ``validation_step``, by name.
    """
    loop = trainer.fit_loop.epoch_loop.val_loop
    progress = loop.batch_progress.state_dict()
    fn, stage, loggers, validate_loop = trainer.state.fn, trainer.state.stage, trainer.loggers, trainer.validate_loop
    source = data_source(loop)
    instance, combined = source.instance, loop._combined_loader
    with logger_metrics_kept(trainer):
        trainer.state.fn = TrainerFn.VALIDATING
        trainer.loggers = []
        trainer.validate_loop = loop
        if dataloaders is not None:
            source.instance, loop._combined_loader = dataloaders, None
        try:
            outputs = loop.run()
        finally:
            trainer.state.fn, trainer.state.stage, trainer.loggers = fn, stage, loggers
            trainer.validate_loop = validate_loop
            loop.batch_progress.load_state_dict(progress)
            if dataloaders is not None:
                source.instance, loop._combined_loader = instance, combined
    return {name: float(value) for output in outputs for name, value in output.items()}


def epoch_validation_metrics(trainer: pl.Trainer) -> dict[str, float]:
    """In ``on_validation_end``: what the validation that just ended logged, as :func:`validate_in_fit` returns it.

    The loop has moved its epoch's results to the logger connector (``_logger_connector.metrics["log"]``,
    Lightning >= 2.0) before calling that hook.
    """
    return {name: float(value) for name, value in trainer._logger_connector.metrics["log"].items()}


def restart_early_stopping(callback: EarlyStopping) -> None:
    """``EarlyStopping`` counts afresh: no best score, no patience used (a smaller model starts its own history).

    Writes ``EarlyStopping.wait_count`` and ``best_score`` (Lightning >= 2.0; public attributes, but written by the
    callback alone), to the values its constructor sets: ``best_score`` is ±inf by ``monitor_op``.
    """
    callback.wait_count = 0
    callback.best_score = torch.tensor(math.inf if callback.monitor_op == torch.lt else -math.inf)
