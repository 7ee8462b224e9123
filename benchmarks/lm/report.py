"""The Markdown report: the perplexity table, the goals, what ours pruned, and the cost of each step."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Callable, Sequence

from benchmarks.common import markdown_table, mean_spread

from .model import LayerWidths
from .results import (
    OURS,
    OURS_RECOVERED,
    UNPRUNED,
    UNPRUNED_LONGER,
    LMResults,
    Row,
    SeedRun,
    StepRecovery,
    ours_with_unit,
)

BEGIN, END = "<!-- lm:begin -->", "<!-- lm:end -->"
GOAL_REDUCTION = 0.3
GOAL_SHARE = 0.5
"""Goal 1: ours' one-shot perplexity increase at -30 % is at most half of the best Torch-Pruning setting's."""
GOAL_RECOVERED = 0.05
"""Goal 2: after one recovery epoch, ours' perplexity is within 5 % of the unpruned model's."""


def _key(row: Row) -> tuple[float, str, int]:
    return row.reduction, row.method, row.epochs_after_prune


def _groups(results: LMResults) -> dict[tuple[float, str, int], list[Row]]:
    groups: dict[tuple[float, str, int], list[Row]] = defaultdict(list)
    for row in results.rows():
        groups[_key(row)].append(row)
    return dict(groups)


def _unpruned(results: LMResults, method: str = UNPRUNED) -> dict[int, float]:
    return {run.seed: next(r.test_ppl for r in run.rows if r.method == method) for run in results.seeds}


def _mean(values: Sequence[float]) -> float:
    return statistics.fmean(values) if values else math.nan


def compact_widths(widths: Sequence[LayerWidths]) -> str:
    """Per decoder layer ``query heads/kv heads/FFN neurons``, runs of equal layers written once: ``8/2/512 ×4``."""
    runs: list[tuple[str, int]] = []
    for layer in widths:
        text = f"{layer.query_heads}/{layer.kv_heads}/{layer.ffn}"
        if runs and runs[-1][0] == text:
            runs[-1] = (text, runs[-1][1] + 1)
        else:
            runs.append((text, 1))
    return ", ".join(text if count == 1 else f"{text} ×{count}" for text, count in runs)


def _increase(rows: Sequence[Row], unpruned: dict[int, float]) -> list[float]:
    return [row.test_ppl - unpruned[row.seed] for row in rows]


def _signed(values: Sequence[float], digits: int = 3) -> str:
    """``mean_spread`` with the mean's sign: ``+1.234 ± 0.100``."""
    text = mean_spread(values, digits)
    return text if text.startswith(("-", "—", "nan")) else f"+{text}"


def _seeds(count: int) -> str:
    return f"{count} seed{'s' if count != 1 else ''}"


