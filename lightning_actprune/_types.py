"""The plain-data types every step shares: which neurons a layer has, which go (the plan), what changed (the result).

Core modules (statistics, planning, surgery, search) and presentation (reports, loggers, checkpoints) all build on
these, and on the wording of λ with its unit (:func:`describe_threshold`); nothing here imports any other module of
the package.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

from torch import nn

_UNITS = {
    "mean": "mean activation",
    "mean_abs": "mean |activation|",
    "rms": "RMS activation",
    "std": "activation std",
    "nonzero_fraction": "fraction of non-zero activations",
    "fluctuation": "fluctuation, squared output units",
}


def register_unit(statistic: str, unit: str) -> None:
    """Name the unit of a user's :class:`NeuronScorer` for :func:`describe_threshold` (its class declares it)."""
    _UNITS.setdefault(statistic, unit)


def scale_unit(normalize: bool, scale: str) -> str:
    """What λ is counted in, before the statistic's name: ``""`` for raw scores.

    Example:
        >>> scale_unit(True, "mean") + "fluctuation"
        '× the layer mean of fluctuation'
    """
    if not normalize:
        return ""
    return "× the layer mean of " if scale == "mean" else "std of standardised "


def describe_threshold(threshold: float, statistic: str, normalize: bool, scale: str = "std") -> str:
    """λ with its statistic and unit, for people: ``"λ = 0.2 (mean activation)"``.

    Example:
        >>> describe_threshold(-0.7612, "fluctuation", normalize=True)
        'λ = -0.7612 std of standardised fluctuation per layer'
        >>> describe_threshold(0.41, "fluctuation", normalize=True, scale="mean")
        'λ = 0.41 × the layer mean of fluctuation'
    """
    if normalize:
        per_layer = "" if scale == "mean" else " per layer"  # "× the layer mean" already says it
        return f"λ = {threshold:.4g} {scale_unit(normalize, scale)}{statistic}{per_layer}"
    return f"λ = {threshold:.4g} ({_UNITS.get(statistic, statistic)})"


class ModuleSlice(NamedTuple):
    """One module's share of a coupled group: which of its output or input indices carry which neuron.

    Attributes:
        module: the module's name in the model.
        dim: ``"out"`` (the module produces the neurons) or ``"in"`` (it consumes them).
        indices: the module's own channel/feature indices.
        neurons: for each index, the neuron of the group it carries.
    """

    module: str
    dim: Literal["out", "in"]
    indices: tuple[int, ...]
    neurons: tuple[int, ...]


@dataclass(frozen=True)
class PrunableLayer:
    """A group of neurons that are removed together, with every module that holds a slice of them.

    A plain ``Linear → ReLU → Linear`` gives one group per hidden layer; a residual addition ties the channels of
    every layer that writes into it into one group.

    Attributes:
        name: the producing layers' names joined with ``+``.
        neurons: how many neurons the group has.
        producers: the ``Linear``/``Conv`` layers that output these neurons.
        slices: the modules with parameters that shrink when a neuron goes.
        groups: the neurons form this many equal consecutive blocks, and every block keeps the same number of
            neurons (at least one): the channels of a grouped convolution, the query heads of each key/value head.
    """

    name: str
    neurons: int
    producers: tuple[str, ...]
    slices: tuple[ModuleSlice, ...]
    groups: int = 1

    def __post_init__(self) -> None:
        if self.groups < 1 or self.neurons % self.groups:
            raise ValueError(f"{self.name}: {self.neurons} neurons cannot form {self.groups} equal groups")

    def blocks(self) -> list[range]:
        """The neurons of each of the :attr:`groups` blocks that keep equal counts."""
        size = self.neurons // self.groups
        return [range(b * size, (b + 1) * size) for b in range(self.groups)]

    @property
    def consumers(self) -> tuple[ModuleSlice, ...]:
        """The slices of the layers that read these neurons: where the activations are measured."""
        return tuple(s for s in self.slices if s.dim == "in")


@dataclass(frozen=True, repr=False)
class LayerPlan:
    """What happens to one :class:`PrunableLayer`.

    Attributes:
        name: the layer's name.
        neurons: neurons before pruning.
        kept: indices of the neurons that stay, ascending.
    """

    name: str
    neurons: int
    kept: tuple[int, ...]

    @property
    def removed(self) -> tuple[int, ...]:
        """Indices of the neurons that go, ascending."""
        kept = set(self.kept)
        return tuple(i for i in range(self.neurons) if i not in kept)

    def __repr__(self) -> str:
        return f"LayerPlan({self.name!r}, {self.neurons} -> {len(self.kept)})"


