"""The report: the generated part of ``BENCHMARKS.md`` (five tables) and the accuracy-vs-parameters plot."""

from __future__ import annotations

import math
import statistics as stats
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path

from benchmarks.common import acc, delta, pct, write_section

from .results import BenchmarkResults, Measurements, MethodRow

BEGIN, END = "<!-- benchmark:begin -->", "<!-- benchmark:end -->"


def _mb(size: float) -> str:
    return f"{size / 1e6:.2f}"


def _widths(widths: Mapping[str, int] | None) -> str:
    return "-" if not widths else " / ".join(str(w) for w in widths.values())


def _grid_lines(measured: Measurements) -> list[str]:
    """Table 3: every setting of our options at every target, the best per column, and the rule's choice."""
    settings, choice = measured.settings, measured.choice
    targets = [str(t) for t in settings.targets]
    variants = choice.variants
    best_per_target = {t: max(v.test_acc[t] for v in variants) for t in targets}
    best_mean = max(v.mean_test_acc for v in variants)
    rank = {v.label: i + 1 for i, v in enumerate(sorted(variants, key=lambda v: -v.mean_test_acc))}
    z = choice.z

    def cell(value: float, best: float) -> str:
        return f"**{acc(value)}**" if round(100 * value, 2) == round(100 * best, 2) else acc(value)

    def yes(flag: bool) -> str:
        return "yes" if flag else "no"

    lines = [
        "### 3. Choosing the defaults: each statistic ± compensation ± normalize, at equal reduction",
        "",
        f"Every setting of `statistic` × `compensate` × `normalize` ({len(variants)} settings) at each target: the plan"
        " `target_params_reduction` picks (`plan_for_reduction` on a `ThresholdEvaluator` with those options: neurons"
        " removed one at a time in its removal order; with `normalize`, λ is in standard deviations of the layer's"
        " scores and may be negative), applied to a deep copy of the"
        " trained model, test accuracy in %. **Bold**: the best of the column. *mean*: the accuracy averaged over"
        f" the {len(targets)} targets. *below best*: how far that mean is below the best setting's, in points, ± one"
        f" paired standard error over the {choice.test_examples:,} test examples (each example counts the targets"
        " at which one setting got it"
        " right and the other did not; this is the test-set sampling noise of one trained model, not the noise of"
        " another training seed). The Torch-Pruning rows at the bottom are for reference (`mean`'s widths per"
        " target, as in table 2, with and without `plan_from_kept(..., compensate=True)`); they are not options of"
        " the callback.",
        "",
        f"**Rule for the defaults**: {choice.rule}.",
        "",
        "| rank | statistic | compensate | normalize | "
        + " | ".join(f"−{float(t):.0%}" for t in targets)
        + " | mean | below best (± SE) |",
        "| ---: | :--- | :---: | :---: | " + " | ".join("---:" for _ in targets) + " | ---: | ---: |",
    ]
    for v in variants:
        label = v.label
        marks = [word for word, name in (("best", choice.best), ("recommended", choice.recommended)) if name == label]
        flag = f" ◀ **{', '.join(marks)}**" if marks else ""
        below = "-" if label == choice.best else f"{100 * v.below_best:.2f} ± {100 * v.below_best_se:.2f}"
        if not v.within_noise:
            below += " *"
        lines.append(
            f"| {rank[label]} | `{v.statistic}`{flag} | {yes(v.compensate)} | {yes(v.normalize)} | "
            + " | ".join(cell(v.test_acc[t], best_per_target[t]) for t in targets)
            + f" | {cell(v.mean_test_acc, best_mean)} | {below} |"
        )
    reference: dict[str, dict[str, float]] = defaultdict(dict)
    for row in measured.comparison:
        if row.family == "magnitude" and str(row.target) in targets:
            reference[row.method][str(row.target)] = row.test_acc
    for method, accuracy in reference.items():
        lines.append(
            f"| - | {method} | {yes(method.endswith('compensate'))} | - | "
            + " | ".join(acc(accuracy[t]) for t in targets)
            + f" | {acc(stats.fmean(accuracy[t] for t in targets))} | - |"
        )
    chosen, best = choice.variant(choice.recommended), choice.variant(choice.best)
    seed = next((v for v in variants if v.label == choice.seed), None)
    # ties share the better rank
    per_target_rank = [1 + sum(w.test_acc[t] > chosen.test_acc[t] for w in variants) for t in targets]
    lines += [
        "",
        f"\\* more than {z:g} standard errors below the best. Unpruned: {acc(measured.baseline.test_acc)}%.",
        "",
        f"**Best mean over the targets: `{choice.best}`**, {acc(best.mean_test_acc)}%."
        + (
            f" **Recommended by the rule: `{choice.recommended}`**, {acc(chosen.mean_test_acc)}%"
            f" ({100 * chosen.below_best:.2f} ± {100 * chosen.below_best_se:.2f} below the best)."
            if choice.recommended != choice.best
            else " It is also the rule's choice."
        )
        + (
            f" Against the seed's `{choice.seed}` ({acc(seed.mean_test_acc)}%):"
            f" {100 * chosen.over_seed:+.2f} ± {100 * chosen.over_seed_se:.2f} points on the mean."
            if seed is not None and seed is not chosen
            else ""
        )
        + f" Its rank per target ({', '.join(f'−{float(t):.0%}' for t in targets)}): "
        + ", ".join(f"{r} of {len(variants)}" for r in per_target_rank)
        + "."
        + "".join(
            f" At −{float(t):.0%} it is {100 * gap.gap:.2f} ± {100 * gap.se:.2f} points below `{gap.best}`."
            for t, gap in chosen.below_target_best.items()
            if gap.best != chosen.label
        ),
        "",
    ]
    return lines


