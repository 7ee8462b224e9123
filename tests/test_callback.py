import copy
import csv

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_actprune import ActivationPruning, ActivationPruningError
from tests.helpers import (
    ARCHITECTURES,
    Classifier,
    KeepUnpruned,
    assert_matches_oracle,
    input_shape,
    loaders,
    quiet_trainer,
    replace_removed_by_means,
)
from tests.scorers import NoCall, OutputWeightNorm

SUMMARY_KEYS = {
    "actprune/threshold",
    "actprune/params_before",
    "actprune/params_after",
    "actprune/params_reduction",
    "actprune/size_mb_before",
    "actprune/size_mb_after",
    "actprune/neurons_before",
    "actprune/neurons_after",
}
METRIC_KEYS = {f"actprune/{m}_{w}" for m in ("val_acc", "val_loss") for w in ("before", "after", "change")}


def trainer_for(tmp_path, *callbacks, **kwargs) -> pl.Trainer:
    loggers = [CSVLogger(tmp_path, name="csv"), TensorBoardLogger(tmp_path, name="tb")]
    options = {"max_epochs": 3, "logger": loggers, "enable_checkpointing": False}
    return quiet_trainer(tmp_path, *callbacks, **{**options, **kwargs})


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_fit_prunes_physically_and_logs_everywhere(tmp_path, architecture):
    pl.seed_everything(0)
    net = ARCHITECTURES[architecture]()
    model = Classifier(net)
    train, val = loaders(input_shape(net))
    # BatchNorm recalibration off: the surgery alone must equal the zeroing oracle (recalibration has its own)
    keep, pruning = KeepUnpruned(), ActivationPruning(threshold=0.2, monitor="val_acc", recalibration_batches=0)
    trainer = trainer_for(tmp_path, keep, pruning)
    trainer.fit(model, train, val)

    result = pruning.result
    assert result is not None
    assert 0 < result.plan.neurons_after < result.plan.neurons_before
    assert result.params_after == sum(p.numel() for p in model.parameters()) < result.params_before
    assert result.params_before == sum(p.numel() for p in keep.model.parameters())
    assert set(result.metrics_before) == {"val_acc", "val_loss"} == set(result.metrics_after)

    # oracle: the pruned model is the original with the removed neurons' activations forced to zero
    assert_matches_oracle(model, keep.model, result.plan, torch.cat([batch[0] for batch in val]))

    # the before numbers are the unpruned model's validation; the after numbers the pruned model's
    reference = Classifier(ARCHITECTURES[architecture]())
    reference.load_state_dict(keep.model.state_dict())
    before = trainer.validate(reference, val, verbose=False)[0]
    after = trainer.validate(model, val, verbose=False)[0]
    assert result.metrics_before["val_acc"] == pytest.approx(before["val_acc"])
    assert result.metrics_after["val_acc"] == pytest.approx(after["val_acc"])

    # every logger got the summary, at the last training step
    with open(trainer.loggers[0].experiment.metrics_file_path) as f:
        rows = [r for r in csv.DictReader(f) if r.get("actprune/params_after")]
    assert len(rows) == 1
    assert {k for k, v in rows[0].items() if v} >= SUMMARY_KEYS | METRIC_KEYS
    assert int(rows[0]["step"]) == trainer.global_step
    assert float(rows[0]["actprune/params_after"]) == result.params_after
    assert float(rows[0]["actprune/val_acc_change"]) == pytest.approx(
        result.metrics_after["val_acc"] - result.metrics_before["val_acc"]
    )
    events = EventAccumulator(trainer.loggers[1].log_dir)
    events.Reload()
    assert set(events.Tags()["scalars"]) >= SUMMARY_KEYS | METRIC_KEYS
    (event,) = events.Scalars("actprune/params_reduction")
    assert event.value == pytest.approx(result.params_reduction)


def test_fit_leaves_trainer_state_as_fit_does(tmp_path):
    states = []
    for callbacks in ([], [ActivationPruning(threshold=0.1, sweep=[0.0, 0.5, 1.0])]):
        pl.seed_everything(0)
        train, val = loaders((8,))
        trainer = trainer_for(tmp_path, *callbacks)
        trainer.fit(Classifier(ARCHITECTURES["mlp_modules"]()), train, val)
        metrics = [
            {k: float(v) for k, v in m.items()}
            for m in (trainer.callback_metrics, trainer.logged_metrics, trainer.progress_bar_metrics)
        ]
        states.append((trainer.state.fn, trainer.state.status, trainer.state.stage, metrics))
    assert states[0] == states[1]  # our validation passes (statistics, three λ) leave no trace in the Trainer


def test_summary_is_printed_once_with_layer_counts(tmp_path, caplog):
    pl.seed_everything(0)
    train, val = loaders((8,))
    trainer = trainer_for(tmp_path, ActivationPruning(threshold=0.2, statistic="mean"))
    with caplog.at_level("INFO"):
        trainer.fit(Classifier(ARCHITECTURES["mlp_modules"]()), train, val)
    text = caplog.text
    assert text.count("Activation pruning, λ = 0.2 (mean activation): parameters") == 1
    assert "net.0" in text
    assert "16 ->" in text
    assert "val_acc:" in text


