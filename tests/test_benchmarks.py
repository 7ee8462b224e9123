"""Smoke test of the benchmarks.fashion_mnist package on a tiny synthetic problem: no Fashion-MNIST, a few seconds."""

import gzip
import os
import re
import struct

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import TensorDataset

from benchmarks.common import (
    Evaluator,
    MLPClassifier,
    SplitDataModule,
    TrainConfig,
    gather_statistics,
    locate_fashion_mnist,
    machine_info,
    ours_at_reduction,
    pruned_copy,
    quiet_trainer,
)
from benchmarks.common.data import IDX_FILES, read_idx
from benchmarks.fashion_mnist.compare import compare_at_reduction, grid_at_reduction, summarize_grid
from benchmarks.fashion_mnist.measure import measure_cost, measure_latency, nonzero_parameters, state_dict_bytes
from benchmarks.fashion_mnist.methods import Variant, magnitude_kept, option_grid
from benchmarks.fashion_mnist.report import plot, render_markdown, write_markdown
from benchmarks.fashion_mnist.results import BenchmarkResults, GridRow, RunInfo, Settings, TrainingFacts
from benchmarks.fashion_mnist.run import main, run_benchmark
from lightning_actprune import STATISTICS
from lightning_actprune.core import ThresholdEvaluator, count_parameters, layer_scores, plan_from_kept, plan_pruning

STALE_MARKDOWN = (
    "# Benchmarks\n\nhand-written intro\n\n<!-- benchmark:begin -->\nSTALE TABLES\n<!-- benchmark:end -->\n\nend"
)
INSTALL_COMMAND = "apt-get update && apt-get install -y dataset-fashion-mnist"


def _dataset(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 12, generator=g)
    y = (x[:, 0] > 0.5).long() + (x[:, 1] > 0.5).long()
    return TensorDataset(x, y)


@pytest.fixture(scope="module")
def trained():
    pl.seed_everything(0, verbose=False)
    datamodule = SplitDataModule(_dataset(256, 0), _dataset(96, 1), _dataset(96, 2), batch_size=32, eval_batch_size=48)
    model = MLPClassifier(sizes=(12, 24, 20, 3), lr=1e-2)
    quiet_trainer(max_epochs=2).fit(model, datamodule=datamodule)
    return model.eval(), datamodule


def test_equal_reduction_comparison_is_fair_and_masking_keeps_the_size(trained):
    model, datamodule = trained
    evaluator = Evaluator(datamodule)
    layers, moments, state_bytes = gather_statistics(evaluator, model)
    assert [layer.name for layer in layers] == ["net.0", "net.2"]
    # every hidden layer's consumer is measured (the model's input need not be: it is no neuron)
    assert {"net.2", "net.4"} <= set(state_bytes) <= {"net.0", "net.2", "net.4"}
    # four float64 sums per input feature and a float64 count
    assert state_bytes["net.2"] == (4 * 24 + 1) * 8

    before = count_parameters(model)
    settings = Settings(random_seeds=(0, 1))
    example = datamodule.val_set.tensors[0][:1]
    rows = {row.method: (row, pruned) for row, pruned in compare_at_reduction(
        model, layers, moments, evaluator, 0.5, settings, example
    )}  # fmt: skip

    ours, ours_model = rows["ours (mean)"]
    assert ours.params == count_parameters(ours_model) <= 0.5 * before
    assert ours.file_bytes < state_dict_bytes(model)
    widths = ours.widths
    assert all(width < layer.neurons for width, layer in zip(widths.values(), layers, strict=True))
    for statistic in STATISTICS:
        row, _ = rows[f"ours ({statistic})"]
        assert row.params <= 0.5 * before
        # the fewest neurons that reach the target, one at a time: one neuron fewer does not reach it
        one_by_one = ThresholdEvaluator(model, layers, moments, statistic, min_neurons=1)
        removed = sum(layer.neurons - row.widths[layer.name] for layer in layers)
        assert count_parameters(pruned_copy(model, one_by_one.plan_removing(removed))) == row.params
        assert count_parameters(pruned_copy(model, one_by_one.plan_removing(removed - 1))) > 0.5 * before

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
    assert unstructured.file_bytes >= state_dict_bytes(model)
    assert not any(name.endswith(("_orig", "_mask")) for name in masked.state_dict())
    structured, masked = rows["ModelPruning ln_structured (L2 rows)"]
    assert structured.params == before
    zero_rows = int((masked.net[0].weight.abs().sum(1) == 0).sum())
    assert zero_rows == layers[0].neurons - widths["net.0"]

    # the trained model itself was never touched
    assert count_parameters(model) == before == nonzero_parameters(model)


