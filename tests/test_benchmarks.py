"""Smoke test of benchmarks/fashion_mnist.py on a tiny synthetic problem: no Fashion-MNIST, a few seconds."""

import gzip
import importlib.util
import struct
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import TensorDataset

from lightning_actprune.core import count_parameters, layer_scores

ROOT = Path(__file__).resolve().parent.parent


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("fashion_mnist_benchmark", ROOT / "benchmarks" / "fashion_mnist.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


bench = _load_benchmark()


def _dataset(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 12, generator=g)
    y = (x[:, 0] > 0.5).long() + (x[:, 1] > 0.5).long()
    return TensorDataset(x, y)


@pytest.fixture(scope="module")
def trained():
    pl.seed_everything(0, verbose=False)
    datamodule = bench.SplitDataModule(
        _dataset(256, 0), _dataset(96, 1), _dataset(96, 2), batch_size=32, eval_batch_size=48
    )
    model = bench.MLPClassifier(sizes=(12, 24, 20, 3), lr=1e-2)
    bench.quiet_trainer(max_epochs=2).fit(model, datamodule=datamodule)
    return model.eval(), datamodule


def test_equal_reduction_comparison_is_fair_and_masking_keeps_the_size(trained):
    model, datamodule = trained
    evaluator = bench.Evaluator(datamodule)
    layers, moments, state_bytes = bench.gather_statistics(evaluator, model)
    assert [layer.name for layer in layers] == ["net.0", "net.2"]
    # every hidden layer's consumer is measured (the model's input need not be: it is no neuron)
    assert {"net.2", "net.4"} <= set(state_bytes) <= {"net.0", "net.2", "net.4"}
    # four float64 sums per input feature and a float64 count
    assert state_bytes["net.2"] == (4 * 24 + 1) * 8

    before = count_parameters(model)
    settings = bench.Settings(random_seeds=(0, 1))
    example = datamodule.val_set.tensors[0][:1]
    rows = {row.method: (row, pruned) for row, pruned in bench.compare_at_reduction(
        model, layers, moments, evaluator, 0.5, settings, example
    )}  # fmt: skip

    ours, ours_model = rows["ours (mean)"]
    assert ours.params == count_parameters(ours_model) <= 0.5 * before
    assert ours.file_bytes < bench.state_dict_bytes(model)
    widths = ours.widths
    assert all(width < layer.neurons for width, layer in zip(widths.values(), layers, strict=True))
    for statistic in bench.STATISTICS:
        row, _ = rows[f"ours ({statistic})"]
        assert row.params <= 0.5 * before
        # bisection found the first plan that reaches the target: the next lower score's plan does not
        scores = torch.cat([layer_scores(layer, moments, statistic, model=model) for layer in layers])
        lower = float(scores[scores < row.threshold].max())
        smaller = bench.plan_pruning(layers, moments, lower, statistic, model=model)
        assert count_parameters(bench.pruned_copy(model, smaller)) > 0.5 * before

    magnitude = [f"Torch-Pruning magnitude L{norm}{suffix}" for norm in (1, 2) for suffix in ("", " + compensate")]
    for name in (*magnitude, "random (mean of 2 seeds)"):
        row, pruned = rows[name]
        assert row.widths == widths
        assert pruned.net[0].out_features == widths["net.0"]
        assert pruned.net[4].in_features == widths["net.2"]
        assert row.params == ours.params
    assert rows["random (mean of 2 seeds)"][0].test_acc_std is not None
    for norm in (1, 2):
        plain = rows[f"Torch-Pruning magnitude L{norm}"][1]
        compensated = rows[f"Torch-Pruning magnitude L{norm} + compensate"][1]
        # the same neurons; only the consumers' biases absorbed the removed ones
        assert torch.equal(plain.net[0].weight, compensated.net[0].weight)
        assert torch.equal(plain.net[2].weight, compensated.net[2].weight)
        assert not torch.equal(plain.net[4].bias, compensated.net[4].bias)
    compensated, compensated_model = rows["ours (mean, compensate)"]
    assert compensated.widths == widths
    assert compensated.params == ours.params
    # the removed neurons' mean activations moved into the consumers' biases
    changed = [i for i in (2, 4) if not torch.equal(compensated_model.net[i].bias, ours_model.net[i].bias)]
    assert changed

    unstructured, masked = rows["ModelPruning l1_unstructured"]
    assert unstructured.params == count_parameters(masked) == before
    assert unstructured.nonzero == ours.params
    assert unstructured.file_bytes >= bench.state_dict_bytes(model)
    assert not any(name.endswith(("_orig", "_mask")) for name in masked.state_dict())
    structured, masked = rows["ModelPruning ln_structured (L2 rows)"]
    assert structured.params == before
    zero_rows = int((masked.net[0].weight.abs().sum(1) == 0).sum())
    assert zero_rows == layers[0].neurons - widths["net.0"]

    # the trained model itself was never touched
    assert count_parameters(model) == before == bench.nonzero_parameters(model)


def test_magnitude_keeps_the_largest_neurons(trained):
    model, datamodule = trained
    evaluator = bench.Evaluator(datamodule)
    layers, _, _ = bench.gather_statistics(evaluator, model)
    example = datamodule.val_set.tensors[0][:1]
    kept = bench.magnitude_kept(model, layers, {"net.0": 5, "net.2": 7}, example, norm=1)
    assert [len(kept["net.0"]), len(kept["net.2"])] == [5, 7]
    # net.0's group: its own rows and net.2's columns
    score = model.net[0].weight.abs().sum(1) + model.net[2].weight.abs().sum(0)
    assert set(kept["net.0"]) == set(torch.topk(score, 5).indices.tolist())
    plan = bench.plan_from_kept(layers, kept)
    assert plan.neurons_after == 12
    assert {(op.module, op.dim) for op in plan.operations} == {
        ("net.0", "out"), ("net.2", "in"), ("net.2", "out"), ("net.4", "in")
    }  # fmt: skip


def test_every_option_setting_reaches_its_target_and_compensation_changes_outputs(trained):
    model, datamodule = trained
    evaluator = bench.Evaluator(datamodule)
    layers, moments, _ = bench.gather_statistics(evaluator, model)
    before = count_parameters(model)
    variants = bench.option_grid(bench.STATISTICS)
    assert len(set(variants)) == 4 * len(bench.STATISTICS) == 24
    grid = bench.grid_at_reduction(model, layers, moments, evaluator, 0.5, variants)
    rows = {bench.Variant(row.statistic, row.compensate, row.normalize): (row, correct) for row, correct in grid}
    assert list(rows) == variants
    x, y = datamodule.test_set.tensors
    for variant, (row, correct) in rows.items():
        assert row.params <= 0.5 * before
        assert correct.shape == y.shape
        assert row.test_acc == pytest.approx(float(correct.double().mean()))
        # the first λ that reaches the target: the next lower score's plan does not
        scores = torch.cat(
            [layer_scores(layer, moments, variant.statistic, model, variant.normalize) for layer in layers]
        )
        if bool((scores < row.threshold).any()):
            lower = float(scores[scores < row.threshold].max())
            smaller = bench.plan_pruning(
                layers, moments, lower, variant.statistic, model=model, normalize=variant.normalize
            )
            assert count_parameters(bench.pruned_copy(model, smaller)) > 0.5 * before
    assert any(row.threshold < 0 for row, _ in rows.values())  # normalised scores: λ in standard deviations

    for variant in variants:
        if variant.compensate:
            continue
        compensated = variant._replace(compensate=True)
        assert rows[variant][0].threshold == rows[compensated][0].threshold
        assert rows[variant][0].widths == rows[compensated][0].widths
        models = []
        for option in (variant, compensated):
            _, plan, _ = bench.ours_at_reduction(
                model, layers, moments, option.statistic, 0.5, option.compensate, option.normalize
            )
            models.append(bench.pruned_copy(model, plan))
        with torch.no_grad():
            assert not torch.allclose(models[0](x), models[1](x))

    # table 2 measures with trainer.test, table 3 with a plain forward: the same number
    _, plan, _ = bench.ours_at_reduction(model, layers, moments, "rms", 0.5, True, True)
    row, _ = rows[bench.Variant("rms", True, True)]
    assert evaluator.test_accuracy(bench.pruned_copy(model, plan)) == pytest.approx(row.test_acc, abs=1e-6)


def test_the_rule_keeps_the_simpler_setting_within_noise():
    seed = bench.Variant("mean")
    fancy = bench.Variant("rms", compensate=True, normalize=True)

    def summary(accuracy: dict, n: int = 400) -> dict:
        rows = []
        for target in (0.5, 0.9):
            for variant, acc in accuracy.items():
                correct = torch.arange(n) < round(acc * n)  # nested: a better setting also gets the easier ones
                rows.append((bench.GridRow(target, *variant, 0.0, 1, {}, acc), correct))
        return bench.summarize_grid(rows, seed)

    close = summary({seed: 0.80, bench.Variant("std"): 0.8025, fancy: 0.805})
    assert close["best"] == "rms, compensate, normalize"
    assert close["recommended"] == "mean"
    by_label = {v["label"]: v for v in close["variants"]}
    assert by_label["mean"]["below_best"] == pytest.approx(0.005)
    assert by_label["mean"]["within_noise"]
    assert by_label["rms, compensate, normalize"]["over_seed"] == pytest.approx(0.005)
    assert by_label["rms, compensate, normalize"]["distance"] == 3

    far = summary({seed: 0.70, bench.Variant("std"): 0.7975, fancy: 0.80})
    assert far["recommended"] == "std"  # within noise of the best and closer to the seed
    assert not next(v for v in far["variants"] if v["label"] == "mean")["within_noise"]


def test_cost_latency_and_report(trained, tmp_path):
    model, datamodule = trained
    cost = bench.measure_cost(model, datamodule, threshold=0.05, statistic="mean", repeats=1)
    assert set(cost["median_seconds"]) == {"plain", "statistics", "on_fit_end", "analysis_plan_surgery"}
    # the callback and the plain functions prune the same neurons
    assert cost["callback_params_after"] == cost["plain_functions_params_after"] < cost["params_before"]
    assert cost["peak_allocated_bytes"]["statistics"] > cost["peak_allocated_bytes"]["plain"] > 0
    latency = bench.measure_latency({"a": model, "b": model}, (12,), batch=4, rounds=2, iterations=2)
    assert set(latency) == {"a", "b"}
    assert all(seconds > 0 for seconds in latency.values())

    settings = bench.Settings(
        thresholds=(0.0, 0.05, 10.0),
        targets=(0.5,),
        plot_targets=(),
        statistics=("mean", "rms"),
        random_seeds=(0,),
        latency_rounds=1,
        latency_iterations={1: 1, 256: 1},
        speed_rounds=1,
        cost_repeats=1,
    )
    results = bench.run_benchmark(model, datamodule, settings, log=lambda _: None)
    assert results["marked"]["threshold"] == 10.0
    assert results["seed_table"][0]["params"] == count_parameters(model)
    config = {"sizes": [12, 24, 20, 3], "lr": 0.01, "batch_size": 32, "epochs": 2, "seed": 0}
    results |= {
        "machine": bench.machine_info(),
        "training": {"cached": True, "train_seconds": 1.0, "threads": 1, "config": config},
        "command": "python benchmarks/fashion_mnist.py",
        "total_seconds": 1.0,
    }
    markdown = tmp_path / "BENCHMARKS.md"
    markdown.write_text(
        "# Benchmarks\n\nhand-written intro\n\n<!-- benchmark:begin -->\nSTALE TABLES\n<!-- benchmark:end -->\n\nend"
    )
    bench.write_markdown(markdown, bench.render_markdown(results))
    text = markdown.read_text()
    assert "hand-written intro" in text
    assert text.endswith("end")
    assert "STALE TABLES" not in text
    assert "ModelPruning l1_unstructured" in text
    assert "◀ **≥70%**" in text
    assert "### 3. Choosing the defaults" in text
    assert "Torch-Pruning magnitude L2 + compensate" in text
    assert results["choice"]["recommended"] in {v["label"] for v in results["choice"]["variants"]}
    assert len(results["grid"]) == 2 * 4  # two statistics × compensate × normalize, one target
    assert results["table_mismatches"] == []
    assert f"ours ({results['choice']['recommended']})" in {row["method"] for row in results["comparison"]}
    bench.plot(results, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 0


def test_reads_idx_and_says_how_to_get_the_data(tmp_path):
    images = torch.arange(2 * 3 * 4, dtype=torch.uint8).reshape(2, 3, 4)
    path = tmp_path / "images.gz"
    path.write_bytes(gzip.compress(struct.pack(">BBBB3I", 0, 0, 8, 3, 2, 3, 4) + images.numpy().tobytes()))
    assert torch.equal(bench.read_idx(path), images)
    with pytest.raises(FileNotFoundError, match="does not hold Fashion-MNIST"):
        bench.locate_fashion_mnist(tmp_path, install=False)
