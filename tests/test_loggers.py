"""The λ table reaches the loggers we name in the README, each read back from what it wrote."""

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest

from lightning_actprune import ActivationPruning
from lightning_actprune._report import sweep_columns, sweep_records
from tests.helpers import ARCHITECTURES, Classifier, loaders
from tests.test_checkpoint import fit_trainer

SWEEP = [0.0, 0.1, 0.2, 0.4]
PNG = b"\x89PNG\r\n\x1a\n"


def fit_with(logger, tmp_path):
    pl.seed_everything(0)
    pruning = ActivationPruning(threshold=0.1, sweep=SWEEP, monitor="val_acc")
    trainer = fit_trainer(tmp_path, pruning, logger=logger, default_root_dir=tmp_path, enable_checkpointing=False)
    train, val = loaders((8,))
    trainer.fit(Classifier(ARCHITECTURES["mlp_functional"](), lr=0.2), train, val)
    return trainer, pruning.result


def test_wandb_run_holds_the_sweep_table_and_plot(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    # offline, quiet, and every file W&B writes (run, cache, settings) inside tmp_path
    for name in ["WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"]:
        monkeypatch.setenv(name, str(tmp_path))
    for name, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    logger = WandbLogger(save_dir=tmp_path, offline=True, project="actprune-test")
    try:
        trainer, result = fit_with(logger, tmp_path)
    finally:
        wandb.finish()
        wandb.teardown()  # stops W&B's service process: the run's record is complete on disk only then

    (run_dir,) = tmp_path.glob("wandb/offline-run-*")
    (table_file,) = run_dir.glob("files/media/table/actprune/sweep_*.table.json")
    table = json.loads(table_file.read_text())
    records = sweep_records(result)
    assert table["columns"] == sweep_columns(records)
    assert table["data"] == [[record[column] for column in table["columns"]] for record in records]
    assert [row[table["columns"].index("chosen")] for row in table["data"]] == [False, True, False, False]

    (image_file,) = run_dir.glob("files/media/images/actprune/sweep_plot_*.png")
    assert image_file.read_bytes() == Path(trainer.log_dir, "actprune_sweep.png").read_bytes()
    assert image_file.read_bytes()[:8] == PNG

    # the run's own record (what `wandb sync` uploads) logs both files under their keys
    (run_log,) = run_dir.glob("*.wandb")
    history = run_log.read_bytes()
    for key, media in [("actprune/sweep", table_file), ("actprune/sweep_plot", image_file)]:
        assert key.encode() in history
        assert media.relative_to(run_dir / "files").as_posix().encode() in history


def test_mlflow_run_holds_the_sweep_files(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow-skinny has no database backend
    from lightning.pytorch.loggers import MLFlowLogger
    from mlflow.tracking import MlflowClient

    tracking_uri = (tmp_path / "mlruns").as_uri()
    logger = MLFlowLogger(experiment_name="actprune-test", tracking_uri=tracking_uri)
    trainer, result = fit_with(logger, tmp_path)

    client = MlflowClient(tracking_uri)
    names = sorted(artifact.path for artifact in client.list_artifacts(logger.run_id))
    assert names == ["actprune_sweep.csv", "actprune_sweep.json", "actprune_sweep.png"]
    downloaded = Path(client.download_artifacts(logger.run_id, "", str(tmp_path / "downloaded")))
    for name in names:
        assert (downloaded / name).read_bytes() == Path(trainer.log_dir, name).read_bytes()
    payload = json.loads((downloaded / "actprune_sweep.json").read_text())
    assert payload["rows"] == sweep_records(result)
    assert client.get_run(logger.run_id).data.metrics["actprune/chosen_threshold"] == 0.1
