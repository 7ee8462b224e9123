"""Each private Lightning access in ``_lightning_compat`` still reaches what it means to, on a real Trainer.

When a Lightning release moves one, the test names it. Nothing here imports ``lightning_actprune`` at module
level: if a private import is gone the package cannot import, and ``test_private_names_exist`` still says which.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning
import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.trainer.states import RunningStage
from packaging.version import Version
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler, SequentialSampler, TensorDataset

COMPAT = "lightning_actprune/_lightning_compat.py"


def moved(what: str) -> str:
    return f"Lightning {lightning.__version__} moved `{what}`; update {COMPAT}"


@contextmanager
def reaching(what: str) -> Iterator[None]:
    """Turn the errors of a missing private name into a failure that names it."""
    try:
        yield
    except (AttributeError, ImportError, TypeError) as error:
        pytest.fail(f"{moved(what)} ({type(error).__name__}: {error})")


@pytest.fixture(scope="module")
def compat() -> Any:
    with reaching("a name imported at the top of the compatibility module"):
        return importlib.import_module("lightning_actprune._lightning_compat")


class Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(4, 2)
        self.loaded: dict[str, Any] | None = None
        self.ckpt_path_while_loading: Any = None

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.cross_entropy(self.net(x), y), prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["tiny"] = "saved by the module"

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        from lightning_actprune import _lightning_compat

        self.loaded = _lightning_compat.loaded_checkpoint(self.trainer)
        self.ckpt_path_while_loading = self.trainer.ckpt_path


def data(n: int = 8, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(torch.randn(n, 4, generator=g), torch.randint(0, 2, (n,), generator=g)), 4)


def trainer(tmp_path: Any, **kwargs: Any) -> pl.Trainer:
    settings: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": 1,
        "limit_train_batches": 1,
        "limit_val_batches": 1,
        # each access is checked on a bare Trainer; tests/test_defaults.py covers the defaults (see `quiet_trainer`)
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": tmp_path,
    }
    return pl.Trainer(**{**settings, **kwargs})


@pytest.fixture
def fitted(tmp_path: Any) -> tuple[pl.Trainer, Tiny, DataLoader, DataLoader]:
    train, val = data(), data(seed=1)
    model = Tiny()
    fit = trainer(tmp_path)
    fit.fit(model, train, val)
    return fit, model, train, val


@pytest.mark.parametrize(
    ("module", "name"),
    [
        ("lightning.pytorch.trainer.connectors.data_connector", "_request_dataloader"),
        ("lightning.pytorch.trainer.connectors.data_connector", "_DataLoaderSource"),
        ("lightning.pytorch.utilities.data", "_update_dataloader"),
        ("lightning.pytorch.strategies.launchers.multiprocessing", "_MultiProcessingLauncher"),
    ],
)
def test_private_names_exist(module, name):
    with reaching(f"{module}.{name}"):
        assert callable(getattr(importlib.import_module(module), name))


@pytest.mark.parametrize(
    ("loop", "expected"),
    [
        ("fit_loop", "train"),
        ("fit_loop.epoch_loop.val_loop", "val"),
        ("validate_loop", "val"),
        ("test_loop", "model"),
        ("predict_loop", "model"),
    ],
)
def test_data_source_is_where_each_loop_gets_its_data(compat, fitted, loop, expected):
    fit, model, train, val = fitted
    found = fit
    for attribute in loop.split("."):
        found = getattr(found, attribute)
    with reaching(f"{loop}._data_source"):
        source = compat.data_source(found)
        instance = source.instance
        defined = source.is_defined()
    assert instance is {"train": train, "val": val, "model": model}[expected], moved(f"{loop}._data_source.instance")
    assert defined == (expected != "model"), moved(f"{loop}._data_source.is_defined()")


def test_data_source_instance_is_what_request_dataloader_returns(compat, fitted):
    fit, _, _, val = fitted
    other = data(seed=2)
    with reaching("fit_loop.epoch_loop.val_loop._data_source, or _request_dataloader"):
        source = compat.data_source(fit.fit_loop.epoch_loop.val_loop)
        source.instance = other
        requested = compat.request_dataloader(source)
    assert requested is other, moved("_request_dataloader(_DataLoaderSource)")
    source.instance = val
    assert compat.request_dataloader(source) is val


def test_update_dataloader_swaps_the_sampler_and_keeps_the_rest(compat):
    loader = data(n=10)
    sampler = SequentialSampler(range(3))
    with reaching("lightning.pytorch.utilities.data._update_dataloader"):
        updated = compat.update_dataloader(loader, sampler, mode=RunningStage.VALIDATING)
    assert updated.sampler is sampler, moved("_update_dataloader(dataloader, sampler, mode)")
    assert updated.dataset is loader.dataset
    assert updated.batch_size == loader.batch_size


def test_requires_distributed_sampler_follows_the_strategy_and_the_loader(compat, tmp_path):
    one = trainer(tmp_path)
    ddp = trainer(tmp_path, strategy="ddp", devices=2)
    unsharded = trainer(tmp_path, strategy="ddp", devices=2, use_distributed_sampler=False)
    loader = data()
    sharded = DataLoader(loader.dataset, sampler=DistributedSampler(loader.dataset, num_replicas=2, rank=0))
    with reaching("trainer._data_connector._requires_distributed_sampler"):
        cases = [(one, loader), (ddp, loader), (unsharded, loader), (ddp, sharded)]
        answers = [compat.requires_distributed_sampler(fit, dataloader) for fit, dataloader in cases]
    assert answers == [False, True, False, False], moved("trainer._data_connector._requires_distributed_sampler")


@pytest.mark.parametrize(("strategy", "spawns"), [("ddp_spawn", True), ("ddp", False), ("auto", False)])
def test_launches_processes_knows_spawning_strategies(compat, tmp_path, strategy, spawns):
    fit = trainer(tmp_path, strategy=strategy, devices=1 if strategy == "auto" else 2)
    assert compat.launches_processes(fit.strategy) is spawns, moved("_MultiProcessingLauncher")


def test_logger_metrics_kept_restores_what_fit_left(compat, fitted):
    fit, model, _, _ = fitted
    getters: dict[str, Callable[[], dict[str, Any]]] = {
        "_callback_metrics": lambda: fit.callback_metrics,
        "_logged_metrics": lambda: fit.logged_metrics,
        "_progress_bar_metrics": lambda: fit.progress_bar_metrics,
    }
    before = {name: dict(get()) for name, get in getters.items()}
    assert all("val_loss" in metrics for metrics in before.values())
    what = "trainer._logger_connector._callback_metrics/_logged_metrics/_progress_bar_metrics"
    with reaching(what), compat.logger_metrics_kept(fit):
        fit.validate(model, data(n=4, seed=3), verbose=False)
        changed = {name: dict(get()) for name, get in getters.items()}
    for name, get in getters.items():
        assert changed[name]["val_loss"] != before[name]["val_loss"]
        assert get() == before[name], moved(f"trainer._logger_connector.{name}")


def test_set_ckpt_path_is_read_back_and_not_loaded_by_the_next_run(compat, fitted, tmp_path):
    fit, model, _, val = fitted
    missing = tmp_path / "missing.ckpt"
    with reaching("trainer._checkpoint_connector._ckpt_path"):
        compat.set_ckpt_path(fit, missing)
    assert fit.ckpt_path == missing, moved("trainer._checkpoint_connector._ckpt_path")
    # the public setter would make Lightning load this path in the next run (and fail: the file does not exist)
    fit.validate(model, val, verbose=False)
    compat.set_ckpt_path(fit, None)
    assert fit.ckpt_path is None


def test_dump_checkpoint_weights_only_holds_the_model_and_its_hook(compat, fitted):
    fit, model, _, _ = fitted
    with reaching("trainer._checkpoint_connector.dump_checkpoint"):
        checkpoint = compat.dump_checkpoint(fit, weights_only=True)
    assert checkpoint["tiny"] == "saved by the module", moved("dump_checkpoint calling on_save_checkpoint")
    assert checkpoint["state_dict"].keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(checkpoint["state_dict"][key], value)
    assert "optimizer_states" not in checkpoint
    assert "callbacks" not in checkpoint
    assert "optimizer_states" in compat.dump_checkpoint(fit, weights_only=False)


def test_loaded_checkpoint_is_the_one_being_restored(compat, fitted, tmp_path):
    fit, model, _, val = fitted
    with reaching("trainer._checkpoint_connector._loaded_checkpoint"):
        assert compat.loaded_checkpoint(fit) == {}
    path = tmp_path / "tiny.ckpt"
    fit.save_checkpoint(path)
    fit.validate(model, val, ckpt_path=path, verbose=False)
    assert model.loaded is not None, moved("trainer._checkpoint_connector._loaded_checkpoint")
    assert model.loaded["tiny"] == "saved by the module", moved("trainer._checkpoint_connector._loaded_checkpoint")
    assert model.loaded["state_dict"].keys() == model.state_dict().keys()
    assert str(model.ckpt_path_while_loading) == str(path)


def test_declared_floors_are_the_versions_ci_pins_for_its_lowest_run():
    root = Path(__file__).parents[1]
    block = re.search(r"^dependencies = \[(.*?)^\]", (root / "pyproject.toml").read_text(), re.MULTILINE | re.DOTALL)
    assert block is not None, "pyproject.toml has no `dependencies = [...]` block"
    floors = {name: Version(v) for name, v in re.findall(r'"([\w-]+)>=([\w.]+)', block.group(1))}
    every_floor = {
        name: Version(v)
        for name, v in re.findall(r'"([\w-]+)(?:\[\w+\])?>=([\w.]+)', (root / "pyproject.toml").read_text())
    }
    lines = (root / ".ci" / "lowest.txt").read_text().splitlines()
    pins = {name: Version(v) for name, v in (line.split("==") for line in lines if line and not line.startswith("#"))}
    assert {name: pins.get(name) for name in floors} == floors, (
        "the floors in pyproject.toml and the pins in .ci/lowest.txt differ"
    )
    # a pin beyond the dependencies (an extra's package) is that extra's declared floor
    assert {name: every_floor.get(name) for name in pins} == pins
    assert re.search(r'"lightning>=[\w.]+,<\d+\.\d+"', block.group(1)), "lightning needs an upper bound"


class ValidatesInFit(pl.Callback):
    """At the end of the training epoch, runs `validate_in_fit` and notes what the Trainer says while it runs."""

    def __init__(self, compat: Any) -> None:
        self.compat = compat
        self.during: dict[str, Any] = {}

    def on_validation_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.state.fn == "validate":  # our pass, not the fit's own validation
            self.during = {
                "num_val_batches": list(trainer.num_val_batches),
                "validate_loop": trainer.validate_loop,
                "val_loop": trainer.fit_loop.epoch_loop.val_loop,
            }

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.validate_loop = trainer.validate_loop
        self.logged = dict(trainer.logged_metrics)
        self.metrics = self.compat.validate_in_fit(trainer)
        self.after = {"fn": trainer.state.fn, "validate_loop": trainer.validate_loop, "logged": trainer.logged_metrics}


def test_validate_in_fit_runs_the_fit_val_loop_unseen_with_its_batch_count(compat, tmp_path):
    """The progress bars size their bar by `trainer.num_val_batches`, which reads `validate_loop` (issue 19)."""
    probe = ValidatesInFit(compat)
    fit = trainer(tmp_path, callbacks=[probe], limit_val_batches=2)
    fit.fit(Tiny(), data(), data(seed=1))
    with reaching("trainer.validate_loop / fit_loop.epoch_loop.val_loop.max_batches"):
        assert probe.during["num_val_batches"] == [2]
        assert probe.during["validate_loop"] is probe.during["val_loop"]
    assert set(probe.metrics) == {"val_loss"}
    assert probe.after["fn"] == "fit"
    assert probe.after["validate_loop"] is probe.validate_loop
    assert dict(probe.after["logged"]) == probe.logged  # nothing logged


def test_epoch_validation_metrics_are_what_the_validation_logged(compat, tmp_path):
    class Seen(pl.Callback):
        def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            self.metrics = compat.epoch_validation_metrics(trainer)

    seen = Seen()
    fit = trainer(tmp_path, callbacks=[seen])
    fit.fit(Tiny(), data(), data(seed=1))
    with reaching("trainer._logger_connector.metrics['log']"):
        assert seen.metrics == {"val_loss": pytest.approx(float(fit.callback_metrics["val_loss"]))}


@pytest.mark.parametrize("mode", ["min", "max"])
def test_restart_early_stopping_is_a_fresh_early_stopping(compat, mode):
    from lightning.pytorch.callbacks import EarlyStopping

    used, fresh = EarlyStopping(monitor="val_loss", mode=mode), EarlyStopping(monitor="val_loss", mode=mode)
    used.wait_count, used.best_score = 3, torch.tensor(0.25)
    compat.restart_early_stopping(used)
    with reaching("EarlyStopping.wait_count / best_score"):
        assert used.wait_count == fresh.wait_count == 0
        assert torch.equal(used.best_score, fresh.best_score)
