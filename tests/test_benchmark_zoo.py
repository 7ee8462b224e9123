import math

import pytest
import torch

from benchmarks.zoo.run import ARCHITECTURES, Row, measure, render_markdown, token_data


def test_token_tasks_are_learnable_and_deterministic():
    train, val = token_data("tokens")
    x, y = train.tensors
    assert x.shape[1] == 16
    assert len(train) == 3200
    assert len(val) == 800
    assert torch.equal(token_data("tokens")[0].tensors[1], y)  # the same seed gives the same data
    assert set(y.tolist()) == {0, 1, 2, 3}
    lm_x, lm_y = token_data("lm")[0].tensors
    step = (lm_x[:, 1] - lm_x[:, 0]) % 32
    assert torch.equal((lm_x[:, 1:] - lm_x[:, :-1]) % 32, step[:, None].expand(-1, 15))  # one step per sequence
    assert torch.equal(lm_y[:, :-1], lm_x[:, 1:])  # the target is the next token


def test_bert_is_measured_end_to_end(tmp_path):
    pytest.importorskip("transformers")
    (bert,) = [a for a in ARCHITECTURES if a.name.startswith("HF BERT")]
    row = measure(bert, epochs=1, lr=1e-3, root=tmp_path)
    assert row.status == "measured"
    assert 0.3 < row.prunable_fraction < 1
    assert row.analysis_seconds > 0
    assert row.validation_seconds > 0
    assert 0.65 < row.params_after / row.params <= 0.7  # the -30% target, within one unit's share
    for accuracy in (row.acc_before, row.acc_after, row.acc_recovered):
        assert 0 <= accuracy <= 1
    assert math.isclose(row.acc_pruned, row.acc_after)  # no BatchNorm: nothing to recalibrate


def test_report_lists_every_architecture_and_why_some_have_no_numbers():
    rows = [
        Row(
            "A",
            "measured",
            params=1000,
            prunable_fraction=0.5,
            analysis_seconds=0.2,
            validation_seconds=0.1,
            params_after=700,
            acc_before=0.9,
            acc_pruned=0.5,
            acc_after=0.8,
            acc_recovered=0.88,
            layers=3,
            messages=["lightning_actprune: not pruning x: because"],
        ),
        Row("B", "skipped: timm is not installed"),
        Row("C", "nothing pruned", params=1000, prunable_fraction=0.1, analysis_seconds=0.1, validation_seconds=0.1),
    ]
    text = render_markdown(
        rows, {"command": "python -m benchmarks.zoo", "minutes": 1.0, "machine": "m", "epochs": 2, "lr": 0.001}
    )
    assert "| A | 1,000 | 50.0% | 0.20 | 2.00× | 3 | 700 (-30.0%) | 90.0 | 50.0 | 80.0 | 88.0 |" in text
    assert "| B | skipped: timm is not installed |" in text
    assert "- A: not pruning x: because" in text
    assert "| C | 1,000 | 10.0% | 0.10 | 1.00× | 0 | out of reach (10.0% prunable) | — | — | — | — |" in text


def test_a_subset_run_replaces_its_rows_in_the_last_comparable_run(tmp_path):
    import dataclasses
    import json

    from benchmarks.zoo.run import merged_with_earlier

    header = {"command": "python -m benchmarks.zoo", "minutes": 10.0, "machine": "m", "epochs": 4, "lr": 0.001}
    earlier = [Row("LSTM classifier", "measured", params=1), Row("torchvision resnet18", "measured", params=2)]
    path = tmp_path / "zoo_results.json"
    path.write_text(json.dumps({"header": header, "rows": [dataclasses.asdict(r) for r in earlier]}))
    new_header = {**header, "command": "python -m benchmarks.zoo --models lstm", "minutes": 1.0}
    merged = merged_with_earlier(path, [Row("LSTM classifier", "measured", params=3)], new_header)
    assert [(r.name, r.params) for r in merged] == [("torchvision resnet18", 2), ("LSTM classifier", 3)]
    assert new_header["minutes"] == 11.0
    assert new_header["command"] == "python -m benchmarks.zoo, then python -m benchmarks.zoo --models lstm"
    other = {**header, "epochs": 2}
    assert merged_with_earlier(path, [Row("x", "measured")], other) == [Row("x", "measured")]  # not comparable
