"""The generated Markdown section of ``BENCHMARKS.md`` (between the ``cost:begin``/``:end`` markers)."""

from __future__ import annotations

from pathlib import Path

from benchmarks.common import write_section as write_between_markers

from .results import BUDGET_FLOOR_SECONDS, BUDGET_FRACTION, OVERHEAD_BUDGET, CostResults, Measurement

BEGIN, END = "<!-- cost:begin -->", "<!-- cost:end -->"


def _goal(row: Measurement) -> str:
    if row.error or not row.validation_seconds:
        return "—"
    return f"{'met' if row.met else 'missed'} (≤ {row.budget_seconds:.1f} s)"


def _overhead(row: Measurement) -> str:
    if not row.batch_seconds:
        return "—"
    text = f"{row.callback_overhead:+.0%}"
    if row.needed_overhead is not None:
        text += f" (every moment: {row.statistics_overhead:+.0%})"
    if row.update_share:
        text += f"; inside its updates {row.update_share:+.0%}"
    if row.recorder_setup_seconds:
        text += f"; first batch +{row.recorder_setup_seconds:.2f} s"
    return text


def _many_layers(row: Measurement) -> str:
    if row.update_share:  # measured within each batch: the verdict's measure
        within = "within" if row.update_share <= OVERHEAD_BUDGET else "over"
        return (
            f" Recording the default's statistics with {row.measured_layers} measured layers ({row.model}) costs"
            f" {row.update_share:.0%} of a validation batch inside its metric updates, timed within each batch"
            f" ({within} the {OVERHEAD_BUDGET:.0%} goal); side by side with plain batches it added"
            f" {row.callback_overhead:.0%} (every moment: {row.statistics_overhead:.0%}), a difference of two runs"
            " that moved by tens of points between runs of the same code on this machine." + _setup(row)
        )
    within = "within" if row.callback_overhead <= OVERHEAD_BUDGET else "over"
    return (
        f" Recording the default's statistics with {row.measured_layers} measured layers ({row.model}) adds"
        f" {row.callback_overhead:.0%} to a validation batch ({within} the {OVERHEAD_BUDGET:.0%} goal;"
        f" every moment: {row.statistics_overhead:.0%})." + _setup(row)
    )


def _setup(row: Measurement) -> str:
    return (
        f" Its first batch costs {row.recorder_setup_seconds:.2f} s more (the recorder's {row.measured_layers} metrics"
        f" are made), once per pass: {row.recorder_setup_seconds / row.batch_seconds:.0%} of one batch."
        if row.recorder_setup_seconds
        else ""
    )


def _skipped(results: CostResults) -> str:
    if not results.skipped_before:
        return ""
    return (
        f" The baseline's rows of {', '.join(results.skipped_before)} were left out to fit the run into the time this"
        " machine had (`--skip-before`): those models are measured after only."
    )


def _prune_cells(row: Measurement) -> str:
    if row.error:
        return "— | — | — | — | —"
    if not row.validation_seconds:  # a model measured for its statistics only
        return "— | — | — | — | —"
    return (
        f"{row.validation_seconds:.1f} | {row.prune_seconds:.1f} | {row.passes} in {row.passes_seconds:.1f}"
        f" | {row.other_seconds:.1f} | {row.other_ratio:.2f}"
    )


def render_markdown(results: CostResults) -> str:
    """The section: command, machine, the goal met per model, one row per model and version."""
    pruned = [r for r in results.rows if r.version == "after" and r.validation_seconds and not r.error]
    met = [r.model for r in pruned if r.met]
    missed = [r.model for r in pruned if not r.met]
    many = [r for r in results.rows if r.version == "after" and r.measured_layers >= 300 and r.batch_seconds]
    lines = [
        "### What the prune step costs, at the defaults and native resolutions (generated)",
        "",
        f"Command: `{results.command}` ({results.total_seconds / 60:.1f} min"
        + (", the runs side by side" if " & " in results.command else "")
        + f"). Machine: {results.cpu},"
        f" {results.threads} torch threads per process (niced; other jobs ran on the machine: the two versions of"
        f" each model ran back to back), torch {results.torch}, torch-pruning {results.torch_pruning}. Before:"
        f" commit {results.baseline}; after: {results.current}. Random weights and images, 10 classes;"
        " `ActivationPruning(target_params_reduction=0.3)` (its default criterion, BatchNorm recalibration on),"
        " `fit` with `max_epochs=0`, the validation images as training data too; wall-clock seconds.",
        "",
        f"**After: {len(met)} of {len(pruned)} models meet the goal** (everything but the validation passes within"
        f" {BUDGET_FRACTION:.0%} of one pass, or {BUDGET_FLOOR_SECONDS:g} s if that is more)"
        + (f"; missed: {', '.join(missed)}." if missed else ".")
        + "".join(_many_layers(r) for r in many)
        + _skipped(results),
        "",
        "| model | res. | params | measured layers | version | validation pass (s) | prune step (s)"
        " | its validation passes (s) | the rest (s) | the rest / pass | goal | recording statistics, per batch |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in results.rows:
        error = f" {r.error}" if r.error else ""
        lines.append(
            f"| {r.model} | {r.resolution} | {r.params / 1e6:.1f}M | {r.measured_layers} | {r.version}{error}"
            f" | {_prune_cells(r)} | {_goal(r)} | {_overhead(r)} |"
        )
    lines += [
        "",
        "The prune step is the analysis the callback runs at the first validation batch of `fit` and its `prune`: a"
        " validation pass that records statistics, scoring, the target search, the surgery, BatchNorm recalibration"
        " (a pass over the training batches) and the passes after the surgery. Its validation passes are every"
        " `trainer.validate` it calls; the rest is what they leave (analysis and its checks, scoring, search,"
        " surgery). A validation pass is a plain `trainer.validate` of the unpruned model and of the pruned one,"
        " averaged. Recording statistics, per batch: validation batches in `torch.inference_mode` (as Lightning"
        " validates) under `ActivationRecorder`, after its first batch, against the same batches without it (the"
        " fastest batch of eight runs each, the variants taking turns); the recorder's first batch also makes one"
        " metric per measured layer, which is paid once per pass and shown apart (as the first batch). The column"
        " shows what the version's callback records: before, every moment; after, only the moments its prune reads"
        " (the default statistic's mean and mean square), with every moment in brackets.",
    ]
    return "\n".join(lines)


def write_section(path: Path, generated: str) -> None:
    """Replace what lies between the cost markers of ``path`` (appended at its end if missing)."""
    write_between_markers(path, generated, BEGIN, END)
