"""The Lightning callback: gather statistics → plan → prune → re-validate → report."""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger, MLFlowLogger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from lightning_actprune import _lightning_compat as compat
from lightning_actprune._checkpoint import (
    _add_plan,
    _record_pruning,
    _result_from_state,
    _result_state,
    _save_pruned_checkpoint,
    _settings_state,
    _watch_loading,
)
from lightning_actprune._distributed import (
    check_same_on_every_rank,
    check_strategy,
    reduced_moments,
    synced_metrics,
    unrepeated_val_dataloaders,
)
from lightning_actprune._errors import ActivationPruningError
from lightning_actprune._plan import ExampleInputs, find_prunable_layers
from lightning_actprune._report import (
    PruningResult,
    SweepRow,
    count_parameters,
    format_sweep_table,
    model_size_mb,
    plot_sweep,
    write_sweep_files,
)
from lightning_actprune._statistics import MEASURED_TYPES, ActivationRecorder, Statistic, _check_statistic
from lightning_actprune._surgery import ModuleSnapshot, apply_plan
from lightning_actprune._sweep import (
    ThresholdEvaluator,
    choose_within_drop,
    metric_drop,
    search_within_drop,
    threshold_for_reduction,
)

OnError = Literal["raise", "warn"]
_ON_ERROR = ("raise", "warn")
Mode = Literal["max", "min"]
_MODES = ("max", "min")


