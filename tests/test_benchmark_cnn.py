"""Smoke test of the benchmarks.fashion_cnn package on a tiny synthetic problem: no Fashion-MNIST, a few seconds."""

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import TensorDataset

from benchmarks.common import SplitDataModule, machine_info, quiet_trainer, recalibrated, write_section
from benchmarks.fashion_cnn.methods import (
    EpochTimer,
    fine_tuned,
    scratch_widths,
    torch_pruning_at_reduction,
)
from benchmarks.fashion_cnn.models import ResNetClassifier
from benchmarks.fashion_cnn.report import BEGIN, END, render_markdown
from benchmarks.fashion_cnn.results import (
    METHODS,
    OURS,
    OURS_RECALIBRATED,
    OURS_RECOVERED,
    SCRATCH,
    SCRATCH_LONGER,
    TP,
    TP_FINE_TUNED,
    CNNBenchmarkResults,
    CNNRunInfo,
    CNNSettings,
    CNNTrainConfig,
    CNNTrainingFacts,
)
from benchmarks.fashion_cnn.run import run_benchmark
from benchmarks.fashion_mnist.report import BEGIN as MLP_BEGIN
from benchmarks.fashion_mnist.report import END as MLP_END
from lightning_actprune.core import count_parameters

WIDTHS = (4, 8)


