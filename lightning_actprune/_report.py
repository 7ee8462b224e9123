"""What changed: sizes and metrics before and after pruning, as plain numbers and as text."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from torch import nn

from lightning_actprune._plan import PruningPlan

PREFIX = "actprune/"


def count_parameters(model: nn.Module) -> int:
    """The number of parameter values in ``model`` (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters())


def model_size_mb(model: nn.Module) -> float:
    """The size of ``model``'s parameters and buffers in megabytes (10⁶ bytes)."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors) / 1e6


@dataclass(frozen=True)
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
    """

    plan: PruningPlan
    params_before: int
    params_after: int
    size_mb_before: float
    size_mb_after: float
    metrics_before: Mapping[str, float] = field(default_factory=dict)
    metrics_after: Mapping[str, float] = field(default_factory=dict)

    @property
    def params_reduction(self) -> float:
        """``1 - params_after / params_before``."""
        return 1.0 - self.params_after / self.params_before if self.params_before else 0.0

    def to_metrics(self) -> dict[str, float]:
        """The numbers under the ``actprune/`` keys that every logger receives."""
        metrics = {
            "threshold": self.plan.threshold,
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
        return {PREFIX + k: float(v) for k, v in metrics.items()}

    def summary(self) -> str:
        """A short human-readable summary with the per-layer neuron counts."""
        lines = [
            f"Activation pruning ({self.plan.statistic} < {self.plan.threshold:g}): "
            f"parameters {self.params_before:,} -> {self.params_after:,} (-{self.params_reduction:.1%}), "
            f"size {self.size_mb_before:.3f} MB -> {self.size_mb_after:.3f} MB, "
            f"neurons {self.plan.neurons_before:,} -> {self.plan.neurons_after:,}",
        ]
        width = max([len(layer.name) for layer in self.plan.layers] + [5])
        for layer in self.plan.layers:
            lines.append(f"  {layer.name:<{width}}  {layer.neurons:>6} -> {len(layer.kept):>6}")
        for name, before in self.metrics_before.items():
            after = self.metrics_after.get(name)
            if after is not None:
                lines.append(f"  {name}: {before:.4f} -> {after:.4f} ({after - before:+.4f})")
        return "\n".join(lines)