def goals(results: LMResults) -> list[str]:
    """Each goal, met or missed, with its numbers (means over seeds), one line each."""
    groups, unpruned = _groups(results), _unpruned(results)
    lines = []
    ours_one_shot = groups.get((GOAL_REDUCTION, OURS, 0))
    tp_one_shot = {
        method: rows
        for (reduction, method, epochs), rows in groups.items()
        if reduction == GOAL_REDUCTION and method.startswith("Torch-Pruning") and epochs == 0
    }
    if ours_one_shot and tp_one_shot:
        ours_increase = _mean(_increase(ours_one_shot, unpruned))
        best_method, best_rows = min(tp_one_shot.items(), key=lambda item: _mean(_increase(item[1], unpruned)))
        best_increase = _mean(_increase(best_rows, unpruned))
        met = ours_increase <= GOAL_SHARE * best_increase
        share = ours_increase / best_increase if best_increase > 0 else math.inf
        lines.append(
            f"- Goal 1, one-shot at -{GOAL_REDUCTION:.0%}: ours' perplexity increase at most {GOAL_SHARE:.0%} of the"
            f" best Torch-Pruning setting's: **{'met' if met else 'missed'}** (ours"
            f" {_signed(_increase(ours_one_shot, unpruned))}, best Torch-Pruning ({best_method})"
            f" {_signed(_increase(best_rows, unpruned))}: {share:.0%} of it, means over"
            f" {_seeds(len(ours_one_shot))} and {_seeds(len(best_rows))})."
        )
    else:
        lines.append(f"- Goal 1 not measured: no one-shot rows of ours and Torch-Pruning at -{GOAL_REDUCTION:.0%}.")
    for reduction in results.config.reductions:
        recovered = groups.get((reduction, OURS_RECOVERED, results.config.recovery_epochs))
        if not recovered:
            continue
        ratios = [row.test_ppl / unpruned[row.seed] - 1 for row in recovered]
        gap = _mean(ratios)
        verdict = "met" if gap <= GOAL_RECOVERED else f"missed by {100 * (gap - GOAL_RECOVERED):.1f} points"
        longer = _unpruned(results, UNPRUNED_LONGER)
        same_steps = _mean([row.test_ppl / longer[row.seed] - 1 for row in recovered])
        spread = f" ± {100 * statistics.stdev(ratios):.1f}" if len(ratios) > 1 else ""
        lines.append(
            f"- Goal 2 at -{reduction:.0%}, after {results.config.recovery_epochs} recovery epoch: within"
            f" {GOAL_RECOVERED:.0%} of the unpruned perplexity: **{verdict}** ({100 * gap:+.1f}{spread} %; against"
            f" the unpruned model trained as many steps, E + R epochs: {100 * same_steps:+.1f} %;"
            f" {_seeds(len(ratios))})."
        )
    return lines


def _units(results: LMResults) -> tuple[str, str] | None:
    """The default ``gqa_unit`` (the ``ours`` rows) and the other one compared, read from the plans; None: no rows."""
    units = list(dict.fromkeys(plan.gqa_unit for run in results.seeds for plan in run.plans))
    return (units[0], units[1]) if len(units) == 2 else None


def gqa_comparison(results: LMResults) -> list[str]:
    """Which ``gqa_unit`` keeps more accuracy, per reduction, one-shot and after recovery: one line each.

    A unit *wins by more than the seed spread* when its mean perplexity is lower by more than the larger standard
    deviation over seeds of the two rows; the paired difference (other unit - default, seed by seed) is given too.
    """
    units = _units(results)
    if units is None:
        return []
    default, other = units
    groups, lines = _groups(results), []
    for reduction in results.config.reductions:
        for base, epochs in ((OURS, 0), (OURS_RECOVERED, results.config.recovery_epochs)):
            mine = groups.get((reduction, base, epochs), [])
            theirs = {
                row.seed: row.test_ppl for row in groups.get((reduction, ours_with_unit(base, other), epochs), [])
            }
            pairs = [(row.test_ppl, theirs[row.seed]) for row in mine if row.seed in theirs]
            if not pairs:
                continue
            ours_ppl, other_ppl = [a for a, _ in pairs], [b for _, b in pairs]
            difference = [b - a for a, b in pairs]
            spread = max(statistics.stdev(ours_ppl), statistics.stdev(other_ppl)) if len(pairs) > 1 else 0.0
            winner = default if _mean(difference) > 0 else other
            if len(pairs) == 1:
                verdict = f"**{winner}** keeps more accuracy at this one seed (no spread to compare with)"
            elif abs(_mean(difference)) > spread:
                verdict = f"**{winner}** keeps more accuracy, by more than the seed spread ({spread:.3f})"
            else:
                verdict = f"{winner} is ahead, but within the seed spread ({spread:.3f}): no clear winner"
            when = "one-shot" if epochs == 0 else f"+ {epochs} recovery epoch"
            lines.append(
                f"- -{reduction:.0%}, {when}: test ppl `{default}` {mean_spread(ours_ppl, 3)}, `{other}`"
                f" {mean_spread(other_ppl, 3)}; `{other}` - `{default}` = {mean_spread(difference, 3)} (paired by"
                f" seed, {_seeds(len(pairs))}): {verdict}."
            )
    return lines


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def distillation_cost(results: LMResults) -> list[float]:
    """Per seed, reduction and ``N``: the median distilled recovery step's seconds over the plain one's."""
    ratios = []
    for run in results.seeds:
        plain = {(r.reduction, r.recovery_steps): r for r in run.step_recoveries if not r.distill_weight}
        for record in run.step_recoveries:
            base = plain.get((record.reduction, record.recovery_steps))
            if record.distill_weight and base is not None:
                ratios.append(_median(record.step_seconds) / _median(base.step_seconds))
    return ratios


