"""The Lightning callback: gather statistics → plan → prune → re-validate → report."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from typing_extensions import override

from lightning_actprune._errors import ActivationPruningError
from lightning_actprune._plan import ExampleInputs, find_prunable_layers, plan_pruning
from lightning_actprune._report import PruningResult, count_parameters, model_size_mb
from lightning_actprune._statistics import STATISTICS, ActivationRecorder, Statistic
from lightning_actprune._surgery import ModuleSnapshot, apply_plan

OnError = Literal["raise", "warn"]
_ON_ERROR = ("raise", "warn")


def _check_number(name: str, value: object, minimum: float, integer: bool = False) -> None:
    allowed = f"{'an int' if integer else 'a finite number'} >= {minimum:g}"
    number_types = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, number_types) or not math.isfinite(value) or value < minimum:
        raise ActivationPruningError(f"`{name}` must be {allowed}; got {value!r}.")


def _check_patterns(name: str, value: object) -> None:
    if value is None:
        return
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ActivationPruningError(f"`{name}` must be a list of module-name glob patterns; got {value!r}.")


class ActivationPruning(Callback):
    r"""Remove the neurons that barely fire, at the end of ``fit``.

    After training, the validation data runs through the model once (no gradients) while every neuron's
    activation statistic is accumulated; every neuron whose statistic is below ``threshold`` (λ) is physically
    removed (weight matrices shrink), the model is validated again, and the change in size and in every
    validation metric goes to every logger under ``actprune/…``, to the console, and to :attr:`result`.

    A neuron's activation is what its consumers receive: it is measured at the input of the next
    ``Linear``/``Conv``, after any nonlinearity (module or functional), dropout, pooling or flatten. Coupled
    layers (BatchNorm, flatten, residual additions) are found by Torch-Pruning's ``DependencyGraph``; a channel
    tied by a residual addition is removed only when every layer that reads the stream finds it below λ.

    Args:
        threshold: λ, ``>= 0``; neurons whose statistic is strictly below it are removed.
        statistic: ``"mean"`` (the seed's), ``"mean_abs"``, ``"rms"``, ``"nonzero_fraction"`` (1 − APoZ) or
            ``"std"``, each averaged over every sample and position.
        monitor: a validation metric to highlight in the summary; it must be logged by ``validation_step``.
        layers: glob patterns of layer names to prune (default: every hidden ``Linear``/``Conv``).
        exclude: glob patterns of layer names never to prune.
        min_neurons: the fewest neurons any layer keeps (``>= 1``).
        prune_best: prune the best checkpoint of the Trainer's ``ModelCheckpoint`` instead of the last weights.
        on_error: ``"raise"`` (fit fails) or ``"warn"`` (fit ends with a warning); the trained model is restored
            exactly either way.

    Example::

        trainer = L.Trainer(callbacks=[ActivationPruning(threshold=0.4, monitor="val_acc")])
        trainer.fit(model, datamodule=dm)  # the model is pruned in place at the end
        print(trainer.callbacks[0].result.params_reduction)
    """

    def __init__(
        self,
        threshold: float,
        statistic: Statistic = "mean",
        monitor: str | None = None,
        layers: list[str] | None = None,
        exclude: list[str] | None = None,
        min_neurons: int = 1,
        prune_best: bool = False,
        on_error: OnError = "raise",
    ) -> None:
        _check_number("threshold", threshold, minimum=0)
        if statistic not in STATISTICS:
            raise ActivationPruningError(f"`statistic` can be one of {', '.join(STATISTICS)}; got {statistic!r}.")
        if monitor is not None and not isinstance(monitor, str):
            raise ActivationPruningError(f"`monitor` must be a metric name or None; got {monitor!r}.")
        _check_patterns("layers", layers)
        _check_patterns("exclude", exclude)
        _check_number("min_neurons", min_neurons, minimum=1, integer=True)
        if not isinstance(prune_best, bool):
            raise ActivationPruningError(f"`prune_best` must be True or False; got {prune_best!r}.")
        if on_error not in _ON_ERROR:
            raise ActivationPruningError(f"`on_error` can be one of {', '.join(_ON_ERROR)}; got {on_error!r}.")
        self.threshold = float(threshold)
        self.statistic: str = statistic
        self.monitor = monitor
        self.layers = list(layers) if layers is not None else None
        self.exclude = list(exclude or [])
        self.min_neurons = min_neurons
        self.prune_best = prune_best
        self.on_error: str = on_error
        self.result: PruningResult | None = None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        source = _data_source(trainer.fit_loop.epoch_loop.val_loop)
        if not is_overridden("validation_step", pl_module) or not source.is_defined():
            raise ActivationPruningError(
                "ActivationPruning needs validation data: implement `validation_step` and pass `val_dataloaders`"
                " (or a datamodule with `val_dataloader`) to `trainer.fit`."
            )
        if trainer.limit_val_batches == 0:
            raise ActivationPruningError(
                "ActivationPruning needs validation batches; got `Trainer(limit_val_batches=0)`."
            )
        if self.prune_best and trainer.checkpoint_callback is None:
            raise ActivationPruningError("`prune_best=True` needs a `ModelCheckpoint` callback on the Trainer.")
        launcher = trainer.strategy.launcher
        if launcher is not None and type(launcher).__name__ == "_MultiProcessingLauncher":
            raise ActivationPruningError(
                f"ActivationPruning does not support `strategy={type(trainer.strategy).__name__}` with spawned"
                " processes: the pruned model would stay in the worker processes. Use `strategy='ddp'`."
            )

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.interrupted:
            return
        try:
            with _trainer_state_kept(trainer):
                result = self.prune(trainer, pl_module)
        except ActivationPruningError as error:
            if self.on_error == "raise":
                raise
            rank_zero_warn(f"Activation pruning failed, the trained model is unchanged: {error}")
            return
        except Exception as error:
            if self.on_error == "raise":
                raise ActivationPruningError(
                    f"activation pruning failed, the trained model is unchanged: {type(error).__name__}: {error}"
                ) from error
            rank_zero_warn(f"Activation pruning failed, the trained model is unchanged: {error!r}")
            return
        if result is None:
            return
        self.result = result
        metrics = result.to_metrics()
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        rank_zero_info(result.summary())

    def prune(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> PruningResult | None:
        """Gather statistics, plan, prune and re-validate; the model is restored if any step fails."""
        ckpt_path = self._best_checkpoint(trainer)
        with ActivationRecorder(pl_module) as recorder:
            metrics_before = _validate(trainer, pl_module, ckpt_path=ckpt_path)
        if self.monitor is not None and self.monitor not in metrics_before:
            logged = ", ".join(metrics_before) or "(none)"
            raise ActivationPruningError(f"`monitor={self.monitor!r}` is not a validation metric; logged: {logged}.")
        recorder.check_finite()
        layers = find_prunable_layers(pl_module, self._example_inputs(pl_module, recorder), self.layers, self.exclude)
        if not layers:
            rank_zero_info(f"ActivationPruning: {type(pl_module).__name__} has no prunable layer; nothing changed.")
            return None
        plan = plan_pruning(layers, recorder.moments(), self.threshold, self.statistic, self.min_neurons)
        if any(len(layer.kept) == self.min_neurons < layer.neurons for layer in plan.layers):
            at_floor = [layer.name for layer in plan.layers if len(layer.kept) == self.min_neurons < layer.neurons]
            rank_zero_warn(
                f"ActivationPruning: λ={self.threshold:g} selects every neuron of {', '.join(at_floor)};"
                f" keeping the {self.min_neurons} most active (`min_neurons`)."
            )
        params_before, size_before = count_parameters(pl_module), model_size_mb(pl_module)
        snapshot = ModuleSnapshot(pl_module, (o.module for o in plan.operations))
        apply_plan(pl_module, plan)
        try:
            metrics_after = _validate(trainer, pl_module)
        except BaseException:
            snapshot.restore()
            raise
        return PruningResult(
            plan=plan,
            params_before=params_before,
            params_after=count_parameters(pl_module),
            size_mb_before=size_before,
            size_mb_after=model_size_mb(pl_module),
            metrics_before=metrics_before,
            metrics_after=metrics_after,
        )

    def _best_checkpoint(self, trainer: pl.Trainer) -> str | None:
        if not self.prune_best:
            return None
        path = getattr(trainer.checkpoint_callback, "best_model_path", "")
        if not path:
            raise ActivationPruningError(
                "`prune_best=True` but the ModelCheckpoint saved no best checkpoint (does it `monitor` a metric?)."
            )
        return str(path)

    @staticmethod
    def _example_inputs(pl_module: pl.LightningModule, recorder: ActivationRecorder) -> ExampleInputs:
        example = pl_module.example_input_array
        inputs: ExampleInputs
        if example is None:
            inputs = recorder.example_inputs
        elif isinstance(example, dict):
            inputs = {"": ((), example)}
        else:
            inputs = {"": (example if isinstance(example, tuple) else (example,), {})}
        device = next((p.device for p in pl_module.parameters()), torch.device("cpu"))
        return dict(move_data_to_device(dict(inputs), device))

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold,
            "statistic": self.statistic,
            "min_neurons": self.min_neurons,
            "plan": self.result.plan.to_dict() if self.result is not None else None,
        }


def _data_source(loop: object) -> Any:
    # Lightning keeps where each loop's data comes from (a module, a datamodule or loaders) on the loop.
    return loop._data_source  # type: ignore[attr-defined]


def _validate(trainer: pl.Trainer, pl_module: pl.LightningModule, ckpt_path: str | None = None) -> dict[str, float]:
    """One validation pass through the Trainer (on its device, its precision), with the fit's data."""
    source = _data_source(trainer.fit_loop.epoch_loop.val_loop).instance
    kwargs: dict[str, Any] = {}
    if isinstance(source, pl.LightningDataModule):
        kwargs["datamodule"] = source
    elif not isinstance(source, pl.LightningModule):
        kwargs["dataloaders"] = source
    results = trainer.validate(pl_module, ckpt_path=ckpt_path, verbose=False, **kwargs)
    return {name: float(value) for result in results for name, value in result.items()}


@contextmanager
def _trainer_state_kept(trainer: pl.Trainer) -> Iterator[None]:
    """Leave the Trainer as ``fit`` left it: state, loggers (not written to), metrics, data sources."""
    state = dataclasses.replace(trainer.state)
    loggers = trainer.loggers
    connector = trainer._logger_connector
    callback_metrics = dict(connector._callback_metrics)
    loops = (
        trainer.fit_loop,
        trainer.fit_loop.epoch_loop.val_loop,
        trainer.validate_loop,
        trainer.test_loop,
        trainer.predict_loop,
    )
    sources = [_data_source(loop).instance for loop in loops]
    ckpt_path = trainer._checkpoint_connector._ckpt_path
    trainer.loggers = []
    try:
        yield
    finally:
        trainer.loggers = loggers
        trainer.state.status, trainer.state.fn, trainer.state.stage = state.status, state.fn, state.stage
        connector._callback_metrics = callback_metrics
        for loop, source in zip(loops, sources, strict=False):
            _data_source(loop).instance = source
        trainer._checkpoint_connector._ckpt_path = ckpt_path
