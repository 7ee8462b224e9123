"""The classifiers the Fashion-MNIST benchmarks train, the MLP's recipe, the quiet Trainer and the weights cache."""

from __future__ import annotations

import dataclasses
import itertools
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from .records import from_plain, short_hash


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The MLP's recipe: what its cached weights depend on."""

    sizes: tuple[int, ...] = (784, 1024, 1024, 10)
    lr: float = 1e-3
    batch_size: int = 128
    epochs: int = 10
    seed: int = 0
    num_val: int = 10_000

    def key(self) -> str:
        """A short hash of the configuration, for the cache file name."""
        return short_hash(dataclasses.asdict(self))


class Classifier(pl.LightningModule):
    """Cross-entropy training with Adam; logs ``val_loss``, ``val_acc`` and ``test_acc``. Subclasses add ``forward``.

    Args:
        num_classes: the number of classes.
        lr: Adam's learning rate.
    """

    def __init__(self, num_classes: int, lr: float) -> None:
        super().__init__()
        self.lr = lr
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.val_acc(logits, y)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", self.val_acc)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.test_acc(self(x), y)
        self.log("test_acc", self.test_acc)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class MLPClassifier(Classifier):
    """A ReLU MLP (``sizes`` = input, hidden…, classes) trained with Adam; logs ``val_acc`` and ``test_acc``."""

    def __init__(self, sizes: Sequence[int] = (784, 1024, 1024, 10), lr: float = 1e-3) -> None:
        super().__init__(sizes[-1], lr)
        self.save_hyperparameters()
        layers: list[nn.Module] = []
        for width_in, width_out in itertools.pairwise(sizes[:-1]):
            layers += [nn.Linear(width_in, width_out), nn.ReLU()]
        self.net = nn.Sequential(*layers, nn.Linear(sizes[-2], sizes[-1]))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class BasicBlock(nn.Module):
    """conv3×3-BN-ReLU-conv3×3-BN plus a shortcut (identity, or 1×1 conv-BN when the shape changes), then ReLU."""

    def __init__(self, channels_in: int, channels_out: int, stride: int = 1, hidden: int | None = None) -> None:
        super().__init__()
        hidden = channels_out if hidden is None else hidden
        self.conv1 = nn.Conv2d(channels_in, hidden, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.conv2 = nn.Conv2d(hidden, channels_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or channels_in != channels_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(channels_in, channels_out, 1, stride=stride, bias=False), nn.BatchNorm2d(channels_out)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNetClassifier(Classifier):
    """A small ResNet: stride-2 stem conv-BN-ReLU, a :class:`BasicBlock` per stage (stride 2 between), pool, Linear.

    Args:
        widths: the channels of the stem and of each stage, e.g. ``(8, 16, 32)``.
        hidden: the inner channels of each stage's block (between its two convolutions); default: the stage's width.
            A network trained from scratch at the widths a pruned one ended with passes both.
        lr: Adam's learning rate.
        num_classes: outputs of the final Linear.
    """

    def __init__(
        self,
        widths: Sequence[int] = (8, 16, 32),
        hidden: Sequence[int] | None = None,
        lr: float = 1e-3,
        num_classes: int = 10,
    ) -> None:
        super().__init__(num_classes, lr)
        self.save_hyperparameters()
        hidden = list(widths) if hidden is None else list(hidden)
        # a stride-2 stem (28×28 → 14×14) keeps a training epoch within minutes on two CPU cores
        self.stem = nn.Sequential(
            nn.Conv2d(1, widths[0], 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()
        )
        blocks = [
            BasicBlock(widths[max(i - 1, 0)], widths[i], stride=1 if i == 0 else 2, hidden=hidden[i])
            for i in range(len(widths))
        ]
        self.stages = nn.Sequential(*blocks)
        self.head = nn.Linear(widths[-1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stages(self.stem(x.reshape(-1, 1, 28, 28)))
        return self.head(x.mean(dim=(2, 3)))


def quiet_trainer(**kwargs: Any) -> pl.Trainer:
    """A CPU Trainer that writes nothing: no logger, checkpoint, progress bar or model summary."""
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
    }
    return pl.Trainer(**{**options, **kwargs})


ModelT = TypeVar("ModelT", bound=Classifier)
FactsT = TypeVar("FactsT")


def train_cached(
    build: Callable[[], ModelT],
    datamodule: pl.LightningDataModule,
    config: Any,
    facts_type: type[FactsT],
    weights: Path,
    retrain: bool = False,
) -> tuple[ModelT, FactsT]:
    """Train ``build()`` for ``config.epochs`` (seeded with ``config.seed``) once; later runs load ``weights``.

    The facts (``facts_type(train_seconds, threads, config, final_val_acc)``, with a ``cached`` flag) are stored
    beside the weights, in JSON.
    """
    facts_path = weights.with_suffix(".json")
    if weights.is_file() and facts_path.is_file() and not retrain:
        model = build()
        model.load_state_dict(torch.load(weights, weights_only=True))
        facts = from_plain(facts_type, json.loads(facts_path.read_text()))
        return model.eval(), dataclasses.replace(facts, cached=True)  # type: ignore[type-var]
    pl.seed_everything(config.seed, workers=True, verbose=False)
    model = build()
    trainer = quiet_trainer(max_epochs=config.epochs)
    start = time.perf_counter()
    trainer.fit(model, datamodule=datamodule)
    facts = facts_type(
        train_seconds=time.perf_counter() - start,  # type: ignore[call-arg]
        threads=torch.get_num_threads(),
        config=config,
        final_val_acc=float(trainer.callback_metrics["val_acc"]),
    )
    weights.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), weights)
    written = dataclasses.asdict(facts)  # type: ignore[call-overload]
    del written["cached"]  # a property of the run that reads the file, not of the training
    facts_path.write_text(json.dumps(written, indent=2))
    return model.eval(), facts
