import csv
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

from lightning_actprune import ActivationPruning, ActivationPruningError, ActivationStatistics, PruningPlan
from lightning_actprune._distributed import check_same_on_every_rank, check_strategy, fingerprint, synced_metrics
from lightning_actprune._scoring import recorded_moments
from lightning_actprune.core import ActivationRecorder, apply_plan, find_prunable_layers, plan_pruning
from tests import ddp_script
from tests.helpers import ROOT, Classifier, KeepUnpruned, MLPModule, assert_matches_oracle, make_data

DDP_TIMEOUT_S = 240  # the run takes ~10 s on 2 CPU cores; a hang must not block the suite forever


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """One real 2-process DDP run of ``tests/ddp_script.py``: what each rank saw, by rank."""
    out = tmp_path_factory.mktemp("ddp")
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK")}
    env.pop("MASTER_PORT", None)  # Lightning picks a free port
    env["OMP_NUM_THREADS"] = "1"
    command = [sys.executable, "-m", "tests.ddp_script", str(out)]
    completed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=DDP_TIMEOUT_S)
    written = sorted(p.name for p in out.glob("rank*.pt"))
    log = completed.stdout[-3000:] + completed.stderr[-6000:]
    assert completed.returncode == 0, log
    assert written == ["rank0.pt", "rank1.pt"], log  # rank zero exits cleanly even when rank one died
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(2)]


def reference_model(state_dict):
    model = Classifier(MLPModule())
    model.load_state_dict(state_dict)
    return model.eval()


@pytest.mark.slow
def test_ddp_statistics_equal_one_process_and_every_rank_prunes_the_same(ddp_run):
    zero, one = ranks = ddp_run
    assert zero["distributed_at_fit_end"]  # torchmetrics can sync the statistics
    assert one["distributed_at_fit_end"]
    assert zero["world_size"] == one["world_size"] == 2

    # every pass of the callback covers the 33 samples once: 17 + 16, in 2 + 1 batches (no padding, no hang)
    assert zero["samples_per_pass"][0] == [16, 1]
    assert one["samples_per_pass"][0] == [16]
    assert all(sum(a) + sum(b) == 33 for a, b in zip(zero["samples_per_pass"], one["samples_per_pass"], strict=True))

    # the statistics are those of one process over the same 33 samples, on both ranks
    x, y = make_data((8,), n=ddp_script.VAL_SIZE, seed=1).tensors
    unpruned = reference_model(zero["unpruned"])
    with ActivationRecorder(unpruned) as recorder, torch.no_grad():
        for batch in x.split(ddp_script.VAL_BATCH_SIZE):
            unpruned(batch)
    reference = recorder.moments()
    # the callback records only the moments its prune reads (the statistic's and the tie-break's); the rest are NaN
    recorded = recorded_moments("mean")
    assert set(recorded) == {"mean", "mean_square"}
    for rank in ranks:
        assert set(rank["statistics"]) == set(reference)
        for name, moments in reference.items():
            assert rank["statistics"][name]["num_values"].item() == 33  # padding would have made it 34
            for field, value in moments._asdict().items():
                if field in recorded or field == "num_values":
                    torch.testing.assert_close(rank["statistics"][name][field], value, rtol=1e-6, atol=1e-9)
                else:
                    assert rank["statistics"][name][field].isnan().all(), (name, field)

    # the same plan on both ranks, and the one a single process makes from the same data and weights
    layers = find_prunable_layers(unpruned, recorder.example_inputs)
    expected = plan_pruning(layers, reference, ddp_script.THRESHOLD, "mean").to_dict()
    assert zero["plan"] == one["plan"] == expected
    assert 0 < sum(len(layer["kept"]) for layer in expected["layers"]) < sum(layer.neurons for layer in layers)

    # both ranks hold identical pruned weights: the rank-0 unpruned model with that plan applied
    for name, tensor in zero["unpruned"].items():
        assert torch.equal(tensor, one["unpruned"][name]), name
    apply_plan(unpruned, PruningPlan.from_dict(expected))
    assert set(zero["pruned"]) == set(one["pruned"]) == set(unpruned.state_dict())
    for name, tensor in unpruned.state_dict().items():
        assert torch.equal(zero["pruned"][name], tensor), name
        assert torch.equal(one["pruned"][name], tensor), name

    # the metrics are the same on both ranks; the accuracy (a torchmetrics Metric) is exactly one process's
    assert zero["metrics_before"] == one["metrics_before"]
    assert zero["metrics_after"] == one["metrics_after"]
    with torch.no_grad():
        accuracy_after = (unpruned(x).argmax(1) == y).double().mean().item()
        accuracy_before = (reference_model(zero["unpruned"])(x).argmax(1) == y).double().mean().item()
    assert zero["metrics_before"]["val_acc"] == pytest.approx(accuracy_before, abs=1e-6)
    assert zero["metrics_after"]["val_acc"] == pytest.approx(accuracy_after, abs=1e-6)

    # logged once (rank zero), the λ table written once, into the shared log directory
    log_dir = Path(zero["log_dir"])
    assert log_dir == Path(one["log_dir"])
    with open(log_dir / "metrics.csv") as f:
        rows = [row for row in csv.DictReader(f) if row.get("actprune/params_after")]
    assert len(rows) == 1
    assert float(rows[0]["actprune/val_acc_after"]) == pytest.approx(zero["metrics_after"]["val_acc"])
    assert {p.name for p in log_dir.glob("actprune_sweep.*")} >= {"actprune_sweep.csv", "actprune_sweep.json"}