def test_magnitude_keeps_the_largest_neurons(trained):
    model, datamodule = trained
    evaluator = Evaluator(datamodule)
    layers, _, _ = gather_statistics(evaluator, model)
    example = datamodule.val_set.tensors[0][:1]
    kept = magnitude_kept(model, layers, {"net.0": 5, "net.2": 7}, example, norm=1)
    assert [len(kept["net.0"]), len(kept["net.2"])] == [5, 7]
    # net.0's group: its own rows and net.2's columns
    score = model.net[0].weight.abs().sum(1) + model.net[2].weight.abs().sum(0)
    assert set(kept["net.0"]) == set(torch.topk(score, 5).indices.tolist())
    plan = plan_from_kept(layers, kept)
    assert plan.neurons_after == 12
    assert {(op.module, op.dim) for op in plan.operations} == {
        ("net.0", "out"), ("net.2", "in"), ("net.2", "out"), ("net.4", "in")
    }  # fmt: skip


def test_every_option_setting_reaches_its_target_and_compensation_changes_outputs(trained):
    model, datamodule = trained
    evaluator = Evaluator(datamodule)
    layers, moments, _ = gather_statistics(evaluator, model)
    before = count_parameters(model)
    variants = option_grid(STATISTICS)
    assert len(set(variants)) == 4 * len(STATISTICS) == 24
    grid = grid_at_reduction(model, layers, moments, evaluator, 0.5, variants)
    rows = {Variant(row.statistic, row.compensate, row.normalize): (row, correct) for row, correct in grid}
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
            smaller = plan_pruning(layers, moments, lower, variant.statistic, model=model, normalize=variant.normalize)
            assert count_parameters(pruned_copy(model, smaller)) > 0.5 * before
    assert any(row.threshold < 0 for row, _ in rows.values())  # normalised scores: λ in standard deviations

    for variant in variants:
        if variant.compensate:
            continue
        compensated = variant._replace(compensate=True)
        assert rows[variant][0].threshold == rows[compensated][0].threshold
        assert rows[variant][0].widths == rows[compensated][0].widths
        models = []
        for option in (variant, compensated):
            _, plan, _ = ours_at_reduction(
                model, layers, moments, option.statistic, 0.5, option.compensate, option.normalize
            )
            models.append(pruned_copy(model, plan))
        with torch.no_grad():
            assert not torch.allclose(models[0](x), models[1](x))

    # table 2 measures with trainer.test, table 3 with a plain forward: the same number
    _, plan, _ = ours_at_reduction(model, layers, moments, "rms", 0.5, True, True)
    row, _ = rows[Variant("rms", True, True)]
    assert evaluator.test_accuracy(pruned_copy(model, plan)) == pytest.approx(row.test_acc, abs=1e-6)


def test_the_rule_keeps_the_simpler_setting_within_noise():
    seed = Variant("mean")
    fancy = Variant("rms", compensate=True, normalize=True)

    def summary(accuracy: dict, n: int = 400):
        rows = []
        for target in (0.5, 0.9):
            for variant, acc in accuracy.items():
                correct = torch.arange(n) < round(acc * n)  # nested: a better setting also gets the easier ones
                rows.append((GridRow(target, *variant, 0.0, 1, {}, acc), correct))
        return summarize_grid(rows, seed)

    close = summary({seed: 0.80, Variant("std"): 0.8025, fancy: 0.805})
    assert close.best == "rms, compensate, normalize"
    assert close.recommended == "mean"
    by_label = {v.label: v for v in close.variants}
    assert by_label["mean"].below_best == pytest.approx(0.005)
    assert by_label["mean"].within_noise
    assert by_label["rms, compensate, normalize"].over_seed == pytest.approx(0.005)
    assert by_label["rms, compensate, normalize"].distance == 3

    far = summary({seed: 0.70, Variant("std"): 0.7975, fancy: 0.80})
    assert far.recommended == "std"  # within noise of the best and closer to the seed
    assert not next(v for v in far.variants if v.label == "mean").within_noise


