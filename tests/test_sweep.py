import csv
import json
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_actprune import ActivationPruning
from lightning_actprune._sweep import ThresholdEvaluator, threshold_for_reduction
from lightning_actprune.core import ActivationRecorder, find_prunable_layers
from tests.helpers import ARCHITECTURES, Classifier, loaders, quiet_trainer

SWEEP = [0.0, 0.05, 0.1, 0.2, 0.4]
REDUCTIONS = [0.2, 0.4, 0.6, 0.8]  # a table for a target or a budget lists parameter reductions


class CountValidations(Callback):
    def __init__(self):
        self.runs = 0

    def on_validation_start(self, trainer, pl_module):
        if trainer.state.fn == "validate":
            self.runs += 1


def fit(tmp_path, pruning, architecture="mlp_functional", **kwargs):
    pl.seed_everything(0)
    counter = CountValidations()
    loggers = [CSVLogger(tmp_path, name="csv"), TensorBoardLogger(tmp_path, name="tb")]
    trainer = quiet_trainer(
        tmp_path, counter, pruning, max_epochs=3, logger=loggers, enable_checkpointing=False, **kwargs
    )
    model = Classifier(ARCHITECTURES[architecture](), lr=0.2)
    train, val = loaders((8,))
    trainer.fit(model, train, val)
    return trainer, model, counter


def test_sweep_reports_a_monotone_table_everywhere_at_one_pass_per_threshold(tmp_path):
    pruning = ActivationPruning(threshold=0.1, sweep=SWEEP, monitor="val_acc")
    trainer, _model, counter = fit(tmp_path, pruning)
    result = pruning.result
    assert [row.threshold for row in result.sweep] == SWEEP
    params = [row.params for row in result.sweep]
    assert params == sorted(params, reverse=True)
    assert params[0] > params[-1]
    assert all(set(row.metrics) == {"val_acc", "val_loss"} for row in result.sweep)
    # the statistics come from the fit's last validation, one pass per λ, and the applied λ (in the table) reuses
    # its row: no extra pass
    assert counter.runs == len(SWEEP)
    assert result.metrics_after == result.sweep[SWEEP.index(0.1)].metrics

    log_dir = trainer.log_dir
    with open(f"{log_dir}/actprune_sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["threshold"]) for r in rows] == SWEEP
    assert [r["chosen"] for r in rows] == ["False", "False", "True", "False", "False"]
    assert float(rows[2]["val_acc_change"]) == pytest.approx(
        result.sweep[2].metrics["val_acc"] - result.metrics_before["val_acc"]
    )
    payload = json.loads(Path(log_dir, "actprune_sweep.json").read_text())
    assert payload["chosen_threshold"] == 0.1
    assert payload["chosen_by"] == "threshold"
    assert len(payload["rows"]) == len(SWEEP)
    assert Path(log_dir, "actprune_sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    events = EventAccumulator(trainer.loggers[1].log_dir, size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    assert "actprune/sweep" in events.Tags()["images"]
    assert any("actprune/sweep" in tag for tag in events.Tags()["tensors"])  # text summaries are tensors
    assert "actprune/chosen_threshold" in events.Tags()["scalars"]


def test_sweep_with_threshold_prunes_exactly_as_threshold_alone(tmp_path):
    _, swept, _ = fit(tmp_path / "a", ActivationPruning(threshold=0.15, sweep=SWEEP))
    _, direct, counter = fit(tmp_path / "b", ActivationPruning(threshold=0.15))
    assert counter.runs == 1  # the statistics come from the fit's last validation; then re-validation
    swept_state, direct_state = swept.state_dict(), direct.state_dict()
    assert swept_state.keys() == direct_state.keys()
    for name, tensor in swept_state.items():
        assert torch.equal(tensor, direct_state[name]), name


@pytest.mark.parametrize("sweep", [REDUCTIONS, None], ids=["from_sweep", "bisection"])
def test_max_metric_drop_applies_the_most_pruning_within_budget(tmp_path, sweep):
    budget = 0.05
    pruning = ActivationPruning(max_metric_drop=budget, monitor="val_loss", mode="min", sweep=sweep)
    _, _, counter = fit(tmp_path, pruning)
    result = pruning.result
    before = result.metrics_before["val_loss"]
    assert result.chosen_by == "max_metric_drop"
    assert result.metrics_after["val_loss"] - before <= budget
    within = [r for r in result.sweep if r.metrics["val_loss"] - before <= budget]
    assert result.params_after == min(r.params for r in within)
    if sweep is None:
        neurons = result.plan.neurons_before
        assert counter.runs <= 1 + 1 + math.ceil(math.log2(neurons + 1))
    else:
        assert [row.target for row in result.sweep] == sweep
        assert all(1 - row.params_kept >= row.target for row in result.sweep)


def test_a_table_for_a_target_lists_reductions_and_never_changes_the_criterion(tmp_path, caplog):
    """Asking for a table must not change which neurons a target removes (issue 19): same plan with and without."""
    with caplog.at_level("INFO"):
        _, tabled, _ = fit(
            tmp_path / "a", tabled_pruning := ActivationPruning(target_params_reduction=0.5, sweep=REDUCTIONS)
        )
    _, plain, _ = fit(tmp_path / "b", plain_pruning := ActivationPruning(target_params_reduction=0.5))
    assert tabled_pruning.effective_statistic == plain_pruning.effective_statistic == "fluctuation"
    assert tabled_pruning.result.plan.to_dict() == plain_pruning.result.plan.to_dict()
    for name, tensor in tabled.state_dict().items():
        assert torch.equal(tensor, plain.state_dict()[name]), name
    result = tabled_pruning.result
    assert [row.target for row in result.sweep] == sorted([*REDUCTIONS, 0.5])  # the applied target has its row
    assert [1 - row.params_kept >= row.target for row in result.sweep] == [True] * 5
    summary = result.summary().splitlines()[0]
    assert "chosen by target_params_reduction (the table lists parameter reductions)" in summary
    assert "ActivationPruning sweep: -20% of the parameters (1/4)" not in caplog.text  # progress bar off here
    with open(tmp_path / "a" / "csv" / "version_0" / "actprune_sweep.csv") as f:
        assert [float(r["target_reduction"]) for r in csv.DictReader(f)] == sorted([*REDUCTIONS, 0.5])


def test_target_params_reduction_is_the_smallest_threshold_reaching_it(tmp_path):
    pruning = ActivationPruning(target_params_reduction=0.3)
    _, _, counter = fit(tmp_path, pruning)
    assert counter.runs == 1  # no validation is spent finding λ
    assert pruning.result.params_reduction >= 0.3
    assert pruning.result.chosen_by == "target_params_reduction"


def test_threshold_for_reduction_is_minimal_and_models_are_restored_between_thresholds():
    torch.manual_seed(0)
    model = ARCHITECTURES["cnn"]().eval()
    x = torch.randn(32, 1, 8, 8)
    with ActivationRecorder(model) as recorder, torch.no_grad():
        model(x)
    evaluator = ThresholdEvaluator(model, find_prunable_layers(model, x), recorder.moments(), "mean", 1)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    parameters = list(model.parameters())
    threshold = threshold_for_reduction(evaluator, 0.5)
    candidates = evaluator.candidates()
    index = candidates.index(threshold)
    assert 1 - evaluator.size(threshold).params_kept >= 0.5
    assert 1 - evaluator.size(candidates[index - 1]).params_kept < 0.5
    assert all(a is b for a, b in zip(model.parameters(), parameters, strict=True))
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, state[name]), name
    with pytest.raises(ValueError, match=r"`target_params_reduction=0.999` is out of reach"):
        threshold_for_reduction(evaluator, 0.999)


@pytest.mark.parametrize("progress_bar", [True, False])
def test_sweep_says_which_threshold_of_how_many_unless_the_progress_bar_is_off(tmp_path, caplog, progress_bar):
    pruning = ActivationPruning(threshold=0.1, statistic="mean", sweep=[0.0, 0.1, 0.3])
    with caplog.at_level("INFO"):
        fit(tmp_path, pruning, enable_progress_bar=progress_bar)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("ActivationPruning sweep:")]
    expected = [
        "ActivationPruning sweep: λ=0 (1/3)",
        "ActivationPruning sweep: λ=0.1 (2/3)",
        "ActivationPruning sweep: λ=0.3 (3/3)",
    ]
    assert lines == (expected if progress_bar else [])


