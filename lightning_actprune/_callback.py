"""The Lightning callback: gather statistics → plan → prune → re-validate → report."""

from __future__ import annotations

import dataclasses
import fnmatch
import itertools
import math
import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger, MLFlowLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from lightning_actprune import _lightning_compat as compat
from lightning_actprune._checkpoint import (
    _add_plan,
    _legacy_state,
    _record_pruning,
    _result_from_state,
    _result_state,
    _save_pruned_checkpoint,
    _settings_state,
    _watch_loading,
)
from lightning_actprune._distributed import (
    average_batchnorm_statistics,
    check_same_on_every_rank,
    check_strategy,
    reduced_moments,
    rewrap_after_pruning,
    synced_metrics,
    unrepeated_val_dataloaders,
)
from lightning_actprune._errors import ActivationPruningError
from lightning_actprune._optimizer import OptimizerSnapshot, apply_plan_with_optimizers
from lightning_actprune._plan import ExampleInputs, PruningPlan, find_prunable_layers, layer_inventory
from lightning_actprune._recalibration import batchnorm_layers, recalibrating_batchnorm
from lightning_actprune._report import (
    NONE_CHOSEN,
    PruningResult,
    SweepRow,
    count_parameters,
    format_sweep_table,
    model_size_mb,
    plot_sweep,
    sweep_columns,
    sweep_records,
    write_sweep_files,
)
from lightning_actprune._scoring import NeuronScorer, as_scorer
from lightning_actprune._statistics import (
    MEASURED_TYPES,
    STATISTICS,
    ActivationRecorder,
    Statistic,
)
from lightning_actprune._surgery import ModuleSnapshot
from lightning_actprune._sweep import (
    ThresholdEvaluator,
    choose_within_drop,
    metric_drop,
    plan_for_reduction,
    search_within_drop,
)

OnError = Literal["raise", "warn"]
_ON_ERROR = ("raise", "warn")
Mode = Literal["max", "min"]
_MODES = ("max", "min")


def _resolve_statistic(statistic: object, user_lambda: bool) -> object:
    """The rule for ``statistic=None``: a λ the user writes is a mean activation; one the callback picks is not."""
    if statistic is not None:
        return statistic
    return "mean" if user_lambda else "fluctuation"


def _never_negative(statistic: str) -> str:
    if statistic not in STATISTICS:  # a user's NeuronScorer
        return f" ({statistic} has `signed = False`: its scores are never negative, a negative λ would remove nothing)"
    return f" (the {statistic} is never negative: a negative λ would remove nothing)"