@pytest.mark.slow
def test_ddp_ranks_that_plan_differently_fail_before_any_surgery(ddp_run):
    ranks = ddp_run
    # the statistics pass ran (from a datamodule, with `sync_dist=True` logging, uneven batches) and was exact
    assert ranks[0]["disagreeing"]["samples_per_pass"] == [[16, 1]]
    assert ranks[1]["disagreeing"]["samples_per_pass"] == [[16]]
    for rank in ranks:
        disagreeing = rank["disagreeing"]
        assert "the pruning plans differ across the 2 processes (rank 0 vs rank 1)" in disagreeing["error"]
        assert "nothing was removed" in disagreeing["error"]
        for name, tensor in disagreeing["unpruned"].items():
            assert torch.equal(disagreeing["after"][name], tensor), name


@pytest.mark.slow
def test_ddp_batchnorm_recalibration_pools_the_ranks_statistics_identically(ddp_run):
    zero, one = (rank["batchnorm"] for rank in ddp_run)
    for name, tensor in zero["pruned"].items():
        assert torch.equal(one["pruned"][name], tensor), name  # bit-identical ranks after recalibration
    means = [k for k in zero["local"] if k.endswith("running_mean")]
    assert means
    for key in means:
        variance = key.replace("running_mean", "running_var")
        local_means = torch.stack([zero["local"][key], one["local"][key]])
        local_variances = torch.stack([zero["local"][variance], one["local"][variance]])
        assert not torch.equal(local_means[0], local_means[1])  # each rank recalibrated on its own shard
        pooled = local_means.mean(0)
        torch.testing.assert_close(zero["pruned"][key], pooled)
        torch.testing.assert_close(
            zero["pruned"][variance], (local_variances + local_means.square()).mean(0) - pooled.square()
        )
    assert zero["metrics_after"] == one["metrics_after"]
    assert zero["metrics_pruned"] == one["metrics_pruned"]


@pytest.mark.slow
def test_ddp_recovery_epochs_train_the_smaller_model_identically_on_every_rank(ddp_run):
    zero, one = (rank["recovery"] for rank in ddp_run)
    assert zero["pruned_at_epoch"] == one["pruned_at_epoch"] == 1
    for name, tensor in zero["final"].items():
        assert torch.equal(one["final"][name], tensor), name  # the gradients were all-reduced after the prune
    assert zero["final"]["net.net.0.weight"].shape[0] < 16
    steps = zero["steps_per_epoch"]
    recovery = zero["losses"][2 * steps :]  # the two epochs after the prune
    assert len(recovery) == 2 * steps
    first, last = sum(recovery[:steps]) / steps, sum(recovery[steps:]) / steps
    assert last < first  # the loss goes down while the smaller model trains
    assert zero["metrics_recovered"] == one["metrics_recovered"]
    assert zero["metrics_recovered"]["val_loss"] < zero["metrics_after"]["val_loss"]


def test_one_process_helpers_are_no_ops(make_trainer):
    trainer = make_trainer(devices=1, logger=False)
    check_same_on_every_rank(trainer, {"anything": torch.arange(3)}, "values")
    assert synced_metrics(trainer, {"val_acc": 0.5}) == {"val_acc": 0.5}


