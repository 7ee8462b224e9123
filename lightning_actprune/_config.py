"""The callback's arguments: validated once, stored in one frozen object, serialisable as plain values."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from lightning_actprune._errors import ActivationPruningError
from lightning_actprune._scoring import NeuronScorer, as_scorer
from lightning_actprune._statistics import STATISTICS

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


@dataclass(frozen=True)
class PruningSettings:
    """Every argument of :class:`~lightning_actprune.ActivationPruning`, checked and normalised at construction.

    Each bad value raises an :class:`ActivationPruningError` that names the argument, what is allowed and what came
    in. The fields mean what the callback's arguments of the same names mean; ``scorer`` and ``normalized`` are
    derived: the criterion λ is compared against (the issue-11 rule for ``statistic=None``) and whether scores are
    standardised per layer.
    """

    threshold: float | None = None
    statistic: str | NeuronScorer | None = None
    monitor: str | None = None
    mode: str = "max"
    sweep: list[float] | None = None
    max_metric_drop: float | None = None
    target_params_reduction: float | None = None
    compensate: bool = False
    normalize: bool | None = None
    layers: list[str] | None = None
    exclude: list[str] | None = None
    min_neurons: int = 1
    prune_best: bool = False
    on_error: str = "raise"
    pruned_checkpoint: str | None = "pruned.ckpt"
    recalibration_batches: int = 20
    recovery_epochs: int = 0
    prune_heads: bool = True
    uniform_widths: bool = False
    scorer: NeuronScorer = field(init=False, repr=False)
    normalized: bool = field(init=False, repr=False)

    def __post_init__(self) -> None:
        (
            threshold, statistic, monitor, mode, sweep, max_metric_drop, target_params_reduction, compensate,
            normalize, layers, exclude, min_neurons, prune_best, on_error, pruned_checkpoint, recalibration_batches,
            recovery_epochs, prune_heads, uniform_widths,
        ) = (getattr(self, f.name) for f in dataclasses.fields(self) if f.init)  # fmt: skip
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
        if not isinstance(prune_heads, bool):
            raise ActivationPruningError(f"`prune_heads` must be True or False; got {prune_heads!r}.")
        if not isinstance(uniform_widths, bool):
            raise ActivationPruningError(f"`uniform_widths` must be True or False; got {uniform_widths!r}.")
        if not isinstance(prune_best, bool):
            raise ActivationPruningError(f"`prune_best` must be True or False; got {prune_best!r}.")
        if on_error not in _ON_ERROR:
            raise ActivationPruningError(f"`on_error` can be one of {', '.join(_ON_ERROR)}; got {on_error!r}.")
        if pruned_checkpoint is not None and (not isinstance(pruned_checkpoint, str) or not pruned_checkpoint):
            raise ActivationPruningError(f"`pruned_checkpoint` must be a file path or None; got {pruned_checkpoint!r}.")
        normalised = {
            "threshold": float(threshold) if threshold is not None else None,
            "sweep": sorted({float(v) for v in sweep}) if sweep is not None else None,
            "max_metric_drop": float(max_metric_drop) if max_metric_drop is not None else None,
            "target_params_reduction": float(target_params_reduction) if target_params_reduction is not None else None,
            "layers": list(layers) if layers is not None else None,
            "exclude": list(exclude or []),
            "scorer": scorer,
            "normalized": normalized,
        }
        for name, value in normalised.items():
            object.__setattr__(self, name, value)

    @property
    def effective_statistic(self) -> str:
        """The name of the criterion λ is compared against: ``statistic``, or the one the rule picks for ``None``."""
        return self.scorer.name

    def to_state(self) -> dict[str, Any]:
        """Every argument as a plain value (a scorer by its name): what a checkpoint stores."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        return {name: value.name if isinstance(value, NeuronScorer) else value for name, value in values.items()}
