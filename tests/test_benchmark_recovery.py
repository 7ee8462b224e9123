"""Smoke test of benchmarks.recovery on a tiny synthetic problem: no Fashion-MNIST, a few seconds."""

import dataclasses

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import TensorDataset

from benchmarks.common import MLPClassifier, TrainConfig, machine_info, quiet_trainer
from benchmarks.recovery.protocol import EpochSeededDataModule
from benchmarks.recovery.report import BEGIN, END, render_markdown, write_section
from benchmarks.recovery.results import Base, RecoveryConfig, RecoveryResults, Row
from benchmarks.recovery.run import OURS, RESULTS_FILE, SCRATCH, main, merge_results, run_recovery, tp_method

GRADUAL = "ours, gradual (2 prunes)"
"""The rows the published results hold from commit 14d8739, when gradual pruning existed."""

CONFIG = RecoveryConfig(
    train=TrainConfig(sizes=(12, 48, 40, 3), lr=1e-2, batch_size=32, epochs=2),
    reductions=(0.6,),
    taylor_batches=2,
    bisection_steps=10,
)


def _dataset(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 12, generator=g)
    y = (x[:, 0] > 0.5).long() + (x[:, 1] > 0.5).long()
    return TensorDataset(x, y)


def _datamodule() -> EpochSeededDataModule:
    return EpochSeededDataModule(_dataset(320, 0), _dataset(96, 1), _dataset(200, 2), batch_size=32, eval_batch_size=50)


def test_resumed_fit_equals_uninterrupted_fit(tmp_path):
    config = CONFIG.train
    pl.seed_everything(0, verbose=False)
    straight = MLPClassifier(config.sizes, config.lr)
    quiet_trainer(max_epochs=3).fit(straight, datamodule=_datamodule())
    pl.seed_everything(0, verbose=False)
    first = MLPClassifier(config.sizes, config.lr)
    trainer = quiet_trainer(max_epochs=1)
    trainer.fit(first, datamodule=_datamodule())
    trainer.save_checkpoint(tmp_path / "one.ckpt")
    resumed = MLPClassifier(config.sizes, config.lr)
    quiet_trainer(max_epochs=3).fit(resumed, datamodule=_datamodule(), ckpt_path=tmp_path / "one.ckpt")
    for name, value in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value, msg=name)


def test_protocol_runs_end_to_end_and_reports(tmp_path):
    lines: list[str] = []
    base, rows, times = run_recovery(_datamodule(), CONFIG, tmp_path, lines.append)
    assert (tmp_path / f"recovery_base_{CONFIG.base_key()}_e1.ckpt").is_file()
    table = {(row.method, row.recovery_epochs): row for row in rows if row.reduction == 0.6}
    methods = [OURS, SCRATCH] + [tp_method(i, g) for i in ("magnitude", "taylor") for g in (True, False)]
    assert set(table) == {(m, r) for m in methods for r in (0, 1, 2)}
    assert rows[0].method == "unpruned"
    assert rows[0].params == base.params == 12 * 48 + 48 + 48 * 40 + 40 + 40 * 3 + 3
    for (method, _), row in table.items():
        assert 1 - row.params / base.params >= 0.6, method
        assert 0 <= row.test_acc <= 1
    # the callback inside fit prunes to the same widths as the plain functions, and recovery trains that model
    one_shot = table[OURS, 0]
    for epochs in (1, 2):
        assert table[OURS, epochs].widths == one_shot.widths
        assert table[OURS, epochs].params == one_shot.params
    assert table[SCRATCH, 0].widths == one_shot.widths
    # right after the prune inside fit, the model is the plain functions' one-shot model
    assert [t.recovery_epochs for t in times] == [1, 2]
    for time in times:
        assert time.test_acc_after_prune == pytest.approx(one_shot.test_acc)
        assert len(time.recovery_seconds) == time.recovery_epochs
        assert time.ratio > 0
    assert max(table[OURS, 1].test_acc, table[OURS, 2].test_acc) > one_shot.test_acc

    results = RecoveryResults(CONFIG, base, rows, times, machine_info(), "python -m benchmarks.recovery", 1.0)
    again = RecoveryResults.from_json(results.to_json())
    assert again == results
    markdown = tmp_path / "BENCHMARKS.md"
    markdown.write_text("# Benchmarks\n\nkept\n")
    write_section(markdown, "STALE")
    write_section(markdown, render_markdown(again))
    text = markdown.read_text()
    assert text.startswith("# Benchmarks\n\nkept\n")
    assert text.count(BEGIN) == text.count(END) == 1
    assert "STALE" not in text
    assert "| -60% | ours (default criterion) | 1 |" in text
    assert "Target not measured" in text  # the toy has no -90% row
    assert "- Gradual pruning (several prunes over training): not offered; it did not beat one prune" in text