def _images(n: int, seed: int) -> TensorDataset:
    """28×28 images whose class is which quarter is brightest (3 of the 4 quarters used)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = 0.3 * torch.rand(n, 28, 28, generator=g)
    for i, label in enumerate(y.tolist()):
        row, col = divmod(label, 2)
        x[i, 14 * row : 14 * row + 14, 14 * col : 14 * col + 14] += 0.5
    return TensorDataset(x.flatten(1), y)


def _build(widths=WIDTHS, hidden=None) -> ResNetClassifier:
    return ResNetClassifier(widths, hidden, lr=1e-2, num_classes=3)


def _train(datamodule: SplitDataModule, widths, hidden=None, epochs=1) -> tuple[ResNetClassifier, float]:
    """The recipe of ``train_cached``: the model (eval mode) and its last validation accuracy."""
    pl.seed_everything(0, workers=True, verbose=False)
    model = _build(widths, hidden)
    trainer = quiet_trainer(max_epochs=epochs)
    trainer.fit(model, datamodule=datamodule)
    return model.eval(), float(trainer.callback_metrics["val_acc"])


@pytest.fixture(scope="module")
def trained():
    torch.set_num_threads(1)
    datamodule = SplitDataModule(_images(128, 0), _images(64, 1), _images(64, 2), batch_size=32, eval_batch_size=32)
    model, val_acc = _train(datamodule, WIDTHS)
    return model, datamodule, val_acc


def test_recalibration_changes_only_the_copy_s_batchnorm_statistics(trained):
    model, datamodule, _ = trained
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fixed, seconds = recalibrated(model, datamodule.train_dataloader(), 2)
    assert seconds > 0
    assert not fixed.training
    stats = [k for k in before if k.endswith(("running_mean", "running_var"))]
    assert len(stats) == 2 * 6  # stem, 2 per block, the second block's shortcut
    changed = [k for k in stats if not torch.equal(fixed.state_dict()[k], before[k])]
    assert changed == stats
    # two batches averaged: every layer counted both, and no parameter moved
    assert all(int(v) == 2 for k, v in fixed.state_dict().items() if k.endswith("num_batches_tracked"))
    for name, parameter in fixed.named_parameters():
        torch.testing.assert_close(parameter, before[name])
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key])


def test_torch_pruning_bisection_meets_the_budget(trained):
    model, datamodule, _ = trained
    before = count_parameters(model)
    ratio, pruned = torch_pruning_at_reduction(model, datamodule.val_set.tensors[0][:1], 0.5, steps=8)
    assert 0 < ratio < 0.75
    assert count_parameters(pruned) <= 0.5 * before
    assert pruned.head.out_features == 3  # the ignored layer keeps its outputs
    assert count_parameters(model) == before


def test_fine_tuning_trains_every_parameter_and_batchnorm_statistic_of_a_copy(trained):
    model, datamodule, _ = trained  # in eval mode, as every pruned copy is
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tuned, seconds = fine_tuned(model, datamodule, 1, seed=0)
    assert seconds > 0
    assert not tuned.training
    for key, value in tuned.state_dict().items():
        if key.endswith("num_batches_tracked"):
            assert int(value) == int(before[key]) + 4  # 128 images in batches of 32
        else:
            assert not torch.equal(value, before[key]), key
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key])


def test_epoch_timer_counts_training_steps_per_epoch(trained):
    _, datamodule, _ = trained
    timer = EpochTimer()
    quiet_trainer(max_epochs=2, callbacks=[timer], limit_val_batches=0).fit(_build(), datamodule=datamodule)
    assert len(timer.seconds) == 2
    assert all(seconds > 0 for seconds in timer.seconds)


def test_rows_at_every_target_and_the_report(trained, tmp_path):
    model, datamodule, val_acc = trained
    trained_runs = []

    def train_scratch(widths, hidden, epochs):
        trained_runs.append((widths, hidden, epochs))
        facts = CNNTrainingFacts(1.0 * epochs, 1, CNNTrainConfig(widths, epochs=epochs))
        return _train(datamodule, widths, hidden, epochs)[0], facts

    settings = CNNSettings(targets=(0.3, 0.6), recalibration_batches=2, cost_repeats=1, recovery_targets=(0.6,))
    training = CNNTrainingFacts(1.0, 1, CNNTrainConfig(WIDTHS, epochs=1), final_val_acc=val_acc)
    measured = run_benchmark(model, datamodule, settings, train_scratch, _build, training, log=lambda _: None)
    before = count_parameters(model)
    assert measured.params_before == before
    rows = {(row.target, row.method): row for row in measured.rows}
    longer = {OURS_RECOVERED, TP_FINE_TUNED, SCRATCH_LONGER}
    assert set(rows) == {
        (target, method)
        for target in settings.targets
        for method in METHODS
        if target in settings.recovery_targets or method not in longer
    }
    for target in settings.targets:
        ours, scratch = rows[target, OURS], rows[target, SCRATCH]
        assert target <= ours.reduction < target + 0.1
        assert rows[target, TP].reduction >= target
        # the same pruned network before and after recalibration; from scratch at exactly its size
        assert rows[target, OURS_RECALIBRATED].params == ours.params == scratch.params
        assert rows[target, OURS_RECALIBRATED].recalibration_seconds > 0
        assert scratch.train_seconds == 1.0
        assert (*scratch_widths(model, ours.channels), 1) in trained_runs

    # one more epoch at 0.6 only: ours inside fit, Torch-Pruning's copy fine-tuned, from scratch for 2 epochs
    recovered, tuned, longer_scratch = rows[0.6, OURS_RECOVERED], rows[0.6, TP_FINE_TUNED], rows[0.6, SCRATCH_LONGER]
    assert recovered.reduction >= 0.6
    assert sum(recovered.channels.values()) < sum(measured.groups.values())
    assert recovered.train_seconds > 0
    assert tuned.params == rows[0.6, TP].params
    assert tuned.train_seconds > 0
    assert (*scratch_widths(model, rows[0.6, OURS].channels), 2) in trained_runs
    assert longer_scratch.train_seconds == 2.0
    (facts,) = measured.recovery
    assert facts.target == 0.6
    assert facts.pruned_at_epoch == 0
    # the recovery fit's first epoch is the unpruned network's training, bit for bit
    assert facts.val_acc_before_prune == val_acc
    assert len(facts.epoch_seconds) == 2
    assert facts.epoch_ratio > 0
    assert measured.recalibration.seconds > 0
    assert measured.recalibration.ratio > 0
    assert measured.batchnorm_layers == 6
    assert count_parameters(model) == before

    results = CNNBenchmarkResults(
        measured, CNNRunInfo(machine_info(), CNNTrainingFacts(2.0, 1, CNNTrainConfig()), "cmd", 3.0)
    )
    again = CNNBenchmarkResults.from_json(results.to_json())
    assert again == results
    markdown = tmp_path / "BENCHMARKS.md"
    markdown.write_text(f"intro\n\n{MLP_BEGIN}\nMLP TABLES\n{MLP_END}\n\nreading\n\n{BEGIN}\nSTALE\n{END}\n\nend\n")
    write_section(markdown, render_markdown(again), BEGIN, END)
    text = markdown.read_text()
    assert "MLP TABLES" in text
    assert "STALE" not in text
    assert text.startswith("intro\n")
    assert text.endswith("end\n")
    assert "| −60% |" in text
    assert "not yet built" not in text
    assert text.count("| not run ") == 3  # the −30% row's three longer columns
    assert f"| −60% | {100 * val_acc:.2f} | {100 * val_acc:.2f} |" in text
