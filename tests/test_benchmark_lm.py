"""benchmarks.lm: the corpus, the Torch-Pruning recipe's exactness, and the whole protocol with ``--quick``."""

import contextlib
import copy
import dataclasses
import doctest
import importlib.util
import io
import json
import logging
import math
import shlex
import warnings

import pytest
import torch

from benchmarks import common
from benchmarks.common import JsonRecord, command_line, markdown_table, write_section
from benchmarks.lm.data import (
    BOS,
    EOS,
    IGNORE_INDEX,
    PAD,
    Chunks,
    Corpus,
    CorpusConfig,
    CorpusDataModule,
    hash_position,
)
from benchmarks.lm.methods import _tp_pruned
from benchmarks.lm.model import ByteLM, attention_modules, layer_widths, mlp_modules
from benchmarks.lm.report import (
    BEGIN,
    END,
    compact_widths,
    coverage,
    distillation_cost,
    goals,
    gqa_comparison,
    render_markdown,
)
from benchmarks.lm.results import (
    OURS,
    OURS_RECOVERED,
    SCRATCH,
    UNPRUNED,
    UNPRUNED_LONGER,
    LMResults,
    RunConfig,
    default_gqa_unit,
    other_gqa_unit,
    ours_with_unit,
)
from benchmarks.lm.run import QUICK, main

needs_transformers = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None, reason="the benchmark's Llama comes from transformers"
)


def test_common_helpers(tmp_path):
    for module in (common.command, common.markdown, common.records):
        assert doctest.testmod(module).failed == 0
    assert shlex.split(command_line("benchmarks.lm", ["--out", "a b.json"])) == [
        "python", "-m", "benchmarks.lm", "--out", "a b.json",
    ]  # fmt: skip
    with pytest.raises(ValueError, match="every row needs 2 cells"):
        markdown_table(["a", "b"], [[1]])
    with pytest.raises(ValueError, match="`align` letters can be l, r or c; got 'x'"):
        markdown_table(["a"], [[1]], align="x")
    path = tmp_path / "deep" / "report.md"
    write_section(path, "one", "<!-- x:begin -->", "<!-- x:end -->")
    path.write_text("# Title\n\n" + path.read_text() + "\nafter\n")
    write_section(path, "two", "<!-- x:begin -->", "<!-- x:end -->")
    assert path.read_text() == "# Title\n\n<!-- x:begin -->\ntwo\n<!-- x:end -->\n\nafter\n"

    @dataclasses.dataclass
    class Inner:
        values: tuple[float, ...]
        label: str | None = None

    @dataclasses.dataclass
    class Outer(JsonRecord):
        inner: list[Inner]
        by_seed: dict[int, Inner]

    record = Outer([Inner((1.0, 2.5), "a")], {3: Inner((), None)})
    assert Outer.from_json(record.to_json()) == record