def test_cost_latency_and_report(trained, tmp_path):
    model, datamodule = trained
    cost = measure_cost(model, datamodule, threshold=0.05, statistic="mean", repeats=1)
    assert set(cost.median_seconds) == {"plain", "statistics", "on_fit_end", "analysis_plan_surgery"}
    # the callback and the plain functions prune the same neurons
    assert cost.callback_params_after == cost.plain_functions_params_after < cost.params_before
    assert cost.peak_allocated_bytes.statistics > cost.peak_allocated_bytes.plain > 0
    latency = measure_latency({"a": model, "b": model}, (12,), batch=4, rounds=2, iterations=2)
    assert set(latency) == {"a", "b"}
    assert all(seconds > 0 for seconds in latency.values())

    settings = Settings(
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
    measured = run_benchmark(model, datamodule, settings, log=lambda _: None)
    assert measured.marked.threshold == 10.0
    assert measured.seed_table[0].params == count_parameters(model)
    config = TrainConfig(sizes=(12, 24, 20, 3), lr=0.01, batch_size=32, epochs=2, seed=0)
    run = RunInfo(
        machine=machine_info(),
        training=TrainingFacts(cached=True, train_seconds=1.0, threads=1, config=config),
        command="python -m benchmarks.fashion_mnist",
        total_seconds=1.0,
    )
    results = BenchmarkResults(measured, run)
    markdown = tmp_path / "BENCHMARKS.md"
    markdown.write_text(STALE_MARKDOWN)
    write_markdown(markdown, render_markdown(results))
    text = markdown.read_text()
    assert "hand-written intro" in text
    assert text.endswith("end")
    assert "STALE TABLES" not in text
    assert "ModelPruning l1_unstructured" in text
    assert "◀ **≥70%**" in text
    assert "### 3. Choosing the defaults" in text
    assert "Torch-Pruning magnitude L2 + compensate" in text
    assert measured.choice.recommended in {v.label for v in measured.choice.variants}
    assert len(measured.grid) == 2 * 4  # two statistics × compensate × normalize, one target
    assert measured.table_mismatches == []
    assert f"ours ({measured.choice.recommended})" in {row.method for row in measured.comparison}
    plot(measured, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 0

    # the results cache: the JSON gives back the same records, and --report-only renders the same report from it
    assert BenchmarkResults.from_json(results.to_json()) == results
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "fashion_mnist_results.json").write_text(results.to_json())
    rendered = tmp_path / "rendered.md"
    rendered.write_text(STALE_MARKDOWN)
    again = tmp_path / "again.png"
    main(["--report-only", "--cache-dir", str(tmp_path / "cache"), "--markdown", str(rendered), "--plot", str(again)])
    assert rendered.read_text() == text
    assert again.stat().st_size > 0


def test_reads_idx_and_says_how_to_get_the_data(tmp_path):
    images = torch.arange(2 * 3 * 4, dtype=torch.uint8).reshape(2, 3, 4)
    path = tmp_path / "images.gz"
    path.write_bytes(gzip.compress(struct.pack(">BBBB3I", 0, 0, 8, 3, 2, 3, 4) + images.numpy().tobytes()))
    assert torch.equal(read_idx(path), images)
    with pytest.raises(FileNotFoundError, match="does not hold Fashion-MNIST"):
        locate_fashion_mnist(tmp_path, install=False)


@pytest.fixture
def fake_apt(tmp_path, monkeypatch):
    """`apt-get` and `sudo` first on PATH: they log their arguments, and `install` puts the IDX files in place."""
    bin_dir, package_dir, log = tmp_path / "bin", tmp_path / "package", tmp_path / "apt.log"
    bin_dir.mkdir()
    files = " ".join(f"{package_dir}/{name}" for name in IDX_FILES.values())
    (bin_dir / "apt-get").write_text(
        f'#!/bin/sh\necho "$@" >> {log}\nif [ "$1" = install ]; then mkdir -p {package_dir} && touch {files}; fi\n'
    )
    (bin_dir / "sudo").write_text('#!/bin/sh\n[ "$1" = -n ] && shift\nexec "$@"\n')
    for script in bin_dir.iterdir():
        script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("FASHION_MNIST_DIR", raising=False)
    return package_dir, log


def test_missing_data_names_the_install_command_and_installs_nothing_unless_asked(fake_apt, tmp_path):
    package_dir, log = fake_apt
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=re.escape(INSTALL_COMMAND)) as error:
        locate_fashion_mnist(package_dir=package_dir)
    assert "--install-data" in str(error.value)
    explicit = f"{re.escape(str(empty))} does not hold .*{re.escape(INSTALL_COMMAND)}"
    with pytest.raises(FileNotFoundError, match=explicit):
        locate_fashion_mnist(empty, install=True)  # an explicit directory is only looked at, never installed into
    with pytest.raises(SystemExit, match=re.escape(INSTALL_COMMAND)):
        main(["--data-dir", str(empty)])
    assert not log.exists()  # nothing ran apt-get
    with pytest.raises(SystemExit):  # argparse: the flag installs the package's directory, not --data-dir
        main(["--data-dir", str(empty), "--install-data"])
    assert not log.exists()

    # asked to: `apt-get update`, then `apt-get install -y dataset-fashion-mnist`, and the files are found
    assert locate_fashion_mnist(install=True, package_dir=package_dir) == package_dir
    assert log.read_text().splitlines() == ["update", "install -y dataset-fashion-mnist"]