def test_rows_are_measured_alone_and_merged_into_earlier_results(tmp_path):
    def results(methods):
        base, rows, times = run_recovery(_datamodule(), CONFIG, tmp_path, lambda _: None, methods)
        return RecoveryResults(CONFIG, base, rows, times, machine_info(), f"--methods {' '.join(methods)}", 1.0)

    earlier = results(("ours",))
    scratch = results(("scratch",))
    measured = [(r.method, r.recovery_epochs) for r in scratch.rows]
    assert measured == [("unpruned", 0), (SCRATCH, 0), (SCRATCH, 1), (SCRATCH, 2)]
    assert (scratch.base.params, scratch.base.test_acc) == (earlier.base.params, earlier.base.test_acc)
    assert scratch.base.cached  # the base checkpoint the first run wrote
    merged = merge_results(earlier, scratch)
    assert [(r.method, r.recovery_epochs) for r in merged.rows] == [
        ("unpruned", 0), (OURS, 0), (OURS, 1), (OURS, 2), (SCRATCH, 0), (SCRATCH, 1), (SCRATCH, 2),
    ]  # fmt: skip
    assert merged.command == "--methods ours, then --methods scratch"
    assert merged.times == earlier.times
    # measured again: the row is replaced, not repeated
    row = scratch.rows[-1]
    changed = dataclasses.replace(scratch, rows=[scratch.rows[0], dataclasses.replace(row, test_acc=0.5)])
    again = merge_results(merged, changed)
    assert [r.test_acc for r in again.rows if (r.method, r.recovery_epochs) == (SCRATCH, 2)] == [0.5]
    other = dataclasses.replace(scratch, config=dataclasses.replace(CONFIG, reductions=(0.7,)))
    with pytest.raises(ValueError, match=r"measured with another configuration: .*reductions=\(0.6,\).* \(there\)"):
        merge_results(merged, other)


def test_report_only_renders_the_gradual_rows_of_published_results(tmp_path):
    base = Base(params=1000, test_acc=0.9, epoch_seconds=1.0, train_seconds=2.0, cached=False)
    rows = [Row(0.0, "unpruned", 0, 1000, 0.9, [48, 40]), Row(0.6, GRADUAL, 2, 390, 0.85, [20, 16])]
    published = RecoveryResults(CONFIG, base, rows, [], machine_info(), "python -m benchmarks.recovery", 60.0)
    (tmp_path / RESULTS_FILE).write_text(published.to_json())
    markdown = tmp_path / "BENCHMARKS.md"
    markdown.write_text(f"# Benchmarks\n\n{BEGIN}\n{END}\n")
    main(["--report-only", "--cache-dir", str(tmp_path), "--markdown", str(markdown)])
    text = markdown.read_text()
    assert f"| -60% | {GRADUAL} | 2 | 390 (61.0% off) | 20-16 | 0.8500 | -5.00 |" in text
    assert f"- Gradual pruning ({GRADUAL} at R=2), measured at commit 14d8739, when the option existed" in text


def test_bad_configuration_is_refused():
    with pytest.raises(ValueError, match="`epochs` must be at least 2"):
        RecoveryConfig(train=dataclasses.replace(TrainConfig(), epochs=1))
    with pytest.raises(ValueError, match=r"every reduction must be in \(0, 1\); got 1.5"):
        RecoveryConfig(reductions=(1.5,))
    with pytest.raises(ValueError, match="`recovery_epochs` must be positive"):
        RecoveryConfig(recovery_epochs=(0,))


def test_command_line_refuses_bad_arguments(tmp_path):
    with pytest.raises(SystemExit, match="`epochs` must be at least 2"):
        main(["--epochs", "1", "--cache-dir", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"every reduction must be in \(0, 1\); got 90.0"):
        main(["--reductions", "90", "--cache-dir", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"recovery_results\.json does not exist"):
        main(["--report-only", "--cache-dir", str(tmp_path), "--markdown", str(tmp_path / "B.md")])
    with pytest.raises(SystemExit, match=r"--methods merges into the results of a full run; .* does not exist"):
        main(["--methods", "scratch", "--cache-dir", str(tmp_path)])
    base = Base(params=10, test_acc=0.5, epoch_seconds=1.0, train_seconds=1.0, cached=True)
    earlier = RecoveryResults(CONFIG, base, [], [], machine_info(), "python -m benchmarks.recovery", 1.0)
    (tmp_path / RESULTS_FILE).write_text(earlier.to_json())
    with pytest.raises(SystemExit, match=r"error: .*recovery_results\.json was measured with another configuration"):
        main(["--methods", "scratch", "--cache-dir", str(tmp_path)])  # the default epochs and reductions