def _steps_table(results: LMResults) -> str:
    unpruned = _unpruned(results)
    groups: dict[tuple[float, int, float], list[StepRecovery]] = defaultdict(list)
    for run in results.seeds:
        for record in run.step_recoveries:
            groups[(record.reduction, record.recovery_steps, record.distill_weight)].append(record)
    cells = []
    for (reduction, steps, weight), records in groups.items():
        params = round(_mean([r.params for r in records]))
        cells.append(
            [
                f"-{reduction:.0%}",
                len(records),
                f"{steps} ({steps / results.config.steps_per_epoch:.2g} epoch)",
                f"`distill_weight: {weight:g}`, T {records[0].distill_temperature:g}" if weight else "none",
                f"{params:,} ({1 - params / results.parameters.total:.1%} off)",
                mean_spread([r.test_ppl_after_prune for r in records], 3),
                mean_spread([r.test_ppl for r in records], 3),
                mean_spread([r.test_ppl - unpruned[r.seed] for r in records], 3),
                mean_spread([100 * (r.test_ppl / unpruned[r.seed] - 1) for r in records], 1),
                f"{_mean([_median(r.step_seconds) for r in records]):.3f}",
            ]
        )
    return markdown_table(
        [
            "target",
            "seeds",
            "recovery steps N",
            "distillation",
            "parameters",
            "test ppl after the prune",
            "test ppl after N steps",
            "Δ ppl",
            "Δ %",
            "seconds a recovery step (median)",
        ],
        cells,
        "lrllrrrrrr",
    )


def step_recovery_lines(results: LMResults) -> list[str]:
    """The step-recovery table, and the cost of distillation per recovery step as a ratio to a plain step."""
    if not any(run.step_recoveries for run in results.seeds):
        return []
    config = results.config
    lines = [
        "",
        f"Ours + recovery **by steps** (`recovery_steps: N` in a `fit` of `max_steps = E·S + N`: the prune at step"
        f" E·S = {config.epochs * config.steps_per_epoch}, the end of epoch E, with statistics from a validation pass"
        f" of the callback's own; then N steps with the same AdamW), without and with distillation from the unpruned"
        f" model (`distill_weight`, `distill_temperature`); Δ against the unpruned model after E epochs:",
        "",
        _steps_table(results),
    ]
    ratios = distillation_cost(results)
    if ratios:
        lines += [
            "",
            f"Cost of distillation: a distilled recovery step takes {mean_spread(ratios, 2)} times a plain one"
            f" (median step seconds, distilled over plain, at the same reduction and N in the same run; mean ± spread"
            f" over {len(ratios)} pairs of fits: seeds × reductions × N). A step's seconds run from"
            " `on_train_batch_start` to `on_train_batch_end`: forward, backward, optimizer step, and the teacher's"
            " forward when distilling.",
        ]
    return lines


def _table(results: LMResults) -> str:
    unpruned, config = _unpruned(results), results.config
    params0 = results.parameters.total
    lines = []
    for (reduction, method, epochs), rows in _groups(results).items():
        target = "—" if reduction == 0 else f"-{reduction:.0%}"
        if method == UNPRUNED_LONGER:
            method = f"{UNPRUNED_LONGER} {epochs} more epoch{'s' if epochs > 1 else ''}"
        params = round(_mean([row.params for row in rows]))
        ratios = [row.ratio for row in rows if row.ratio is not None]
        lines.append(
            [
                target,
                len(rows),
                method + (f" (ratio {_mean(ratios):.3f})" if ratios else ""),
                "—" if method.startswith(UNPRUNED) else epochs,
                f"{params:,} ({1 - params / params0:.1%} off)",
                compact_widths(rows[0].widths),
                mean_spread([row.test_ppl for row in rows], 3),
                "—" if method == UNPRUNED else mean_spread(_increase(rows, unpruned), 3),
            ]
        )
    return markdown_table(
        [
            "target",
            "seeds",
            "method",
            f"epochs after prune (of {config.steps_per_epoch} steps)",
            "parameters",
            "widths per layer (q heads/kv heads/FFN)" + (f", seed {config.seeds[0]}" if len(config.seeds) > 1 else ""),
            "test ppl",
            "Δ ppl",
        ],
        lines,
        "lrlrrlrr",
    )