def _write(root, relative, text):
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_corpus_splits_by_file_and_scores_every_byte_once(tmp_path):
    for i in range(30):
        _write(tmp_path, f"pkg/mod_{i}.py", f"x = {i}\n" * (i + 1))
    _write(tmp_path, "tests/test_x.py", "assert True\n")  # a test suite: excluded
    _write(tmp_path, "encodings/cp1.py", "table = ()\n")  # generated: excluded
    _write(tmp_path, "empty.py", "")  # nothing to learn: excluded
    config = CorpusConfig(test_bytes=60, val_bytes=40, context=16, root=str(tmp_path))
    corpus = Corpus.load(config)
    paths = [f.path for f in corpus.files]
    assert paths == sorted(f"pkg/mod_{i}.py" for i in range(30))
    again = Corpus.load(config)
    assert [f.split for f in again.files] == [f.split for f in corpus.files]  # deterministic
    by_hash = sorted(corpus.files, key=lambda f: hash_position(f.path))
    splits = [f.split for f in by_hash]  # test first in hash order, then validation, then training
    assert splits == sorted(splits, key=["test", "val", "train"].index)
    assert corpus.bytes_in("test") >= 60
    assert corpus.bytes_in("val") >= 40
    assert corpus.bytes_in("test") - by_hash[splits.count("test") - 1].size < 60  # no file more than needed
    for split in ("train", "val", "test"):
        files = [f for f in corpus.files if f.split == split]
        chunks = getattr(corpus, split)
        # BOS + bytes + EOS per file; every token but the very first is a target exactly once
        assert chunks.scored_tokens == sum(f.size + 2 for f in files) - 1
        first = files[0]
        assert chunks.inputs[0, 0] == BOS
        assert chunks.inputs[0, 1 : 1 + 5].tolist() == list((tmp_path / first.path).read_bytes()[:5])
    chunks = Chunks(torch.tensor([BOS, 10, 11, EOS]), context=2)
    assert chunks.inputs.tolist() == [[BOS, 10], [11, EOS]]
    assert chunks.targets.tolist() == [[10, 11], [EOS, IGNORE_INDEX]]
    assert chunks.inputs.max() <= PAD

    data = CorpusDataModule(corpus, batch_size=4, eval_batch_size=8, seed=0)
    sampler = data.train_dataloader().sampler
    sampler.set_epoch(3)
    shifted = data.shifted(3).train_dataloader().sampler
    shifted.set_epoch(0)
    assert list(sampler) == list(shifted)  # a fine-tune's first epoch sees the recovery epoch's batches
    with pytest.raises(ValueError, match="`context` must be at least 8 bytes; got 4"):
        CorpusConfig(context=4)


def _removed(original, pruned, rows):
    """Which row blocks of ``original`` the rows of ``pruned`` are (blocks of ``rows``), and which are gone."""
    blocks = original.weight.detach().view(-1, rows, original.in_features)
    kept = [
        next(i for i in range(len(blocks)) if torch.equal(blocks[i], block))
        for block in pruned.weight.detach().view(-1, rows, pruned.in_features)
    ]
    return kept, sorted(set(range(len(blocks))) - set(kept))


