"""Every Python and YAML block of the README runs as written, taken from README.md itself (issue 19).

A block that uses a `model` and a `dm` the README leaves to the reader gets the digits example's model and data; a
YAML block runs through LightningCLI with the same model and data. The Trainer keeps its defaults (progress bar,
checkpointing, logger) wherever the README does.
"""

from __future__ import annotations

import ast
import builtins
import re
import sys
import tempfile
from pathlib import Path

import lightning.pytorch as pl
import pytest
import yaml
from lightning.pytorch.cli import LightningCLI

from lightning_actprune import ActivationPruning
from tests.helpers import ROOT

sys.path.insert(0, str(ROOT / "examples"))
from digits import DigitsDataModule, DigitsMLP

README = (ROOT / "README.md").read_text()


def blocks(language: str) -> list[str]:
    return [block.split("```", 1)[0] for block in README.split(f"```{language}\n")[1:]]


PYTHON = blocks("python")
YAML = blocks("yaml")
HIDDEN = 32  # the digits model, small: the blocks' epochs stay as written


def undefined_names(snippet: str) -> set[str]:
    """Names the snippet reads but neither assigns, imports, defines nor gets from Python's builtins."""
    nodes = list(ast.walk(ast.parse(snippet)))
    loaded = {n.id for n in nodes if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    bound = {n.id for n in nodes if isinstance(n, ast.Name) and not isinstance(n.ctx, ast.Load)}
    bound |= {
        (a.asname or a.name).split(".")[0] for n in nodes if isinstance(n, ast.Import | ast.ImportFrom) for a in n.names
    }
    bound |= {n.name for n in nodes if isinstance(n, ast.FunctionDef | ast.ClassDef)}
    bound |= {n.arg for n in nodes if isinstance(n, ast.arg)}
    return loaded - bound - set(dir(builtins))


def test_the_readme_has_the_blocks_this_module_runs():
    assert len(PYTHON) >= 5
    assert len(YAML) >= 2
    # the reader supplies at most a LightningModule `model` and a datamodule `dm`
    assert all(undefined_names(s) <= {"model", "dm"} for s in PYTHON), [undefined_names(s) for s in PYTHON]
    ran = "".join(PYTHON)
    for name in ("ActivationPruning", "apply_plan", "plan_pruning", "export_pruned", "load_pruned"):
        assert f"{name}(" in ran, f"no README snippet calls {name}"


@pytest.fixture
def in_tmp_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # whatever a block writes lands in this test's directory,
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # its `tempfile.mkdtemp()` included
    return tmp_path


@pytest.mark.parametrize("snippet", PYTHON, ids=lambda s: s.splitlines()[0][:40])
def test_python_block_runs(snippet, in_tmp_path):
    for optional in re.findall(r"^(?:from|import) (transformers|timm|torchvision)\b", snippet, re.MULTILINE):
        pytest.importorskip(optional)  # an extra (`models`) the lowest-versions environment does not install
    pl.seed_everything(0)
    namespace = {}
    if undefined_names(snippet):  # the model and data the README leaves to the reader
        namespace = {"model": DigitsMLP(hidden=HIDDEN), "dm": DigitsDataModule()}
    exec(compile(snippet, "README.md", "exec"), namespace)
    if "trainer" in namespace:
        pruning = next(c for c in namespace["trainer"].callbacks if isinstance(c, ActivationPruning))
        assert pruning.result is not None
        assert pruning.result.pruned
        assert pruning.result.params_reduction > 0


def run_cli(config: Path, *args: str) -> LightningCLI:
    return LightningCLI(
        DigitsMLP, DigitsDataModule, seed_everything_default=0, args=["fit", "--config", str(config), *args]
    )


def test_yaml_with_every_argument_runs_and_prints_what_the_readme_shows(in_tmp_path, caplog):
    (block,) = [b for b in YAML if "lightning_actprune.ActivationPruning" in b]
    config = in_tmp_path / "config.yaml"
    config.write_text(block)
    with caplog.at_level("INFO"):
        cli = run_cli(config, f"--model.hidden={HIDDEN}")
    (pruning,) = [c for c in cli.trainer.callbacks if isinstance(c, ActivationPruning)]
    written = yaml.safe_load(block)["trainer"]["callbacks"][0]["init_args"]
    result = pruning.result
    assert result is not None
    assert result.chosen_by == "target_params_reduction"
    assert result.params_reduction >= written["target_params_reduction"]
    assert set(written["sweep"]) <= {row.target for row in result.sweep}
    assert result.metrics_recovered  # the recovery epochs the block asks for ran
    # the README prints this run's summary (on its own digits model): the same lines appear here
    printed = "\n".join(record.getMessage() for record in caplog.records)
    shown = re.search(r"```text\n(Activation pruning, λ = .*?chosen by target_params_reduction[^\n]*)\n", README)
    assert shown is not None, "the README shows the summary of its YAML"
    words = re.sub(r"[-\d.,]+", "#", shown.group(1))
    assert words in {re.sub(r"[-\d.,]+", "#", line) for line in printed.splitlines()}


def test_yaml_of_your_own_criterion_runs(in_tmp_path, monkeypatch):
    (fragment,) = [b for b in YAML if b.startswith("statistic:")]
    (definition,) = [s for s in PYTHON if "class WeightNorm(NeuronScorer)" in s]
    (in_tmp_path / "mypackage.py").write_text(definition)  # "the class must be importable"
    monkeypatch.syspath_prepend(str(in_tmp_path))
    init_args = {"threshold": 0.5, "pruned_checkpoint": None, **yaml.safe_load(fragment)}
    config = in_tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "trainer": {
                    "max_epochs": 2,
                    "callbacks": [{"class_path": "lightning_actprune.ActivationPruning", "init_args": init_args}],
                }
            }
        )
    )
    cli = run_cli(config, f"--model.hidden={HIDDEN}")
    (pruning,) = [c for c in cli.trainer.callbacks if isinstance(c, ActivationPruning)]
    assert pruning.result.plan.statistic == "mypackage.WeightNorm"
    assert pruning.result.pruned