def _check_number(name: str, value: object, minimum: float, integer: bool = False) -> None:
    allowed = "an int" if integer else "a finite number"
    allowed += f" >= {minimum:g}" if math.isfinite(minimum) else ""
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

    λ is chosen in exactly one of three ways: ``threshold`` applies the given λ; ``max_metric_drop`` applies the
    λ with the largest parameter reduction whose ``monitor`` got worse by at most that much (among ``sweep``, or
    found by bisection over the distinct scores in at most ``1 + ceil(log2(neurons + 1))`` validation passes);
    ``target_params_reduction`` applies the smallest λ that removes at least that fraction of the parameters,
    found from the statistics alone. With ``sweep``, every λ listed is evaluated (one validation pass each, the
    statistics are gathered once) and the table is printed, written as ``actprune_sweep.csv``/``.json``/``.png``
    into the log directory and sent to the loggers.

    Args:
        threshold: λ, ``>= 0``; neurons whose statistic is strictly below it are removed.
        statistic: ``"fluctuation"`` (default; FLAP: variance × squared norm of the consumer's weight column, in
            squared output units), or ``"mean"`` (the seed's), ``"mean_abs"``, ``"rms"``, ``"std"`` (activation
            units), ``"nonzero_fraction"`` (1 − APoZ, in [0, 1]), each over every sample and position. The default
            was chosen from the benchmark (BENCHMARKS.md): the best accuracy averaged over 50-90% reduction.
            ``statistic="mean"`` alone gives the seed's behaviour.
        monitor: a validation metric to highlight in the summary and the plot, and the one ``max_metric_drop``
            watches; it must be logged by ``validation_step``.
        mode: ``"max"`` if a larger ``monitor`` is better (accuracy), ``"min"`` if smaller is (loss).
        sweep: λ values to evaluate and report as a table (each ``>= 0``).
        max_metric_drop: the most ``monitor`` may get worse (absolute, ``>= 0``); needs ``monitor``.
        target_params_reduction: the fraction of parameters to remove, in (0, 1).
        compensate: fold each removed neuron's mean activation into its consumers' biases (created where a
            consumer has none), so nearly constant neurons go almost without a trace. Exact, for the removed
            neurons held at their mean, into ``Linear`` consumers and into ``Conv`` consumers away from padding.
        normalize: standardise the scores of each layer (``(s - mean) / std``) before comparing with λ, so one λ
            means the same in layers of different scales; λ is then in standard deviations and may be negative.
            ``None`` (default): only for ``fluctuation``, whose raw scale differs between layers.
        layers: glob patterns of layer names to prune (default: every hidden ``Linear``/``Conv``).
        exclude: glob patterns of layer names never to prune.
        min_neurons: the fewest neurons any layer keeps (``>= 1``).
        prune_best: prune the best checkpoint of the Trainer's ``ModelCheckpoint`` instead of the last weights.
        on_error: ``"raise"`` (fit fails) or ``"warn"`` (fit ends with a warning); the trained model is restored
            exactly either way.
        pruned_checkpoint: where to write a weights-only Lightning checkpoint of the pruned model, with its plan;
            a relative path is under ``trainer.log_dir`` (or ``default_root_dir``); None writes none. Every
            checkpoint of the pruned model carries its plan under ``"actprune_plan"``, and with this callback on
            the Trainer, ``trainer.validate/test/predict(model, ckpt_path=...)`` shrinks a fresh full-size model
            to it before loading (see :class:`PrunedCheckpointMixin` and :func:`load_pruned` for the other paths).

    Example::

        trainer = L.Trainer(callbacks=[ActivationPruning(threshold=0.4, monitor="val_acc")])
        trainer.fit(model, datamodule=dm)  # the model is pruned in place at the end
        print(trainer.callbacks[0].result.params_reduction)
    """

    def __init__(
        self,
        threshold: float | None = None,
        statistic: Statistic = "fluctuation",
        monitor: str | None = None,
        mode: Mode = "max",
        sweep: list[float] | None = None,
        max_metric_drop: float | None = None,
        target_params_reduction: float | None = None,
        compensate: bool = False,
        normalize: bool | None = None,
        layers: list[str] | None = None,
        exclude: list[str] | None = None,
        min_neurons: int = 1,
        prune_best: bool = False,
        on_error: OnError = "raise",
        pruned_checkpoint: str | None = "pruned.ckpt",
    ) -> None:
        choices = {"threshold": threshold, "max_metric_drop": max_metric_drop}
        choices["target_params_reduction"] = target_params_reduction
        if sum(v is not None for v in choices.values()) != 1:
            given = ", ".join(f"{k}={v!r}" for k, v in choices.items())
            raise ActivationPruningError(
                f"set exactly one of `threshold`, `max_metric_drop`, `target_params_reduction`; got {given}."
            )
        # `normalize=None`: standardise the statistic whose raw scale differs between layers (fluctuation)
        normalized = statistic == "fluctuation" if normalize is None else normalize
        if threshold is not None:
            # standardised scores are centred on 0: a negative λ is meaningful only when they are normalised
            _check_number("threshold", threshold, minimum=-math.inf if normalized else 0)
        if max_metric_drop is not None:
            _check_number("max_metric_drop", max_metric_drop, minimum=0)
            if monitor is None:
                raise ActivationPruningError("`max_metric_drop` needs `monitor`: the metric whose drop is bounded.")
        if target_params_reduction is not None:
            _check_number("target_params_reduction", target_params_reduction, minimum=0)
            if not 0 < target_params_reduction < 1:
                raise ActivationPruningError(
                    f"`target_params_reduction` must be in (0, 1); got {target_params_reduction!r}."
                )
        if mode not in _MODES:
            raise ActivationPruningError(f"`mode` can be one of {', '.join(_MODES)}; got {mode!r}.")
        if sweep is not None:
            if not isinstance(sweep, (list, tuple)) or not sweep:
                raise ActivationPruningError(f"`sweep` must be a non-empty list of thresholds; got {sweep!r}.")
            for value in sweep:
                _check_number("sweep", value, minimum=-math.inf if normalized else 0)
        _check_statistic(statistic)
        if monitor is not None and not isinstance(monitor, str):
            raise ActivationPruningError(f"`monitor` must be a metric name or None; got {monitor!r}.")
        _check_patterns("layers", layers)
        _check_patterns("exclude", exclude)
        _check_number("min_neurons", min_neurons, minimum=1, integer=True)
        if not isinstance(compensate, bool):
            raise ActivationPruningError(f"`compensate` must be True or False; got {compensate!r}.")
        if normalize is not None and not isinstance(normalize, bool):
            raise ActivationPruningError(f"`normalize` must be True, False or None (automatic); got {normalize!r}.")
        if not isinstance(prune_best, bool):
            raise ActivationPruningError(f"`prune_best` must be True or False; got {prune_best!r}.")
        if on_error not in _ON_ERROR:
            raise ActivationPruningError(f"`on_error` can be one of {', '.join(_ON_ERROR)}; got {on_error!r}.")
        if pruned_checkpoint is not None and (not isinstance(pruned_checkpoint, str) or not pruned_checkpoint):
            raise ActivationPruningError(f"`pruned_checkpoint` must be a file path or None; got {pruned_checkpoint!r}.")
        self.threshold = float(threshold) if threshold is not None else None
        self.statistic: str = statistic
        self.monitor = monitor
        self.mode: str = mode
        self.compensate = compensate
        self.normalize = normalize
        self._normalized = normalized
        self.sweep = sorted({float(v) for v in sweep}) if sweep is not None else None
        self.max_metric_drop = float(max_metric_drop) if max_metric_drop is not None else None
        self.target_params_reduction = float(target_params_reduction) if target_params_reduction is not None else None
        self.layers = list(layers) if layers is not None else None
        self.exclude = list(exclude or [])
        self.min_neurons = min_neurons
        self.prune_best = prune_best
        self.on_error: str = on_error
        self.pruned_checkpoint = pruned_checkpoint
        self.result: PruningResult | None = None
        self.pruned_checkpoint_path: str | None = None
        """Where the last pruned checkpoint was written."""
        self._load_hook: RemovableHandle | None = None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # a pruned checkpoint given as `ckpt_path` shrinks the model before its weights are loaded
        self._remove_load_hook()
        self._load_hook = _watch_loading(trainer, pl_module, lambda: self.pruned_checkpoint_path)
        if stage != "fit":
            return
        source = compat.data_source(trainer.fit_loop.epoch_loop.val_loop)
        if not is_overridden("validation_step", pl_module) or not source.is_defined():
            raise ActivationPruningError(
                "ActivationPruning needs validation data: implement `validation_step` and pass `val_dataloaders`"
                " (or a datamodule with `val_dataloader`) to `trainer.fit`."
            )
        if trainer.limit_val_batches == 0:
            raise ActivationPruningError(
                "ActivationPruning needs validation batches; got `Trainer(limit_val_batches=0)`."
            )
        self._check_patterns(pl_module)
        if self.prune_best and trainer.checkpoint_callback is None:
            raise ActivationPruningError("`prune_best=True` needs a `ModelCheckpoint` callback on the Trainer.")
        check_strategy(trainer.strategy)  # spawned workers and sharded parameters cannot be pruned in place

    def _check_patterns(self, pl_module: pl.LightningModule) -> None:
        """Patterns that match no Linear/Conv at all fail before training, not after it."""
        names = [name for name, m in pl_module.named_modules() if isinstance(m, MEASURED_TYPES)]
        for argument, patterns in (("layers", self.layers or []), ("exclude", self.exclude)):
            for pattern in patterns:
                if not fnmatch.filter(names, pattern):
                    raise ActivationPruningError(
                        f"`{argument}` pattern {pattern!r} matches no Linear/Conv layer of {type(pl_module).__name__};"
                        f" its Linear/Conv layers are: {', '.join(names) or '(none)'}."
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
        _record_pruning(pl_module, result.plan)  # the module remembers its plan: every checkpoint of it carries it
        # the model is pruned and validated: a failure to report or save is a warning, never an undone pruning
        try:
            self._report(trainer, result)
        except Exception as error:
            rank_zero_warn(
                f"ActivationPruning: the model is pruned, but reporting failed: {type(error).__name__}: {error}"
            )
        if self.pruned_checkpoint is not None:
            try:
                self.pruned_checkpoint_path = _save_pruned_checkpoint(trainer, pl_module, self.pruned_checkpoint)
            except Exception as error:
                rank_zero_warn(
                    f"ActivationPruning: the model is pruned, but saving `pruned_checkpoint={self.pruned_checkpoint!r}`"
                    f" failed: {type(error).__name__}: {error}"
                )
            else:
                rank_zero_info(f"ActivationPruning: saved the pruned model to {self.pruned_checkpoint_path}")

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        _add_plan(checkpoint, trainer, pl_module)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_load_hook()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._remove_load_hook()

    def _remove_load_hook(self) -> None:
        if self._load_hook is not None:
            self._load_hook.remove()
            self._load_hook = None

    def _report(self, trainer: pl.Trainer, result: PruningResult) -> None:
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
        paths = write_sweep_files(result, log_dir or trainer.default_root_dir, self.monitor)
        for logger in trainer.loggers:
            _send_sweep(logger, result, paths, self.monitor, trainer.global_step)

    def prune(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> PruningResult | None:
        """Gather statistics, choose λ, prune and re-validate; the model is restored if any step fails."""
        ckpt_path = self._best_checkpoint(trainer)
        # loading the best checkpoint overwrites the last weights in place: keep them to restore on failure
        last_weights = {k: v.detach().clone() for k, v in pl_module.state_dict().items()} if ckpt_path else None
        try:
            if ckpt_path is not None:  # before any `torch.compile` wrapper is removed: the keys were saved with it
                pl_module.load_state_dict(trainer.strategy.load_checkpoint(ckpt_path)["state_dict"])
            compiled = _uncompile(pl_module)
            try:
                result = self._prune(trainer, pl_module)
            except BaseException:
                _recompile(compiled)
                raise
            if result is None:  # nothing pruned: the model goes back as it was, compiled
                _recompile(compiled)
        except BaseException:
            if last_weights is not None:
                pl_module.load_state_dict(last_weights)
            raise
        if result is not None and compiled:
            rank_zero_warn(
                f"ActivationPruning: {', '.join(name for _, name, _ in compiled)} was compiled with `torch.compile`;"
                " it is pruned as the eager module it wraps and left uncompiled: compile the pruned model again."
            )
        return result

    def _prune(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> PruningResult | None:
        with ActivationRecorder(pl_module) as recorder:
            metrics_before = _validate(trainer, pl_module)
        if self.monitor is not None and self.monitor not in metrics_before:
            logged = ", ".join(metrics_before) or "(none)"
            raise ActivationPruningError(f"`monitor={self.monitor!r}` is not a validation metric; logged: {logged}.")
        moments = reduced_moments(trainer, recorder)  # summed over every rank's shard, the same on every rank
        recorder.check_finite(moments)
        with warnings.catch_warnings(record=True) as skipped:  # re-issued once, on rank zero
            warnings.simplefilter("always")
            layers = find_prunable_layers(
                pl_module, self._example_inputs(pl_module, recorder), self.layers, self.exclude
            )
        for warning in skipped:
            rank_zero_warn(str(warning.message))
        if getattr(trainer, "fast_dev_run", False):  # set by the Trainer at init, not declared on the class
            rank_zero_info("ActivationPruning: `fast_dev_run` validates one batch; the statistics come from it alone.")
        if not layers:
            rank_zero_info(f"ActivationPruning: {type(pl_module).__name__} has no prunable layer; nothing changed.")
            return None
        evaluator = ThresholdEvaluator(
            pl_module,
            layers,
            moments,
            self.statistic,
            self.min_neurons,
            validate=lambda: _validate(trainer, pl_module),
            compensate=self.compensate,
            normalize=self._normalized,
        )
        rows = {row.threshold: row for row in self._sweep(trainer, evaluator)}
        threshold, chosen_by = self._choose(evaluator, metrics_before, rows)
        plan = evaluator.plan(threshold)
        at_floor = [layer.name for layer in plan.layers if len(layer.kept) == self.min_neurons < layer.neurons]
        if at_floor:
            rank_zero_warn(
                f"ActivationPruning: λ={threshold:g} leaves {', '.join(at_floor)} with only"
                f" `min_neurons={self.min_neurons}` neuron(s), the most active; a lower λ keeps more."
            )
        params_before, size_before = count_parameters(pl_module), model_size_mb(pl_module)
        check_same_on_every_rank(trainer, plan.to_dict(), "the pruning plans")  # before any rank cuts
        snapshot = ModuleSnapshot(pl_module, plan.touched_modules)
        apply_plan(pl_module, plan)
        try:
            # a λ of the table was validated on this very pruned model: its metrics are the "after" ones
            metrics_after = rows[threshold].metrics if threshold in rows else _validate(trainer, pl_module)
        except BaseException:
            snapshot.restore()
            raise
        params_after, size_after = count_parameters(pl_module), model_size_mb(pl_module)
        if rows and threshold not in rows:
            neurons = {layer.name: len(layer.kept) for layer in plan.layers}
            kept = params_after / params_before
            rows[threshold] = SweepRow(threshold, params_after, kept, size_after, neurons, metrics_after)
        return PruningResult(
            plan=plan,
            params_before=params_before,
            params_after=params_after,
            size_mb_before=size_before,
            size_mb_after=size_after,
            metrics_before=metrics_before,
            metrics_after=metrics_after,
            sweep=tuple(rows[t] for t in sorted(rows)),
            chosen_by=chosen_by,
        )

    def _sweep(self, trainer: pl.Trainer, evaluator: ThresholdEvaluator) -> list[SweepRow]:
        thresholds = self.sweep or []
        rows = []
        for index, threshold in enumerate(thresholds, start=1):
            if trainer.progress_bar_callback is not None:
                rank_zero_info(f"ActivationPruning sweep: λ={threshold:g} ({index}/{len(thresholds)})")
            rows.append(evaluator.evaluate(threshold))
        return rows

    def _choose(
        self, evaluator: ThresholdEvaluator, metrics_before: dict[str, float], rows: dict[float, SweepRow]
    ) -> tuple[float, str]:
        if self.threshold is not None:
            return self.threshold, "threshold"
        if self.target_params_reduction is not None:
            return threshold_for_reduction(evaluator, self.target_params_reduction), "target_params_reduction"
        monitor, max_drop = str(self.monitor), float(self.max_metric_drop or 0.0)  # both set: checked in __init__
        before = metrics_before[monitor]
        if not rows:
            searched = search_within_drop(evaluator, monitor, before, max_drop, self.mode)
            rows.update({row.threshold: row for row in searched})
        chosen = choose_within_drop(list(rows.values()), monitor, before, max_drop, self.mode)
        if chosen is None:
            worst = min(metric_drop(before, r.metrics[monitor], self.mode) for r in rows.values())
            raise ActivationPruningError(
                f"no λ keeps `{monitor}` within `max_metric_drop={max_drop:g}`: the smallest drop"
                f" among the λ evaluated ({', '.join(f'{t:g}' for t in sorted(rows))}) is {worst:.4g}."
            )
        return chosen.threshold, "max_metric_drop"

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
        """Every constructor argument and the last result, as plain values."""
        return {
            **_settings_state(self),
            "plan": self.result.plan.to_dict() if self.result is not None else None,
            "result": _result_state(self.result),
            "pruned_checkpoint_path": self.pruned_checkpoint_path,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the last result; the settings stay as constructed (a difference is reported)."""
        result = _result_from_state(state_dict.get("plan"), state_dict.get("result"))
        if result is not None:
            self.result = result
        self.pruned_checkpoint_path = state_dict.get("pruned_checkpoint_path", self.pruned_checkpoint_path)
        current = _settings_state(self)
        changed = [f"{k}={v!r} (now {current[k]!r})" for k, v in state_dict.items() if k in current and v != current[k]]
        if changed:
            rank_zero_info(f"ActivationPruning: the checkpoint was written with {', '.join(changed)}.")


