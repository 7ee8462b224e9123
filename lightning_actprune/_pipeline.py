"""One prune, in the order of the mission: statistics → layers → choose λ → apply → result.

:class:`PruningPipeline` takes everything it needs at construction (the settings, the Trainer and its module,
whether ``fit`` goes on afterwards, the fit's own recorded validation and the layers found before training) and its
methods run in pipeline order. :func:`run_guarded` is the transaction around it: whatever fails, the trained model
is left exactly as it was, and ``on_error`` decides between an error and a warning.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_actprune._analysis import ExampleInputs, find_prunable_layers, layer_inventory
from lightning_actprune._config import PruningSettings
from lightning_actprune._distributed import check_same_on_every_rank, is_distributed, reduced_moments, synced_metrics
from lightning_actprune._errors import ActivationPruningError
from lightning_actprune._huggingface import uniform_ties
from lightning_actprune._optimizer import OptimizerSnapshot, apply_plan_with_optimizers
from lightning_actprune._recalibration import batchnorm_layers
from lightning_actprune._scoring import recorded_moments
from lightning_actprune._statistics import ActivationMoments, ActivationRecorder
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
    keeps_parameter_copies,
    recompile,
    trainer_state_kept,
    uncompile,
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

Table = dict[float, tuple[SweepRow, PruningPlan]]
"""The rows of a table by λ, each with the plan it was measured with."""


class RecordedPass(NamedTuple):
    """A validation of ``fit`` recorded for the prune that follows it: its statistics, metrics and weights."""

    recorder: ActivationRecorder
    metrics: dict[str, float]
    weights: tuple[int, tuple[tuple[int, int, int], ...]]

    def still_valid(self, trainer: pl.Trainer, pl_module: pl.LightningModule, in_fit: bool) -> bool:
        """Whether the statistics are those of the model as it is now.

        Inside ``fit`` every pass runs the fit's own validation loop; after it, a distributed pass covers every
        sample exactly once, which the fit's padded shards do not, and callbacks that keep averaged weights may
        have swapped them in: then the statistics are gathered anew.
        """
        if self.weights != weights_fingerprint(trainer, pl_module):
            return False
        averaging = any(map(keeps_parameter_copies, getattr(trainer, "callbacks", [])))
        return in_fit or not (is_distributed(trainer) or averaging)


def analyse(
    settings: PruningSettings, pl_module: pl.LightningModule, inputs: ExampleInputs
) -> tuple[list[PrunableLayer], int]:
    """Which layers can be pruned, and how many warnings said which cannot and why (issued once, on rank zero)."""
    with warnings.catch_warnings(record=True) as skipped:
        warnings.simplefilter("always")
        layers = find_prunable_layers(
            pl_module,
            inputs,
            settings.layers,
            settings.exclude or [],
            prune_heads=settings.prune_heads,
            gqa_unit=settings.gqa_unit,
            prune_residual=settings.prune_residual,
        )
    for warning in skipped:
        rank_zero_warn(str(warning.message))
    return layers, len(skipped)


def statistics_recorder(settings: PruningSettings, pl_module: pl.LightningModule) -> ActivationRecorder:
    """A recorder of what the prune reads: the statistic's moments, the RMS of the tie-break, the means to compensate.

    Each moment left out saves a pass over every measured layer's inputs per validation batch.
    """
    return ActivationRecorder(pl_module, moments=recorded_moments(settings.scorer, settings.compensate))


def example_inputs(pl_module: pl.LightningModule, recorder: ActivationRecorder) -> ExampleInputs:
    """What the analysis traces with: the module's ``example_input_array``, else the first batch it recorded."""
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


def nothing_prunable(pl_module: pl.LightningModule) -> str:
    """What the model holds, for the message that says nothing in it is prunable."""
    return (
        f" Found {layer_inventory(pl_module) or 'no layer with parameters'}; none is prunable (only a Linear/Conv"
        " feeding another Linear/Conv is; the warnings above say why)."
    )


