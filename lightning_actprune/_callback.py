"""The Lightning callback, hooks and state; the prune is :class:`~lightning_actprune._pipeline.PruningPipeline`."""

from __future__ import annotations

import dataclasses
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from lightning_actprune import _lightning_compat as compat
from lightning_actprune._checkpoint import (
    _add_plan,
    _legacy_state,
    _result_from_state,
    _result_state,
    _watch_loading,
)
from lightning_actprune._config import PruningSettings
from lightning_actprune._distillation import Teaching
from lightning_actprune._distributed import rewrap_after_pruning
from lightning_actprune._fit_checks import check_fit
from lightning_actprune._fit_validations import FitValidations
from lightning_actprune._loggers import keep_configs_in_step, publish
from lightning_actprune._module_plan import _record_pruning
from lightning_actprune._pipeline import PruningPipeline, run_guarded
from lightning_actprune._trainer import has_compiled_modules, trainer_state_kept, validate
from lightning_actprune._types import PrunableLayer, PruningResult


class ActivationPruning(PruningSettings, Callback):
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
    why, and the table is still reported. With ``sweep``, every row listed is evaluated (one validation pass each,
    the statistics are gathered once) and the table is printed, written as ``actprune_sweep.csv``/``.json``/
    ``.png`` into the log directory and sent to the loggers.

    Units: unless ``statistic`` is set, a λ you write (``threshold``) is a mean activation, the seed's units, and a
    λ the callback picks (``target_params_reduction``, ``max_metric_drop``) is in multiples of the layer's mean
    ``fluctuation`` (of the mean RMS over all BatchNorm-normalised channels, for those): heads, neurons and channels
    on one scale. A table follows the choice: λ values with ``threshold``, parameter reductions with a target or a
    budget. The summary says which.

    Args:
        threshold: λ; neurons whose statistic is strictly below it are removed. It may be negative for ``mean``
            (GELU/SiLU/tanh means can be) and for standardised scores, and must be ``>= 0`` otherwise.
        statistic: ``"mean"`` (the seed's), ``"mean_abs"``, ``"rms"``, ``"std"`` (activation units),
            ``"nonzero_fraction"`` (1 − APoZ, in [0, 1]) or ``"fluctuation"`` (FLAP: variance × squared norm of
            the consumer's weight column, in squared output units), each over every sample and position. ``None``
            (default): ``"mean"`` for a λ you write, ``"fluctuation"`` over each layer's mean when the callback
            picks λ (:class:`~lightning_actprune._scoring.DefaultCriterion`: a head, an FFN neuron, a channel each by
            its share of its layer's output energy, which kept heads beside FFN neurons on the ViT benchmark);
            fluctuation won the MLP benchmark (BENCHMARKS.md) at equal reduction. There, channels that BatchNorm
            normalises are scored by their ``"rms"`` instead, over one mean for all such layers (so the raw RMS ranks
            them across layers, which won on the BatchNorm ResNet); the plan's ``scored_by`` and the summary list
            those layers. ``normalize=False`` keeps plain raw fluctuation. For signed activations
            (GELU, SiLU, tanh), a mean near 0 does not mean "silent": use ``"std"``, ``"rms"`` or ``"fluctuation"``.
            Or your own criterion, a :class:`NeuronScorer` (in YAML: ``class_path`` and ``init_args``): its
            ``signed`` says whether λ may be negative, and its scores are put on one scale only with
            ``normalize=True`` (as its ``scale`` says).
        monitor: a validation metric to highlight in the summary and the plot, and the one ``max_metric_drop``
            watches; it must be logged by ``validation_step``.
        mode: ``"max"`` if a larger ``monitor`` is better (accuracy), ``"min"`` if smaller is (loss).
        sweep: the rows of a table to evaluate and report: λ values (same units and signs as ``threshold``) with
            ``threshold``; fractions of the parameters to remove, in (0, 1), with ``target_params_reduction`` or
            ``max_metric_drop`` (each planned like the target; ``max_metric_drop`` then chooses among them).
        max_metric_drop: the most ``monitor`` may get worse (absolute, ``>= 0``); needs ``monitor``.
        target_params_reduction: the fraction of parameters to remove, in (0, 1).
        compensate: fold each removed neuron's mean activation into its consumers' biases (created where a
            consumer has none), so nearly constant neurons go almost without a trace. Exact, for the removed
            neurons held at their mean, into ``Linear`` consumers and into ``Conv`` consumers away from padding.
        normalize: put the scores of each layer on one scale before comparing with λ, so one λ means the same in
            layers of different scales: the default criterion divides by the layer's mean (λ in multiples of it), a
            statistic you name is standardised (``(s - mean) / std``, λ in standard deviations, either sign).
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
        recovery_epochs: ``0`` (default) prunes at the end of ``fit``. ``R > 0`` prunes after epoch
            ``max_epochs - R`` of ``max_epochs``, counting from 1 (after its validation; Lightning's
            ``current_epoch`` is then ``max_epochs - R - 1``), and lets the same ``fit`` train the smaller model for
            the last ``R`` epochs with the same optimizer (its per-parameter state sliced like the parameters, its
            hyper-parameters, schedulers and step counts kept); the report at the end of ``fit`` adds the metrics
            after recovery (``actprune/M_recovered``). ``threshold`` and ``target_params_reduction`` mean what they
            mean without recovery; ``max_metric_drop`` bounds the drop right after pruning (and recalibration),
            before recovery. Under DDP the wrapper is rebuilt around the smaller model; ``EarlyStopping``
            restarts counting at the prune.
        prune_heads: also remove whole attention heads: each attention module (found from its structure and its own
            numbers, ``num_heads``/``head_dim`` or its ``config``'s: Hugging Face's families, timm's,
            ``nn.MultiheadAttention``) is one layer ``<name>:heads`` whose neurons are its heads, scored by the
            activations that reach its out projection and chosen with the other neurons by the same λ; at least one
            head per module stays, and the module's head counts are updated. ``False`` leaves attention as it is.
        gqa_unit: what one unit of a grouped-query attention module is: ``"query_heads"`` removes query heads, the
            same number from every key/value head (``num_key_value_groups`` stays whole); ``"kv_groups"`` removes a
            key/value head with all of its query heads.
        recovery_steps: ``N > 0`` prunes at step ``max_steps - N`` (``trainer.global_step``, with statistics from a
            validation pass of its own) and lets the same ``fit`` train the smaller model for the last ``N`` steps,
            as ``recovery_epochs`` does for epochs: for ``max_steps`` runs and runs shorter than one epoch.
        prune_on: ``"fit_end"`` (default; or inside ``fit`` with ``recovery_epochs``/``recovery_steps``) or
            ``"fit_start"``: prune the weights ``fit`` starts with (a trained model, or a ``ckpt_path`` resume),
            with statistics from one validation pass, so that the whole ``fit`` trains the smaller model.
        distill_weight: ``> 0``: while the pruned model trains (recovery), the unpruned model as it was just before
            the prune is the teacher (frozen, eval mode, same device) and the training loss gains
            ``distill_weight × T² × KL(teacher ‖ student)`` of the outputs softened by the temperature ``T``. The
            output distilled is what the outermost module ``training_step`` calls returns (``self(x)``,
            ``self.model(...)``; the last one when it calls several), or its ``distill_output`` field. The teacher
            is saved in every checkpoint of the recovery (a resumed fit distils from it) and released at the end.
        distill_temperature: ``T`` of the distillation (``> 0``).
        distill_output: the field of a structured output to distil (a key or attribute, e.g. ``"logits"``); None:
            the output itself when it is a tensor, else its ``logits``, else its first tensor.
        uniform_widths: the layers of one role keep the same number of neurons and heads in every block (layers whose
            names are equal once block indices are masked, ``model.layers.*.mlp.down_proj``, and in a Hugging Face
            model the layers one config field sets, such as T5's ``d_ff``), so that a config holding one width per
            role describes the pruned model. A pruned Hugging Face model's config is always brought in step with its
            widths where it can state them, so ``model.save_pretrained(dir)`` then reloads with ``from_pretrained``;
            with ``False`` (default) every layer keeps its own width, and :func:`lightning_actprune.save_pretrained`
            writes a form the stock ``from_pretrained`` loads (zero-padded; the same outputs).
        optimizer_state: what the optimizers keep of their state at a prune inside ``fit`` (recovery, ``fit_start``):
            ``"carry"`` (default) slices every per-parameter state like its parameter (Adam's moments and step counts
            go on); ``"reset"`` drops the state of the parameters the prune changed (they start again as a parameter
            the optimizer never stepped), the others keep theirs; ``"fresh"`` drops every parameter's state, as a
            new optimizer would, keeping the param groups, hyper-parameters and learning-rate schedulers.
        prune_residual: also narrow a transformer's residual stream (its embedding width, as Minitron does): the
            channels that LayerNorms (or RMSNorms) normalise, in every layer writing to or reading from the stream,
            the norms and the parameters added to it (``cls_token``, ``pos_embed``, a layer scale), scored with the
            other units by the energy each puts into the layers reading the LayerNorms. Each pruned LayerNorm keeps
            normalising over its original width (``WidthKeptLayerNorm``; an RMSNorm's weight and eps are scaled), so
            removing a channel equals zeroing it.
            Not inside Hugging Face models (their configs derive head sizes from the hidden size). ``False``
            (default) keeps the stream's width.

    Example::

        trainer = L.Trainer(callbacks=[ActivationPruning(threshold=0.4, monitor="val_acc")])
        trainer.fit(model, datamodule=dm)  # the model is pruned in place at the end
        print(trainer.callbacks[0].result.params_reduction)
    """

    def __post_init__(self) -> None:
        super().__post_init__()  # validates the arguments
        self.result: PruningResult | None = None
        """The last pruning's result (None until one ran)."""
        self.pruned_checkpoint_path: str | None = None
        """Where the last pruned checkpoint was written."""
        self.pruned_at_epoch: int | None = None
        """Lightning's ``current_epoch`` (from 0) in which the model was pruned inside ``fit``, or None."""
        self.pruned_at_step: int | None = None
        """``trainer.global_step`` when the model was pruned inside ``fit``, or None."""
        self._validations = FitValidations(self)
        self._load_hook: RemovableHandle | None = None
        self._teaching = Teaching(self)

    @property
    def settings(self) -> PruningSettings:
        """The arguments, validated (the callback itself: its arguments are frozen attributes)."""
        return self

    @property
    def prunable_layers(self) -> list[PrunableLayer] | None:
        """What the analysis at the start of ``fit`` found prunable (None until then): problems show before training."""
        return self._validations.layers

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # a pruned checkpoint given as `ckpt_path` shrinks the model before its weights are loaded
        self._remove_load_hook()
        self._load_hook = _watch_loading(
            trainer,
            pl_module,
            lambda: self.pruned_checkpoint_path,
            lambda module, checkpoint: self._teaching.restore(trainer, module, checkpoint),
        )
        if stage != "fit":
            return
        self._validations.reset()  # this fit's model is analysed anew
        self.pruned_at_epoch = self.pruned_at_step = None  # a resumed fit gets them back from its checkpoint
        check_fit(self, trainer, pl_module)

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING and not has_compiled_modules(pl_module):
            self._validations.start(pl_module, prune_follows=self._prune_follows(trainer))

    @override
    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int, *_: Any
    ) -> None:
        self._validations.first_batch_done(pl_module)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            self._validations.end(trainer, pl_module)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.prune_on == "fit_start" and not self._pruned_in_fit:
            self._prune_in_fit(trainer, pl_module)
        else:  # a resumed recovery: the teacher came back with the checkpoint
            self._teaching.start(pl_module)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.recovery_steps and not self._pruned_in_fit and trainer.global_step >= self._prune_step(trainer):
            self._prune_in_fit(trainer, pl_module)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.recovery_epochs and not self._pruned_in_fit and self._is_prune_epoch(trainer):
            self._prune_in_fit(trainer, pl_module)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.interrupted:
            return
        if self.trains_after_prune and self._pruned_in_fit:
            self._report_recovered(trainer, pl_module)
            return
        if self.trains_after_prune:
            when = (
                "epoch (`max_epochs - recovery_epochs`)"
                if self.recovery_epochs
                else "step (`max_steps - recovery_steps`)"
            )
            rank_zero_warn(
                f"ActivationPruning: `fit` ended before the prune {when}; the model is pruned now, at the end of fit,"
                " with no recovery epochs or steps."
            )
        result = self._prune(trainer, pl_module, in_fit=False)
        if result is not None and result.pruned:
            _record_pruning(pl_module, result.plan)  # the module remembers its plan: every checkpoint carries it
            keep_configs_in_step(pl_module, self.uniform_widths)
        self._finish(trainer, pl_module, result)

    def _prune(self, trainer: pl.Trainer, pl_module: pl.LightningModule, in_fit: bool) -> PruningResult | None:
        recorded = self._validations.recorded(trainer, pl_module, in_fit)
        layers = self._validations.layers
        pipeline = PruningPipeline(self, trainer, pl_module, in_fit=in_fit, recorded=recorded, layers=layers)
        return run_guarded(self, trainer, pl_module, pipeline.run)

    def _prune_in_fit(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Prune now; the rest of ``fit`` trains the smaller model with the same optimizers (and the teacher)."""
        self._teaching.prepare(trainer, pl_module, self._validations.called)  # the model before the prune
        result = self._prune(trainer, pl_module, in_fit=True)
        self.pruned_at_epoch, self.pruned_at_step = trainer.current_epoch, trainer.global_step
        if result is None:  # failed (and warned) or nothing prunable: training goes on with the unpruned model
            return
        self.result = result
        if not result.pruned:
            return
        _record_pruning(pl_module, result.plan)  # every checkpoint from now on carries the plan
        keep_configs_in_step(pl_module, self.uniform_widths)
        self._teaching.start(pl_module)
        rewrap_after_pruning(trainer, pl_module)  # DDP: the wrapper must reduce the new parameters' gradients
        for callback in trainer.early_stopping_callbacks:  # a new, smaller model: its patience starts afresh
            compat.restart_early_stopping(callback)
        if self.recovery_epochs:
            when = f"after epoch {trainer.current_epoch + 1} of {trainer.max_epochs}; the last"
            when += f" {self.recovery_epochs} epoch(s) train"
        elif self.recovery_steps:
            when = f"at step {trainer.global_step} of {trainer.max_steps}; the last {self.recovery_steps} step(s) train"
        else:
            when = "at the start of fit; the whole fit trains"
        rank_zero_info(f"ActivationPruning: pruned {when} the smaller model.")

    def _report_recovered(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """At the end of a ``fit`` that pruned inside: the metrics after the recovery epochs, then the report."""
        self._teaching.stop()
        result = self.result
        if result is not None and result.pruned:  # else the prune failed (and warned) or found nothing
            with trainer_state_kept(trainer):
                recovered = validate(trainer, pl_module)
            result = dataclasses.replace(result, metrics_recovered=recovered)
        self._finish(trainer, pl_module, result)

    def _finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule, result: PruningResult | None) -> None:
        if result is not None:
            self.result = result
            self.pruned_checkpoint_path = publish(trainer, pl_module, result, self) or self.pruned_checkpoint_path

    @property
    def _pruned_in_fit(self) -> bool:
        return self.pruned_at_step is not None or self.pruned_at_epoch is not None

    def _is_prune_epoch(self, trainer: pl.Trainer) -> bool:
        return trainer.current_epoch == (trainer.max_epochs or 0) - self.recovery_epochs - 1

    def _prune_step(self, trainer: pl.Trainer) -> int:
        return trainer.max_steps - self.recovery_steps

    def _prune_follows(self, trainer: pl.Trainer) -> bool:
        """Whether a prune comes right after this epoch's validation, with no training step in between."""
        epochs = trainer.max_epochs
        if epochs is None or epochs < 0 or trainer.sanity_checking or self.prune_best:
            return False  # unknown last epoch; no epoch yet; the best checkpoint is pruned, not these weights
        if self.recovery_steps or self.prune_on == "fit_start" or self._pruned_in_fit:
            return False  # the prune is not at an epoch's end, or is done
        return trainer.current_epoch == epochs - self.recovery_epochs - 1

    @property
    @override
    def state_key(self) -> str:
        """The key of this instance's state in a checkpoint: instances that prune different layers keep theirs apart.

        λ is not part of it, so a run resumed with another λ still finds its state (and reports the change).
        """
        return self._generate_state_key(layers=self.layers, exclude=self.exclude, statistic=self.effective_statistic)

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        _add_plan(checkpoint, trainer, pl_module)
        self._teaching.save(checkpoint)  # a resumed fit distils from the same teacher

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        legacy = _legacy_state(self, trainer, checkpoint)
        if legacy is not None:
            self.load_state_dict(legacy)

    @override
    def state_dict(self) -> dict[str, Any]:
        """Every constructor argument and the last result, as plain values."""
        return {
            **self.to_state(),
            "plan": self.result.plan.to_dict() if self.result is not None else None,
            "result": _result_state(self.result),
            "pruned_checkpoint_path": self.pruned_checkpoint_path,
            "pruned_at_epoch": self.pruned_at_epoch,
            "pruned_at_step": self.pruned_at_step,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the last result; the settings stay as constructed (a difference is reported)."""
        result = _result_from_state(state_dict.get("plan"), state_dict.get("result"))
        if result is not None:
            self.result = result
        self.pruned_checkpoint_path = state_dict.get("pruned_checkpoint_path", self.pruned_checkpoint_path)
        self.pruned_at_epoch = state_dict.get("pruned_at_epoch", self.pruned_at_epoch)
        self.pruned_at_step = state_dict.get("pruned_at_step", self.pruned_at_step)
        current = self.to_state()
        changed = [f"{k}={v!r} (now {current[k]!r})" for k, v in state_dict.items() if k in current and v != current[k]]
        if changed:
            rank_zero_info(f"ActivationPruning: the checkpoint was written with {', '.join(changed)}.")

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_load_hook()
        self._validations.close()
        self._teaching.stop()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.teardown(trainer, pl_module, "exception")

    def _remove_load_hook(self) -> None:
        if self._load_hook is not None:
            self._load_hook.remove()
            self._load_hook = None