def coverage(results: LMResults) -> list[str]:
    """Which rows a seed lacks that another seed has (a seed run with a smaller scope), one line; none: empty."""
    keys = list(dict.fromkeys(_key(row) for row in results.rows()))  # in the table's order
    steps = {(r.reduction, r.recovery_steps, r.distill_weight) for run in results.seeds for r in run.step_recoveries}
    parts = []
    for run in results.seeds:
        present = {_key(row) for row in run.rows}
        missing = [key for key in keys if key not in present]
        lacks = []
        for reduction in sorted({key[0] for key in missing}):
            pct = f"-{reduction:.0%}"
            if not any(row.reduction == reduction for row in run.rows):
                lacks.append(f"no {pct} rows")
                continue
            methods = dict.fromkeys(method for r, method, _ in missing if r == reduction)
            lacks.append(f"no {pct} {'; '.join(methods)} rows")
        missing_steps = steps - {(r.reduction, r.recovery_steps, r.distill_weight) for r in run.step_recoveries}
        if missing_steps and not run.step_recoveries:
            lacks.append("no recovery-by-steps rows")
        elif missing_steps:
            lacks += [
                f"no -{reduction:.0%} recovery by {count} steps"
                + (f" with `distill_weight: {weight:g}`" if weight else " without distillation")
                for reduction, count, weight in sorted(missing_steps)
            ]
        if lacks:
            parts.append(f"seed {run.seed} has {', '.join(lacks)}")
    if not parts:
        return []
    return [
        "",
        "Not every seed ran every row (each table's *seeds* column counts the seeds a row holds; its mean ± spread is"
        f" over those): {'; '.join(parts)}.",
    ]


def _what_ours_pruned(results: LMResults) -> list[str]:
    lines = []
    run = results.seeds[0]
    for plan in run.plans:
        kinds: dict[str, int] = defaultdict(int)
        for layer in plan.layers:
            kinds[layer.kind] += 1
        per_layer: dict[int | None, dict[str, str]] = defaultdict(dict)
        for layer in plan.layers:
            per_layer[layer.decoder_layer][layer.kind] = f"{layer.neurons} → {layer.kept}"
        cells = [
            [
                "—" if index is None else index,
                parts.get("ffn", "not a prunable layer"),
                parts.get("heads", "not a prunable layer"),
                parts.get("other", ""),
            ]
            for index, parts in sorted(per_layer.items(), key=lambda item: -1 if item[0] is None else item[0])
        ]
        found = ", ".join(f"{count} {kind}" for kind, count in sorted(kinds.items())) or "none"
        lines += [
            "",
            f"At -{plan.reduction:.0%} (seed {plan.seed}, `gqa_unit: {plan.gqa_unit}`): {plan.statistic},"
            f" λ = {plan.threshold:.4g}; prunable layers"
            f" found: {found}; validation loss {plan.val_loss_before:.4f} → {plan.val_loss_after:.4f}.",
            "",
            markdown_table(["decoder layer", "FFN neurons", "attention heads", "other"], cells, "rlll"),
        ]
        if plan.messages:
            lines += ["", "What the callback said it skipped:", ""]
            lines += [f"- {message.removeprefix('lightning_actprune: ')[:300]}" for message in plan.messages]
    return lines