def test_prune_best_prunes_the_best_checkpoint(tmp_path):
    pl.seed_everything(0)
    train, val = loaders((8,))
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val_acc", mode="max")
    pruning = ActivationPruning(threshold=0.0, statistic="mean_abs", prune_best=True)  # removes nothing
    trainer = trainer_for(tmp_path, pruning, checkpoint, enable_checkpointing=True, max_epochs=4)
    model = Classifier(ARCHITECTURES["mlp_modules"](), lr=0.5)
    trainer.fit(model, train, val)
    best = torch.load(checkpoint.best_model_path, weights_only=True)["state_dict"]
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, best[name]), name
    assert pruning.result.metrics_before["val_acc"] == pytest.approx(float(checkpoint.best_model_score))


def test_no_validation_loader_fails_at_setup_not_after_training(tmp_path):
    train, _ = loaders((8,))
    trainer = trainer_for(tmp_path, ActivationPruning(threshold=0.1))
    model = Classifier(ARCHITECTURES["mlp_modules"]())
    with pytest.raises(ActivationPruningError, match="needs validation data"):
        trainer.fit(model, train)
    assert trainer.global_step == 0


@pytest.mark.parametrize("sanity_steps", [2, 0], ids=["sanity_check", "no_sanity_check"])
def test_unknown_monitor_fails_at_the_first_validation_not_after_training(tmp_path, sanity_steps):
    """Issue 19: a misspelt `monitor` is found by the sanity check (or the first epoch's validation), not at the end."""
    train, val = loaders((8,))
    model = Classifier(ARCHITECTURES["mlp_modules"]())
    trained = copy.deepcopy(model.state_dict())
    pruning = ActivationPruning(threshold=0.2, monitor="val_f1")
    trainer = trainer_for(tmp_path, pruning, max_epochs=30, num_sanity_val_steps=sanity_steps)
    with pytest.raises(
        ActivationPruningError, match=r"`monitor='val_f1'` is not a metric that `validation_step` logs; logged: val_lo"
    ):
        trainer.fit(model, train, val)
    assert trainer.current_epoch == 0  # not 30 epochs later
    assert trainer.global_step == (0 if sanity_steps else len(train))
    if sanity_steps:
        for name, tensor in model.state_dict().items():
            assert torch.equal(tensor, trained[name])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"threshold": -0.1, "statistic": "mean_abs"},
            r"`threshold` must be a finite number >= 0; got -0.1 \(the mean_abs is never negative: a negative λ would",
        ),
        ({"threshold": float("nan"), "statistic": "rms"}, r"`threshold` must be a finite number >= 0; got nan"),
        ({"threshold": float("nan"), "statistic": "mean"}, r"`threshold` must be a finite number; got nan"),
        (
            {"threshold": float("inf"), "statistic": "fluctuation", "normalize": False},
            r"`threshold` must be a finite number >= 0; got inf",
        ),
        ({"threshold": float("inf")}, r"`threshold` must be a finite number; got inf"),  # a mean: any sign
        ({"threshold": "0.4", "statistic": "rms"}, r"`threshold` must be a finite number >= 0; got '0.4'"),
        ({"threshold": True, "statistic": "std"}, r"`threshold` must be a finite number >= 0; got True"),
        ({"threshold": float("nan"), "statistic": "fluctuation"}, r"`threshold` must be a finite number; got nan"),
        ({"threshold": 0.1, "normalize": "yes"}, r"`normalize` must be True, False or None \(automatic\); got 'yes'"),
        (
            {"threshold": 0.1, "statistic": "median"},
            r"`statistic` can be one of mean, mean_abs, rms, nonzero_fraction, std, fluctuation or a NeuronScorer"
            r" instance; got 'median'",
        ),
        ({"threshold": 0.1, "statistic": 3}, r"`statistic` can be one of mean, .* or a NeuronScorer instance; got 3"),
        (
            {"threshold": 0.1, "statistic": OutputWeightNorm},
            r"`statistic` can be .* NeuronScorer instance; got <class 'tests.scorers.OutputWeightNorm'>",
        ),
        (
            {"threshold": 0.1, "statistic": NoCall()},
            r"`statistic` can be .* NeuronScorer instance that implements `__call__`; got NoCall\(\), which does not",
        ),
        ({"threshold": -0.1, "statistic": OutputWeightNorm()}, r"`threshold` must be a finite number >= 0; got -0.1"),
        ({"threshold": 0.1, "min_neurons": 0}, r"`min_neurons` must be an int >= 1; got 0"),
        ({"threshold": 0.1, "min_neurons": 1.5}, r"`min_neurons` must be an int >= 1; got 1.5"),
        ({"threshold": 0.1, "layers": "net.0"}, r"`layers` must be a list of module-name glob patterns; got 'net.0'"),
        ({"threshold": 0.1, "exclude": [1]}, r"`exclude` must be a list of module-name glob patterns; got \[1\]"),
        ({"threshold": 0.1, "on_error": "ignore"}, r"`on_error` can be one of raise, warn; got 'ignore'"),
        ({"threshold": 0.1, "prune_best": "yes"}, r"`prune_best` must be True or False; got 'yes'"),
        ({"threshold": 0.1, "prune_heads": "no"}, r"`prune_heads` must be True or False; got 'no'"),
        ({"threshold": 0.1, "monitor": 3}, r"`monitor` must be a metric name or None; got 3"),
        ({}, r"set exactly one of `threshold`, `max_metric_drop`, `target_params_reduction`; got threshold=None"),
        (
            {"threshold": 0.1, "target_params_reduction": 0.5},
            r"set exactly one of .*; got threshold=0.1, max_metric_drop=None, target_params_reduction=0.5",
        ),
        ({"max_metric_drop": 0.01}, r"`max_metric_drop` needs `monitor`"),
        ({"max_metric_drop": -0.01, "monitor": "val_acc"}, r"`max_metric_drop` must be a finite number >= 0"),
        ({"target_params_reduction": 1.0}, r"`target_params_reduction` must be in \(0, 1\); got 1.0"),
        ({"target_params_reduction": 0}, r"`target_params_reduction` must be in \(0, 1\); got 0"),
        ({"threshold": 0.1, "mode": "maximize"}, r"`mode` can be one of max, min; got 'maximize'"),
        ({"threshold": 0.1, "sweep": []}, r"`sweep` must be a non-empty list of thresholds \(λ values\); got \[\]"),
        (
            {"target_params_reduction": 0.5, "sweep": [0.3, 1.0]},
            r"`sweep` lists parameter reductions in \(0, 1\) when the callback picks λ .*; got 1.0 in \[0.3, 1.0\]",
        ),
        (
            {"max_metric_drop": 0.1, "monitor": "val_acc", "sweep": ()},
            r"`sweep` must be a non-empty list of parameter reductions in \(0, 1\); got \(\)",
        ),
        ({"threshold": 0.1, "sweep": [0.1, -1], "statistic": "std"}, r"`sweep` must be a finite number >= 0; got -1"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ActivationPruningError, match=message):
        ActivationPruning(**kwargs)


