"""The report, for people: the λ table as records, aligned text, CSV/JSON files and a plot."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from lightning_actprune._types import PruningResult, scale_unit


def _by_reduction(result: PruningResult) -> bool:
    """Whether the table lists parameter reductions (a target or a budget) rather than λ values."""
    return bool(result.sweep) and result.sweep[0].target is not None


def sweep_records(result: PruningResult) -> list[dict[str, Any]]:
    """The table as flat records (one per λ, or per parameter reduction), with a ``chosen`` column; ascending λ."""
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
    unit = scale_unit(result.plan.normalize, result.plan.scale)
    listed = "parameter reductions" if _by_reduction(result) else "λ values"
    table = Table(title=f"ActivationPruning table of {listed} (λ in {unit}{result.plan.statistic}); * = applied")
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

    A table of parameter reductions is drawn against the reduction asked for instead.

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
    by_reduction = _by_reduction(result)
    thresholds = [100 * (row.target or 0.0) if by_reduction else row.threshold for row in rows]
    figure, left = plt.subplots(figsize=(6.4, 4.0))
    left.plot(thresholds, [row.metrics.get(metric, float("nan")) for row in rows], "o-", color="tab:blue")
    unit = scale_unit(result.plan.normalize, result.plan.scale)
    left.set_xlabel("parameters removed (%)" if by_reduction else f"λ ({unit}{result.plan.statistic})")
    left.set_ylabel(metric, color="tab:blue")
    if metric in result.metrics_before:
        left.axhline(result.metrics_before[metric], color="tab:blue", linestyle=":", label=f"{metric} unpruned")
    right = left.twinx()
    right.plot(thresholds, [100 * row.params_kept for row in rows], "s--", color="tab:orange")
    right.set_ylabel("parameters kept (%)", color="tab:orange")
    right.set_ylim(0, 105)
    if result.pruned:
        threshold = result.plan.threshold
        at = 100 * result.params_reduction if by_reduction else threshold
        left.axvline(at, color="gray", linestyle="--")
        left.annotate(f"applied λ={threshold:.3g}", (at, 0.02), xycoords=("data", "axes fraction"),
                      rotation=90, va="bottom", ha="right", color="gray")  # fmt: skip
    title = "Activation pruning: " + ("parameter reductions" if by_reduction else "λ sweep")
    left.set_title(title + ("" if result.pruned else " (no λ qualified: nothing applied)"))
    figure.tight_layout()
    return figure
