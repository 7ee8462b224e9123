"""The callback's arguments, declared once: a frozen dataclass that validates them and serialises them as plain values.

:class:`~lightning_actprune.ActivationPruning` inherits it, so its constructor (what LightningCLI reads) is this
dataclass's and its arguments are typed attributes that cannot be reassigned after validation.
"""

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from lightning_actprune._errors import ActivationPruningError
from lightning_actprune._heads import GQA_UNITS
from lightning_actprune._optimizer import OPTIMIZER_STATES
from lightning_actprune._scoring import DEFAULT_CRITERION, NeuronScorer, as_scorer
from lightning_actprune._statistics import STATISTICS, Statistic

PruneOn = Literal["fit_end", "fit_start"]
_PRUNE_ON = ("fit_end", "fit_start")
OnError = Literal["raise", "warn"]
_ON_ERROR = ("raise", "warn")
Mode = Literal["max", "min"]
_MODES = ("max", "min")
GqaUnit = Literal["query_heads", "kv_groups"]
OptimizerState = Literal["carry", "reset", "fresh"]


def _resolve_statistic(statistic: object, user_lambda: bool, normalize: object = None) -> object:
    """The rule for ``statistic=None``: a λ the user writes is a mean activation; one the callback picks is not.

    A λ the callback picks compares scores on one scale: each layer's fluctuation over its mean, and for the channels
    BatchNorm normalises their RMS over one mean for all of them (:class:`DefaultCriterion`); with
    ``normalize=False``, raw fluctuation alone.
    ``sweep`` does not change it: a table for a target or a budget lists parameter reductions, not λ values.
    """
    if statistic is not None:
        return statistic
    if user_lambda:
        return "mean"
    return "fluctuation" if normalize is False else DEFAULT_CRITERION


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


def _check_sweep(sweep: object, thresholds: bool, signed: bool, statistic: str) -> None:
    """With ``threshold``, ``sweep`` lists λ values; when the callback picks λ, it lists parameter reductions."""
    what = "thresholds (λ values)" if thresholds else "parameter reductions in (0, 1)"
    if not isinstance(sweep, (list, tuple)) or not sweep:
        raise ActivationPruningError(f"`sweep` must be a non-empty list of {what}; got {sweep!r}.")
    for value in sweep:
        if thresholds:
            _check_number("sweep", value, minimum=-math.inf if signed else 0, why=_never_negative(statistic))
            continue
        _check_number("sweep", value, minimum=0)
        if not 0 < value < 1:
            raise ActivationPruningError(
                f"`sweep` lists parameter reductions in (0, 1) when the callback picks λ (`target_params_reduction`"
                f" or `max_metric_drop`; with `threshold` it lists λ values); got {value!r} in {list(sweep)!r}."
            )


