"""The generated Markdown section of ``BENCHMARKS.md`` (between the ``architectures:begin``/``:end`` markers)."""

from __future__ import annotations

from pathlib import Path

from benchmarks import common

from .results import ERROR, EXACT, SKIPPED, ModelResult, SweepResults

BEGIN, END = "<!-- architectures:begin -->", "<!-- architectures:end -->"
BUDGET_SECONDS = 10.0
"""Issue 14's goal for analysis + checks + λ search, per model."""


NOTE_CHARACTERS = 160


def _notes(error: str, messages: list[str]) -> str:
    """The error, else the first skip message (shortened) and how many there are; safe inside a table cell."""
    text = error
    if not text and messages:
        first = messages[0].removeprefix("lightning_actprune: ")
        if len(first) > NOTE_CHARACTERS:
            first = first[: NOTE_CHARACTERS - 1] + "…"
        text = first if len(messages) == 1 else f"({len(messages)} skip messages) {first}"
    return text.replace("|", "\\|").replace("\n", " ")


def _statistics(rows: list[ModelResult]) -> str:
    """The criteria the rows were scored by (one, unless the JSON mixes runs); older JSON did not record it."""
    used = sorted({r.statistic for r in rows if r.statistic})
    return ", ".join(f"`{s}`" for s in used) if used else "the default"


def render_markdown(results: SweepResults) -> str:
    """The section: command, machine, a summary line and one table row per model."""
    rows = results.rows
    count = {status: sum(r.status == status for r in rows) for status in (EXACT, SKIPPED, ERROR)}
    slow = [r.name for r in rows if r.status != ERROR and r.fixed_seconds > BUDGET_SECONDS]
    lines = [
        "### torchvision classification models under 30M parameters (generated)",
        "",
        f"Command: `{results.command}` ({results.total_seconds / 60:.1f} min). Machine: {results.cpu}, one thread"
        f" per model, torch {results.torch}, torchvision {results.torchvision}, torch-pruning"
        f" {results.torch_pruning}. Random weights, 10 classes, 16 random images at the smallest resolution the"
        " model accepts; `target_params_reduction=0.3` at the callback's defaults"
        f" ({_statistics(rows)} scores and their tie-breaks); the pruned model is compared with the original whose"
        " removed neurons are zeroed (eval mode).",
        "",
        f"**{count[EXACT]} of {len(rows)} pruned exactly, {count[SKIPPED]} skipped, {count[ERROR]} errors;"
        f" {len(slow)} over {BUDGET_SECONDS:g} s** of analysis + checks + λ search"
        + (f" ({', '.join(slow)})." if slow else "."),
        "",
        "| model | params | res. | status | prunable params | layers | layers pruned | removed | analysis + checks (s)"
        " | λ search (s) | ratio to a 2k validation | peak RSS (MB) | notes |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        notes = _notes(r.error, r.messages)
        lines.append(
            f"| {r.name} | {r.params / 1e6:.1f}M | {r.resolution or '—'} | {r.status} | {r.prunable_fraction:.0%}"
            f" | {r.layers} | {r.layers_pruned} | {r.reduction:.1%} | {r.analysis_seconds:.1f} | {r.search_seconds:.1f}"
            f" | {r.ratio:.2f} | {r.peak_rss_mb:.0f} | {notes or '—'} |"
        )
    lines += [
        "",
        "Layers pruned: the prunable layers (coupled groups, head sets) that lose at least one neuron. λ search:"
        " scoring every neuron, ordering them and finding the fewest that meet the target. The ratio divides"
        " analysis + checks + λ search by one validation pass of 2,000 images at the same"
        " resolution (extrapolated from a timed batch of 16). Times are the model process's CPU seconds on one thread"
        " (`time.process_time`), so that other work on a shared machine does not inflate them. Peak RSS is the"
        " model's own process. Notes: the error, else the first of the model's skip messages (the JSON has all).",
    ]
    return "\n".join(lines)


def write_section(path: Path, generated: str) -> None:
    """Replace what lies between the architecture markers of ``path`` (appended at its end if missing)."""
    common.write_section(path, generated, BEGIN, END)