@needs_transformers
@pytest.mark.parametrize(("importance", "scope"), [("magnitude", "recipe"), ("taylor", "recipe"), ("magnitude", "ffn")])
def test_torch_pruning_recipe_equals_zeroing_the_removed_heads_and_neurons(importance, scope):
    torch.manual_seed(0)
    model = ByteLM(QUICK.model).eval()
    inputs = torch.randint(0, 256, (3, QUICK.model.context))
    if importance == "taylor":
        model(inputs).logsumexp(-1).mean().backward()
    pruned = _tp_pruned(model, importance, 0.5, inputs[:1], scope)
    widths = layer_widths(pruned)
    heads = 4 if scope == "recipe" else 8  # the recipe: 2 query heads of 4 per key/value head go
    assert [(w.query_heads, w.kv_heads) for w in widths] == [(heads, 2)] * QUICK.model.layers
    assert all(w.ffn == 64 for w in widths)
    zeroed = copy.deepcopy(model)
    for (_, attention), (_, small) in zip(
        attention_modules(zeroed.model), attention_modules(pruned.model), strict=True
    ):
        kept, removed = _removed(attention.q_proj, small.q_proj, attention.head_dim)
        per_group = QUICK.model.heads // QUICK.model.kv_heads
        # the query heads stay with their key/value head
        assert sorted(h // per_group for h in kept) == sorted([0, 1] * (heads // 2))
        with torch.no_grad():
            for head in removed:
                attention.o_proj.weight[:, head * attention.head_dim : (head + 1) * attention.head_dim] = 0
    for (_, mlp), (_, small) in zip(mlp_modules(zeroed.model), mlp_modules(pruned.model), strict=True):
        _, removed = _removed(mlp.gate_proj, small.gate_proj, 1)
        with torch.no_grad():
            mlp.down_proj.weight[:, removed] = 0
    with torch.no_grad():
        torch.testing.assert_close(pruned(inputs), zeroed(inputs), rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("lm") / "results.json"
    # the command line quiets Lightning's loggers and sets the thread count: give the other tests theirs back
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels, threads = [logger.level for logger in loggers], torch.get_num_threads()
    printed = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(printed):
            main(["--quick", "--threads", "1", "--scratch", "--tp-hidden", "--out", str(out)])
        out.with_suffix(".log").write_text(printed.getvalue())
    finally:
        torch.set_num_threads(threads)
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
    return out


@needs_transformers
def test_quick_run_writes_every_method_s_records(quick):
    data = json.loads(quick.read_text())
    results = LMResults.from_json(quick.read_text())
    assert results.to_json() == json.dumps(data, indent=2)
    assert results.config == dataclasses.replace(QUICK, scratch=True, tp_scopes=("recipe", "ffn", "hidden"))
    assert results.command == f"python -m benchmarks.lm --quick --threads 1 --scratch --tp-hidden --out {quick}"
    assert results.corpus.files[0].path == "__future__.py"
    assert {f.split for f in results.corpus.files} == {"train", "val", "test"}
    (run,) = results.seeds
    total = results.parameters.total
    assert total == results.parameters.embedding + results.parameters.lm_head + results.parameters.attention + (
        results.parameters.ffn + results.parameters.norms
    )
    rows = {(r.reduction, r.method, r.epochs_after_prune): r for r in run.rows}
    assert set(rows) == {
        (0.0, UNPRUNED, 0),
        (0.0, UNPRUNED_LONGER, 1),
        (0.3, OURS, 0),
        (0.3, OURS_RECOVERED, 1),
        (0.3, "Torch-Pruning magnitude", 0),
        (0.3, "Torch-Pruning magnitude", 1),
        (0.3, "Torch-Pruning taylor", 0),
        (0.3, "Torch-Pruning taylor", 1),
        (0.3, "Torch-Pruning magnitude, FFN only", 0),
        (0.3, "Torch-Pruning magnitude, FFN only", 1),
        (0.3, "Torch-Pruning taylor, FFN only", 0),
        (0.3, "Torch-Pruning taylor, FFN only", 1),
        (0.3, "Torch-Pruning magnitude, hidden size too", 0),
        (0.3, "Torch-Pruning magnitude, hidden size too", 1),
        (0.3, "Torch-Pruning taylor, hidden size too", 0),
        (0.3, "Torch-Pruning taylor, hidden size too", 1),
        (0.3, SCRATCH, 1),
        (0.3, ours_with_unit(OURS, other_gqa_unit()), 0),
        (0.3, ours_with_unit(OURS_RECOVERED, other_gqa_unit()), 1),
    }
    ours = rows[(0.3, OURS, 0)]
    assert rows[(0.0, UNPRUNED, 0)].params == total
    assert 0.3 <= 1 - ours.params / total < 0.33
    assert rows[(0.3, OURS_RECOVERED, 1)].params == ours.params
    for method in ("Torch-Pruning magnitude", "Torch-Pruning taylor", "Torch-Pruning taylor, FFN only"):
        tp_row = rows[(0.3, method, 0)]
        assert tp_row.params <= ours.params  # at most ours' parameters
        assert 0 < tp_row.ratio < 0.95
        assert tp_row.search_seconds > 0
        assert rows[(0.3, method, 1)].widths == tp_row.widths
    assert {w.query_heads for w in rows[(0.3, "Torch-Pruning taylor, FFN only", 0)].widths} == {8}
    hidden = rows[(0.3, "Torch-Pruning magnitude, hidden size too", 0)]
    assert hidden.params <= ours.params
    assert rows[(0.3, SCRATCH, 1)].params == ours.params  # ours' architecture, trained from random weights
    assert rows[(0.3, SCRATCH, 1)].widths == ours.widths
    for row in run.rows:
        assert len(row.widths) == QUICK.model.layers
        assert 1 < row.test_ppl < 259
    plan, other_plan = run.plans
    assert [layer.kind for layer in plan.layers] == ["heads", "ffn"] * QUICK.model.layers  # heads and FFN neurons
    assert [layer.kept for layer in plan.layers if layer.kind == "ffn"] == [w.ffn for w in ours.widths]
    assert plan.test_loss_right_after_prune_in_fit == pytest.approx(ours.test_loss, rel=1e-4)  # the same prune
    assert (
        (plan.gqa_unit, other_plan.gqa_unit) == (default_gqa_unit(), other_gqa_unit()) == ("query_heads", "kv_groups")
    )
    # kv_groups: the units of each attention are its key/value heads, each with its 4 query heads
    assert [layer.neurons for layer in other_plan.layers if layer.kind == "heads"] == [2] * QUICK.model.layers
    kv_one_shot = rows[(0.3, ours_with_unit(OURS, "kv_groups"), 0)]
    assert kv_one_shot.test_loss == other_plan.test_loss_right_after_prune_in_fit
    # one key/value group (4 query heads and their key/value head) is 5 % of the quick model: it may overshoot by one
    assert 0.3 <= 1 - kv_one_shot.params / total < 0.36
    for width, layer in zip(kv_one_shot.widths, [x for x in other_plan.layers if x.kind == "heads"], strict=True):
        assert (width.kv_heads, width.query_heads) == (layer.kept, 4 * layer.kept)
    # by steps: N = S and N = S/4 (at least 1), each plain and distilled
    steps = {(r.recovery_steps, r.distill_weight): r for r in run.step_recoveries}
    assert set(steps) == {(2, 0.0), (2, 0.5), (1, 0.0), (1, 0.5)}
    for (count, _), record in steps.items():
        assert len(record.step_seconds) == count
        assert all(seconds > 0 for seconds in record.step_seconds)
        assert record.prune_seconds > 0
        assert record.distill_temperature == 2.0
        # the prune at step E·S is ours' one-shot prune: the same batches before it, the same statistics
        assert (record.params, record.widths) == (ours.params, ours.widths)
        assert record.test_loss_after_prune == pytest.approx(ours.test_loss, rel=1e-5)
        assert record.test_loss < record.test_loss_after_prune  # recovery helps
    # N = S steps without distillation are the recovery epoch; distillation changes the loss, so the weights
    assert steps[(2, 0.0)].test_loss == pytest.approx(rows[(0.3, OURS_RECOVERED, 1)].test_loss, rel=1e-5)
    assert steps[(2, 0.5)].test_loss != steps[(2, 0.0)].test_loss
    assert run.validation_seconds[0] > 0
    # the results are written after every row (an interrupted seed keeps the rows it finished), then at its end
    written = [line for line in quick.with_suffix(".log").read_text().splitlines() if " wrote " in line]
    counts = [int(line.split("the last with ")[1].split(" rows")[0]) for line in written]
    finished = len(run.rows) + len(run.step_recoveries)
    assert counts == [*range(3, finished + 1), finished]  # the unpruned rows come with the first method's
    assert ours.prune_seconds > 0
    assert rows[(0.3, OURS_RECOVERED, 1)].prune_seconds > 0


@needs_transformers
def test_quick_report_renders_the_table_the_goals_and_what_was_pruned(quick):
    results = LMResults.from_json(quick.read_text())
    text = quick.with_suffix(".md").read_text()
    assert text.startswith(BEGIN)
    assert text.rstrip().endswith(END)
    assert render_markdown(results) in text
    assert f"Command: `python -m benchmarks.lm --quick --threads 1 --scratch --tp-hidden --out {quick}`" in text
    header = "| target | seeds | method | epochs after prune (of 2 steps) | parameters | widths per layer (q heads/"
    assert header in text
    ours = next(r for r in results.rows() if r.method == OURS)
    assert (
        f"| -30% | 1 | ours, one-shot | 0 | {ours.params:,} ({1 - ours.params / results.parameters.total:.1%} off) |"
        in (text)
    )
    assert "| -30% | 1 | Torch-Pruning taylor (ratio " in text
    assert "Not every seed ran every row" not in text  # one seed, every row
    assert "Goal 1, one-shot at -30%" in text
    assert "Goal 2 at -30%, after 1 recovery epoch" in text
    assert "| 0 | 128 → " in text  # decoder layer 0's FFN neurons, read from the plan
    assert "| one validation pass (`trainer.validate`, the unit) |" in text
    assert compact_widths(ours.widths) in text
    one = compact_widths(ours.widths[:1])
    assert one.count("/") == 2  # query heads / key-value heads / FFN neurons; equal layers are written once
    assert compact_widths(ours.widths[:1] * 3) == f"{one} ×3"
    assert "| -30% | 1 | ours + recovery, `gqa_unit: kv_groups` | 1 |" in text
    lines = gqa_comparison(results)
    assert [line.split(":")[0] for line in lines] == ["- -30%, one-shot", "- -30%, + 1 recovery epoch"]
    assert all("at this one seed (no spread to compare with)" in line for line in lines)
    assert lines[0] in text
    assert "| -30% | 1 | 2 (1 epoch) | none | " in text
    assert "| -30% | 1 | 1 (0.5 epoch) | `distill_weight: 0.5`, T 2 | " in text
    ratios = distillation_cost(results)
    assert len(ratios) == 2  # distilled over plain at N = 2 and N = 1
    assert f"a distilled recovery step takes {ratios[0] / 2 + ratios[1] / 2:.2f} ± " in text
    assert "At -30% (seed 0, `gqa_unit: kv_groups`)" in text
    assert "| -30% ours: one recovery step by steps, distilled (`distill_weight: 0.5`) (median) |" in text


@needs_transformers
def test_goals_say_met_or_missed_from_the_numbers(quick):
    results = LMResults.from_json(quick.read_text())
    run = results.seeds[0]
    base = next(r for r in run.rows if r.method == UNPRUNED).test_loss

    def with_loss(method, epochs, loss):
        for row in run.rows:
            if (row.method, row.epochs_after_prune) == (method, epochs):
                row.test_loss = loss

    with_loss(OURS, 0, base + 0.01)
    for row in run.rows:
        if row.method.startswith("Torch-Pruning") and row.epochs_after_prune == 0:
            row.test_loss = base + 0.05
    with_loss(OURS_RECOVERED, 1, base + 0.03)  # 3 % above unpruned
    lines = goals(results)
    assert "**met**" in lines[0]
    assert "**met** (+3.0 %; against the unpruned model trained as many steps, E + R epochs: " in lines[1]
    with_loss(OURS, 0, base + 0.04)
    with_loss(OURS_RECOVERED, 1, base + 0.1)  # 10.5 % above
    lines = goals(results)
    assert "**missed**" in lines[0]
    assert "**missed by 5.5 points** (+10.5 %;" in lines[1]


@needs_transformers
def test_gqa_verdict_needs_a_difference_larger_than_the_seed_spread(quick):
    results = LMResults.from_json(quick.read_text())
    other = copy.deepcopy(results.seeds[0])
    other.seed = 1
    for row in other.rows:
        row.seed = 1
    results.seeds.append(other)
    one_shot, kv_one_shot = OURS, ours_with_unit(OURS, "kv_groups")

    def set_ppl(seed, method, ppl):
        for row in results.seeds[seed].rows:
            if (row.method, row.epochs_after_prune) == (method, 0):
                row.test_loss = math.log(ppl)

    set_ppl(0, one_shot, 10.0)
    set_ppl(1, one_shot, 10.2)  # spread 0.141
    set_ppl(0, kv_one_shot, 9.0)
    set_ppl(1, kv_one_shot, 9.1)
    assert "**kv_groups** keeps more accuracy, by more than the seed spread (0.141)" in gqa_comparison(results)[0]
    set_ppl(0, kv_one_shot, 10.05)
    set_ppl(1, kv_one_shot, 10.05)  # 0.05 better on average: less than the spread
    assert "kv_groups is ahead, but within the seed spread (0.141): no clear winner" in gqa_comparison(results)[0]


@needs_transformers
def test_runs_of_one_seed_each_merge_into_one_report(quick, tmp_path):
    results = LMResults.from_json(quick.read_text())
    other = copy.deepcopy(results)
    other.seeds[0].seed = 7
    other.seeds[0].step_recoveries = []  # a run without the step rows: extra rows may differ
    other = dataclasses.replace(other, config=dataclasses.replace(other.config, seeds=(7,), step_fractions=()))
    second = tmp_path / "seed7.json"
    second.write_text(other.to_json())
    out = tmp_path / "merged.json"
    main(["--report-only", "--merge", str(quick), str(second), "--out", str(out)])
    merged = LMResults.from_json(out.read_text())
    assert [run.seed for run in merged.seeds] == [0, 7]
    assert merged.config == dataclasses.replace(results.config, seeds=(0, 7))
    assert merged.command == f"{results.command} && {other.command}"
    text = out.with_suffix(".md").read_text()
    assert "Seeds: 0, 7 (mean ± standard deviation" in text
    assert "| -30% | 1 | 2 (1 epoch) | none | " in text  # the step rows of the one seed that has them
    assert "Not every seed ran every row" in text
    assert "seed 7 has no recovery-by-steps rows." in text
    # a seed run later with another scope: no kv_groups rows, no step rows, but a reduction the others lack
    third = copy.deepcopy(results)
    third.seeds[0].seed = 8
    kept = [dataclasses.replace(row, seed=8) for row in third.seeds[0].rows if "gqa_unit" not in row.method]
    third.seeds[0].rows = kept + [dataclasses.replace(row, reduction=0.5) for row in kept if row.reduction]
    third.seeds[0].step_recoveries = []
    third = dataclasses.replace(third, config=dataclasses.replace(third.config, seeds=(8,), reductions=(0.3, 0.5)))
    merged = LMResults.merge([results, other, third])
    assert merged.config.reductions == (0.3, 0.5)
    assert coverage(merged) == [
        "",
        "Not every seed ran every row (each table's *seeds* column counts the seeds a row holds; its mean ± spread is"
        " over those): seed 0 has no -50% rows; seed 7 has no -50% rows, no recovery-by-steps rows; seed 8 has no"
        " -30% ours, one-shot, `gqa_unit: kv_groups`; ours + recovery, `gqa_unit: kv_groups` rows, no"
        " recovery-by-steps rows.",
    ]
    assert "| -50% | 1 | ours, one-shot | 0 |" in render_markdown(merged)
    assert "| -30% | 3 | ours, one-shot | 0 |" in render_markdown(merged)
    with pytest.raises(ValueError, match=r"the runs repeat seed 0's rows: \[\(0.3, 'Torch-Pruning magnitude'"):
        LMResults.merge([results, results])
    # one seed in two runs: the later run adds the reduction the first left out
    fourth = copy.deepcopy(third)
    fourth.seeds[0].rows = [row for row in fourth.seeds[0].rows if row.reduction != 0.3]
    fifth = copy.deepcopy(third)
    fifth.seeds[0].rows = [row for row in fifth.seeds[0].rows if row.reduction != 0.5]
    joined = LMResults.merge([results, fifth, fourth])
    assert [run.seed for run in joined.seeds] == [0, 8]
    assert joined.config.seeds == (0, 8)
    assert joined.seeds[1].rows == fifth.seeds[0].rows + [row for row in fourth.seeds[0].rows if row.reduction]
    assert coverage(joined) == coverage(LMResults.merge([results, third]))
    longer = dataclasses.replace(results, config=dataclasses.replace(results.config, epochs=3))
    with pytest.raises(ValueError, match="runs of different protocols cannot be merged"):
        LMResults.merge([results, longer])
    with pytest.raises(SystemExit):
        main(["--merge", str(quick), "--out", str(out)])  # --merge needs --report-only


def test_run_config_checks_the_step_and_distillation_settings():
    assert RunConfig(steps_per_epoch=80).recovery_step_counts == (80, 20)
    assert RunConfig(steps_per_epoch=2).recovery_step_counts == (2, 1)  # at least one step
    with pytest.raises(ValueError, match=r"`step_fractions` must be distinct positive numbers; got \(0.0,\)"):
        RunConfig(step_fractions=(0.0,))
    with pytest.raises(ValueError, match=r"`distill_weights` must be distinct numbers >= 0, one at least; got \(\)"):
        RunConfig(distill_weights=())
    with pytest.raises(ValueError, match="`distill_temperature` must be > 0; got 0"):
        RunConfig(distill_temperature=0)
    assert RunConfig(step_fractions=(), distill_weights=()).step_fractions == ()  # no step rows: no weights needed
    with pytest.raises(ValueError, match=r"`tp_reductions` must be among the reductions \(0.3, 0.5\); got \(0.4,\)"):
        RunConfig(tp_reductions=(0.4,))
    assert RunConfig(tp_reductions=()).tp_reductions == ()  # no Torch-Pruning rows at all
