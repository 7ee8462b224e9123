"""The quality benchmark's Markdown: one table of mean ± spread over seeds, and the issue's goals, met or missed."""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path

from benchmarks.common import markdown_table, mean_spread, write_section

from .models import QualityConfig
from .results import OURS, OURS_DISTILLED, OURS_RESIDUAL, OURS_RESIDUAL_DISTILLED, UNPRUNED, QualityResults, Row

Key = tuple[float, str, int]
TITLES = {"vit": "A small ViT", "mlp": "The MLP", "resnet": "The BatchNorm ResNet"}
WIDTHS = {
    "vit": "`d` the embedding width, then heads × head width / FFN per block",
    "mlp": "hidden widths",
    "resnet": "every convolution's output channels, in order (BatchNorm recalibrated after each one-shot prune)",
}


def markers(arch: str) -> tuple[str, str]:
    """The lines around the generated section of ``arch`` in BENCHMARKS.md."""
    return f"<!-- quality-{arch}:begin -->", f"<!-- quality-{arch}:end -->"


def _by_cell(rows: list[Row]) -> dict[Key, dict[int, Row]]:
    cells: dict[Key, dict[int, Row]] = defaultdict(dict)
    for row in rows:
        cells[(row.reduction, row.method, row.epochs)][row.seed] = row
    return cells


def _points(cell: dict[int, Row]) -> list[float]:
    return [100 * row.test_acc for _, row in sorted(cell.items())]


def _deltas(cell: dict[int, Row], base: dict[int, Row]) -> list[float]:
    return [100 * (row.test_acc - base[seed].test_acc) for seed, row in sorted(cell.items()) if seed in base]


def _best(cells: dict[Key, dict[int, Row]], reduction: float, epochs: int, prefix: str) -> tuple[str, list[float]]:
    """The setting whose name starts with ``prefix`` with the highest mean accuracy at this reduction and epochs."""
    candidates = {
        m: _points(c) for (r, m, e), c in cells.items() if (r, e) == (reduction, epochs) and m.startswith(prefix)
    }
    if not candidates:
        return "", []
    name = max(candidates, key=lambda m: statistics.fmean(candidates[m]))
    return name, candidates[name]


def goals(results: QualityResults) -> list[str]:
    """The issue's goals for this network, each met or missed, with the numbers."""
    if results.config.arch == "mlp":
        return _mlp_goals(results)
    if results.config.arch == "resnet":
        return _within(results, 0.7, 1.0)
    cells = _by_cell(results.rows)
    base = cells.get((0.0, UNPRUNED, 0), {})
    lines = []
    tp_name, tp = _best(cells, 0.3, 0, "Torch-Pruning")
    for name in (OURS, OURS_RESIDUAL):
        ours = _points(cells.get((0.3, name, 0), {}))
        if not ours or not tp:
            continue
        gap = statistics.fmean(ours) - statistics.fmean(tp)
        verdict = "**met**" if gap > 0 else "**missed**"
        lines.append(
            f"- −30 % one-shot ahead of Torch-Pruning's best setting: {verdict}: {name} {mean_spread(ours)} %,"
            f" {tp_name} {mean_spread(tp)} % ({gap:+.2f} points)."
        )
    epochs = max((row.epochs for row in results.rows if row.method == OURS), default=0)
    for name in (OURS, OURS_DISTILLED, OURS_RESIDUAL, OURS_RESIDUAL_DISTILLED):
        recovered = cells.get((0.5, name, epochs), {})
        tp_name, tp = _best(cells, 0.5, epochs, "Torch-Pruning")
        if not recovered or not tp:
            continue
        drop = statistics.fmean(_deltas(recovered, base))
        gap = statistics.fmean(_points(recovered)) - statistics.fmean(tp)
        spread = max(statistics.stdev(_points(recovered)), statistics.stdev(tp)) if len(tp) > 1 else 0.0
        within, ahead = drop >= -1.0, gap > spread
        verdict = "**met**" if within and ahead else "**missed**"
        lines.append(
            f"- −50 % with {epochs} recovery epoch(s), {name}: within 1 point of unpruned"
            f" ({'yes' if within else 'no'}: {drop:+.2f} points) and ahead of Torch-Pruning + fine-tuning by more than"
            f" the seed spread ({'yes' if ahead else 'no'}: {gap:+.2f} points against {tp_name}, spread"
            f" {spread:.2f}): {verdict}."
        )
    return lines