class PruningPipeline:
    """Gather statistics, find the layers, choose λ, apply the plan and re-validate: one prune of ``pl_module``.

    Args:
        settings: the callback's arguments.
        trainer: the Trainer, inside or at the end of ``fit``.
        pl_module: its module, as it is now (compiled submodules already unwrapped).
        in_fit: whether ``fit`` goes on after the prune (recovery): the optimizers follow the parameters.
        recorded: the fit's own validation of this very model, when it was recorded: no pass of our own.
        layers: the layers the analysis at the start of ``fit`` found, or None to analyse now.
    """

    def __init__(
        self,
        settings: PruningSettings,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        *,
        in_fit: bool,
        recorded: RecordedPass | None,
        layers: list[PrunableLayer] | None,
    ) -> None:
        self.settings, self.trainer, self.pl_module = settings, trainer, pl_module
        self.in_fit, self.recorded, self.layers = in_fit, recorded, layers
        self.passes = ValidationPasses(trainer, pl_module, in_fit, settings.recalibration_batches)

    def run(self) -> PruningResult | None:
        """The result of the prune; None when nothing in the model is prunable (the model is unchanged)."""
        recorder, metrics_before = self.statistics()
        moments = reduced_moments(self.trainer, recorder)  # summed over every rank's shard, the same on every rank
        recorder.check_finite(moments)
        layers = self.prunable_layers(recorder)
        if not layers:
            return None
        evaluator = self.evaluator(layers, moments)
        table = self.table(evaluator)
        plan, chosen_by = self.choose(evaluator, metrics_before, table)
        return self.result(evaluator, plan, chosen_by, metrics_before, table)

    def statistics(self) -> tuple[ActivationRecorder, dict[str, float]]:
        """The activation statistics and the "before" metrics: from the fit's last validation, or a pass of ours."""
        if self.recorded is not None:
            recorder, metrics = self.recorded.recorder, synced_metrics(self.trainer, self.recorded.metrics)
        else:
            with statistics_recorder(self.settings, self.pl_module) as recorder:
                metrics = self.passes.metrics()
        monitor = self.settings.monitor
        if monitor is not None and monitor not in metrics:
            logged = ", ".join(metrics) or "(none)"
            raise ActivationPruningError(f"`monitor={monitor!r}` is not a validation metric; logged: {logged}.")
        if getattr(self.trainer, "fast_dev_run", False):  # set by the Trainer at init, not declared on the class
            rank_zero_info("ActivationPruning: `fast_dev_run` validates one batch; the statistics come from it alone.")
        return recorder, metrics

    def prunable_layers(self, recorder: ActivationRecorder) -> list[PrunableLayer]:
        """The layers found at the start of ``fit``, or found now; saying so when there are none."""
        name = type(self.pl_module).__name__
        if self.layers is not None:  # the analysis at the start of fit already said what it found
            if not self.layers:
                rank_zero_info(f"ActivationPruning: {name} has no prunable layer; nothing changed.")
            return self.layers
        layers, _ = analyse(self.settings, self.pl_module, example_inputs(self.pl_module, recorder))
        if not layers:
            rank_zero_warn(
                f"ActivationPruning: {name} has no prunable layer; nothing changed." + nothing_prunable(self.pl_module)
            )
        return layers

    def evaluator(self, layers: list[PrunableLayer], moments: dict[str, ActivationMoments]) -> ThresholdEvaluator:
        """Plans and measures any λ from the statistics, restoring the model between them."""
        return ThresholdEvaluator(
            self.pl_module,
            layers,
            moments,
            self.settings.scorer,
            self.settings.min_neurons,
            validate=self.passes.metrics_recalibrated,
            compensate=self.settings.compensate,
            normalize=self.settings.normalized,
            tied=uniform_ties(self.pl_module, layers) if self.settings.uniform_widths else (),
        )

    def table(self, evaluator: ThresholdEvaluator) -> Table:
        """The rows of ``sweep``, each validated, with its plan, by λ.

        With ``threshold`` the table lists λ values; when the callback picks λ it lists parameter reductions, each
        planned like ``target_params_reduction`` (the same criterion as the λ the callback applies).
        """
        values = self.settings.sweep or []
        by_reduction = self.settings.threshold is None
        table: Table = {}
        for index, value in enumerate(values, start=1):
            if self.trainer.progress_bar_callback is not None:
                what = f"-{100 * value:g}% of the parameters" if by_reduction else f"λ={value:g}"
                rank_zero_info(f"ActivationPruning sweep: {what} ({index}/{len(values)})")
            if not by_reduction:
                plan = evaluator.plan(value)
                table[plan.threshold] = (evaluator.evaluate(plan), plan)
                continue
            choice = plan_for_reduction(evaluator, value)
            if choice.plan is None:
                rank_zero_warn(f"ActivationPruning: the table leaves out -{100 * value:g}%: {choice.note}")
                continue
            row = dataclasses.replace(evaluator.evaluate(choice.plan), target=value)
            table[row.threshold] = (row, choice.plan)
        return table

    def choose(
        self, evaluator: ThresholdEvaluator, metrics_before: dict[str, float], table: Table
    ) -> tuple[PruningPlan | None, str]:
        """The plan to apply and how it was chosen; ``None`` when no λ qualifies (the model stays as it is)."""
        if self.settings.threshold is not None:
            return evaluator.plan(self.settings.threshold), "threshold"
        if self.settings.target_params_reduction is not None:
            return self._plan_for_target(evaluator, self.settings.target_params_reduction), "target_params_reduction"
        return self._plan_within_drop(evaluator, metrics_before, table), "max_metric_drop"

    def _plan_for_target(self, evaluator: ThresholdEvaluator, target: float) -> PruningPlan | None:
        choice = plan_for_reduction(evaluator, target)
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
        return choice.plan

    def _plan_within_drop(
        self, evaluator: ThresholdEvaluator, metrics_before: dict[str, float], table: Table
    ) -> PruningPlan | None:
        monitor, max_drop = str(self.settings.monitor), float(self.settings.max_metric_drop or 0.0)
        before, mode = metrics_before[monitor], self.settings.mode
        if not table:  # no table asked for: bisection over the distinct scores, its rows join the table
            searched = search_within_drop(evaluator, monitor, before, max_drop, mode)
            table.update({row.threshold: (row, evaluator.plan(row.threshold)) for row in searched})
        rows = [row for row, _ in table.values()]
        chosen = choose_within_drop(rows, monitor, before, max_drop, mode)
        if chosen is not None:
            return table[chosen.threshold][1]
        smallest = min(metric_drop(before, row.metrics[monitor], mode) for row in rows)
        ordered = sorted(rows, key=lambda row: row.threshold)
        if ordered[0].target is None:
            evaluated = f"the λ evaluated ({', '.join(f'{r.threshold:g}' for r in ordered)})"
        else:
            reductions = ", ".join(f"-{100 * (r.target or 0):g}%" for r in ordered)
            evaluated = f"the parameter reductions evaluated ({reductions})"
        rank_zero_warn(
            f"ActivationPruning: no λ keeps `{monitor}` within `max_metric_drop={max_drop:g}`: the smallest drop"
            f" among {evaluated} is {smallest:.4g}; the trained model is left unpruned (the table is still written)."
        )
        return None

    def result(
        self,
        evaluator: ThresholdEvaluator,
        plan: PruningPlan | None,
        chosen_by: str,
        metrics_before: dict[str, float],
        table: Table,
    ) -> PruningResult:
        """Apply ``plan`` (when one qualified) and say what changed."""
        params_before, size_before = count_parameters(self.pl_module), model_size_mb(self.pl_module)
        rows = {threshold: row for threshold, (row, _) in table.items()}
        metrics_pruned: dict[str, float] = {}
        if plan is None:  # no λ qualified: the model stays as it is, the table is still reported
            plan, metrics_after = dataclasses.replace(evaluator.plan_removing(0), threshold=math.nan), metrics_before
            chosen_by = NONE_CHOSEN
        else:
            metrics_after, metrics_pruned = self.apply(plan, rows, params_before)
        return PruningResult(
            plan=plan,
            params_before=params_before,
            params_after=count_parameters(self.pl_module),
            size_mb_before=size_before,
            size_mb_after=model_size_mb(self.pl_module),
            metrics_before=metrics_before,
            metrics_after=metrics_after,
            sweep=tuple(rows[t] for t in sorted(rows)),
            chosen_by=chosen_by,
            metrics_pruned=metrics_pruned,
        )

    def apply(
        self, plan: PruningPlan, rows: dict[float, SweepRow], params_before: int
    ) -> tuple[dict[str, float], dict[str, float]]:
        """Cut the model to ``plan``; its metrics after recalibration and, if recalibrated, right after the cut.

        The table gets the applied λ's row when it lacks it. Inside ``fit`` the same optimizers follow the
        parameters to their new shapes; if anything fails, model and optimizers are put back exactly.
        """
        self._warn_at_floor(plan)
        neurons = {layer.name: len(layer.kept) for layer in plan.layers}
        validated = rows.get(plan.threshold)
        validated = validated if validated is not None and dict(validated.neurons) == neurons else None
        check_same_on_every_rank(self.trainer, plan.to_dict(), "the pruning plans")  # before any rank cuts
        optimizers = OptimizerSnapshot(self.trainer.optimizers if self.in_fit else [])
        try:
            with restoring(self.pl_module, [*plan.touched_modules, *batchnorm_layers(self.pl_module)]):
                apply_plan_with_optimizers(self.pl_module, plan, optimizers.optimizers, self.settings.optimizer_state)
                metrics_after, metrics_pruned = self.passes.metrics_pruned(validated.metrics if validated else None)
        except BaseException:
            optimizers.restore()
            raise
        if rows and validated is None:
            params_after, size_after = count_parameters(self.pl_module), model_size_mb(self.pl_module)
            target = self.settings.target_params_reduction  # a table for a target lists reductions
            row = SweepRow(plan.threshold, params_after, params_after / params_before, size_after, neurons)
            rows[plan.threshold] = dataclasses.replace(row, metrics=metrics_after, target=target)
        return metrics_after, metrics_pruned

    def _warn_at_floor(self, plan: PruningPlan) -> None:
        floor = self.settings.min_neurons
        at_floor = [layer.name for layer in plan.layers if len(layer.kept) == floor < layer.neurons]
        if at_floor:
            rank_zero_warn(
                f"ActivationPruning: λ={plan.threshold:g} leaves {', '.join(at_floor)} with only"
                f" `min_neurons={floor}` neuron(s), the most active; a lower λ keeps more."
            )


