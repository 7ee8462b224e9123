"""Smoke test of benchmarks.quality on a tiny ViT and synthetic 28×28 images: no Fashion-MNIST, a few seconds."""

import dataclasses
import json

import pytest
import torch
from torch.utils.data import TensorDataset

from benchmarks.common import SplitDataModule, machine_info
from benchmarks.quality import methods
from benchmarks.quality.models import QualityConfig, build, recipe
from benchmarks.quality.report import goals, markers
from benchmarks.quality.results import (
    OURS,
    OURS_BEFORE,
    OURS_DISTILLED,
    OURS_RESIDUAL,
    OURS_RESIDUAL_DISTILLED,
    SCRATCH,
    UNPRUNED,
    QualityResults,
)
from benchmarks.quality.run import main, run_seed

pytest.importorskip("timm")
pytest.importorskip("torch_pruning")

TINY = QualityConfig(embed_dim=16, depth=2, num_heads=2, mlp_ratio=2.0, epochs=1, train_images=192, num_val=64, lr=3e-3)


def _images(n: int, seed: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=generator)
    x = torch.rand(n, 784, generator=generator) * 0.3
    for label in range(3):  # a bright band whose row says the class
        rows = x.view(n, 28, 28)[y == label]
        rows[:, 9 * label : 9 * label + 5] += 0.7
    return TensorDataset(x, y)