def _check_number(name: str, value: object, minimum: float, integer: bool = False, why: str = "") -> None:
    allowed = "an int" if integer else "a finite number"
    allowed += f" >= {minimum:g}" if math.isfinite(minimum) else ""
    why = why if math.isfinite(minimum) else ""
    number_types = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, number_types) or not math.isfinite(value) or value < minimum:
        raise ActivationPruningError(f"`{name}` must be {allowed}; got {value!r}{why}.")


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
    ``target_params_reduction`` removes the fewest neurons, lowest scores first (ties broken one neuron at a time),
    that take away at least that fraction of the parameters, found from the statistics alone. When no λ qualifies
    (no λ within ``max_metric_drop``, a target out of reach) the trained model is left as it is, a warning says
    why, and the table is still reported. With ``sweep``, every λ listed is evaluated (one validation pass each, the
    statistics are gathered once) and the table is printed, written as ``actprune_sweep.csv``/``.json``/``.png``
    into the log directory and sent to the loggers.

    Units: unless ``statistic`` is set, a λ you write (``threshold``, ``sweep``) is a mean activation, the
    seed's units, and a λ the callback picks (``target_params_reduction``, or ``max_metric_drop`` without
    ``sweep``) is in standard deviations of the per-layer standardised ``fluctuation``. The summary says which.

    Args:
        threshold: λ; neurons whose statistic is strictly below it are removed. It may be negative for ``mean``
            (GELU/SiLU/tanh means can be) and for standardised scores, and must be ``>= 0`` otherwise.
        statistic: ``"mean"`` (the seed's), ``"mean_abs"``, ``"rms"``, ``"std"`` (activation units),
            ``"nonzero_fraction"`` (1 − APoZ, in [0, 1]) or ``"fluctuation"`` (FLAP: variance × squared norm of
            the consumer's weight column, in squared output units), each over every sample and position. ``None``
            (default): ``"mean"`` for a λ you write, ``"fluctuation"`` (standardised) when the callback picks λ;
            fluctuation won the benchmark (BENCHMARKS.md) at equal reduction. For signed activations (GELU, SiLU,
            tanh), a mean near 0 does not mean "silent": use ``"std"``, ``"rms"`` or ``"fluctuation"``. Or your
            own criterion, a :class:`NeuronScorer` (in YAML: ``class_path`` and ``init_args``): its ``signed`` says
            whether λ may be negative, and its scores are standardised only with ``normalize=True``.
        monitor: a validation metric to highlight in the summary and the plot, and the one ``max_metric_drop``
            watches; it must be logged by ``validation_step``.
        mode: ``"max"`` if a larger ``monitor`` is better (accuracy), ``"min"`` if smaller is (loss).
        sweep: λ values to evaluate and report as a table (same units and signs as ``threshold``).
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
        recalibration_batches: BatchNorm recalibration: after the surgery, the running mean and variance of every
            BatchNorm layer are re-estimated on this many *training* batches (forward passes of ``validation_step``
            with BatchNorm in train mode, no gradients, no parameter change; the average over ranks under DDP),
            because the layers before them now produce different activations. ``0`` turns it off; models without
            BatchNorm skip it. The "after" metrics are then those of the recalibrated model, and the metrics right
            after the surgery are reported too (``actprune/M_pruned``); the λ table and ``max_metric_drop`` judge
            each λ recalibrated.
        recovery_epochs: ``0`` (default) prunes at the end of ``fit``. ``R > 0`` prunes at the end of epoch
            ``max_epochs - R`` (after its validation) and lets the same ``fit`` train the smaller model for the last
            ``R`` epochs with the same optimizer (its per-parameter state sliced like the parameters, its
            hyper-parameters, schedulers and step counts kept); the report at the end of ``fit`` adds the metrics
            after recovery (``actprune/M_recovered``). ``threshold`` and ``target_params_reduction`` mean what they
            mean without recovery; ``max_metric_drop`` bounds the drop right after pruning (and recalibration),
            before recovery. Under DDP the wrapper is rebuilt around the smaller model; ``EarlyStopping``
            restarts counting at the prune.

    Example::

        trainer = L.Trainer(callbacks=[ActivationPruning(threshold=0.4, monitor="val_acc")])
        trainer.fit(model, datamodule=dm)  # the model is pruned in place at the end
        print(trainer.callbacks[0].result.params_reduction)
    """

    def __init__(
        self,
        threshold: float | None = None,
        statistic: Statistic | NeuronScorer | None = None,
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
        recalibration_batches: int = 20,
        recovery_epochs: int = 0,
    ) -> None:
        choices = {"threshold": threshold, "max_metric_drop": max_metric_drop}
        choices["target_params_reduction"] = target_params_reduction
        if sum(v is not None for v in choices.values()) != 1:
            given = ", ".join(f"{k}={v!r}" for k, v in choices.items())
            raise ActivationPruningError(
                f"set exactly one of `threshold`, `max_metric_drop`, `target_params_reduction`; got {given}."
            )
        scorer = as_scorer(_resolve_statistic(statistic, user_lambda=threshold is not None or sweep is not None))
        resolved = scorer.name
        # `normalize=None`: standardise the statistic whose raw scale differs between layers (fluctuation)
        normalized = resolved == "fluctuation" if normalize is None else normalize
        # standardised scores and the mean of GELU/SiLU/tanh outputs can be negative; the other statistics cannot
        signed = normalized or scorer.signed
        if threshold is not None:
            _check_number("threshold", threshold, minimum=-math.inf if signed else 0, why=_never_negative(resolved))
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
                _check_number("sweep", value, minimum=-math.inf if signed else 0, why=_never_negative(resolved))
        if monitor is not None and not isinstance(monitor, str):
            raise ActivationPruningError(f"`monitor` must be a metric name or None; got {monitor!r}.")
        _check_patterns("layers", layers)
        _check_patterns("exclude", exclude)
        _check_number("min_neurons", min_neurons, minimum=1, integer=True)
        _check_number("recalibration_batches", recalibration_batches, minimum=0, integer=True)
        _check_number("recovery_epochs", recovery_epochs, minimum=0, integer=True)
        if recovery_epochs and prune_best:
            raise ActivationPruningError(
                "`prune_best=True` cannot be combined with `recovery_epochs`: the best weights were trained with"
                " another optimizer state than the one training goes on with; prune the last weights instead."
            )
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
        self.statistic = statistic
        self._statistic: str = resolved
        self._scorer = scorer
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
        self.recalibration_batches = recalibration_batches
        self.recovery_epochs = recovery_epochs
        self.result: PruningResult | None = None
        self.pruned_checkpoint_path: str | None = None
        """Where the last pruned checkpoint was written."""
        self._load_hook: RemovableHandle | None = None
        self._train_loader: Any = None
        self._in_fit = False  # pruning inside `fit` (recovery epochs follow) rather than at its end
        self.pruned_at_epoch: int | None = None
        """The epoch at whose end the model was pruned inside ``fit`` (``recovery_epochs > 0``), or None."""

    @property
    def effective_statistic(self) -> str:
        """The statistic λ is compared against: ``statistic``, or the one the rule picks when it is ``None``."""
        return self._statistic

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
        if self.recovery_epochs:
            self._check_recovery(trainer)

    def _check_recovery(self, trainer: pl.Trainer) -> None:
        """Settings that recovery inside ``fit`` cannot work with fail before training, not at the prune."""
        epochs = trainer.max_epochs
        if epochs is None or epochs <= self.recovery_epochs or trainer.max_steps != -1:
            raise ActivationPruningError(
                f"`recovery_epochs={self.recovery_epochs}` prunes at the end of epoch `max_epochs - recovery_epochs`:"
                f" it needs `Trainer(max_epochs)` > {self.recovery_epochs} and no `max_steps`; got"
                f" max_epochs={epochs}, max_steps={trainer.max_steps}."
            )
        averaging = [type(c).__name__ for c in getattr(trainer, "callbacks", []) if _keeps_parameter_copies(c)]
        if averaging:
            raise ActivationPruningError(
                f"`recovery_epochs` cannot be combined with {', '.join(averaging)}: it keeps its own copy of every"
                " parameter, which pruning inside `fit` would leave at the old shapes."
            )

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epochs = trainer.max_epochs or 0
        if not self.recovery_epochs or trainer.current_epoch != epochs - self.recovery_epochs - 1:
            return
        if self.pruned_at_epoch is not None:  # resumed from a checkpoint written after the prune
            return
        self._in_fit = True
        try:
            result = self._guarded_prune(trainer, pl_module)
        finally:
            self._in_fit = False
        self.pruned_at_epoch = trainer.current_epoch
        if result is None:
            return
        self.result = result
        if result.pruned:
            _record_pruning(pl_module, result.plan)  # every checkpoint from now on carries the plan
            rewrap_after_pruning(trainer, pl_module)  # DDP: the wrapper must reduce the new parameters' gradients
            for callback in trainer.early_stopping_callbacks:  # a new, smaller model: its patience starts afresh
                callback.wait_count = 0
                callback.best_score = torch.tensor(math.inf if callback.monitor_op == torch.lt else -math.inf)
        rank_zero_info(
            f"ActivationPruning: pruned at the end of epoch {trainer.current_epoch}; the last"
            f" {self.recovery_epochs} epoch(s) train the smaller model."
        )

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
        recovered = self.recovery_epochs and self.pruned_at_epoch is not None
        if recovered:
            result = self._recovered(trainer, pl_module)
        else:
            if self.recovery_epochs:
                rank_zero_warn(
                    "ActivationPruning: `fit` ended before the prune epoch (`max_epochs - recovery_epochs`); the"
                    " model is pruned now, at the end of fit, with no recovery epochs."
                )
            result = self._guarded_prune(trainer, pl_module)
        if result is None:
            return
        self.result = result
        if not result.pruned:  # no λ qualified: nothing was cut, only the table and the metrics are reported
            self._report(trainer, result)
            return
        if not recovered:  # pruned inside fit, the plan is recorded already
            _record_pruning(pl_module, result.plan)  # the module remembers its plan: every checkpoint carries it
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

    @property
    @override
    def state_key(self) -> str:
        """The key of this instance's state in a checkpoint: instances that prune different layers keep theirs apart.

        λ is not part of it, so a run resumed with another λ still finds its state (and reports the change).
        """
        return self._generate_state_key(layers=self.layers, exclude=self.exclude, statistic=self._statistic)

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        _add_plan(checkpoint, trainer, pl_module)

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        legacy = _legacy_state(self, trainer, checkpoint)
        if legacy is not None:
            self.load_state_dict(legacy)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_load_hook()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._remove_load_hook()

    def _guarded_prune(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> PruningResult | None:
        """:meth:`prune` under ``on_error``: any failure leaves the trained model exactly as it was."""
        try:
            with _trainer_state_kept(trainer):
                return self.prune(trainer, pl_module)
        except ActivationPruningError as error:
            if self.on_error == "raise":
                raise
            rank_zero_warn(f"Activation pruning failed, the trained model is unchanged: {error}")
        except Exception as error:
            if self.on_error == "raise":
                raise ActivationPruningError(
                    f"activation pruning failed, the trained model is unchanged: {type(error).__name__}: {error}"
                ) from error
            rank_zero_warn(f"Activation pruning failed, the trained model is unchanged: {error!r}")
        return None

    def _recovered(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> PruningResult | None:
        """The in-``fit`` result with the metrics after the recovery epochs (one validation pass)."""
        if self.result is None:  # the prune inside fit failed (and warned) or found nothing prunable
            return None
        if not self.result.pruned:
            return self.result
        with _trainer_state_kept(trainer):
            recovered = _validate(trainer, pl_module)
        return dataclasses.replace(self.result, metrics_recovered=recovered)

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
            finally:
                self._train_loader = None
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
        # our own validation passes replace the fit's loaders: the recalibration's batches are taken now
        self._train_loader = trainer.train_dataloader
        with ActivationRecorder(pl_module) as recorder:
            metrics_before = self._validation(trainer, pl_module)
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
            rank_zero_warn(
                f"ActivationPruning: {type(pl_module).__name__} has no prunable layer; nothing changed. Found"
                f" {layer_inventory(pl_module) or 'no layer with parameters'}; none is prunable: only a Linear/Conv"
                " layer whose outputs feed another Linear/Conv layer is (the warnings above say why others are not)."
            )
            return None
        evaluator = ThresholdEvaluator(
            pl_module,
            layers,
            moments,
            self._scorer,
            self.min_neurons,
            validate=lambda: self._validate_recalibrated(trainer, pl_module),
            compensate=self.compensate,
            normalize=self._normalized,
        )
        rows = {row.threshold: row for row in self._sweep(trainer, evaluator)}
        plan, chosen_by = self._choose(evaluator, metrics_before, rows)
        params_before, size_before = count_parameters(pl_module), model_size_mb(pl_module)
        metrics_pruned: dict[str, float] = {}
        if plan is None:  # no λ qualified: the model stays as it is, the table is still reported
            plan, metrics_after = dataclasses.replace(evaluator.plan_removing(0), threshold=math.nan), metrics_before
            chosen_by = NONE_CHOSEN
        else:
            metrics_after, metrics_pruned = self._apply(trainer, pl_module, plan, rows, params_before)
        return PruningResult(
            plan=plan,
            params_before=params_before,
            params_after=count_parameters(pl_module),
            size_mb_before=size_before,
            size_mb_after=model_size_mb(pl_module),
            metrics_before=metrics_before,
            metrics_after=metrics_after,
            sweep=tuple(rows[t] for t in sorted(rows)),
            chosen_by=chosen_by,
            metrics_pruned=metrics_pruned,
        )

    def _apply(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        plan: PruningPlan,
        rows: dict[float, SweepRow],
        params_before: int,
    ) -> tuple[dict[str, float], dict[str, float]]:
        """Cut the model to ``plan``; its metrics after recalibration and, if recalibrated, right after the cut.

        The table gets the applied λ's row when it lacks it.
        """
        threshold = plan.threshold
        at_floor = [layer.name for layer in plan.layers if len(layer.kept) == self.min_neurons < layer.neurons]
        if at_floor:
            rank_zero_warn(
                f"ActivationPruning: λ={threshold:g} leaves {', '.join(at_floor)} with only"
                f" `min_neurons={self.min_neurons}` neuron(s), the most active; a lower λ keeps more."
            )
        neurons = {layer.name: len(layer.kept) for layer in plan.layers}
        validated = rows.get(threshold)
        validated = validated if validated is not None and dict(validated.neurons) == neurons else None
        check_same_on_every_rank(trainer, plan.to_dict(), "the pruning plans")  # before any rank cuts
        recalibrates = self._recalibrates(pl_module)
        snapshot = ModuleSnapshot(pl_module, [*plan.touched_modules, *batchnorm_layers(pl_module)])
        optimizers = OptimizerSnapshot(trainer.optimizers if self._in_fit else [])
        # inside fit, training goes on: the same optimizers follow the parameters to their new shapes
        apply_plan_with_optimizers(pl_module, plan, optimizers.optimizers)
        metrics_pruned: dict[str, float] = {}
        try:
            if recalibrates:
                metrics_pruned = self._validation(trainer, pl_module)
                recalibrates = self._recalibrate(trainer, pl_module)
            if validated is not None and not recalibrates:
                # a λ of the table was validated on this very pruned model: its metrics are the "after" ones
                metrics_after = dict(validated.metrics)
            else:
                fresh = recalibrates or not metrics_pruned
                metrics_after = self._validation(trainer, pl_module) if fresh else metrics_pruned
        except BaseException:
            snapshot.restore()
            optimizers.restore()
            raise
        if rows and validated is None:
            params_after, size_after = count_parameters(pl_module), model_size_mb(pl_module)
            kept = params_after / params_before
            rows[threshold] = SweepRow(threshold, params_after, kept, size_after, neurons, metrics_after)
        return metrics_after, metrics_pruned if recalibrates else {}

    def _recalibrates(self, pl_module: pl.LightningModule) -> bool:
        return self.recalibration_batches > 0 and bool(batchnorm_layers(pl_module))

    def _recalibrate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
        """Re-estimate BatchNorm statistics on the first training batches; ``False`` (with a warning) if it cannot.

        The passes go through ``trainer.validate`` (the user's ``validation_step`` knows how to feed a batch to
        the model) over the fit's training loader, with every BatchNorm layer in train mode.
        """
        loader = self._train_loader
        if loader is None or isinstance(loader, (Mapping, list, tuple)):
            why = "the fit has no training loader" if loader is None else "the fit has several training loaders"
            rank_zero_warn(f"ActivationPruning: BatchNorm recalibration skipped: {why}.")
            return False
        snapshot = ModuleSnapshot(pl_module, batchnorm_layers(pl_module))
        limit, trainer.limit_val_batches = trainer.limit_val_batches, 1.0  # our batch count, not the val limit
        try:
            with recalibrating_batchnorm(pl_module):
                batches = _FirstBatches(loader, self.recalibration_batches)
                if self._in_fit:
                    compat.validate_in_fit(trainer, batches)
                else:
                    trainer.validate(pl_module, dataloaders=batches, verbose=False)
            average_batchnorm_statistics(trainer, pl_module)  # identical on every rank
        except Exception as error:
            snapshot.restore()
            rank_zero_warn(
                f"ActivationPruning: BatchNorm recalibration failed ({type(error).__name__}: {error}); the pruned"
                " model keeps the running statistics from training."
            )
            return False
        finally:
            trainer.limit_val_batches = limit
        return True

    def _validation(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        """One validation pass with the fit's data: ``trainer.validate`` after ``fit``, the fit's loop inside it."""
        if self._in_fit:
            return synced_metrics(trainer, compat.validate_in_fit(trainer))
        return _validate(trainer, pl_module)

    def _validate_recalibrated(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        """One validation pass of the model recalibrated; its BatchNorm statistics are put back afterwards."""
        if not self._recalibrates(pl_module):
            return self._validation(trainer, pl_module)
        snapshot = ModuleSnapshot(pl_module, batchnorm_layers(pl_module))
        try:
            self._recalibrate(trainer, pl_module)
            return self._validation(trainer, pl_module)
        finally:
            snapshot.restore()

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
    ) -> tuple[PruningPlan | None, str]:
        """The plan to apply and how it was chosen; ``None`` when no λ qualifies (the model stays as it is)."""
        if self.threshold is not None:
            return evaluator.plan(self.threshold), "threshold"
        if self.target_params_reduction is not None:
            choice = plan_for_reduction(evaluator, self.target_params_reduction)
            if choice.note is not None:
                rank_zero_warn(f"ActivationPruning: {choice.note}")
            if choice.plan is None:
                rank_zero_warn("ActivationPruning: the trained model is left unpruned; lower the target.")
            elif choice.tied is not None:
                removed, tied = choice.tied
                rank_zero_info(
                    f"ActivationPruning: λ={choice.plan.threshold:g} splits {tied} neurons with equal scores:"
                    f" {removed} of them go (ties broken by RMS activation, then by the next layers' weight norm)."
                )
            return choice.plan, "target_params_reduction"
        monitor, max_drop = str(self.monitor), float(self.max_metric_drop or 0.0)  # both set: checked in __init__
        before = metrics_before[monitor]
        if not rows:
            searched = search_within_drop(evaluator, monitor, before, max_drop, self.mode)
            rows.update({row.threshold: row for row in searched})
        chosen = choose_within_drop(list(rows.values()), monitor, before, max_drop, self.mode)
        if chosen is None:
            smallest = min(metric_drop(before, r.metrics[monitor], self.mode) for r in rows.values())
            rank_zero_warn(
                f"ActivationPruning: no λ keeps `{monitor}` within `max_metric_drop={max_drop:g}`: the smallest drop"
                f" among the λ evaluated ({', '.join(f'{t:g}' for t in sorted(rows))}) is {smallest:.4g}; the"
                " trained model is left unpruned (the table is still written)."
            )
            return None, "max_metric_drop"
        return evaluator.plan(chosen.threshold), "max_metric_drop"

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
            "pruned_at_epoch": self.pruned_at_epoch,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the last result; the settings stay as constructed (a difference is reported)."""
        result = _result_from_state(state_dict.get("plan"), state_dict.get("result"))
        if result is not None:
            self.result = result
        self.pruned_checkpoint_path = state_dict.get("pruned_checkpoint_path", self.pruned_checkpoint_path)
        self.pruned_at_epoch = state_dict.get("pruned_at_epoch", self.pruned_at_epoch)
        current = _settings_state(self)
        changed = [f"{k}={v!r} (now {current[k]!r})" for k, v in state_dict.items() if k in current and v != current[k]]
        if changed:
            rank_zero_info(f"ActivationPruning: the checkpoint was written with {', '.join(changed)}.")


class _FirstBatches:
    """The first ``count`` batches of a loader, as an iterable with a length (what ``trainer.validate`` takes)."""

    def __init__(self, loader: Iterable[Any], count: int) -> None:
        self.loader, self.count = loader, count

    def __iter__(self) -> Iterator[Any]:
        return itertools.islice(iter(self.loader), self.count)

    def __len__(self) -> int:
        try:
            return min(len(self.loader), self.count)  # type: ignore[arg-type]
        except TypeError:
            return self.count


def _keeps_parameter_copies(callback: Callback) -> bool:
    """Lightning's weight averaging (``StochasticWeightAveraging``, ``WeightAveraging``/EMA) keeps parameter copies."""
    names = {cls.__name__ for cls in type(callback).__mro__}
    return bool(names & {"StochasticWeightAveraging", "WeightAveraging"})


def _send_sweep(logger: Logger, result: PruningResult, paths: list[Path], monitor: str | None, step: int) -> None:
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
        _send_sweep_to_wandb(logger, result, paths, step)


def _send_sweep_to_wandb(logger: WandbLogger, result: PruningResult, paths: list[Path], step: int) -> None:
    """The λ table as a ``wandb.Table`` and the written plot as an image, both under ``actprune/sweep``."""
    records = sweep_records(result)
    columns = sweep_columns(records)
    logger.log_table("actprune/sweep", columns=columns, data=[[r.get(c) for c in columns] for r in records], step=step)
    images = [str(path) for path in paths if path.suffix == ".png"]
    if images:
        caption = f"applied λ={result.plan.threshold:.4g} ({result.plan.statistic})"
        logger.log_image("actprune/sweep_plot", images=images, step=step, caption=[caption])


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