def render_markdown(results: BenchmarkResults) -> str:
    """The generated part of ``BENCHMARKS.md``: machine, command, and every table."""
    measured, run = results.measurements, results.run
    machine, base, settings = run.machine, measured.baseline, measured.settings
    versions = machine.versions
    before, base_acc = base.params, base.test_acc
    layer_names = " / ".join(measured.layers)
    dead = measured.never_active
    lines = [
        f"_Generated by `{run.command}` in {run.total_seconds / 60:.1f} min"
        f" ({'training loaded from the cache' if run.training.cached else 'training included'};"
        f" training took {run.training.train_seconds / 60:.1f} min)._",
        "",
        "### Machine",
        "",
        f"- CPU: {machine.cpu}, {machine.cores} cores ({machine.usable_cores} usable), shared with other"
        f" jobs; `torch.set_num_threads({machine.torch_threads})` for every measurement (training used"
        f" {run.training.threads})",
        f"- Python {machine.python}, torch {versions['torch']}, lightning {versions['lightning']},"
        f" torch-pruning {versions['torch-pruning']} ({machine.platform})",
        "",
        "### Setting",
        "",
        f"- Model: MLP {'-'.join(str(s) for s in run.training.config.sizes)}, ReLU; Adam lr"
        f" {run.training.config.lr}, batch {run.training.config.batch_size},"
        f" {run.training.config.epochs} epochs, seed {run.training.config.seed}.",
        "- Data: Fashion-MNIST; train 50,000 / validation 10,000 (the last 10k training images; statistics and"
        " re-validation) / test 10,000 (every accuracy below). Pixels scaled to [0, 1].",
        f"- Unpruned: **{before:,} parameters**, {_mb(base.file_bytes)} MB state_dict,"
        f" **test accuracy {acc(base_acc)}%** (validation {acc(base.val['val_acc'])}%).",
        "- Accuracy is in %, its change Δ in percentage points against the unpruned model. **No method is"
        " fine-tuned after pruning.**",
        "",
        f"### 1. λ sweep (statistic `{settings.seed_statistic}`)",
        "",
        "Statistics gathered once (one validation pass with an `ActivationRecorder`); for each λ the plan is"
        " re-made (`plan_pruning`) and applied (`apply_plan`) to a deep copy of the trained model."
        f" {sum(dead.values()):,} of the {sum(measured.layers.values()):,} hidden neurons never fire on the"
        f" validation set ({', '.join(f'`{k}` {v}' for k, v in dead.items())}: `nonzero_fraction` = 0); any λ > 0"
        " removes them.",
        "",
        f"| λ | neurons kept ({layer_names}) | parameters kept | reduction | file MB | test acc | Δ acc |",
        "| ---: | :---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    marked = measured.marked
    for row in measured.seed_table:
        flag = (
            f" ◀ **≥{settings.marked_reduction:.0%}**"
            if marked is not None and row.threshold == marked.threshold
            else ""
        )
        lines.append(
            f"| {row.threshold:g}{flag} | {_widths(row.widths)}"
            f" | {row.params:,} ({pct(1 - row.reduction)}) | {pct(row.reduction)}"
            f" | {_mb(row.file_bytes)} | {acc(row.test_acc)} | {delta(row.test_acc, base_acc)} |"
        )
    lines.append("")
    if marked is not None:
        lines.append(
            f"**The first λ that removes ≥{settings.marked_reduction:.0%} of the parameters is λ ="
            f" {marked.threshold:g}**: {before:,} → {marked.params:,} parameters"
            f" (−{pct(marked.reduction)}), test accuracy {acc(base_acc)}% → {acc(marked.test_acc)}%"
            f" ({delta(marked.test_acc, base_acc)} points)."
        )
    else:
        lines.append(f"No λ in the sweep removes ≥{settings.marked_reduction:.0%} of the parameters.")
    lines += [
        "",
        "### 2. Against the alternatives, at equal parameter reduction",
        "",
        "- **ours (statistic)**: the package's plain functions; the plan per target is what `target_params_reduction`"
        " picks: `plan_for_reduction` removes neurons one at a time in ascending score (ties broken by RMS"
        " activation, then by the next layers' weight norm) and bisects on the pruned model's parameter count for"
        " the fewest that remove at least the target; λ is the plan's threshold, in the statistic's own unit."
        " **ours (mean, compensate)**: the same neurons as `mean`, with each removed neuron's"
        " mean validation activation folded into its consumer's bias (`plan_pruning(..., compensate=True)`)."
        f" **ours ({measured.choice.recommended})**: the setting table 3 recommends.",
        "- **ModelPruning l1_unstructured**: Lightning's callback, global over every Linear weight and bias, zeroing"
        " as many values as ours (`mean`) removed. **ln_structured**: the same callback on the same hidden layers,"
        " zeroing the rows of the same number of neurons per layer (L2 norm); the bias and the next layer's"
        " columns stay. Both are applied once to the trained weights through the callback's own methods (`setup`,"
        " `apply_pruning`, `make_pruning_permanent`), without the lottery-ticket reset. Both only *mask*: the"
        ' parameter count, file and latency do not change (the columns say so); "nonzero" is what they reduce.',
        "- **Torch-Pruning magnitude L1/L2**: `tp.importance.GroupMagnitudeImportance(p)` over each neuron's group"
        " (its row and its column in the next layer); the same per-layer widths as ours (`mean`); the"
        " lowest-importance neurons are removed with the same surgery. **+ compensate**: the same neurons, with"
        " their mean activations folded into the next layer's bias (`plan_from_kept(..., compensate=True)`).",
        "- **random**: the same widths, neurons drawn at random; mean ± std over"
        f" {len(settings.random_seeds)} seeds (the size/latency columns are seed 0's model).",
        "- Latency: median ms per forward (`torch.inference_mode`), all models of one target measured side by side"
        " in rotating order.",
        "",
        f"| target | method | λ | neurons kept ({layer_names}) | parameters | nonzero | file MB | test acc"
        " | Δ acc | latency b=1 ms | latency b=256 ms |",
        "| ---: | :--- | ---: | :---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    latencies = base.latency_ms_by_target
    for target in settings.targets:
        unpruned = latencies.get(str(target), {})
        lines.append(
            f"| −{target:.0%} | unpruned | - | - | {before:,} | {before:,} | {_mb(base.file_bytes)}"
            f" | {acc(base_acc)} | - | {unpruned.get('1', math.nan):.3f} | {unpruned.get('256', math.nan):.2f} |"
        )
        for entry in (r for r in measured.comparison if r.target == target):
            accuracy = acc(entry.test_acc)
            if entry.test_acc_std is not None:
                accuracy += f" ± {100 * entry.test_acc_std:.2f}"
            threshold = "-" if entry.threshold is None else f"{entry.threshold:.4g}"
            latency = entry.latency_ms or {}
            params = f"{entry.params:,}" + (" (unchanged)" if entry.family == "masked" else "")
            lines.append(
                f"| −{target:.0%} | {entry.method} | {threshold} | {_widths(entry.widths)} | {params}"
                f" | {entry.nonzero:,} | {_mb(entry.file_bytes)} | {accuracy} | {delta(entry.test_acc, base_acc)}"
                f" | {latency.get('1', math.nan):.3f} | {latency.get('256', math.nan):.2f} |"
            )
    lines += [
        "",
        f"The plot also has the targets {', '.join(f'−{t:.0%}' for t in settings.plot_targets)} (accuracy only).",
        "",
        "![test accuracy vs parameters kept](docs/benchmark_accuracy_vs_params.png)",
        "",
        *_grid_lines(measured),
    ]
    cost = measured.cost
    median = cost.median_seconds
    state_bytes = cost.metric_state_bytes
    memory = cost.peak_allocated_bytes
    extra_mb = (memory.statistics - memory.plain) / 1e6
    analysis = median["analysis_plan_surgery"]
    lines += [
        "### 4. Cost of pruning",
        "",
        f"One process, {cost.repeats} rounds in rotating order, medians; a Trainer whose `fit` ran (zero"
        " epochs, so its validation data are the fit's), the trained weights, the validation set"
        " (all of it, in batches of 1,000).",
        "",
        "| what | median s | ratio to a plain validation pass |",
        "| :--- | ---: | ---: |",
        f"| plain `trainer.validate` | {median['plain']:.3f} | 1.00 |",
        f"| statistics pass (`trainer.validate` with an `ActivationRecorder`) | {median['statistics']:.3f}"
        f" | **{cost.statistics_ratio:.3f}** |",
        "| dependency analysis + plan + surgery alone (`find_prunable_layers`, `plan_pruning`, `apply_plan`)"
        f" | {analysis:.3f} | {analysis / median['plain']:.3f} |",
        f"| `ActivationPruning(threshold={cost.threshold:g}).on_fit_end` (statistics + analysis + plan + surgery"
        " + re-validation of the pruned model + report)"
        f" | {median['on_fit_end']:.3f} | **{cost.on_fit_end_ratio:.2f}** |",
        "",
        "Statistics pass / plain pass, per round: "
        + ", ".join(f"{r:.3f}" for r in cost.statistics_ratio_per_round)
        + " (target ≤ 1.10).",
        "",
        f"Memory of the statistics: the metric states hold **{sum(state_bytes.values()):,} bytes** in all ("
        + ", ".join(f"`{k}` {v:,}" for k, v in state_bytes.items())
        + "; four float64 sums per input feature of every measured layer, and a count). The transient peak is larger:"
        f" over one validation batch of {memory.batch:,}, the most memory held through PyTorch's allocator"
        f" (torch.profiler allocation events) is {memory.plain / 1e6:.1f} MB for the plain forward and"
        f" {memory.statistics / 1e6:.1f} MB with the recorder, **+{extra_mb:.1f} MB** (the recorder's per-batch"
        " temporaries). The process RSS does not show it: the allocator reuses freed memory between passes.",
        "",
        "### 5. Speed of the pruned model",
        "",
        f"Median of {settings.speed_rounds} rounds, models measured side by side; ratios are pruned / unpruned"
        " for latency (lower is better) and throughput (higher is better), next to the parameter ratio.",
        "",
        "| model | batch | parameter ratio | latency ms | latency ratio | throughput /s | throughput ratio |",
        "| :--- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for speed in measured.speed:
        lines.append(
            f"| {speed.model} | {speed.batch} | {speed.param_ratio:.3f} | {speed.latency_ms:.3f}"
            f" | {speed.latency_ratio:.3f} | {speed.throughput_per_s:,.0f} | {speed.throughput_ratio:.2f} |"
        )
    lines.append("")
    return "\n".join(lines)


def write_markdown(path: Path, generated: str) -> None:
    """Put ``generated`` between this report's markers in ``path``, keeping the hand-written text around them."""
    write_section(path, generated, BEGIN, END)


PALETTE = {
    "ours": ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:olive", "navy", "gold"],
    "masked": ["tab:brown", "tab:pink"],
    "magnitude": ["tab:cyan", "teal", "deepskyblue", "darkslategray"],
    "random": ["gray"],
}
STYLE = {"ours": ("-", "o"), "masked": (":", "x"), "magnitude": ("--", "s"), "random": ("-.", "v")}


def plot(measured: Measurements, path: Path) -> None:
    """Test accuracy vs parameters kept for every method, on one chart (masked methods at their nonzero count)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FormatStrFormatter

    before = measured.baseline.params
    base_acc = measured.baseline.test_acc
    figure, axes = plt.subplots(figsize=(11, 8))
    methods: dict[str, list[MethodRow]] = defaultdict(list)
    for row in measured.comparison:
        methods[row.method].append(row)
    used: dict[str, int] = defaultdict(int)
    for method, rows in methods.items():
        rows = sorted(rows, key=lambda r: r.nonzero)
        family = rows[0].family
        colors = PALETTE[family]
        color = colors[used[family] % len(colors)]
        used[family] += 1
        linestyle, marker = STYLE[family]
        x = [100 * r.nonzero / before for r in rows]
        y = [100 * r.test_acc for r in rows]
        label = method + (" [masks only: x = nonzero values]" if family == "masked" else "")
        errors = [100 * (r.test_acc_std or 0.0) for r in rows] if family == "random" else None
        axes.errorbar(
            x,
            y,
            yerr=errors,
            linestyle=linestyle,
            marker=marker,
            color=color,
            label=label,
            capsize=3,
            linewidth=2 if family == "ours" else 1.2,
            markersize=5,
        )
    sweep = [r for r in measured.seed_table if r.reduction < 1]
    axes.plot(
        [100 * (1 - r.reduction) for r in sweep],
        [100 * r.test_acc for r in sweep],
        linestyle="none",
        marker="+",
        markersize=11,
        markeredgewidth=1.5,
        color="black",
        label=f"ours ({measured.settings.seed_statistic}), the λ sweep of table 1",
    )
    axes.axhline(100 * base_acc, color="black", linewidth=0.8, label=f"unpruned ({100 * base_acc:.2f}%)")
    axes.set_xscale("log")
    ticks = [1, 2, 3, 5, 10, 20, 30, 50, 70, 100]
    axes.xaxis.set_major_locator(FixedLocator(ticks))
    axes.xaxis.set_major_formatter(FormatStrFormatter("%g%%"))
    axes.xaxis.set_minor_locator(FixedLocator([]))
    axes.set_xlim(min(100 * (1 - r.reduction) for r in sweep if r.test_acc > 0.2) * 0.8, 110)
    axes.set_xlabel("parameters kept, % of the unpruned model (log scale; nonzero values for the masking methods)")
    axes.set_ylabel("test accuracy, % (no fine-tuning)")
    axes.set_title("Fashion-MNIST, MLP 784-1024-1024-10: test accuracy vs parameters kept, one-shot pruning")
    lowest = min(100 * r.test_acc for r in measured.comparison)
    axes.set_ylim(max(0.0, lowest - 3), 100 * base_acc + 2)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.09), ncol=3, frameon=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)