class ModulePruning(NamedTuple):
    """The surgery on one module: remove ``indices`` along its output (``"out"``) or input (``"in"``)."""

    module: str
    dim: Literal["out", "in"]
    indices: tuple[int, ...]


class BiasUpdate(NamedTuple):
    """Bias compensation on one consumer: ``delta`` is added to its (full-size) bias before the surgery."""

    module: str
    delta: tuple[float, ...]


@dataclass(frozen=True, repr=False)
class PruningPlan:
    """Which neurons go, and the resulting operations on each module, as plain data.

    Attributes:
        threshold: λ; neurons whose statistic is below it were selected for removal.
        statistic: the per-neuron statistic compared with λ.
        layers: one entry per prunable layer.
        operations: per module and direction, the indices to remove (merged across layers).
        bias_updates: with ``compensate``, what each consumer's bias absorbs from the neurons it loses.
        normalize: whether scores were put on one scale per layer before the comparison with λ.
        scored_by: ``(layer name, criterion)`` for the layers another criterion than ``statistic`` scored, their
            scores put on one scale together (the default criterion scores BatchNorm-normalised channels by ``rms``).
        scale: with ``normalize``, how: ``"std"`` (standardised, λ in standard deviations) or ``"mean"`` (divided
            by the mean, λ in multiples of the layer's mean score; the default criterion's).
    """

    threshold: float
    statistic: str
    layers: tuple[LayerPlan, ...]
    operations: tuple[ModulePruning, ...]
    bias_updates: tuple[BiasUpdate, ...] = ()
    normalize: bool = False
    scored_by: tuple[tuple[str, str], ...] = ()
    scale: str = "std"

    @property
    def touched_modules(self) -> tuple[str, ...]:
        """Every module the surgery changes (pruned or given a new bias), each once."""
        return tuple(dict.fromkeys([*(o.module for o in self.operations), *(b.module for b in self.bias_updates)]))

    @property
    def neurons_before(self) -> int:
        """Neurons in all prunable layers before pruning."""
        return sum(layer.neurons for layer in self.layers)

    @property
    def neurons_after(self) -> int:
        """Neurons in all prunable layers after pruning."""
        return sum(len(layer.kept) for layer in self.layers)

    def __repr__(self) -> str:
        """A few lines: λ and the width of each layer, never the kept indices."""
        widths = ", ".join(f"{x.name} {x.neurons} -> {len(x.kept)}" for x in self.layers)
        return (
            f"PruningPlan(threshold={self.threshold:g}, statistic={self.statistic!r}, normalize={self.normalize},"
            f" neurons {self.neurons_before} -> {self.neurons_after}: {widths or 'no layers'};"
            f" {len(self.operations)} module operations, {len(self.bias_updates)} bias updates)"
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain ints, floats, strings and lists: safe for ``torch.load(weights_only=True)`` and JSON."""
        return {
            "threshold": float(self.threshold),
            "statistic": self.statistic,
            "layers": [{"name": x.name, "neurons": x.neurons, "kept": list(x.kept)} for x in self.layers],
            "operations": [{"module": o.module, "dim": o.dim, "indices": list(o.indices)} for o in self.operations],
            "bias_updates": [{"module": b.module, "delta": list(b.delta)} for b in self.bias_updates],
            "normalize": self.normalize,
            "scored_by": [[name, criterion] for name, criterion in self.scored_by],
            "scale": self.scale,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PruningPlan:
        """Rebuild a plan written by :meth:`to_dict`."""
        return cls(
            threshold=float(data["threshold"]),
            statistic=str(data["statistic"]),
            layers=tuple(LayerPlan(str(x["name"]), int(x["neurons"]), tuple(x["kept"])) for x in data["layers"]),
            operations=tuple(
                ModulePruning(str(o["module"]), o["dim"], tuple(int(i) for i in o["indices"]))
                for o in data["operations"]
            ),
            bias_updates=tuple(
                BiasUpdate(str(b["module"]), tuple(float(v) for v in b["delta"])) for b in data.get("bias_updates", [])
            ),
            normalize=bool(data.get("normalize", False)),
            scored_by=tuple((str(name), str(criterion)) for name, criterion in data.get("scored_by", [])),
            scale=str(data.get("scale", "std")),
        )


PREFIX = "actprune/"


NONE_CHOSEN = "none"
"""``PruningResult.chosen_by`` when no λ qualified and the model was left as it was."""


def count_parameters(model: nn.Module) -> int:
    """The number of parameter values in ``model`` (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters())


def model_size_mb(model: nn.Module) -> float:
    """The size of ``model``'s parameters and buffers in megabytes (10⁶ bytes)."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors) / 1e6


@dataclass(frozen=True)
class SweepRow:
    """One λ of the table: what pruning at it gives.

    Attributes:
        threshold: λ.
        params: parameter count after pruning at λ.
        params_kept: ``params / params of the unpruned model``.
        size_mb: parameters + buffers after pruning, in MB.
        neurons: neurons kept per layer.
        metrics: validation metrics after pruning (empty when λ was only sized, not validated).
        target: the parameter reduction this row was asked for (a table for a target or a budget lists
            reductions), or ``None`` in a table of λ values.
    """

    threshold: float
    params: int
    params_kept: float
    size_mb: float
    neurons: Mapping[str, int]
    metrics: Mapping[str, float] = field(default_factory=dict)
    target: float | None = None

    def to_dict(self, metrics_before: Mapping[str, float]) -> dict[str, Any]:
        """A flat row: λ, sizes, neurons per layer, every metric and its change against ``metrics_before``."""
        row: dict[str, Any] = {} if self.target is None else {"target_reduction": self.target}
        row |= {
            "threshold": self.threshold,
            "params": self.params,
            "params_kept_pct": 100.0 * self.params_kept,
            "size_mb": self.size_mb,
            "neurons": sum(self.neurons.values()),
        }
        row.update({f"neurons/{name}": kept for name, kept in self.neurons.items()})
        for name, value in self.metrics.items():
            row[name] = value
            if name in metrics_before:
                row[f"{name}_change"] = value - metrics_before[name]
        return row


@dataclass(frozen=True, repr=False)
class PruningResult:
    """The outcome of one pruning: the plan, the sizes and every validation metric before and after.

    Attributes:
        plan: what was removed.
        params_before: parameter count of the unpruned model.
        params_after: parameter count of the pruned model.
        size_mb_before: parameters + buffers of the unpruned model, in MB.
        size_mb_after: parameters + buffers of the pruned model, in MB.
        metrics_before: validation metrics of the unpruned model.
        metrics_after: validation metrics of the pruned model.
        sweep: the λ table, when one was evaluated (ascending λ).
        chosen_by: how λ was chosen: ``"threshold"``, ``"max_metric_drop"`` or ``"target_params_reduction"``;
            ``"none"`` when no λ qualified: the model is unchanged and ``plan.threshold`` is NaN.
        metrics_pruned: validation metrics right after the surgery, before BatchNorm recalibration (empty when
            nothing was recalibrated: then ``metrics_after`` are those right after the surgery).
        metrics_recovered: validation metrics at the end of ``fit``, after the recovery epochs that trained the
            pruned model (empty without ``recovery_epochs``).
    """

    plan: PruningPlan
    params_before: int
    params_after: int
    size_mb_before: float
    size_mb_after: float
    metrics_before: Mapping[str, float] = field(default_factory=dict)
    metrics_after: Mapping[str, float] = field(default_factory=dict)
    sweep: tuple[SweepRow, ...] = ()
    chosen_by: str = "threshold"
    metrics_pruned: Mapping[str, float] = field(default_factory=dict)
    metrics_recovered: Mapping[str, float] = field(default_factory=dict)

    @property
    def params_reduction(self) -> float:
        """``1 - params_after / params_before``."""
        return 1.0 - self.params_after / self.params_before if self.params_before else 0.0

    @property
    def pruned(self) -> bool:
        """Whether a λ was chosen and applied (``False``: no λ qualified, the model is unchanged)."""
        return self.chosen_by != NONE_CHOSEN

    def __repr__(self) -> str:
        """A few lines: λ, sizes, metrics and per-layer widths; never the kept indices."""
        metrics = ", ".join(
            f"{name} {before:.4g} -> {self.metrics_after[name]:.4g}"
            for name, before in self.metrics_before.items()
            if name in self.metrics_after
        )
        return (
            f"PruningResult(chosen_by={self.chosen_by!r}, params {self.params_before:,} -> {self.params_after:,}"
            f" (-{self.params_reduction:.1%}), {metrics or 'no metrics'}, {len(self.sweep)} sweep rows,\n"
            f"  plan={self.plan!r})"
        )

    def to_metrics(self) -> dict[str, float]:
        """The numbers under the ``actprune/`` keys that every logger receives."""
        metrics = {
            "threshold": self.plan.threshold,
            "chosen_threshold": self.plan.threshold,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "params_reduction": self.params_reduction,
            "size_mb_before": self.size_mb_before,
            "size_mb_after": self.size_mb_after,
            "neurons_before": self.plan.neurons_before,
            "neurons_after": self.plan.neurons_after,
        }
        for name, before in self.metrics_before.items():
            metrics[f"{name}_before"] = before
            if name in self.metrics_after:
                metrics[f"{name}_after"] = self.metrics_after[name]
                metrics[f"{name}_change"] = self.metrics_after[name] - before
            if name in self.metrics_pruned:
                metrics[f"{name}_pruned"] = self.metrics_pruned[name]
            if name in self.metrics_recovered:
                metrics[f"{name}_recovered"] = self.metrics_recovered[name]
        return {PREFIX + k: float(v) for k, v in metrics.items()}

    def summary(self) -> str:
        """A short human-readable summary with the per-layer neuron counts."""
        if not self.pruned:
            lines = [
                f"Activation pruning chose no λ ({self.plan.statistic}): the model is unchanged, "
                f"parameters {self.params_before:,}, neurons {self.plan.neurons_before:,}"
            ]
            lines += [f"  {name}: {value:.4f}" for name, value in self.metrics_before.items()]
            return "\n".join(lines)
        threshold = describe_threshold(self.plan.threshold, self.plan.statistic, self.plan.normalize, self.plan.scale)
        chosen = "" if self.chosen_by == "threshold" else f", chosen by {self.chosen_by}"
        table = ""
        if self.sweep:
            listed = "parameter reductions" if self.sweep[0].target is not None else "λ values"
            table = f" (the table lists {listed})"
        lines = [
            f"Activation pruning, {threshold}{chosen}{table}: "
            f"parameters {self.params_before:,} -> {self.params_after:,} (-{self.params_reduction:.1%}), "
            f"size {self.size_mb_before:.3f} MB -> {self.size_mb_after:.3f} MB, "
            f"neurons {self.plan.neurons_before:,} -> {self.plan.neurons_after:,}",
        ]
        width = max([len(layer.name) for layer in self.plan.layers] + [5])
        scored_by = dict(self.plan.scored_by)
        if scored_by:
            criteria = ", ".join(sorted(set(scored_by.values())))
            why = "(under the default criterion: the channels BatchNorm normalises)"
            if all(layer.name in scored_by for layer in self.plan.layers):
                lines.append(f"  every layer scored by {criteria}, on one scale together {why}")
            else:
                lines.append(
                    f"  scored by {self.plan.statistic}, except the {len(scored_by)} layer(s) marked: scored by"
                    f" {criteria}, on one scale together {why}"
                )
        for layer in self.plan.layers:
            mark = f"  ({scored_by[layer.name]})" if layer.name in scored_by else ""
            lines.append(f"  {layer.name:<{width}}  {layer.neurons:>6} -> {len(layer.kept):>6}{mark}")
        for name, before in self.metrics_before.items():
            after = self.metrics_after.get(name)
            if after is None:
                continue
            if name in self.metrics_pruned:  # the surgery's step and the recalibration's step, each on its own
                steps = f"{self.metrics_pruned[name]:.4f} after surgery -> {after:.4f} after BatchNorm recalibration"
                lines.append(f"  {name}: {before:.4f} -> {steps} ({after - before:+.4f})")
            else:
                lines.append(f"  {name}: {before:.4f} -> {after:.4f} ({after - before:+.4f})")
            if name in self.metrics_recovered:
                recovered = self.metrics_recovered[name]
                lines[-1] += f"; after recovery {recovered:.4f} ({recovered - before:+.4f})"
        return "\n".join(lines)