def _cost(results: LMResults) -> str:
    """Seconds of each step and their ratio to one validation pass, mean over seeds."""
    cells: list[list[object]] = []

    def add(label: str, seconds: Callable[[SeedRun], float | None]) -> None:
        pairs = [(s, run.validation_pass) for run in results.seeds if (s := seconds(run)) is not None]
        if pairs:
            cells.append([label, f"{_mean([s for s, _ in pairs]):.2f}", f"{_mean([s / v for s, v in pairs]):.2f}"])

    def row(run: SeedRun, reduction: float, method: str, epochs: int) -> Row | None:
        return next((r for r in run.rows if _key(r) == (reduction, method, epochs)), None)

    steps, recovery = results.config.steps_per_epoch, results.config.recovery_epochs
    add("one validation pass (`trainer.validate`, the unit)", lambda run: run.validation_pass)
    add("one test pass (plain no-grad loop)", lambda run: run.test_seconds)
    add(f"one training epoch of the unpruned model ({steps} steps)", lambda run: run.train_epoch_seconds)
    add("ours: analysis (`find_prunable_layers`, at the start of `fit`)", lambda run: run.analysis_seconds)
    methods = sorted({r.method for r in results.rows() if r.method.startswith("Torch-Pruning")})
    for reduction in results.config.reductions:
        pct = f"-{reduction:.0%}"

        def field(
            method: str, epochs: int, name: str, reduction: float = reduction
        ) -> Callable[[SeedRun], float | None]:
            def get(run: SeedRun) -> float | None:
                found = row(run, reduction, method, epochs)
                if found is None:
                    return None
                value = getattr(found, name)
                if isinstance(value, list):
                    return _mean(value) if value else None
                return value

            return get

        add(f"{pct} ours: the prune at the end of `fit` (`on_fit_end`)", field(OURS, 0, "prune_seconds"))
        add(
            f"{pct} ours: the prune inside `fit` (`on_train_epoch_end`)",
            field(OURS_RECOVERED, recovery, "prune_seconds"),
        )
        add(f"{pct} ours: one recovery epoch", field(OURS_RECOVERED, recovery, "train_epoch_seconds"))
        for weight in sorted({r.distill_weight for one in results.seeds for r in one.step_recoveries}):

            def step(run: SeedRun, reduction: float = reduction, weight: float = weight) -> float | None:
                found = [
                    _median(r.step_seconds)
                    for r in run.step_recoveries
                    if (r.reduction, r.distill_weight) == (reduction, weight)
                ]
                return _mean(found) if found else None

            label = f"distilled (`distill_weight: {weight:g}`)" if weight else "plain"
            add(f"{pct} ours: one recovery step by steps, {label} (median)", step)
        for method in methods:
            add(f"{pct} {method}: ratio search (bisection)", field(method, 0, "search_seconds"))
            add(f"{pct} {method}: one prune", field(method, 0, "prune_seconds"))
            add(f"{pct} {method}: one fine-tuning epoch", field(method, recovery, "train_epoch_seconds"))
    return markdown_table(["step", "seconds", "/ validation pass"], cells, "lrr")


def _gqa_lines(results: LMResults) -> list[str]:
    units = _units(results)
    lines = gqa_comparison(results)
    if units is None or not lines:
        return []
    default, other = units
    return [
        "",
        f"Which unit of grouped-query attention keeps more accuracy: the `ours` rows use the package's default"
        f" `gqa_unit: {default}` (query heads, as many from every key/value head); the rows marked"
        f" `gqa_unit: {other}` pass it"
        + (
            " (a key/value head with its query heads)"
            if other == "kv_groups"
            else " (query heads, as many from every key/value head)"
        )
        + "; their one-shot row is the test loss right after the prune inside the recovery `fit` (the same weights"
        " and statistics as a prune at the end of `fit`):",
        "",
        *lines,
    ]


