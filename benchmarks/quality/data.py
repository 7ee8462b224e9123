"""The benchmark's data and the trained networks, one file per architecture and seed under the cache."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from torch.utils.data import TensorDataset

from benchmarks.common import Classifier, SplitDataModule, load_fashion_mnist, train_cached

from .models import QualityConfig, build


@dataclasses.dataclass
class BaseFacts:
    """How the unpruned network of one seed was trained."""

    train_seconds: float
    threads: int
    config: QualityConfig
    final_val_acc: float
    cached: bool = False


def datamodule(data_dir: Path, config: QualityConfig) -> SplitDataModule:
    """The first ``config.train_images`` training images, the last ``config.num_val`` as validation, the test set."""
    train, val, test = load_fashion_mnist(data_dir, config.num_val)
    train = TensorDataset(*(t[: config.train_images] for t in train.tensors))
    return SplitDataModule(train, val, test, batch_size=config.batch_size, seed=config.seed)


def trained_base(
    data: SplitDataModule, config: QualityConfig, cache_dir: Path, retrain: bool = False
) -> tuple[Classifier, BaseFacts]:
    """The unpruned network of ``config`` (its seed) after ``config.epochs`` epochs, trained once and cached."""
    weights = cache_dir / "quality" / f"{config.arch}-{config.key()}.pt"
    return train_cached(lambda: build(config), data, config, BaseFacts, weights, retrain)