def _mlp_goals(results: QualityResults) -> list[str]:
    return _within(results, 0.95, 0.5)


def _within(results: QualityResults, reduction: float, points: float) -> list[str]:
    """The goal "at ``reduction`` with the recovery epochs, within ``points`` of unpruned", for ours and distilled."""
    cells = _by_cell(results.rows)
    base = cells.get((0.0, UNPRUNED, 0), {})
    lines = []
    epochs = max((row.epochs for row in results.rows if row.method == OURS), default=0)
    for name in (OURS, OURS_DISTILLED):
        recovered = cells.get((reduction, name, epochs), {})
        if not recovered or not epochs:
            continue
        drops = _deltas(recovered, base)
        verdict = "**met**" if statistics.fmean(drops) >= -points else "**missed**"
        lines.append(
            f"- −{100 * reduction:.0f} % with {epochs} recovery epoch(s) within {points:g} point of unpruned, {name}:"
            f" {verdict}:"
            f" {mean_spread(drops)} points ({mean_spread(_points(recovered))} %)."
        )
    return lines


def _description(config: QualityConfig) -> str:
    if config.arch == "mlp":
        return "MLP 784-1024-1024-10 (ReLU)"
    if config.arch == "resnet":
        return "ResNet 8/16/32 channels (stride-2 stem, a BatchNorm basic block per stage)"
    return (
        f"timm ViT, {config.depth} blocks × {config.num_heads} heads, width {config.embed_dim}, FFN"
        f" {int(config.embed_dim * config.mlp_ratio)}, {config.patch_size}×{config.patch_size} patches"
    )


def render(results: QualityResults) -> str:
    """The generated section."""
    config, machine = results.config, results.machine
    cells = _by_cell(results.rows)
    base = cells.get((0.0, UNPRUNED, 0), {})
    seeds = sorted({row.seed for row in results.rows})
    order = sorted(cells, key=lambda k: (k[0], k[2], k[1]))
    table = []
    for key in order:
        reduction, method, epochs = key
        cell = cells[key]
        first = cell[min(cell)]
        table.append(
            [
                f"-{reduction:.0%}" if reduction else "—",
                method,
                epochs,
                f"{statistics.fmean(row.params for row in cell.values()):,.0f}",
                mean_spread(_points(cell)),
                mean_spread(_deltas(cell, base)) if reduction else "",
                first.widths,
            ]
        )
    epoch_seconds = statistics.fmean(results.base_epoch_seconds.values()) if results.base_epoch_seconds else 0.0
    longest = ", the longest of the runs" if " + " in results.command else ""
    lines = [
        f"### {TITLES[config.arch]} on Fashion-MNIST, seeds side by side (generated)",
        "",
        f"Command: `{results.command}` ({results.minutes:.1f} min{longest}). Machine: {machine.cpu},"
        f" {machine.usable_cores}"
        f" usable cores, {machine.torch_threads} torch thread(s), torch {machine.versions.get('torch')}, timm"
        f" {machine.versions.get('timm')}, torch-pruning {machine.versions.get('torch-pruning')}.",
        "",
        f"Unpruned: {_description(config)}, trained {config.epochs} epochs on the first {config.train_images:,}"
        f" training images (Adam lr {config.lr:g}, batch {config.batch_size}; {epoch_seconds:.0f} s per epoch);"
        f" statistics on {config.num_val:,} validation images;"
        f" accuracy on the 10,000 test images. Seeds {', '.join(map(str, seeds))}: mean ± standard deviation in %,"
        " Δ paired with the same seed's unpruned model, in points. `epochs`: training after the prune (from scratch:"
        " all of it). Widths (seed " + f"{seeds[0]}): {WIDTHS[config.arch]}.",
        "",
        "Goals:",
        "",
        *goals(results),
        "",
        markdown_table(
            ["target", "method", "epochs", "params", "test acc (%)", "Δ (points)", f"widths (seed {seeds[0]})"],
            table,
            align="llrrrrl",
        ),
    ]
    return "\n".join(lines)


def write_report(results: QualityResults, markdown: Path) -> None:
    """Print the section and write it between the markers of its architecture in ``markdown``."""
    text = render(results)
    print(text)
    write_section(markdown, text, *markers(results.config.arch))