def test_compensate_through_the_callback_matches_the_mean_oracle(tmp_path):
    pl.seed_everything(0)
    net = ARCHITECTURES["mlp_functional"]()
    model = Classifier(net)
    train, val = loaders((8,))
    keep = KeepUnpruned()
    pruning = ActivationPruning(threshold=0.2, statistic="fluctuation", compensate=True, normalize=False)
    trainer_for(tmp_path, keep, pruning).fit(model, train, val)
    plan = pruning.result.plan
    assert plan.bias_updates
    x = torch.cat([batch[0] for batch in val])
    # the statistics pass saw exactly these inputs: its means are the ones the biases absorbed
    from lightning_actprune.core import ActivationRecorder

    with ActivationRecorder(keep.model) as recorder, torch.no_grad():
        for batch in val:
            keep.model(batch[0])
    replace_removed_by_means(keep.model, plan, recorder.moments())
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), keep.model(x), rtol=1e-5, atol=1e-5)


def test_a_negative_threshold_is_allowed_for_signed_scores_and_only_then():
    assert ActivationPruning(threshold=-0.5, statistic="rms", normalize=True).threshold == -0.5
    assert ActivationPruning(threshold=-0.5, statistic="fluctuation").threshold == -0.5  # normalised by default
    assert ActivationPruning(threshold=-0.5).threshold == -0.5  # a mean activation: GELU/SiLU/tanh means are < 0
    assert ActivationPruning(sweep=[-0.2, 0.0], threshold=0.0, statistic="mean").sweep == [-0.2, 0.0]
    with pytest.raises(ActivationPruningError, match=r"`threshold` must be a finite number >= 0; got -0.5"):
        ActivationPruning(threshold=-0.5, statistic="nonzero_fraction")
    with pytest.raises(ActivationPruningError, match=r"`threshold` must be a finite number >= 0; got -0.5"):
        ActivationPruning(threshold=-0.5, statistic="fluctuation", normalize=False)
    with pytest.raises(ActivationPruningError, match=r"`compensate` must be True or False; got 1"):
        ActivationPruning(threshold=0.1, compensate=1)


def test_the_analysis_message_mentions_warnings_only_when_there_are_some(tmp_path, caplog):
    """Issue 19: "the warnings above name the layers that will not be pruned" was printed with no warning above."""
    train, val = loaders((8,))
    trainer = trainer_for(tmp_path, ActivationPruning(threshold=0.1), max_epochs=1)
    with caplog.at_level("INFO"):
        trainer.fit(Classifier(ARCHITECTURES["mlp_modules"]()), train, val)
    assert "ActivationPruning: 2 prunable layer(s), 28 neurons: net.net.0 (16), net.net.2 (12).\n" in caplog.text
    assert "warnings above" not in caplog.text
