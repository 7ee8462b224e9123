"""The network under test: a small ResNet for 1×28×28 images (BatchNorm, residual blocks), trained once and cached."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.common import Classifier, SplitDataModule, train_cached

from .results import CNNTrainConfig, CNNTrainingFacts


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


def train_or_load(
    datamodule: SplitDataModule,
    config: CNNTrainConfig,
    cache_dir: Path,
    hidden: Sequence[int] | None = None,
    retrain: bool = False,
) -> tuple[ResNetClassifier, CNNTrainingFacts]:
    """Train once with Lightning (fixed seeds) and cache the ``state_dict``; later runs load it.

    Args:
        datamodule: the data.
        config: the stage widths and the training settings.
        cache_dir: where the weights go (one file per configuration and ``hidden``).
        hidden: each block's inner channels (default: the stage's width).
        retrain: ignore cached weights.

    Returns:
        The trained model (eval mode) and facts about the training run (time, whether it came from the cache).
    """
    suffix = "" if hidden is None else "_" + "-".join(map(str, hidden))
    return train_cached(
        lambda: ResNetClassifier(config.widths, hidden, config.lr),
        datamodule,
        config,
        CNNTrainingFacts,
        cache_dir / f"resnet_{config.key()}{suffix}.pt",
        retrain,
    )
