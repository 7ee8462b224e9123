"""Train an MLP on scikit-learn's digits and prune it with ActivationPruning, all from a YAML config.

Run::

    python examples/digits.py fit --config examples/digits.yaml

The digits (1,797 8x8 images) ship inside scikit-learn: nothing is downloaded. After ``fit`` the log directory
holds ``pruned.ckpt`` (the pruned LightningModule and its plan), ``pruned.pt`` (the pruned network's
``state_dict`` and plan, for :func:`lightning_actprune.load_pruned`) and, when ``onnx`` and ``onnxscript`` are
installed, ``pruned.onnx``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LightningCLI
from sklearn.datasets import load_digits
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from lightning_actprune import ActivationPruning, export_pruned, load_pruned


class DigitsDataModule(pl.LightningDataModule):
    """scikit-learn's digits as 64 features in [0, 1]; a fixed, stratification-free split."""

    def __init__(self, batch_size: int = 64, val_fraction: float = 0.2, seed: int = 0) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.seed = seed

    def setup(self, stage: str) -> None:
        images, labels = load_digits(return_X_y=True)
        x = torch.tensor(images, dtype=torch.float32) / 16.0
        y = torch.tensor(labels, dtype=torch.long)
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.seed))
        n_val = int(len(x) * self.val_fraction)
        self.val_set = TensorDataset(x[order[:n_val]], y[order[:n_val]])
        self.train_set = TensorDataset(x[order[n_val:]], y[order[n_val:]])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=256)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()


class DigitsMLP(pl.LightningModule):
    """A 64-h-h-10 ReLU MLP trained with Adam; logs ``val_loss`` and ``val_acc``."""

    def __init__(self, hidden: int = 256, lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Linear(64, hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, 10),
        )  # fmt: skip
        self.val_acc = MulticlassAccuracy(num_classes=10, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=10, average="micro")
        self.example_input_array = torch.zeros(1, 64)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.val_acc(logits, y)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", self.val_acc, prog_bar=True)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.test_acc(self(x), y)
        self.log("test_acc", self.test_acc)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def export(cli: LightningCLI) -> None:
    """After ``fit``: the pruned network as ``state_dict`` + plan (``pruned.pt``) and, if possible, as ONNX."""
    pruning = next((c for c in cli.trainer.callbacks if isinstance(c, ActivationPruning)), None)
    if pruning is None or pruning.result is None or not cli.trainer.is_global_zero:
        return
    directory = Path(cli.trainer.log_dir or cli.trainer.default_root_dir)
    export_pruned(cli.model, directory / "pruned.pt", submodule="net")
    # a fresh full-size network (built from the saved hyperparameters) shrinks to the plan and loads the weights
    net = load_pruned(DigitsMLP(hidden=cli.model.hparams.hidden).net, directory / "pruned.pt").eval()
    example = torch.zeros(1, 64)
    with torch.no_grad():
        assert torch.equal(net(example), cli.model.net.eval()(example))
    print(f"Saved the pruned network to {directory / 'pruned.pt'}")
    if importlib.util.find_spec("onnx") is None or importlib.util.find_spec("onnxscript") is None:
        print("ONNX export skipped: `pip install onnx onnxscript` enables it.")
        return
    # an ordinary dense network: nothing of this package is needed to run it
    torch.onnx.export(
        net,
        (example,),
        str(directory / "pruned.onnx"),
        input_names=["x"],
        output_names=["logits"],
        dynamic_shapes=({0: torch.export.Dim("batch")},),  # any batch size
        external_data=False,  # one file: the weights are small
    )
    print(f"Saved the pruned network as ONNX to {directory / 'pruned.onnx'}")


def main() -> None:
    cli = LightningCLI(DigitsMLP, DigitsDataModule, seed_everything_default=0)
    if cli.subcommand == "fit":
        export(cli)


if __name__ == "__main__":
    main()