def render_markdown(results: LMResults) -> str:
    """The report: how it was run, the table, the goals, what ours pruned, the cost of each step."""
    config, corpus, params = results.config, results.corpus, results.parameters
    model = config.model
    seeds = ", ".join(str(s) for s in config.seeds)
    unpruned_val = [run.unpruned_val_loss for run in results.seeds]
    parts = [
        "### Language model: a small Llama on the standard library's bytes (generated)",
        "",
        f"Command: `{results.command}` ({results.total_seconds / 60:.1f} min). Machine: {results.machine.describe()}.",
        "",
        f"Data: {len(corpus.files)} files of the Python standard library (`{corpus.root}`, every non-empty `*.py`"
        f" outside {', '.join(f'`{d}`' for d in corpus.excluded_directories)}), as bytes, split by a hash of each"
        f" file's path: "
        + ", ".join(
            f"{split} {corpus.bytes[split]:,} bytes ({corpus.chunks[split]:,} chunks)" for split in corpus.bytes
        )
        + f"; chunks of {config.corpus.context} bytes; validation and test perplexity per byte over every byte of"
        " their files.",
        "",
        f"Model: `LlamaForCausalLM` from `LlamaConfig`, {model.layers} layers, width {model.hidden_size},"
        f" {model.heads} query heads over {model.kv_heads} key/value heads of {model.head_dim}, SwiGLU FFN of"
        f" {model.intermediate_size}, RMSNorm, rotary; {params.total:,} parameters, embeddings and LM head included"
        f" ({'tied' if params.tied else 'untied'}: embedding {params.embedding:,}, LM head {params.lm_head:,},"
        f" attention {params.attention:,}, FFN {params.ffn:,}, norms {params.norms:,}); every reduction is of that"
        f" total. AdamW (lr {model.lr}, betas 0.9/0.95, weight decay {model.weight_decay}, constant rate), batches of"
        f" {config.batch_size} chunks; an epoch is {config.steps_per_epoch} steps (`limit_train_batches`). Trained"
        f" E = {config.epochs} epochs before pruning (validation loss {mean_spread(unpruned_val, 4)}, perplexity"
        f" {mean_spread([math.exp(v) for v in unpruned_val], 3)}); R = {config.recovery_epochs} epoch after it."
        f" Seeds: {seeds} (mean ± standard deviation over seeds where there are several).",
        "",
        "Methods, each from the same trained weights: **ours, one-shot** is"
        " `ActivationPruning(target_params_reduction=r)` at the end of `fit` (every other argument at its default);"
        " **ours + recovery** adds `recovery_epochs=1`"
        " (prunes after epoch E, then trains the smaller model with the same AdamW, its state sliced); ours prunes"
        " attention heads (`gqa_unit` at the package's default unless a row names it) and FFN neurons;"
        " **Torch-Pruning** is its LLM recipe (`examples/LLMs/prune_llm.py`): `MetaPruner` with `num_heads` of"
        " q/k/v, `prune_num_heads=True`, `prune_head_dims=False`, `head_pruning_ratio = pruning_ratio`, local"
        " ranking, `round_to=4`, the LM head ignored and, unlike its script, the embedding too, so that the hidden"
        " size stays and heads and FFN are what it prunes (with grouped-query attention it removes query heads evenly"
        " per key/value head and keeps every key/value head; with 4 query heads per key/value head, torch-pruning"
        " 1.6.1 removes no head at all above a ratio of 0.5, so its parameter count is not monotone in the ratio);"
        " *FFN only* is the same with q, k and v ignored (FFN neurons only, every head stays)"
        + (
            ", *hidden size too* the recipe as its script runs it (only the LM head ignored)"
            if "hidden" in config.tp_scopes
            else ""
        )
        + "; magnitude (`GroupMagnitudeImportance(p=2,"
        ' group_reduction="mean")`) or Taylor (`GroupTaylorImportance`, gradients of'
        f" {config.taylor_batches} training batches) importance; its ratio is bisected"
        f" ({config.bisection_steps} halvings) to a parameter count at most ours' and, in the last interval, the"
        " closest to it; *epochs after prune* 1 is fine-tuning with a fresh AdamW on the very batches of ours'"
        " recovery epoch. Δ ppl is against the unpruned model after E epochs; *unpruned, trained on* is the same"
        " model after E + R epochs, for the recovery rows' total training.",
        "",
        _table(results),
        *coverage(results),
        "",
        *goals(results),
        *_gqa_lines(results),
        *step_recovery_lines(results),
        "",
        "What ours pruned (read from `callback.result.plan`):",
        *_what_ours_pruned(results),
        "",
        "Wall-clock of each step (mean over seeds), and as a ratio to one validation pass measured in the same run:",
        "",
        _cost(results),
    ]
    return "\n".join(parts)
