"""benchmarks.cost: one real measurement of a tiny model through the callback, and the report's rendering."""

import dataclasses

import pytest
import torch
from torch import nn

from benchmarks.cost import measure as cost_measure
from benchmarks.cost.models import MODELS, Model
from benchmarks.cost.report import BEGIN, END, render_markdown, write_section
from benchmarks.cost.results import CostResults, Measurement, merge


def _tiny_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 10),
    )  # fmt: skip


def test_a_measurement_times_the_prune_step_and_its_passes(monkeypatch):
    monkeypatch.setitem(MODELS, "tiny_cnn", Model("tiny_cnn", _tiny_cnn, 12))
    threads = torch.get_num_threads()
    try:
        row = cost_measure.measure("tiny_cnn", "after", images=8, batch_size=4, target=0.3)
    finally:
        torch.set_num_threads(threads)
    assert row.error == ""
    assert row.measured_layers == 3  # the first conv reads the images: not measured
    assert row.reduction >= 0.3
    # statistics, after the surgery, BatchNorm recalibration, after it
    assert row.passes == 4
    assert 0 < row.passes_seconds < row.prune_seconds
    assert 0 < row.analysis_seconds < row.prune_seconds
    assert row.validation_seconds > 0
    assert row.batch_seconds > 0
    assert row.recorded_batch_seconds > 0
    assert row.needed_batch_seconds > 0
    assert row.recorder_setup_seconds >= 0
    assert row.update_share > 0  # the default's recorder spends time in its updates, timed within each batch
    assert row.package.endswith("lightning_actprune/__init__.py")


def _results() -> CostResults:
    rows = [
        Measurement("net", "before", 224, 64, 16, "", 25_000_000, 160, 10.0, 0.02, 70.0, 9.0, 40.0, 4, 0.3, 1.0, 2.1),
        Measurement(
            "net", "after", 224, 64, 16, "", 25_000_000, 160, 10.0, 0.01, 41.5, 1.0, 40.0, 4, 0.3, 1.0, 1.3, 1.05
        ),
        Measurement("wide", "after", 224, 64, 16, "", 1_000_000, 41, 1.0, 0.0, 10.0, 1.0, 6.0, 4, 0.3, 0.1, 0.2),
        Measurement(
            "many",
            "after",
            224,
            64,
            16,
            "",
            19_000_000,
            326,
            batch_seconds=1.0,
            recorded_batch_seconds=1.08,
            recorder_setup_seconds=0.25,
            update_share=0.06,
        ),
        Measurement("bad", "after", 299, 64, 16, error="timed out after 5 s"),
    ]
    return CostResults(
        rows, "python -m benchmarks.cost", "a CPU", 2, "2.x", "1.6.1", "5fd020c", "abc", 600.0, ["wide", "many"]
    )


def test_report_says_per_model_whether_the_goal_is_met(tmp_path):
    results = _results()
    after = results.rows[1]
    assert after.other_seconds == pytest.approx(1.5)
    assert after.budget_seconds == pytest.approx(2.0)  # 10 % of a 10 s pass is less than the 2 s floor
    assert after.met
    assert not results.rows[0].met
    assert not results.rows[2].met  # 4 s of the rest against a 1 s pass
    text = render_markdown(results)
    assert "**After: 1 of 2 models meet the goal**" in text
    assert "; missed: wide." in text
    # after: the callback records the default's moments only (+5 %); every moment in brackets
    assert "| net | 224 | 25.0M | 160 | after | 10.0 | 41.5 | 4 in 40.0 | 1.5 | 0.15 | met (≤ 2.0 s) | +5%" in text
    assert "(every moment: +30%)" in text
    assert (
        "| net | 224 | 25.0M | 160 | before | 10.0 | 70.0 | 4 in 40.0 | 30.0 | 3.00 | missed (≤ 2.0 s) | +110% |"
        in text
    )
    assert (
        "326 measured layers (many) costs 6% of a validation batch inside its metric updates, timed within each batch"
        " (within the 10% goal); side by side with plain batches it added 8% (every moment: 8%)" in text
    )
    assert "| +8%; inside its updates +6%; first batch +0.25 s |" in text
    assert "Its first batch costs 0.25 s more (the recorder's 326 metrics are made), once per pass: 25% of" in text
    assert "The baseline's rows of wide, many were left out" in text
    assert "| bad | 299 | 0.0M | 0 | after timed out after 5 s | — | — | — | — | — | — | — |" in text
    assert CostResults.from_json(results.to_json()) == results

    markdown = tmp_path / "BENCHMARKS.md"
    markdown.write_text(f"# Benchmarks\n\nhand-written\n\n{BEGIN}\nold\n{END}\n")
    write_section(markdown, text)
    assert "old" not in markdown.read_text()
    assert text in markdown.read_text()


def test_runs_side_by_side_merge_into_one_table_in_the_models_order():
    whole = _results()
    one = dataclasses.replace(whole, rows=whole.rows[2:], command="run b", total_seconds=300.0, skipped_before=[])
    two = dataclasses.replace(whole, rows=whole.rows[:2], command="run a", total_seconds=500.0)
    merged = merge([one, two], ["net", "wide", "many", "bad"])
    assert [(r.model, r.version) for r in merged.rows] == [
        ("net", "before"), ("net", "after"), ("wide", "after"), ("many", "after"), ("bad", "after")
    ]  # fmt: skip
    assert merged.command == "run b & run a"
    assert merged.total_seconds == 500.0
    assert merged.skipped_before == ["wide", "many"]
    assert "(8.3 min, the runs side by side)" in render_markdown(merged)
    with pytest.raises(ValueError, match="measured twice"):
        merge([two, two], ["net"])
    with pytest.raises(ValueError, match="different commits"):
        merge([one, dataclasses.replace(two, current="other")], ["net"])


def test_the_updates_are_timed_inside_each_batch_and_the_metric_is_restored():
    from lightning_actprune._statistics import ActivationStatistics
    from lightning_actprune.core import ActivationRecorder

    update = ActivationStatistics.update
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    batches = [torch.randn(32, 8) for _ in range(3)]
    shares: list[float] = []
    cost_measure._batch_seconds(net, batches, lambda: ActivationRecorder(net), shares)
    assert len(shares) == 2  # every batch after the recorder's first
    assert all(share > 0 for share in shares)
    assert ActivationStatistics.update is update
    plain: list[float] = []
    cost_measure._batch_seconds(net, batches, None, plain)
    assert plain == [0.0, 0.0]  # nothing recorded, nothing inside the updates
