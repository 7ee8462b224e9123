"""The Lightning callback: gather statistics → plan → prune → re-validate → report."""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import warnings
from typing import Any, NamedTuple

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from lightning_actprune import _lightning_compat as compat
from lightning_actprune._analysis import ExampleInputs, find_prunable_layers, layer_inventory
from lightning_actprune._checkpoint import (
    _add_plan,
    _legacy_state,
    _record_pruning,
    _result_from_state,
    _result_state,
    _save_pruned_checkpoint,
    _watch_loading,
)
from lightning_actprune._config import Mode, OnError, PruningSettings
from lightning_actprune._distributed import (
    check_same_on_every_rank,
    check_strategy,
    is_distributed,
    reduced_moments,
    rewrap_after_pruning,
    synced_metrics,
)
from lightning_actprune._errors import ActivationPruningError
from lightning_actprune._heads import projection_owners
from lightning_actprune._huggingface import sync_pretrained_configs, uniform_ties
from lightning_actprune._loggers import report
from lightning_actprune._optimizer import OptimizerSnapshot, apply_plan_with_optimizers
from lightning_actprune._recalibration import batchnorm_layers
from lightning_actprune._scoring import NeuronScorer
from lightning_actprune._statistics import (
    MEASURED_TYPES,
    ActivationRecorder,
    Statistic,
)
from lightning_actprune._surgery import restoring
from lightning_actprune._sweep import (
    ThresholdEvaluator,
    choose_within_drop,
    metric_drop,
    plan_for_reduction,
    search_within_drop,
)
from lightning_actprune._trainer import (
    ValidationPasses,
    has_compiled_modules,
    keeps_parameter_copies,
    recompile,
    trainer_state_kept,
    uncompile,
    validate,
    weights_fingerprint,
)
from lightning_actprune._types import (
    NONE_CHOSEN,
    PrunableLayer,
    PruningPlan,
    PruningResult,
    SweepRow,
    count_parameters,
    model_size_mb,
)


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
        prune_heads: also remove whole attention heads (timm ``Attention``, Hugging Face BERT-style attention,
            GPT-2's ``GPT2Attention``, ``nn.MultiheadAttention``): each attention module is one layer
            ``<name>:heads`` whose neurons are its heads, scored by the activations that reach its out projection
            and chosen with the other neurons by the same λ; at least one head per module stays, and the module's
            head count is updated. ``False`` leaves attention as it is.
        uniform_widths: the layers of one role in every block keep the same number of neurons and heads (layers whose
            names are equal once block indices are masked, ``model.layers.*.mlp.down_proj``, and in a Hugging Face
            model the layers one config field sets, such as T5's ``d_ff``), so that a config holding one width per
            role describes the pruned model. A pruned Hugging Face model's config is always brought in step with its
            widths where it can state them, so ``model.save_pretrained(dir)`` then reloads with ``from_pretrained``;
            with ``False`` (default) every layer keeps its own width, and :func:`lightning_actprune.save_pretrained`
            writes a form the stock ``from_pretrained`` loads (zero-padded; the same outputs).

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
        prune_heads: bool = True,
        uniform_widths: bool = False,
    ) -> None:
        self.settings = PruningSettings(
            threshold=threshold,
            statistic=statistic,
            monitor=monitor,
            mode=mode,
            sweep=sweep,
            max_metric_drop=max_metric_drop,
            target_params_reduction=target_params_reduction,
            compensate=compensate,
            normalize=normalize,
            layers=layers,
            exclude=exclude,
            min_neurons=min_neurons,
            prune_best=prune_best,
            on_error=on_error,
            pruned_checkpoint=pruned_checkpoint,
            recalibration_batches=recalibration_batches,
            recovery_epochs=recovery_epochs,
            prune_heads=prune_heads,
            uniform_widths=uniform_widths,
        )
        """The arguments, validated: read them here or as the callback's attributes of the same names."""
        self.result: PruningResult | None = None
        self.pruned_checkpoint_path: str | None = None
        """Where the last pruned checkpoint was written."""
        self._load_hook: RemovableHandle | None = None
        self._in_fit = False  # pruning inside `fit` (recovery epochs follow) rather than at its end
        self._preview: ActivationRecorder | None = None
        self._recording: ActivationRecorder | None = None  # during the validation right before a prune
        self._last_pass: _RecordedPass | None = None
        self.prunable_layers: list[PrunableLayer] | None = None
        """What the analysis at the start of ``fit`` found prunable (None until then): problems show before training."""
        self.pruned_at_epoch: int | None = None
        """The epoch at whose end the model was pruned inside ``fit`` (``recovery_epochs > 0``), or None."""

    @property
    def effective_statistic(self) -> str:
        """The statistic λ is compared against: ``statistic``, or the one the rule picks when it is ``None``."""
        return self.settings.effective_statistic

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # a pruned checkpoint given as `ckpt_path` shrinks the model before its weights are loaded
        self._remove_load_hook()
        self._load_hook = _watch_loading(trainer, pl_module, lambda: self.pruned_checkpoint_path)
        if stage != "fit":
            return
        self.prunable_layers = None  # this fit's model is analysed anew
        self.pruned_at_epoch = None  # a resumed fit gets it back from the checkpoint, restored after `setup`
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
        if self.settings.prune_best and trainer.checkpoint_callback is None:
            raise ActivationPruningError("`prune_best=True` needs a `ModelCheckpoint` callback on the Trainer.")
        check_strategy(trainer.strategy)  # spawned workers and sharded parameters cannot be pruned in place
        if self.settings.recovery_epochs:
            self._check_recovery(trainer)

    def _check_recovery(self, trainer: pl.Trainer) -> None:
        """Settings that recovery inside ``fit`` cannot work with fail before training, not at the prune."""
        epochs = trainer.max_epochs
        recovery = self.settings.recovery_epochs
        if epochs is None or epochs <= recovery or trainer.max_steps != -1:
            raise ActivationPruningError(
                f"`recovery_epochs={recovery}` prunes at the end of epoch `max_epochs - recovery_epochs`:"
                f" it needs `Trainer(max_epochs)` > {recovery} and no `max_steps`; got"
                f" max_epochs={epochs}, max_steps={trainer.max_steps}."
            )
        averaging = [type(c).__name__ for c in getattr(trainer, "callbacks", []) if keeps_parameter_copies(c)]
        if averaging:
            raise ActivationPruningError(
                f"`recovery_epochs` cannot be combined with {', '.join(averaging)}: it keeps its own copy of every"
                " parameter, which pruning inside `fit` would leave at the old shapes."
            )

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epochs = trainer.max_epochs or 0
        if not self.settings.recovery_epochs or trainer.current_epoch != epochs - self.settings.recovery_epochs - 1:
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
            self._sync_pretrained_configs(pl_module)
            rewrap_after_pruning(trainer, pl_module)  # DDP: the wrapper must reduce the new parameters' gradients
            for callback in trainer.early_stopping_callbacks:  # a new, smaller model: its patience starts afresh
                callback.wait_count = 0
                callback.best_score = torch.tensor(math.inf if callback.monitor_op == torch.lt else -math.inf)
            rank_zero_info(
                f"ActivationPruning: pruned at the end of epoch {trainer.current_epoch}; the last"
                f" {self.settings.recovery_epochs} epoch(s) train the smaller model."
            )

    def _check_patterns(self, pl_module: pl.LightningModule) -> None:
        """Patterns that match no Linear/Conv at all fail before training, not after it."""
        names = [name for name, m in pl_module.named_modules() if isinstance(m, MEASURED_TYPES)]
        names += [name for name in projection_owners(pl_module) if name not in names]  # nn.MultiheadAttention
        for argument, patterns in (("layers", self.settings.layers or []), ("exclude", self.settings.exclude or [])):
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
        recovered = self.settings.recovery_epochs and self.pruned_at_epoch is not None
        if recovered:
            result = self._recovered(trainer, pl_module)
        else:
            if self.settings.recovery_epochs:
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
            self._sync_pretrained_configs(pl_module)
        # the model is pruned and validated: a failure to report or save is a warning, never an undone pruning
        try:
            self._report(trainer, result)
        except Exception as error:
            rank_zero_warn(
                f"ActivationPruning: the model is pruned, but reporting failed: {type(error).__name__}: {error}"
            )
        filename = self.settings.pruned_checkpoint
        if filename is not None:
            try:
                self.pruned_checkpoint_path = _save_pruned_checkpoint(trainer, pl_module, filename)
            except Exception as error:
                rank_zero_warn(
                    f"ActivationPruning: the model is pruned, but saving `pruned_checkpoint={filename!r}`"
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
        settings = self.settings
        return self._generate_state_key(
            layers=settings.layers, exclude=settings.exclude, statistic=settings.effective_statistic
        )

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
        self._stop_preview()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._remove_load_hook()
        self._stop_preview()

    def _guarded_prune(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> PruningResult | None:
        """:meth:`prune` under ``on_error``: any failure leaves the trained model exactly as it was."""
        try:
            with trainer_state_kept(trainer):
                return self.prune(trainer, pl_module)
        except ActivationPruningError as error:
            if self.settings.on_error == "raise":
                raise
            rank_zero_warn(f"Activation pruning failed, the trained model is unchanged: {error}")
        except Exception as error:
            if self.settings.on_error == "raise":
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
        with trainer_state_kept(trainer):
            recovered = validate(trainer, pl_module)
        return dataclasses.replace(self.result, metrics_recovered=recovered)

    def _stop_preview(self) -> None:
        for recorder in (self._preview, self._recording):
            if recorder is not None:
                recorder.__exit__(None, None, None)
        self._preview = self._recording = self._last_pass = None

    def _remove_load_hook(self) -> None:
        if self._load_hook is not None:
            self._load_hook.remove()
            self._load_hook = None

    def _report(self, trainer: pl.Trainer, result: PruningResult) -> None:
        report(trainer, result, self.settings.monitor)

    def prune(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> PruningResult | None:
        """Gather statistics, choose λ, prune and re-validate; the model is restored if any step fails."""
        ckpt_path = self._best_checkpoint(trainer)
        # loading the best checkpoint overwrites the last weights in place: keep them to restore on failure
        last_weights = {k: v.detach().clone() for k, v in pl_module.state_dict().items()} if ckpt_path else None
        try:
            if ckpt_path is not None:  # before any `torch.compile` wrapper is removed: the keys were saved with it
                pl_module.load_state_dict(trainer.strategy.load_checkpoint(ckpt_path)["state_dict"])
            compiled = uncompile(pl_module)
            try:
                result = self._prune(trainer, pl_module)
            except BaseException:
                recompile(compiled)
                raise
            if result is None:  # nothing pruned: the model goes back as it was, compiled
                recompile(compiled)
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
        passes = ValidationPasses(trainer, pl_module, self._in_fit, self.settings.recalibration_batches)
        recorded = self._recorded_pass(trainer, pl_module)
        if recorded is not None:  # the validation that just ran saw this very model: its statistics serve
            recorder, metrics_before = recorded.recorder, synced_metrics(trainer, recorded.metrics)
        else:
            with ActivationRecorder(pl_module) as recorder:
                metrics_before = passes.metrics()
        monitor = self.settings.monitor
        if monitor is not None and monitor not in metrics_before:
            logged = ", ".join(metrics_before) or "(none)"
            raise ActivationPruningError(f"`monitor={monitor!r}` is not a validation metric; logged: {logged}.")
        moments = reduced_moments(trainer, recorder)  # summed over every rank's shard, the same on every rank
        recorder.check_finite(moments)
        # the analysis ran once, at the start of fit, when it could: its layers are the same now
        layers = self.prunable_layers
        warned = layers is not None  # the analysis at the start of fit already said what it found
        if layers is None:
            layers = self._analyse(pl_module, recorder)
        if getattr(trainer, "fast_dev_run", False):  # set by the Trainer at init, not declared on the class
            rank_zero_info("ActivationPruning: `fast_dev_run` validates one batch; the statistics come from it alone.")
        if not layers:
            if warned:
                rank_zero_info(f"ActivationPruning: {type(pl_module).__name__} has no prunable layer; nothing changed.")
                return None
            rank_zero_warn(
                f"ActivationPruning: {type(pl_module).__name__} has no prunable layer; nothing changed."
                + self._nothing_prunable(pl_module)
            )
            return None
        evaluator = ThresholdEvaluator(
            pl_module,
            layers,
            moments,
            self.settings.scorer,
            self.settings.min_neurons,
            validate=passes.metrics_recalibrated,
            compensate=self.settings.compensate,
            normalize=self.settings.normalized,
            tied=uniform_ties(pl_module, layers) if self.settings.uniform_widths else (),
        )
        rows = {row.threshold: row for row in self._sweep(trainer, evaluator)}
        plan, chosen_by = self._choose(evaluator, metrics_before, rows)
        params_before, size_before = count_parameters(pl_module), model_size_mb(pl_module)
        metrics_pruned: dict[str, float] = {}
        if plan is None:  # no λ qualified: the model stays as it is, the table is still reported
            plan, metrics_after = dataclasses.replace(evaluator.plan_removing(0), threshold=math.nan), metrics_before
            chosen_by = NONE_CHOSEN
        else:
            metrics_after, metrics_pruned = self._apply(trainer, pl_module, plan, rows, params_before, passes)
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
        passes: ValidationPasses,
    ) -> tuple[dict[str, float], dict[str, float]]:
        """Cut the model to ``plan``; its metrics after recalibration and, if recalibrated, right after the cut.

        The table gets the applied λ's row when it lacks it.
        """
        threshold = plan.threshold
        at_floor = [layer.name for layer in plan.layers if len(layer.kept) == self.settings.min_neurons < layer.neurons]
        if at_floor:
            rank_zero_warn(
                f"ActivationPruning: λ={threshold:g} leaves {', '.join(at_floor)} with only"
                f" `min_neurons={self.settings.min_neurons}` neuron(s), the most active; a lower λ keeps more."
            )
        neurons = {layer.name: len(layer.kept) for layer in plan.layers}
        validated = rows.get(threshold)
        validated = validated if validated is not None and dict(validated.neurons) == neurons else None
        check_same_on_every_rank(trainer, plan.to_dict(), "the pruning plans")  # before any rank cuts
        optimizers = OptimizerSnapshot(trainer.optimizers if self._in_fit else [])
        try:
            with restoring(pl_module, [*plan.touched_modules, *batchnorm_layers(pl_module)]):
                # inside fit, training goes on: the same optimizers follow the parameters to their new shapes
                apply_plan_with_optimizers(pl_module, plan, optimizers.optimizers)
                metrics_after, metrics_pruned = passes.metrics_pruned(validated.metrics if validated else None)
        except BaseException:
            optimizers.restore()
            raise
        if rows and validated is None:
            params_after, size_after = count_parameters(pl_module), model_size_mb(pl_module)
            kept = params_after / params_before
            rows[threshold] = SweepRow(threshold, params_after, kept, size_after, neurons, metrics_after)
        return metrics_after, metrics_pruned

    def _sync_pretrained_configs(self, pl_module: pl.LightningModule) -> None:
        """Hugging Face models: their configs state the pruned widths, or a message says what cannot be stated."""
        try:
            unstated = sync_pretrained_configs(pl_module)
        except Exception as error:  # the model is pruned: a config left behind is a warning, never an undone pruning
            rank_zero_warn(f"ActivationPruning: the model is pruned, but its config was not updated: {error!r}")
            return
        say = rank_zero_warn if self.settings.uniform_widths else rank_zero_info  # expected when widths are free
        for message in unstated:
            say(f"ActivationPruning: {message}")

    def _analyse(self, pl_module: pl.LightningModule, recorder: ActivationRecorder) -> list[PrunableLayer]:
        """Which layers can be pruned (Torch-Pruning's analysis and the per-layer checks); skips warned once."""
        with warnings.catch_warnings(record=True) as skipped:  # re-issued once, on rank zero
            warnings.simplefilter("always")
            layers = find_prunable_layers(
                pl_module,
                self._example_inputs(pl_module, recorder),
                self.settings.layers,
                self.settings.exclude or [],
                prune_heads=self.settings.prune_heads,
            )
        for warning in skipped:
            rank_zero_warn(str(warning.message))
        return layers

    @staticmethod
    def _nothing_prunable(pl_module: pl.LightningModule) -> str:
        return (
            f" Found {layer_inventory(pl_module) or 'no layer with parameters'}; none is prunable (only a Linear/Conv"
            " feeding another Linear/Conv is; the warnings above say why)."
        )

    def _prune_follows(self, trainer: pl.Trainer) -> bool:
        """Whether a prune comes right after this epoch's validation, with no training step in between."""
        epochs, recovery = trainer.max_epochs, self.settings.recovery_epochs
        if epochs is None or epochs < 0 or trainer.sanity_checking or self.settings.prune_best:
            return False  # unknown last epoch; no epoch yet; the best checkpoint is pruned, not these weights
        if recovery and self.pruned_at_epoch is not None:
            return False
        return trainer.current_epoch == epochs - recovery - 1

    def _recorded_pass(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> _RecordedPass | None:
        """The statistics and metrics of the fit's last validation, if they are those of the model as it is now.

        Inside ``fit`` every pass runs the fit's own validation loop; after it, a distributed pass covers every
        sample exactly once, which the fit's padded shards do not, and callbacks that keep averaged weights may
        have swapped them in: then the statistics are gathered anew.
        """
        recorded, self._last_pass = self._last_pass, None
        if recorded is None or recorded.weights != weights_fingerprint(trainer, pl_module):
            return None
        if not self._in_fit and (
            is_distributed(trainer) or any(map(keeps_parameter_copies, getattr(trainer, "callbacks", [])))
        ):
            return None
        return recorded

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        fitting = trainer.state.fn == TrainerFn.FITTING
        if not fitting or has_compiled_modules(pl_module):  # compiled: traced at the prune, as the eager modules
            return
        self._last_pass = None
        if self._prune_follows(trainer) and self._recording is None:
            # the prune right after this validation takes its statistics from it: one validation pass fewer
            self._recording = ActivationRecorder(pl_module).__enter__()
        # the first validation of fit (the sanity check when there is one): analyse the model now, not after training
        if self.prunable_layers is None and self._preview is None:
            self._preview = ActivationRecorder(pl_module).__enter__()

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        recorder, self._recording = self._recording, None
        if recorder is None:
            return
        recorder.__exit__(None, None, None)
        metrics = compat.epoch_validation_metrics(trainer)
        self._last_pass = _RecordedPass(recorder, metrics, weights_fingerprint(trainer, pl_module))

    @override
    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int, *_: Any
    ) -> None:
        recorder, self._preview = self._preview, None
        if recorder is None:
            return
        recorder.__exit__(None, None, None)
        if self._recording is not None:  # the analysis runs the model: those passes are not validation data
            self._recording.__exit__(None, None, None)
        try:
            layers = self._analyse(pl_module, recorder)
        except Exception as error:
            rank_zero_warn(
                f"ActivationPruning: analysing {type(pl_module).__name__} at the start of fit failed"
                f" ({type(error).__name__}: {error}); it is tried again when pruning."
            )
            return
        finally:
            if self._recording is not None:
                self._recording.__enter__()
        self.prunable_layers = layers
        if not layers:
            rank_zero_warn(
                f"ActivationPruning: {type(pl_module).__name__} has no prunable layer (seen before training)."
                + self._nothing_prunable(pl_module)
            )
            return
        neurons = sum(layer.neurons for layer in layers)
        shown = ", ".join(f"{layer.name} ({layer.neurons})" for layer in layers[:8])
        more = f" and {len(layers) - 8} more" if len(layers) > 8 else ""
        rank_zero_info(
            f"ActivationPruning: {len(layers)} prunable layer(s), {neurons} neurons: {shown}{more}; the warnings"
            " above name the layers that will not be pruned and why."
        )

    def _sweep(self, trainer: pl.Trainer, evaluator: ThresholdEvaluator) -> list[SweepRow]:
        thresholds = self.settings.sweep or []
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
        if self.settings.threshold is not None:
            return evaluator.plan(self.settings.threshold), "threshold"
        if self.settings.target_params_reduction is not None:
            choice = plan_for_reduction(evaluator, self.settings.target_params_reduction)
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
        # both set: checked by the settings
        monitor, max_drop = str(self.settings.monitor), float(self.settings.max_metric_drop or 0.0)
        before = metrics_before[monitor]
        if not rows:
            searched = search_within_drop(evaluator, monitor, before, max_drop, self.settings.mode)
            rows.update({row.threshold: row for row in searched})
        chosen = choose_within_drop(list(rows.values()), monitor, before, max_drop, self.settings.mode)
        if chosen is None:
            smallest = min(metric_drop(before, r.metrics[monitor], self.settings.mode) for r in rows.values())
            rank_zero_warn(
                f"ActivationPruning: no λ keeps `{monitor}` within `max_metric_drop={max_drop:g}`: the smallest drop"
                f" among the λ evaluated ({', '.join(f'{t:g}' for t in sorted(rows))}) is {smallest:.4g}; the"
                " trained model is left unpruned (the table is still written)."
            )
            return None, "max_metric_drop"
        return evaluator.plan(chosen.threshold), "max_metric_drop"

    def _best_checkpoint(self, trainer: pl.Trainer) -> str | None:
        if not self.settings.prune_best:
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
            **self.settings.to_state(),
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
        current = self.settings.to_state()
        changed = [f"{k}={v!r} (now {current[k]!r})" for k, v in state_dict.items() if k in current and v != current[k]]
        if changed:
            rank_zero_info(f"ActivationPruning: the checkpoint was written with {', '.join(changed)}.")


class _RecordedPass(NamedTuple):
    """A validation of ``fit`` recorded for the prune that follows it."""

    recorder: ActivationRecorder
    metrics: dict[str, float]
    weights: tuple[int, tuple[tuple[int, int, int], ...]]


def _setting(name: str) -> property:
    return property(lambda self: getattr(self.settings, name), doc=f"The ``{name}`` argument, as validated.")


# the arguments read back as attributes (LightningCLI, `state_dict`, users); one place stores them: `settings`
for _name in PruningSettings.__dataclass_fields__:
    if PruningSettings.__dataclass_fields__[_name].init:
        setattr(ActivationPruning, _name, _setting(_name))
