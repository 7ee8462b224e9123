"""benchmarks.architectures: the per-model check on a few small torchvision models, and the report's rendering."""

import dataclasses

import pytest

from benchmarks.architectures.report import BEGIN, END, render_markdown, write_section
from benchmarks.architectures.results import ERROR, EXACT, SKIPPED, ModelResult, SweepResults, merge


def _results() -> SweepResults:
    rows = [
        ModelResult(
            "tiny_net",
            EXACT,
            1_234_567,
            32,
            0.9,
            4,
            0.301,
            1.5,
            0.5,
            4.0,
            900.0,
            1e-7,
            layers_pruned=3,
            statistic="fluctuation (standardised)",
        ),
        ModelResult("slow_net", EXACT, 2_000_000, 64, 0.5, 9, 0.3, 11.0, 2.0, 26.0, 1000.0, layers_pruned=9),
        ModelResult("odd_net", SKIPPED, 500_000, 32, 0.0, messages=["lightning_actprune: not pruning a|b: why"]),
        ModelResult("bad_net", ERROR, 700_000, error="timed out after 5 s"),
    ]
    return SweepResults(rows, "python -m benchmarks.architectures", "a CPU", 1, "2.x", "0.x", "1.6.1", 90.0)


def test_report_renders_every_model_the_summary_and_the_ratio(tmp_path):
    results = _results()
    text = render_markdown(results)
    summary = "**2 of 4 pruned exactly, 1 skipped, 1 errors; 1 over 10 s** of analysis + checks + λ search (slow_net)."
    assert summary in text
    assert "| tiny_net | 1.2M | 32 | pruned exactly | 90% | 4 | 3 | 30.1% | 1.5 | 0.5 | 0.50 | 900 | — |" in text
    assert "at the callback's defaults (`fluctuation (standardised)` scores and their tie-breaks)" in text
    assert "not pruning a\\|b: why" in text  # a pipe in a message does not break the table
    assert "| bad_net | 0.7M | — | error |" in text
    assert "timed out after 5 s" in text
    assert results.rows[1].ratio == pytest.approx(0.5)
    assert SweepResults.from_json(results.to_json()) == results

    markdown = tmp_path / "BENCHMARKS.md"
    markdown.write_text(f"# Benchmarks\n\nhand-written\n\n{BEGIN}\nold\n{END}\n\nafter\n")
    write_section(markdown, text)
    written = markdown.read_text()
    assert "old" not in written
    assert written.startswith("# Benchmarks\n\nhand-written\n\n")
    assert written.endswith(f"{END}\n\nafter\n")
    assert text in written


def test_subsets_run_side_by_side_merge_into_one_table_by_model_name():
    whole = _results()
    first = dataclasses.replace(whole, rows=whole.rows[2:], command="python -m benchmarks.architectures --models a")
    second = dataclasses.replace(whole, rows=whole.rows[:2], total_seconds=120.0)
    merged = merge([first, second])
    assert [row.name for row in merged.rows] == ["bad_net", "odd_net", "slow_net", "tiny_net"]
    assert merged.command == "python -m benchmarks.architectures --models a & python -m benchmarks.architectures"
    assert merged.total_seconds == 120.0
    with pytest.raises(ValueError, match="measured twice: \\['tiny_net'\\]"):
        merge([whole, dataclasses.replace(whole, rows=whole.rows[:1])])
    with pytest.raises(ValueError, match="different library versions"):
        merge([first, dataclasses.replace(second, torch="3.x")])


@pytest.mark.parametrize("name", ["regnet_y_400mf", "shufflenet_v2_x0_5"])
def test_small_torchvision_models_prune_exactly(name):
    pytest.importorskip("torchvision")
    from benchmarks.architectures.check import check

    result = check(name)
    assert result.status == EXACT, (result.error, result.messages)
    assert result.reduction >= 0.3
    assert result.prunable_fraction > 0.5
    assert result.statistic == "fluctuation (over the layer mean)"  # the callback's default path for a target
    assert 0 < result.layers_pruned <= result.layers
    if name.startswith("regnet"):  # its grouped convolutions' bottlenecks prune too: nothing is skipped
        assert result.messages == []
        assert result.prunable_fraction == 1.0
        assert result.layers > 40