def _send_sweep(logger: Logger, result: PruningResult, paths: list[Path], monitor: str | None, step: int) -> None:
    """TensorBoard gets the figure and the table as text; MLflow the files as artifacts; others only the keys."""
    if isinstance(logger, TensorBoardLogger):
        figure = plot_sweep(result, monitor)
        if figure is not None:
            logger.experiment.add_figure("actprune/sweep", figure, global_step=step)
        table = format_sweep_table(result)
        logger.experiment.add_text("actprune/sweep", "    " + table.replace("\n", "\n    "), global_step=step)
    elif isinstance(logger, MLFlowLogger):
        for path in paths:
            logger.experiment.log_artifact(logger.run_id, str(path))


def _uncompile(module: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """Swap every ``torch.compile``'d submodule for the module it wraps: hooks and tracing need the eager module.

    Returns:
        ``(parent, attribute, compiled wrapper)`` for each swap, to undo it.
    """
    optimized = getattr(getattr(torch, "_dynamo", None), "OptimizedModule", None)
    if optimized is None:
        return []
    swapped = []
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, optimized):
                setattr(parent, name, child._orig_mod)
                swapped.append((parent, name, child))
    return swapped


def _recompile(swapped: list[tuple[nn.Module, str, nn.Module]]) -> None:
    """Undo :func:`_uncompile`."""
    for parent, name, wrapper in swapped:
        setattr(parent, name, wrapper)