def test_one_seed_measures_every_method_and_the_report_states_the_goals(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(methods, "TP_BISECTION_STEPS", 3)  # a coarser ratio: the test checks the steps, not the fit
    data = SplitDataModule(_images(192, 0), _images(64, 1), _images(96, 2), batch_size=32, eval_batch_size=48)
    lines = []
    rows, epoch_seconds = run_seed(TINY, data, tmp_path, [0.3], 1, [0.3], lines.append)
    assert (tmp_path / "quality" / f"vit-{TINY.key()}.pt").is_file()
    assert epoch_seconds > 0
    cells = {(row.reduction, row.method, row.epochs): row for row in rows}
    tp = [f"Torch-Pruning {i}, {s}" for i in ("taylor", "l2") for s in ("global", "uniform")]
    expected = {(0.0, UNPRUNED, 0), (0.3, OURS, 0), (0.3, OURS_BEFORE, 0), (0.3, OURS, 1), (0.3, OURS_DISTILLED, 1)}
    expected |= {(0.3, m, e) for m in tp for e in (0, 1)} | {(0.3, SCRATCH, TINY.epochs + 1)}
    expected |= {(0.3, OURS_RESIDUAL, 0), (0.3, OURS_RESIDUAL, 1), (0.3, OURS_RESIDUAL_DISTILLED, 1)}
    assert set(cells) == expected
    total = cells[(0.0, UNPRUNED, 0)].params
    for (reduction, method, _), row in cells.items():
        assert 1 - row.params / total >= reduction, method
        assert 0 <= row.test_acc <= 1
    # the callback pruning at the start of a fit prunes what the plain functions do: the same statistics and plan
    assert cells[(0.3, OURS, 1)].widths == cells[(0.3, OURS, 0)].widths
    assert cells[(0.3, OURS_RESIDUAL, 1)].widths == cells[(0.3, OURS_RESIDUAL, 0)].widths
    assert cells[(0.3, SCRATCH, TINY.epochs + 1)].widths == cells[(0.3, OURS, 0)].widths
    assert cells[(0.3, OURS, 1)].epoch_seconds
    assert cells[(0.3, "Torch-Pruning taylor, global", 1)].epoch_seconds
    assert cells[(0.0, UNPRUNED, 0)].widths == "d16 2×8/32 2×8/32"

    command = "python -m benchmarks.quality --seeds 0"
    results = QualityResults(TINY, {0: epoch_seconds}, rows, machine_info(), command, 0.1)
    halves = [tmp_path / "a.json", tmp_path / "b.json"]
    for half, seeds in zip(halves, ((0,), (1,)), strict=True):  # the same rows as a second seed: a merge of two runs
        copy = QualityResults.from_json(results.to_json())
        for row in copy.rows:
            row.seed = seeds[0]
        copy.base_epoch_seconds = {seeds[0]: epoch_seconds}
        half.write_text(copy.to_json())
    markdown, out = tmp_path / "BENCHMARKS.md", tmp_path / "merged.json"
    markdown.write_text("# Benchmarks\n\nkept\n")
    main(["--merge", *map(str, halves), "--out", str(out), "--markdown", str(markdown)])
    merged = QualityResults.from_json(out.read_text())
    assert len(merged.rows) == 2 * len(rows)
    assert set(merged.base_epoch_seconds) == {0, 1}
    text = markdown.read_text()
    begin, end = markers("vit")
    assert text.startswith("# Benchmarks\n\nkept\n")
    assert begin in text
    assert end in text
    assert "Seeds 0, 1: mean ± standard deviation" in text
    assert "| -30% | ours (default criterion) | 1 |" in text
    stated = goals(merged)  # the −50 % goal needs a −50 % row: the −30 % one, without and with residual channels
    assert len(stated) == 2
    assert f"**: {OURS} " in stated[0]
    assert f"**: {OURS_RESIDUAL} " in stated[1]
    for line in stated:
        assert line.startswith("- −30 % one-shot ahead of Torch-Pruning's best setting: **m")
        assert ("**met**" in line) != ("**missed**" in line)
        assert line in text
    assert json.loads(out.read_text())["command"].count("python -m benchmarks.quality") == 2
    capsys.readouterr()
    main(["--report-only", "--out", str(out), "--markdown", str(markdown)])
    assert capsys.readouterr().out.strip() in markdown.read_text()


def test_the_mlp_runs_every_method_and_states_its_goal(tmp_path, monkeypatch):
    monkeypatch.setattr(methods, "TP_BISECTION_STEPS", 3)
    config = dataclasses.replace(recipe("mlp", 0), epochs=1, train_images=192, num_val=64)
    data = SplitDataModule(_images(192, 0), _images(64, 1), _images(96, 2), batch_size=32, eval_batch_size=48)
    rows, epoch_seconds = run_seed(config, data, tmp_path, [0.95], 1, [], lambda line: None)
    assert (tmp_path / "quality" / f"mlp-{config.key()}.pt").is_file()
    cells = {(row.reduction, row.method, row.epochs): row for row in rows}
    assert cells[(0.0, UNPRUNED, 0)].widths == "1024-1024"
    assert (0.95, OURS_DISTILLED, 1) in cells
    assert cells[(0.95, OURS, 1)].widths == cells[(0.95, OURS, 0)].widths
    assert 1 - cells[(0.95, OURS, 0)].params / cells[(0.0, UNPRUNED, 0)].params >= 0.95
    results = QualityResults(
        config, {0: epoch_seconds}, rows, machine_info(), "python -m benchmarks.quality --arch mlp", 0.1
    )
    stated = goals(results)
    assert [line.split(",")[0] for line in stated] == [
        "- −95 % with 1 recovery epoch(s) within 0.5 point of unpruned"
    ] * 2
    assert markers("mlp") == ("<!-- quality-mlp:begin -->", "<!-- quality-mlp:end -->")


def test_the_batchnorm_resnet_is_recalibrated_after_a_one_shot_prune_and_states_its_goal(tmp_path, monkeypatch):
    monkeypatch.setattr(methods, "TP_BISECTION_STEPS", 3)
    config = dataclasses.replace(recipe("resnet", 0), epochs=1, train_images=192, num_val=64)
    data = SplitDataModule(_images(192, 0), _images(64, 1), _images(96, 2), batch_size=32, eval_batch_size=48)
    rows, epoch_seconds = run_seed(config, data, tmp_path, [0.7], 1, [], lambda line: None)
    cells = {(row.reduction, row.method, row.epochs): row for row in rows}
    assert cells[(0.0, UNPRUNED, 0)].widths == "8-8-8-16-16-16-32-32-32"  # stem, then conv1, conv2, shortcut per stage
    assert cells[(0.7, OURS, 1)].widths == cells[(0.7, OURS, 0)].widths
    assert 1 - cells[(0.7, OURS, 0)].params / cells[(0.0, UNPRUNED, 0)].params >= 0.7
    results = QualityResults(
        config, {0: epoch_seconds}, rows, machine_info(), "python -m benchmarks.quality --arch resnet", 0
    )
    assert [line.split(",")[0] for line in goals(results)] == [
        "- −70 % with 1 recovery epoch(s) within 1 point of unpruned"
    ] * 2


def test_recalibration_re_estimates_batchnorm_statistics_and_leaves_other_networks_alone():
    data = SplitDataModule(_images(64, 0), _images(32, 1), _images(32, 2), batch_size=32)
    resnet = build(dataclasses.replace(recipe("resnet", 0))).eval()
    recalibrated = methods.with_batchnorm_recalibrated(resnet, data)
    assert recalibrated is not resnet
    before, after = resnet.stem[1].running_mean, recalibrated.stem[1].running_mean
    assert torch.equal(before, torch.zeros_like(before))  # an untrained network's statistics
    assert not torch.equal(after, before)  # re-estimated on the training batches
    mlp = build(recipe("mlp", 0))
    assert methods.with_batchnorm_recalibrated(mlp, data) is mlp


def test_scratch_only_rows_merge_into_a_run_without_repeating_its_cells(tmp_path, monkeypatch):
    monkeypatch.setattr(methods, "TP_BISECTION_STEPS", 2)
    config = dataclasses.replace(recipe("resnet", 0), epochs=1, train_images=96, num_val=32)
    data = SplitDataModule(_images(96, 0), _images(32, 1), _images(32, 2), batch_size=32, eval_batch_size=32)
    full, seconds = run_seed(config, data, tmp_path, [0.5], 0, [], lambda line: None)
    extra, _ = run_seed(config, data, tmp_path, [0.5], 0, [0.5], lambda line: None, scratch_only=True)
    assert {(row.method, row.epochs) for row in extra} == {(UNPRUNED, 0), (OURS, 0), (SCRATCH, config.epochs)}
    paths = []
    for name, rows in (("full", full), ("extra", extra)):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(QualityResults(config, {0: seconds}, rows, machine_info(), name, 0.1).to_json())
    out = tmp_path / "merged.json"
    main(["--arch", "resnet", "--merge", *map(str, paths), "--out", str(out), "--markdown", str(tmp_path / "B.md")])
    merged = QualityResults.from_json(out.read_text())
    keys = [(row.seed, row.reduction, row.method, row.epochs) for row in merged.rows]
    assert len(keys) == len(set(keys)) == len(full) + 1  # the scratch row added, the repeated cells once
    assert (0, 0.5, SCRATCH, config.epochs) in keys