class TouchWeights(Callback):
    """Writes every parameter in place, unchanged, after each epoch: the prune cannot trust the last validation."""

    def on_train_epoch_end(self, trainer, pl_module):
        with torch.no_grad():
            for p in pl_module.parameters():
                p.mul_(1)


@pytest.mark.parametrize("recovery_epochs", [0, 1])
def test_statistics_of_the_last_validation_equal_a_fresh_pass(tmp_path, recovery_epochs):
    runs = {}
    for name, extra in (("reused", []), ("fresh", [TouchWeights()])):
        pl.seed_everything(0)
        counter, pruning = CountValidations(), ActivationPruning(threshold=0.15, recovery_epochs=recovery_epochs)
        trainer = quiet_trainer(
            tmp_path / name, *extra, counter, pruning, max_epochs=3, logger=False, enable_checkpointing=False
        )
        model = Classifier(ARCHITECTURES["mlp_functional"](), lr=0.2)
        trainer.fit(model, *loaders((8,)))
        runs[name] = (counter.runs, pruning.result, model.state_dict())
    (reused_runs, reused, reused_state), (fresh_runs, fresh, fresh_state) = runs["reused"], runs["fresh"]
    assert fresh_runs == reused_runs + 1  # the one pass saved
    assert reused.pruned
    assert reused.plan.layers == fresh.plan.layers
    assert reused.metrics_before == pytest.approx(fresh.metrics_before, rel=1e-6)
    assert reused.metrics_after == pytest.approx(fresh.metrics_after, rel=1e-6)
    if recovery_epochs:  # the extra pass drew a DataLoader seed: the recovery epoch's shuffle differs
        return
    assert reused_state.keys() == fresh_state.keys()
    for key, tensor in reused_state.items():
        torch.testing.assert_close(tensor, fresh_state[key], rtol=1e-6, atol=1e-7, msg=key)
