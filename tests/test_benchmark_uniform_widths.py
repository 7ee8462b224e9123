"""The uniform-against-free widths benchmark: its data, one measured seed, its report."""

import json

import pytest
import torch

from benchmarks.uniform_widths import BEGIN, END, SEQUENCE, main, measure, render, stdlib_splits


def test_the_splits_are_standard_library_bytes_split_by_file():
    splits = stdlib_splits(train_bytes=64 * SEQUENCE, eval_bytes=16 * SEQUENCE)
    shapes = [tuple(splits[s].shape) for s in ("train", "validation", "test")]
    assert shapes == [(64, SEQUENCE), (16, SEQUENCE), (16, SEQUENCE)]
    text = bytes(splits["train"].flatten().tolist()).decode("utf-8", errors="replace")
    assert "def " in text or "import " in text
    rows = {s: {tuple(r.tolist()) for r in splits[s]} for s in splits}
    assert not rows["train"] & rows["test"]
    assert not rows["validation"] & rows["test"]
    assert torch.equal(stdlib_splits(64 * SEQUENCE, 16 * SEQUENCE)["test"], splits["test"])  # deterministic


@pytest.mark.slow
def test_one_seed_is_measured_and_rendered(tmp_path):
    pytest.importorskip("transformers")
    results = measure(seeds=[0], steps=2, targets=[0.3], train_bytes=32 * SEQUENCE, eval_bytes=8 * SEQUENCE)
    uniform, free = results["rows"]
    assert uniform["uniform"] is True
    assert free["uniform"] is False
    assert len(set(uniform["widths"])) == 1  # one width in every block
    for row in (uniform, free):
        assert row["reduction"] >= 0.3
        assert row["parameters"] <= row["stock_parameters"] <= results["trained"][0]["parameters"]
    assert uniform["stock_parameters"] == uniform["parameters"]  # its config states it: nothing padded
    report = render(results, "python -m benchmarks.uniform_widths", 1.0, "a CPU")
    assert "| −30% |" in report
    cache, markdown = tmp_path / "cache", tmp_path / "BENCHMARKS.md"
    cache.mkdir()
    (cache / "uniform_widths_results.json").write_text(
        json.dumps({"results": results, "command": "c", "minutes": 1.0, "machine": "m"})
    )
    markdown.write_text(f"# B\n\nhand-written\n\n{BEGIN}\nold\n{END}\n")
    main(["--report-only", "--cache-dir", str(cache), "--markdown", str(markdown)])
    text = markdown.read_text()
    assert "hand-written" in text
    assert "old" not in text
    assert "| −30% |" in text