def run_guarded(
    settings: PruningSettings,
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    prune: Callable[[], PruningResult | None],
) -> PruningResult | None:
    """``prune()`` as a transaction: on any failure the trained model is exactly as it was; ``on_error`` decides.

    With ``prune_best`` the best checkpoint's weights are pruned instead of the last ones (the last ones come back on
    failure); ``torch.compile``'d submodules are pruned as the eager modules they wrap and left uncompiled. The
    Trainer's state, loggers and data sources are left as ``fit`` left them.
    """
    try:
        with trainer_state_kept(trainer):
            return _with_best_weights(settings, trainer, pl_module, lambda: _uncompiled(pl_module, prune))
    except ActivationPruningError as error:
        if settings.on_error == "raise":
            raise
        rank_zero_warn(f"Activation pruning failed, the trained model is unchanged: {error}")
    except Exception as error:
        if settings.on_error == "raise":
            raise ActivationPruningError(
                f"activation pruning failed, the trained model is unchanged: {type(error).__name__}: {error}"
            ) from error
        rank_zero_warn(f"Activation pruning failed, the trained model is unchanged: {error!r}")
    return None


def _with_best_weights(
    settings: PruningSettings, trainer: pl.Trainer, pl_module: pl.LightningModule, prune: Callable[[], Any]
) -> Any:
    if not settings.prune_best:
        return prune()
    path = getattr(trainer.checkpoint_callback, "best_model_path", "")
    if not path:
        raise ActivationPruningError(
            "`prune_best=True` but the ModelCheckpoint saved no best checkpoint (does it `monitor` a metric?)."
        )
    # loading the best checkpoint overwrites the last weights in place: keep them to restore on failure
    last_weights = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
    try:  # loaded before any `torch.compile` wrapper is removed: the keys were saved with it
        pl_module.load_state_dict(trainer.strategy.load_checkpoint(str(path))["state_dict"])
        return prune()
    except BaseException:
        pl_module.load_state_dict(last_weights)
        raise


def _uncompiled(pl_module: pl.LightningModule, prune: Callable[[], PruningResult | None]) -> PruningResult | None:
    compiled = uncompile(pl_module)
    try:
        result = prune()
    except BaseException:
        recompile(compiled)
        raise
    if result is None:  # nothing pruned: the model goes back as it was, compiled
        recompile(compiled)
    elif compiled:
        rank_zero_warn(
            f"ActivationPruning: {', '.join(name for _, name, _ in compiled)} was compiled with `torch.compile`;"
            " it is pruned as the eager module it wraps and left uncompiled: compile the pruned model again."
        )
    return result