@dataclass(frozen=True, eq=False)
class PruningSettings:
    """Every argument of :class:`~lightning_actprune.ActivationPruning`, checked and normalised at construction.

    Each bad value raises an :class:`ActivationPruningError` that names the argument, what is allowed and what came
    in. The fields mean what the callback's arguments of the same names mean (see its docstring); ``scorer`` and
    ``normalized`` are derived: the criterion λ is compared against (the rule for ``statistic=None``) and whether
    scores are standardised per layer. Identity, not the values, makes two instances equal (``eq=False``): two
    callbacks with the same arguments are still two callbacks.
    """

    threshold: float | None = None
    statistic: Statistic | NeuronScorer | None = None
    monitor: str | None = None
    mode: Mode = "max"
    sweep: list[float] | None = None
    max_metric_drop: float | None = None
    target_params_reduction: float | None = None
    compensate: bool = False
    normalize: bool | None = None
    layers: list[str] | None = None
    exclude: list[str] | None = None
    min_neurons: int = 1
    prune_best: bool = False
    on_error: OnError = "raise"
    pruned_checkpoint: str | None = "pruned.ckpt"
    recalibration_batches: int = 20
    recovery_epochs: int = 0
    prune_heads: bool = True
    recovery_steps: int = 0
    prune_on: PruneOn = "fit_end"
    distill_weight: float = 0.0
    distill_temperature: float = 2.0
    distill_output: str | None = None
    gqa_unit: GqaUnit = "query_heads"
    uniform_widths: bool = False
    optimizer_state: OptimizerState = "carry"
    prune_residual: bool = False
    scorer: NeuronScorer = field(init=False, repr=False)
    normalized: bool = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._check_choice_of_threshold()
        scorer = as_scorer(_resolve_statistic(self.statistic, self.threshold is not None, self.normalize))
        # `normalize=None`: standardise the statistic whose raw scale differs between layers (fluctuation)
        normalized = scorer.name == "fluctuation" if self.normalize is None else self.normalize
        # standardised scores and the mean of GELU/SiLU/tanh outputs can be negative; the other statistics cannot
        self._check_thresholds(signed=normalized or scorer.signed, statistic=scorer.name)
        self._check_options()
        normalised = {
            "threshold": float(self.threshold) if self.threshold is not None else None,
            "sweep": sorted({float(v) for v in self.sweep}) if self.sweep is not None else None,
            "max_metric_drop": float(self.max_metric_drop) if self.max_metric_drop is not None else None,
            "target_params_reduction": _float_or_none(self.target_params_reduction),
            "layers": list(self.layers) if self.layers is not None else None,
            "exclude": list(self.exclude or []),
            "scorer": scorer,
            "normalized": normalized,
        }
        for name, value in normalised.items():
            object.__setattr__(self, name, value)

    def _check_choice_of_threshold(self) -> None:
        choices = {
            "threshold": self.threshold,
            "max_metric_drop": self.max_metric_drop,
            "target_params_reduction": self.target_params_reduction,
        }
        if sum(v is not None for v in choices.values()) != 1:
            given = ", ".join(f"{k}={v!r}" for k, v in choices.items())
            raise ActivationPruningError(
                f"set exactly one of `threshold`, `max_metric_drop`, `target_params_reduction`; got {given}."
            )
        if self.max_metric_drop is not None:
            _check_number("max_metric_drop", self.max_metric_drop, minimum=0)
            if self.monitor is None:
                raise ActivationPruningError("`max_metric_drop` needs `monitor`: the metric whose drop is bounded.")
        target = self.target_params_reduction
        if target is not None:
            _check_number("target_params_reduction", target, minimum=0)
            if not 0 < target < 1:
                raise ActivationPruningError(f"`target_params_reduction` must be in (0, 1); got {target!r}.")

    def _check_thresholds(self, signed: bool, statistic: str) -> None:
        if self.threshold is not None:
            _check_number(
                "threshold", self.threshold, minimum=-math.inf if signed else 0, why=_never_negative(statistic)
            )
        if self.sweep is not None:
            _check_sweep(self.sweep, self.threshold is not None, signed, statistic)

    def _check_options(self) -> None:
        if self.mode not in _MODES:
            raise ActivationPruningError(f"`mode` can be one of {', '.join(_MODES)}; got {self.mode!r}.")
        if self.monitor is not None and not isinstance(self.monitor, str):
            raise ActivationPruningError(f"`monitor` must be a metric name or None; got {self.monitor!r}.")
        _check_patterns("layers", self.layers)
        _check_patterns("exclude", self.exclude)
        _check_number("min_neurons", self.min_neurons, minimum=1, integer=True)
        _check_number("recalibration_batches", self.recalibration_batches, minimum=0, integer=True)
        self._check_recovery()
        for name in ("compensate", "prune_heads", "prune_best", "uniform_widths", "prune_residual"):
            if not isinstance(getattr(self, name), bool):
                raise ActivationPruningError(f"`{name}` must be True or False; got {getattr(self, name)!r}.")
        if self.normalize is not None and not isinstance(self.normalize, bool):
            raise ActivationPruningError(
                f"`normalize` must be True, False or None (automatic); got {self.normalize!r}."
            )
        if self.optimizer_state not in OPTIMIZER_STATES:
            raise ActivationPruningError(
                f"`optimizer_state` can be one of {', '.join(OPTIMIZER_STATES)}; got {self.optimizer_state!r}."
            )
        if self.gqa_unit not in GQA_UNITS:
            raise ActivationPruningError(f"`gqa_unit` can be one of {', '.join(GQA_UNITS)}; got {self.gqa_unit!r}.")
        if self.on_error not in _ON_ERROR:
            raise ActivationPruningError(f"`on_error` can be one of {', '.join(_ON_ERROR)}; got {self.on_error!r}.")
        path = self.pruned_checkpoint
        if path is not None and (not isinstance(path, str) or not path):
            raise ActivationPruningError(f"`pruned_checkpoint` must be a file path or None; got {path!r}.")

    def _check_recovery(self) -> None:
        _check_number("recovery_epochs", self.recovery_epochs, minimum=0, integer=True)
        _check_number("recovery_steps", self.recovery_steps, minimum=0, integer=True)
        if self.prune_on not in _PRUNE_ON:
            raise ActivationPruningError(f"`prune_on` can be one of {', '.join(_PRUNE_ON)}; got {self.prune_on!r}.")
        points = {
            "recovery_epochs": self.recovery_epochs,
            "recovery_steps": self.recovery_steps,
            "prune_on": self.prune_on if self.prune_on == "fit_start" else None,
        }
        chosen = {name: value for name, value in points.items() if value}
        if len(chosen) > 1:
            given = ", ".join(f"{name}={value!r}" for name, value in chosen.items())
            raise ActivationPruningError(
                "set at most one of `recovery_epochs`, `recovery_steps` and `prune_on: fit_start` (each says when the"
                f" prune happens and how long the smaller model trains); got {given}."
            )
        if chosen and self.prune_best:
            raise ActivationPruningError(
                f"`prune_best=True` cannot be combined with `{next(iter(chosen))}`: the best weights were trained with"
                " another optimizer state than the one training goes on with; prune the last weights instead."
            )
        _check_number("distill_weight", self.distill_weight, minimum=0)
        _check_number("distill_temperature", self.distill_temperature, minimum=0)
        if self.distill_temperature <= 0:
            raise ActivationPruningError(f"`distill_temperature` must be > 0; got {self.distill_temperature!r}.")
        if self.distill_weight and not chosen:
            raise ActivationPruningError(
                f"`distill_weight={self.distill_weight!r}` distils while the pruned model trains: it needs"
                " `recovery_epochs`, `recovery_steps` or `prune_on: fit_start`."
            )
        if self.distill_output is not None and (not isinstance(self.distill_output, str) or not self.distill_output):
            raise ActivationPruningError(
                f"`distill_output` must be the name of an output field (e.g. 'logits') or None; got"
                f" {self.distill_output!r}."
            )

    @property
    def trains_after_prune(self) -> bool:
        """Whether the prune happens inside ``fit`` and the smaller model trains afterwards (recovery)."""
        return bool(self.recovery_epochs or self.recovery_steps or self.prune_on == "fit_start")

    @property
    def effective_statistic(self) -> str:
        """The name of the criterion λ is compared against: ``statistic``, or the one the rule picks for ``None``."""
        return self.scorer.name

    def to_state(self) -> dict[str, Any]:
        """Every argument as a plain value (a scorer by its name): what a checkpoint stores."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(PruningSettings) if f.init}
        return {name: value.name if isinstance(value, NeuronScorer) else value for name, value in values.items()}


def _float_or_none(value: float | None) -> float | None:
    return float(value) if value is not None else None
