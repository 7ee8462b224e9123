"""The network under test: a small ResNet for 1×28×28 images (BatchNorm, residual blocks), trained once and cached."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from benchmarks.common import ResNetClassifier, SplitDataModule, train_cached

from .results import CNNTrainConfig, CNNTrainingFacts


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
