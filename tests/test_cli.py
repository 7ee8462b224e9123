"""LightningCLI parses the callback from YAML: the README's snippet and the example's config."""

import csv
import inspect
import sys
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.cli import LightningCLI

from lightning_actprune import ActivationPruning
from tests.helpers import ROOT, KeepUnpruned
from tests.scorers import OutputWeightNorm

sys.path.insert(0, str(ROOT / "examples"))
from digits import DigitsDataModule, DigitsMLP


def readme_yaml_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return [block.split("```", 1)[0] for block in text.split("```yaml\n")[1:]]


def parse(config: Path, *extra: str) -> LightningCLI:
    return LightningCLI(DigitsMLP, DigitsDataModule, run=False, args=["--config", str(config), *extra])


def callback_config(directory: Path, init_args: str) -> Path:
    """A config file with ActivationPruning as the Trainer's only callback, its ``init_args`` in YAML flow style."""
    config = directory / "config.yaml"
    config.write_text(
        "trainer:\n  callbacks:\n    - class_path: lightning_actprune.ActivationPruning\n"
        f"      init_args: {init_args}\n"
    )
    return config


def pruning_callback(cli: LightningCLI) -> ActivationPruning:
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, ActivationPruning)]
    return callback


def test_issue_snippet_parses(tmp_path):
    config = callback_config(tmp_path, "{threshold: 0.4, monitor: val_acc}")
    callback = pruning_callback(parse(config))
    assert callback.threshold == 0.4
    assert callback.monitor == "val_acc"
    assert callback.statistic is None  # not named: a λ the user writes is a mean activation
    assert callback.effective_statistic == "mean"
    assert callback.normalize is None


def test_readme_yaml_sets_every_public_argument(tmp_path):
    (block,) = [b for b in readme_yaml_blocks() if "lightning_actprune.ActivationPruning" in b]
    config = tmp_path / "config.yaml"
    config.write_text(block)
    callback = pruning_callback(parse(config))
    written = yaml.safe_load(block)["trainer"]["callbacks"][0]["init_args"]
    public = set(inspect.signature(ActivationPruning.__init__).parameters) - {"self"}
    assert set(written) == public, "every constructor argument must appear in the README's YAML"
    for name, value in written.items():
        assert getattr(callback, name) == (value if value is not None or name != "exclude" else []), name


def test_example_config_parses_with_overrides():
    cli = parse(
        ROOT / "examples" / "digits.yaml",
        "--trainer.callbacks.init_args.statistic=rms",
        "--trainer.callbacks.init_args.prune_heads=false",
    )
    callback = pruning_callback(cli)
    assert callback.statistic == "rms"
    assert callback.prune_heads is False
    assert callback.monitor == "val_acc"


def test_bad_value_in_yaml_names_the_argument(tmp_path):
    config = callback_config(tmp_path, "{threshold: -1, statistic: rms}")
    with pytest.raises(ValueError, match=r"`threshold` must be a finite number >= 0; got -1"):
        parse(config)


@pytest.mark.slow
def test_cli_fit_runs_the_example_end_to_end(tmp_path):
    config = yaml.safe_load((ROOT / "examples" / "digits.yaml").read_text())
    # quiet, as in `quiet_trainer` (see its docstring); the README's YAML runs with the defaults in test_readme.py
    config["trainer"].update(max_epochs=2, enable_progress_bar=False, enable_model_summary=False)
    for logger in config["trainer"]["logger"]:
        logger["init_args"]["save_dir"] = str(tmp_path)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    LightningCLI(DigitsMLP, DigitsDataModule, args=["fit", "--config", str(path)])
    (metrics,) = tmp_path.glob("digits/version_*/metrics.csv")
    with open(metrics) as f:
        rows = [r for r in csv.DictReader(f) if r.get("actprune/params_after")]
    assert len(rows) == 1
    assert float(rows[0]["actprune/params_after"]) < float(rows[0]["actprune/params_before"])
    assert list(tmp_path.glob("digits/version_*/events.out.tfevents.*"))


@pytest.mark.slow
def test_example_exports_an_ordinary_dense_network_to_onnx(tmp_path):
    onnx = pytest.importorskip("onnx")  # in the `examples` extra
    from digits import export

    config = yaml.safe_load((ROOT / "examples" / "digits.yaml").read_text())
    # quiet, as in `quiet_trainer` (see its docstring): this test checks the exported files only
    config["trainer"].update(max_epochs=3, enable_progress_bar=False, enable_model_summary=False, logger=False)
    config["trainer"]["default_root_dir"] = str(tmp_path)
    path = tmp_path / "input.yaml"  # LightningCLI saves its own config.yaml into the run directory
    path.write_text(yaml.safe_dump(config))
    cli = LightningCLI(DigitsMLP, DigitsDataModule, args=["fit", "--config", str(path)])
    export(cli)
    graph = onnx.load(str(tmp_path / "pruned.onnx")).graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param  # a symbolic batch size
    shapes = sorted(tuple(i.dims) for i in graph.initializer if len(i.dims) == 2)
    expected = sorted(tuple(p.shape) for n, p in cli.model.net.named_parameters() if n.endswith("weight"))
    assert shapes == expected
    assert shapes != [(256, 64), (256, 256), (10, 256)]  # really pruned: not the full-size network


def test_own_scorer_from_yaml_prunes_what_a_hand_computation_predicts(tmp_path):
    config = tmp_path / "config.yaml"  # quiet, as in `quiet_trainer`: this test checks the plan only
    config.write_text(
        "seed_everything: 0\n"
        "trainer:\n"
        "  max_epochs: 1\n  logger: false\n  enable_checkpointing: false\n  enable_progress_bar: false\n"
        f"  default_root_dir: {tmp_path / 'run'}\n"
        "  callbacks:\n"
        "    - class_path: tests.helpers.KeepUnpruned\n"
        "    - class_path: lightning_actprune.ActivationPruning\n"
        "      init_args:\n"
        "        threshold: 3.0\n"
        "        statistic: {class_path: tests.scorers.OutputWeightNorm, init_args: {p: 1}}\n"
        "        pruned_checkpoint: null\n"
        "model: {hidden: 32}\n"
    )
    cli = parse(config)
    pruning = pruning_callback(cli)
    assert isinstance(pruning.statistic, OutputWeightNorm)
    assert pruning.statistic.p == 1
    (keep,) = [c for c in cli.trainer.callbacks if isinstance(c, KeepUnpruned)]
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    for layer in pruning.result.plan.layers:
        l1_norms = keep.state[f"{layer.name}.weight"].abs().sum(1)
        assert layer.kept == tuple(int(i) for i in torch.nonzero(l1_norms >= 3.0).flatten()), layer.name
    assert 0 < pruning.result.plan.neurons_after < pruning.result.plan.neurons_before
    assert pruning.result.plan.statistic == "tests.scorers.OutputWeightNorm"