def test_fingerprint_sees_every_difference():
    plan = {"threshold": 0.1, "layers": [{"name": "fc", "kept": [0, 2, 3]}]}
    same = {"threshold": 0.1, "layers": [{"name": "fc", "kept": [0, 2, 3]}]}
    assert fingerprint(plan) == fingerprint(same)
    others = [
        {"threshold": 0.1, "layers": [{"name": "fc", "kept": [0, 2, 4]}]},
        {"threshold": 0.1 + 1e-17 + 2**-56, "layers": [{"name": "fc", "kept": [0, 2, 3]}]},
        {"threshold": 0.1, "layers": [{"name": "fc", "kept": [0, 2]}, 3]},
    ]
    assert len({fingerprint(plan), *map(fingerprint, others)}) == 4
    values = torch.tensor([1.0, 2.0], dtype=torch.float64)
    assert fingerprint(values) != fingerprint(values.float())
    assert fingerprint(values) != fingerprint(values.nextafter(torch.tensor(3.0, dtype=torch.float64)))


def _sharded(strategy_type):
    strategy = strategy_type.__new__(strategy_type)  # DeepSpeed's constructor needs deepspeed installed
    strategy._launcher = None
    return strategy


@pytest.mark.parametrize(
    ("make_strategy", "message"),
    [
        (
            lambda: pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn").strategy,
            r"does not support `strategy=DDPStrategy` with spawned processes.*Use `strategy='ddp'`",
        ),
        (
            lambda: pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_notebook").strategy,
            r"does not support `strategy=DDPStrategy` with spawned processes",
        ),
        (lambda: FSDPStrategy(), r"does not support `strategy=FSDPStrategy`: it shards the parameters.*'ddp'"),
        (lambda: _sharded(DeepSpeedStrategy), r"does not support `strategy=DeepSpeedStrategy`: it shards"),
    ],
    ids=["ddp_spawn", "ddp_notebook", "fsdp", "deepspeed"],
)
def test_strategies_that_cannot_prune_are_refused_by_name(make_strategy, message):
    with pytest.raises(ActivationPruningError, match=message):
        check_strategy(make_strategy())


@pytest.mark.slow
def test_ddp_spawn_fails_at_setup_before_training(make_trainer):
    # with one spawned worker to stay fast: the worker's error reaches the main process
    model = Classifier(MLPModule())
    train, val = (torch.utils.data.DataLoader(make_data((8,), n=n), batch_size=16) for n in (32, 16))
    trainer = make_trainer(ActivationPruning(threshold=0.1), devices=1, strategy="ddp_spawn", logger=False)
    with pytest.raises(Exception, match="with spawned processes"):
        trainer.fit(model, train, val)


def test_bf16_mixed_accumulates_in_float64_and_prunes(make_trainer, monkeypatch):
    seen_dtypes, moments = set(), []
    update, compute = ActivationStatistics.update, ActivationRecorder.moments
    monkeypatch.setattr(ActivationStatistics, "update", lambda self, a: (seen_dtypes.add(a.dtype), update(self, a))[1])
    monkeypatch.setattr(ActivationRecorder, "moments", lambda self: moments.append(compute(self)) or moments[-1])

    pl.seed_everything(0)
    model = Classifier(MLPModule())
    train = torch.utils.data.DataLoader(make_data((8,), n=96, seed=0), batch_size=16, shuffle=True)
    val = torch.utils.data.DataLoader(make_data((8,), n=50, seed=1), batch_size=16)
    keep, pruning = KeepUnpruned(), ActivationPruning(threshold=0.1, pruned_checkpoint=None)
    trainer = make_trainer(
        keep, pruning, precision="bf16-mixed", max_epochs=3, logger=False, enable_checkpointing=False
    )
    trainer.fit(model, train, val)

    assert torch.bfloat16 in seen_dtypes  # the hidden activations really were bf16
    for layer_moments in moments[-1].values():
        assert all(value.dtype == torch.float64 for value in layer_moments)
    assert pruning.result is not None
    assert 0 < pruning.result.plan.neurons_after < pruning.result.plan.neurons_before
    assert sum(p.numel() for p in model.parameters()) == pruning.result.params_after
    # the pruned model is the trained one with the removed activations zeroed (in float32, outside autocast)
    assert_matches_oracle(model, keep.model, pruning.result.plan, val.dataset.tensors[0])


def test_ddp_distillation_teaches_every_rank_identically(ddp_run):
    """Issue 21: every rank holds a teacher; the distilled recovery differs from the plain one and the ranks agree."""
    zero, one = (rank["distilled"] for rank in ddp_run)
    assert zero["plan"] == one["plan"]
    for name, tensor in zero["final"].items():
        assert torch.equal(one["final"][name], tensor), name
    plain = ddp_run[0]["recovery"]["final"]
    assert any(not torch.equal(plain[name], tensor) for name, tensor in zero["final"].items() if name in plain)