def _validate(trainer: pl.Trainer, pl_module: pl.LightningModule, ckpt_path: str | None = None) -> dict[str, float]:
    """One validation pass through the Trainer (on its device, its precision), with the fit's data."""
    source = compat.data_source(trainer.fit_loop.epoch_loop.val_loop).instance
    kwargs: dict[str, Any] = {}
    # several processes: shards that cover every sample exactly once, not Lightning's padded ones
    unrepeated = unrepeated_val_dataloaders(trainer, compat.data_source(trainer.fit_loop.epoch_loop.val_loop))
    if unrepeated is not None:
        kwargs["dataloaders"] = unrepeated
    elif isinstance(source, pl.LightningDataModule):
        kwargs["datamodule"] = source
    elif not isinstance(source, pl.LightningModule):
        kwargs["dataloaders"] = source
    results = trainer.validate(pl_module, ckpt_path=ckpt_path, verbose=False, **kwargs)
    return synced_metrics(trainer, {name: float(value) for result in results for name, value in result.items()})


@contextmanager
def _trainer_state_kept(trainer: pl.Trainer) -> Iterator[None]:
    """Leave the Trainer as ``fit`` left it: state, loggers (not written to), metrics, data sources."""
    state = dataclasses.replace(trainer.state)
    loggers = trainer.loggers
    loops = (
        trainer.fit_loop,
        trainer.fit_loop.epoch_loop.val_loop,
        trainer.validate_loop,
        trainer.test_loop,
        trainer.predict_loop,
    )
    sources = [compat.data_source(loop).instance for loop in loops]
    ckpt_path = trainer.ckpt_path
    trainer.loggers = []
    try:
        with compat.logger_metrics_kept(trainer):
            yield
    finally:
        trainer.loggers = loggers
        trainer.state.status, trainer.state.fn, trainer.state.stage = state.status, state.fn, state.stage
        for loop, source in zip(loops, sources, strict=False):
            compat.data_source(loop).instance = source
        compat.set_ckpt_path(trainer, ckpt_path)
