"""The generated Markdown section (between the ``hf-families:begin``/``:end`` markers)."""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Sequence

from benchmarks.common import markdown_table

from .check import NEW_TOKENS, RTOL, TARGET
from .families import SHRUNK_FFN, SHRUNK_HEADS, SHRUNK_KV_HEADS, SHRUNK_LAYERS, SHRUNK_VOCAB, SHRUNK_WIDTH
from .results import CLOSE, DIFFERS, ERROR, EXACT, NOT_RUN, NOTHING, PRUNED, SKIPPED, Comparison, FamilyResult
from .results import SweepResults as Results

BEGIN, END = "<!-- hf-families:begin -->", "<!-- hf-families:end -->"
NOTE_CHARACTERS = 140
HEADER = [
    "family",
    "class",
    "config",
    "params",
    "prunable",
    "FFN pruned",
    "heads pruned",
    "attention (unit)",
    "= zeroing oracle",
    "save → stock `from_pretrained`",
    "→ ours `from_pretrained`",
    "uniform: own `save_pretrained` → stock",
    "`generate` cache = no cache = oracle",
    "analysis (s)",
    "notes",
]


def _short(text: str, limit: int = NOTE_CHARACTERS) -> str:
    text = " ".join(text.removeprefix("lightning_actprune: ").split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def comparison(result: Comparison) -> str:
    """``exact``, ``close (3e-08)``, ``differs (…)``, ``—`` (not compared)."""
    if result.outcome == EXACT:
        return "exact"
    if result.outcome == CLOSE:
        return f"close ({result.max_abs_error:.0e})"
    if result.outcome == DIFFERS:
        detail = result.error or f"max error {result.max_abs_error:.2g}"
        return f"**differs** ({_short(detail, 80)})"
    return "—"


def attention(row: FamilyResult) -> str:
    """``4 q / 2 kv (GQA), query head``; ``4 heads``; ``—`` where no attention module declares its heads."""
    info = row.attention
    if not info.attention_modules:
        return "—"
    shape = f"{info.heads} q / {info.kv_heads} kv (GQA)" if info.grouped else f"{info.heads} heads"
    return f"{shape}, {info.unit}" if info.unit else f"{shape}, not found"


def _count(pruned: int, found: int) -> str:
    return f"{pruned}/{found}" if found else "—"


def _params(count: int) -> str:
    return f"{count / 1e6:.2f}M" if count >= 1e6 else f"{count / 1e3:.1f}k"


def _uniform(row: FamilyResult) -> str:
    if row.uniform_load.outcome in (EXACT, CLOSE):
        return comparison(row.uniform_load)
    if row.uniform_unstated:
        unstated = row.uniform_unstated[0].split("cannot state ", 1)[-1].split(": `save_pretrained`", 1)[0]
        return f"config cannot state {_short(unstated, 90)}"
    return comparison(row.uniform_load)


def _notes(row: FamilyResult) -> str:
    if row.error:
        return f"{row.stage}: {_short(row.error)}"
    if row.messages:
        more = f" (+{len(row.messages) - 1} more)" if len(row.messages) > 1 else ""
        return _short(row.messages[0]) + more
    return "—"


def _cells(row: FamilyResult) -> list[object]:
    stock = comparison(row.stock_load)
    if row.stock_load.outcome in (EXACT, CLOSE):
        stock += ", padded" if row.padded else ", not padded"
    return [
        row.name,
        f"`{row.model_class}`",
        "tiny" if row.curated else "default, shrunk",
        _params(row.params),
        f"{row.prunable_fraction:.0%}",
        _count(row.ffn_pruned, row.ffn_layers),
        _count(row.heads_pruned, row.head_layers),
        attention(row),
        comparison(row.oracle),
        stock,
        comparison(row.ours_load),
        _uniform(row),
        comparison(row.generate) if row.generate.outcome != NOT_RUN or row.generate.error else "—",
        f"{row.analysis_seconds:.2f}",
        _notes(row),
    ]


def _equal(rows: Sequence[FamilyResult], field: str) -> int:
    return sum(getattr(row, field).equal for row in rows)


def summary(results: Results) -> list[str]:
    """The counts a reader wants first: tried, built, pruned, and how many pass each check."""
    rows = results.rows
    status = Counter(row.status for row in rows)
    built = [row for row in rows if row.status != SKIPPED and not (row.status == ERROR and row.stage == "process")]
    pruned = [row for row in rows if row.status == PRUNED]
    curated = [row for row in rows if row.curated]
    generating = [row for row in pruned if row.generate.outcome != NOT_RUN or row.generate.error]
    with_heads = [row for row in pruned if row.head_layers]
    seconds = [row.analysis_seconds for row in rows if row.status in (PRUNED, NOTHING) or row.analysis_seconds]
    lines = [
        f"- **{len(rows)} families tried** ({len(curated)} with hand-written tiny configs, {len(rows) - len(curated)}"
        f" from their default config, shrunk), **{len(built)} built and ran** on their batch, **{len(pruned)} pruned**"
        f" ({status[NOTHING]} with nothing prunable, {status[ERROR]} errors, {status[SKIPPED]} skipped: they did not"
        " build or run on a generic batch)"
        + (
            f"; {len(results.not_tried)} more not tried: the run's wall-clock budget was spent first."
            if results.not_tried
            else "."
        ),
        f"- Of the {len(pruned)} pruned: equal to the zeroing oracle {_equal(pruned, 'oracle')}"
        f" ({sum(r.oracle.outcome == EXACT for r in pruned)} bit for bit); ours `save_pretrained` → stock"
        f" `from_pretrained` gives the same outputs {_equal(pruned, 'stock_load')}"
        f" ({sum(r.padded for r in pruned)} written zero-padded); → ours `from_pretrained` (pruned size)"
        f" {_equal(pruned, 'ours_load')}; heads found in {len(with_heads)}, pruned in"
        f" {sum(1 for r in pruned if r.heads_pruned)}; FFN layers pruned in {sum(1 for r in pruned if r.ffn_pruned)}.",
        f"- With `uniform_widths=True` the config states every width and the model's own `save_pretrained` round-trips"
        f" through the stock loader in {_equal(pruned, 'uniform_load')} of {len(pruned)}.",
        f"- `generate` (greedy, {NEW_TOKENS} new tokens) gives the same tokens with and without the cache and as the"
        f" zeroing oracle in {_equal(generating, 'generate')} of {len(generating)} generating families.",
    ]
    if curated:
        ok = [
            r
            for r in curated
            if r.status == PRUNED and r.oracle.equal and r.stock_load.equal and r.ours_load.equal and r.head_layers
        ]
        missing = ", ".join(r.name for r in curated if r not in ok)
        no_heads = ", ".join(r.name for r in curated if r.status == PRUNED and not r.heads_pruned)
        lines.append(
            f"- Issue 20's families: {len(ok)} of {len(curated)} pruned with heads found, equal to the oracle and"
            " through both loaders" + (f" (not: {missing})" if missing else "") + "; heads pruned at the target in"
            f" {sum(1 for r in curated if r.heads_pruned)} of {len(curated)}"
            + (f" (not: {no_heads})" if no_heads else "")
            + f", FFN neurons in {sum(1 for r in curated if r.ffn_pruned)}; with `uniform_widths=True` the model's own"
            f" `save_pretrained` round-trips in {_equal(curated, 'uniform_load')} of {len(curated)}."
        )
    if seconds:
        lines.append(
            f"- Analysis (`find_prunable_layers`) CPU seconds: median {statistics.median(seconds):.2f}, max"
            f" {max(seconds):.2f} ({max(rows, key=lambda r: r.analysis_seconds).name})."
        )
    return lines


def _failures(results: Results) -> list[str]:
    """The families that were not pruned, grouped by what stopped them."""
    groups: dict[str, list[str]] = {}
    for row in results.rows:
        if row.status == PRUNED:
            continue
        if row.status == NOTHING:
            reason = "nothing prunable: " + (_short(row.messages[0], 100) if row.messages else "no candidate layer")
        else:
            reason = f"{row.status} at {row.stage}: {_short(row.error, 120)}"
        groups.setdefault(reason, []).append(row.name)
    cells = [[", ".join(names), reason] for reason, names in sorted(groups.items(), key=lambda item: -len(item[1]))]
    return [markdown_table(["families", "what stopped them"], cells)] if cells else []


def render_markdown(results: Results) -> str:
    """The section: how it ran, the summary, one row per pruned family, then what stopped the others."""
    pruned = [row for row in results.rows if row.status == PRUNED]
    shrunk = (
        f"{SHRUNK_LAYERS} layers, width {SHRUNK_WIDTH}, FFN {SHRUNK_FFN}, {SHRUNK_HEADS} heads over"
        f" {SHRUNK_KV_HEADS} key/value heads where the config has the field, vocabulary {SHRUNK_VOCAB}"
    )
    parts = [
        "### Hugging Face families (generated)",
        "",
        " ".join(
            [
                f"Command: `{results.command}` ({results.total_seconds / 60:.1f} min wall,",
                f"{results.cpu_seconds / 60:.1f} min CPU in the families' checks). Machine:",
                f"{results.machine.describe()}. Each family runs in its own process (one thread, at most",
                f"{results.memory_gb:g} GB), built from a config with random weights: issue 20's families from",
                "hand-written tiny configs (shared with `tests/test_hf_families.py`), every other `model_type` of",
                f"transformers from its default config shrunk ({shrunk}), as the class of its first task among causal",
                "LM, seq2seq LM, sequence/image/audio classification, CTC, speech seq2seq, image-text-to-text (fed",
                "text only) and the bare model. Statistics of one random batch; `find_prunable_layers`; the plan",
                f"`ActivationPruning` chooses for `target_params_reduction={TARGET}` (half the prunable fraction where",
                "that is less); then the checks: the pruned model against the unpruned one with the removed neurons",
                f"zeroed at their consumers (*exact*: bit for bit; *close*: within rtol {RTOL:g});",
                "`lightning_actprune.save_pretrained` (zero-padded where the config cannot state a width) → the stock",
                "`AutoModel….from_pretrained` and → `lightning_actprune.from_pretrained`, outputs against the pruned",
                "model's; a second prune with `uniform_widths=True`, the config synced, the model's own",
                "`save_pretrained` → the stock loader (same outputs at the pruned size); greedy `generate` with and",
                "without the key/value cache and on the zeroing oracle. *FFN pruned*/*heads pruned*: layers that lost",
                "neurons / prunable layers found. *Prunable*: the most any plan removes (every prunable neuron but one",
                "per layer). Analysis: CPU seconds of the family's process. Notes: the error, else the first thing the",
                "analysis said it skipped.",
            ]
        ),
        "",
        *summary(results),
        "",
        markdown_table(HEADER, [_cells(row) for row in pruned], "lllrrrrllllllrl"),
    ]
    failures = _failures(results)
    if failures:
        parts += ["", "Families not pruned, and why:", "", *failures]
    return "\n".join(parts)
