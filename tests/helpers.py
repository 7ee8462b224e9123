"""Tiny real models, real data, a quiet Trainer and the zero-the-removed-inputs oracle shared by the tests.

Plain code, importable outside pytest (``tests/ddp_script.py`` runs in subprocesses); the fixtures built on it
are in ``conftest.py``.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from lightning_actprune import PruningPlan
from lightning_actprune.core import ActivationMoments

ROOT = Path(__file__).resolve().parent.parent
NUM_CLASSES = 3


class MLPModule(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 12), nn.GELU(), nn.Linear(12, NUM_CLASSES))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class MLPFunctional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.out = nn.Linear(8, 16), nn.Linear(16, 12), nn.Linear(12, NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(F.relu(self.fc2(F.relu(self.fc1(x)))))


class MLPBatchNormDropout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2),
            nn.Linear(16, 12), nn.ReLU(), nn.Dropout(0.2), nn.Linear(12, NUM_CLASSES),
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class CNN(nn.Module):
    """Conv → BatchNorm → ReLU → MaxPool, twice, flatten, Linear."""

    image = (1, 8, 8)

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        )  # fmt: skip
        self.fc = nn.Linear(8 * 2 * 2, 10)
        self.out = nn.Linear(10, NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(F.relu(self.fc(torch.flatten(self.features(x), 1))))


class Residual(nn.Module):
    """A stem, one residual block (conv-bn-relu-conv-bn + identity), global pooling and a head."""

    image = (1, 6, 6)

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.conv1, self.bn1 = nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.conv2, self.bn2 = nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.head = nn.Linear(6, NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        x = F.relu(x + y)
        return self.head(x.mean(dim=(2, 3)))


ARCHITECTURES = {
    "mlp_modules": MLPModule,
    "mlp_functional": MLPFunctional,
    "mlp_batchnorm_dropout": MLPBatchNormDropout,
    "cnn": CNN,
    "residual": Residual,
}


def input_shape(net: nn.Module) -> tuple[int, ...]:
    return getattr(net, "image", (8,))


def make_data(shape: tuple[int, ...], n: int = 96, seed: int = 0) -> TensorDataset:
    """A learnable 3-class problem: the class is decided by the sign pattern of two input directions."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g)
    flat = x.flatten(1)
    y = (flat[:, 0] > 0).long() + (flat[:, -1] > 0.5).long()
    return TensorDataset(x, y)


class Classifier(pl.LightningModule):
    """Wraps any ``net``; logs ``val_loss`` (with ``sync_dist`` as given) and ``val_acc`` (a torchmetrics accuracy)."""

    def __init__(self, net: nn.Module, lr: float = 0.05, sync_dist: bool = False) -> None:
        super().__init__()
        self.net = net
        self.lr = lr
        self.sync_dist = sync_dist
        self.val_acc = MulticlassAccuracy(num_classes=NUM_CLASSES, average="micro")

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.val_acc(logits, y)
        self.log("val_loss", F.cross_entropy(logits, y), sync_dist=self.sync_dist)
        self.log("val_acc", self.val_acc)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def loaders(shape: tuple[int, ...], batch_size: int = 32) -> tuple[DataLoader, DataLoader]:
    train = DataLoader(make_data(shape, seed=0), batch_size=batch_size, shuffle=True)
    val = DataLoader(make_data(shape, n=50, seed=1), batch_size=batch_size)
    return train, val


def quiet_trainer(root: str | Path, *callbacks: Callback, **kwargs: Any) -> pl.Trainer:
    """A CPU Trainer that writes under ``root`` and prints no progress bar or summary; ``kwargs`` override.

    Why the defaults are off here: the bar and the summary only print, and hundreds of fits would bury the suite's
    output. ``tests/test_defaults.py`` and the README's snippets (``tests/test_readme.py``) run every feature with the
    Trainer's defaults (bar, checkpointing, logger), so a feature that breaks under them fails there. Tests that also
    pass ``logger=False``/``enable_checkpointing=False`` check files or state of their own, which the default logger's
    and checkpoint's files would only slow down.
    """
    options = {
        "accelerator": "cpu",
        "default_root_dir": root,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "callbacks": list(callbacks),
    }
    return pl.Trainer(**{**options, **kwargs})


class KeepUnpruned(Callback):
    """Placed before ActivationPruning: copies the trained model (in eval mode) and its weights as fit leaves them."""

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.model = copy.deepcopy(pl_module).eval()
        self.state = copy.deepcopy(pl_module.state_dict())


def hf_conv1d() -> tuple[type, ...]:
    """Hugging Face's GPT-2 ``Conv1D`` (a Linear with its weight transposed) once a test has loaded transformers."""
    conv1d = getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)
    return () if conv1d is None else (conv1d,)


def zero_removed_inputs(model: nn.Module, plan: PruningPlan) -> list[torch.utils.hooks.RemovableHandle]:
    """The oracle: on the *unpruned* model, force the removed neurons' activations to zero at every consumer."""
    return _replace_removed_inputs(model, plan, None)


def replace_removed_by_means(
    model: nn.Module, plan: PruningPlan, moments: dict[str, ActivationMoments]
) -> list[torch.utils.hooks.RemovableHandle]:
    """Oracle for ``compensate``: removed neurons' activations replaced by their means at every consumer."""
    return _replace_removed_inputs(model, plan, moments)


def _replace_removed_inputs(
    model: nn.Module, plan: PruningPlan, moments: dict[str, ActivationMoments] | None
) -> list[torch.utils.hooks.RemovableHandle]:
    handles = []
    for op in plan.operations:
        module = model.get_submodule(op.module)
        if op.dim != "in" or not isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, *hf_conv1d())):
            continue
        index = torch.tensor(op.indices)
        values = torch.zeros(len(index)) if moments is None else moments[op.module].mean.float()[index]

        def hook(
            mod: nn.Module, args: tuple[Tensor, ...], index: Tensor = index, values: Tensor = values
        ) -> tuple[Tensor, ...]:
            x = args[0].clone()
            if isinstance(mod, (nn.Linear, *hf_conv1d())):  # features last
                x[..., index] = values.to(x)
            else:  # channels at dim 1, one value per channel over every position
                x[:, index] = values.to(x).view(-1, *[1] * (x.dim() - 2))
            return (x, *args[1:])

        handles.append(module.register_forward_pre_hook(hook))
    return handles


def assert_matches_oracle(pruned: nn.Module, unpruned: nn.Module, plan: PruningPlan, *inputs: Any) -> None:
    """The pruned model's outputs equal the unpruned model's with the removed neurons zeroed at their consumers."""
    zero_removed_inputs(unpruned, plan)
    pruned.eval()
    with torch.no_grad():
        torch.testing.assert_close(pruned(*inputs), unpruned(*inputs))
