"""The reports of the optimizer-state and default-criterion benchmarks, rendered from results of a known shape."""

from benchmarks.common import write_section
from benchmarks.fashion_cnn import default_criterion
from benchmarks.recovery import optimizer_state


def test_optimizer_state_report_has_every_seed_the_means_and_the_paired_differences(tmp_path):
    rows = [
        {"seed": s, "unpruned": 0.88, "carry": 0.87 + s / 100, "reset": 0.87, "fresh": 0.86, "carry_params": 185_706}
        for s in range(3)
    ]
    results = {"reduction": 0.9, "epochs": 10, "rows": rows, "command": "python -m x", "machine": "cpu", "seconds": 60}
    text = optimizer_state.render(results)
    assert "| 2 | 88.00 | 89.00 | 87.00 | 86.00 |" in text
    assert "| mean ± std | 88.00 ± 0.00 | 88.00 ± 1.00 | 87.00 ± 0.00 | 86.00 ± 0.00 |" in text
    assert "| vs carry (paired) |  | 0.00 ± 0.00 | -1.00 ± 1.00 | -2.00 ± 1.00 |" in text
    path = tmp_path / "B.md"
    write_section(path, text, optimizer_state.BEGIN, optimizer_state.END)
    assert text in path.read_text()


def test_default_criterion_report_pairs_new_and_old_per_seed():
    def cell(acc):
        return {"test_acc": acc, "params_reduction": 0.51, "channels": [8, 8, 10], "scored_by_rms": 6}

    rows = [
        {"seed": s, "target": 0.5, "unpruned": 0.86, "new default": cell(0.86 + s / 100), "old default": cell(0.85)}
        for s in range(2)
    ]
    results = {"seeds": [0, 1], "targets": [0.5], "rows": rows, "command": "c", "machine": "m", "seconds": 1}
    text = default_criterion.render(results)
    assert "| −50% | 86.00 ± 0.00 | 86.50 ± 0.71 | 0.50 ± 0.71 | 85.00 ± 0.00 | -1.00 ± 0.00 | 1.50 ± 0.71 |" in text
    assert "seed 1: new 8/8/10 (−51.0%), old 8/8/10 (−51.0%)" in text
