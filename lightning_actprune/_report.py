"""What changed: sizes and metrics before and after pruning, as plain numbers and as text."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from lightning_actprune._plan import PruningPlan
from lightning_actprune._statistics import describe_threshold

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
    """

    threshold: float
    params: int
    params_kept: float
    size_mb: float
    neurons: Mapping[str, int]
    metrics: Mapping[str, float] = field(default_factory=dict)

    def to_dict(self, metrics_before: Mapping[str, float]) -> dict[str, Any]:
        """A flat row: λ, sizes, neurons per layer, every metric and its change against ``metrics_before``."""
        row: dict[str, Any] = {
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
        threshold = describe_threshold(self.plan.threshold, self.plan.statistic, self.plan.normalize)
        lines = [
            f"Activation pruning, {threshold}: "
            f"parameters {self.params_before:,} -> {self.params_after:,} (-{self.params_reduction:.1%}), "
            f"size {self.size_mb_before:.3f} MB -> {self.size_mb_after:.3f} MB, "
            f"neurons {self.plan.neurons_before:,} -> {self.plan.neurons_after:,}",
        ]
        width = max([len(layer.name) for layer in self.plan.layers] + [5])
        for layer in self.plan.layers:
            lines.append(f"  {layer.name:<{width}}  {layer.neurons:>6} -> {len(layer.kept):>6}")
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


def sweep_records(result: PruningResult) -> list[dict[str, Any]]:
    """The λ table as flat records (one per λ), with a ``chosen`` column; ascending λ."""
    return [
        {**row.to_dict(result.metrics_before), "chosen": row.threshold == result.plan.threshold} for row in result.sweep
    ]


def sweep_columns(records: list[dict[str, Any]]) -> list[str]:
    """Every column of the records, in first-seen order (a row may lack a metric another row has)."""
    return list(dict.fromkeys(column for record in records for column in record))


def format_sweep_table(result: PruningResult) -> str:
    """The λ table, aligned, the applied row marked with ``*``; rich's table when rich is installed."""
    records = sweep_records(result)
    if not records:
        return ""
    columns = [c for c in records[0] if c != "chosen" and not c.startswith("neurons/")]
    cells = [[_cell(record.get(c)) for c in columns] for record in records]
    marks = ["*" if record["chosen"] else "" for record in records]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
        lines = ["  " + "  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True))]
        for mark, row in zip(marks, cells, strict=True):
            lines.append(f"{mark:1} " + "  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)))
        return "\n".join(lines)
    unit = "std of standardised " if result.plan.normalize else ""
    table = Table(title=f"ActivationPruning λ sweep ({unit}{result.plan.statistic}); * = applied")
    table.add_column("")
    for column in columns:
        table.add_column(column, justify="right")
    for mark, row in zip(marks, cells, strict=True):
        table.add_row(mark, *row)
    buffer = io.StringIO()
    Console(file=buffer, width=max(100, 14 * (len(columns) + 1)), color_system=None).print(table)
    return buffer.getvalue().rstrip()


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def write_sweep_files(result: PruningResult, directory: str | Path, monitor: str | None = None) -> list[Path]:
    """Write ``actprune_sweep.csv``, ``actprune_sweep.json`` and (with matplotlib) ``actprune_sweep.png``.

    Args:
        result: a result with a λ table.
        directory: where to write (created if needed).
        monitor: the metric to plot (default: the first one).

    Returns:
        The paths written.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    records = sweep_records(result)
    columns = sweep_columns(records)
    csv_path = directory / "actprune_sweep.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(records)
    json_path = directory / "actprune_sweep.json"
    payload = {
        "statistic": result.plan.statistic,
        "chosen_threshold": result.plan.threshold if result.pruned else None,
        "chosen_by": result.chosen_by,
        "normalize": result.plan.normalize,
        "params_before": result.params_before,
        "metrics_before": dict(result.metrics_before),
        "rows": records,
    }
    json_path.write_text(json.dumps(payload, indent=2))
    paths = [csv_path, json_path]
    figure = plot_sweep(result, monitor)
    if figure is not None:
        png_path = directory / "actprune_sweep.png"
        figure.savefig(png_path, dpi=120, bbox_inches="tight")
        import matplotlib.pyplot as plt

        plt.close(figure)
        paths.append(png_path)
    return paths


def plot_sweep(result: PruningResult, monitor: str | None = None) -> Any:
    """A matplotlib figure: ``monitor`` (default: the first metric) and parameters kept (%) against λ.

    Returns:
        The figure, or ``None`` when matplotlib is not installed or the table is empty.
    """
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [row for row in result.sweep if row.metrics]
    if not rows:
        return None
    metric = monitor or next(iter(rows[0].metrics))
    thresholds = [row.threshold for row in rows]
    figure, left = plt.subplots(figsize=(6.4, 4.0))
    left.plot(thresholds, [row.metrics.get(metric, float("nan")) for row in rows], "o-", color="tab:blue")
    unit = "std of standardised " if result.plan.normalize else ""
    left.set_xlabel(f"λ ({unit}{result.plan.statistic})")
    left.set_ylabel(metric, color="tab:blue")
    if metric in result.metrics_before:
        left.axhline(result.metrics_before[metric], color="tab:blue", linestyle=":", label=f"{metric} unpruned")
    right = left.twinx()
    right.plot(thresholds, [100 * row.params_kept for row in rows], "s--", color="tab:orange")
    right.set_ylabel("parameters kept (%)", color="tab:orange")
    right.set_ylim(0, 105)
    if result.pruned:
        threshold = result.plan.threshold
        left.axvline(threshold, color="gray", linestyle="--")
        left.annotate(f"applied λ={threshold:.3g}", (threshold, 0.02), xycoords=("data", "axes fraction"),
                      rotation=90, va="bottom", ha="right", color="gray")  # fmt: skip
    left.set_title("Activation pruning: λ sweep" + ("" if result.pruned else " (no λ qualified: nothing applied)"))
    figure.tight_layout()
    return figure
