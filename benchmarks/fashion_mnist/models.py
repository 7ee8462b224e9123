"""The MLP under test, trained once with Lightning, its weights cached between runs."""

from __future__ import annotations

from pathlib import Path

from benchmarks.common import MLPClassifier, SplitDataModule, TrainConfig, train_cached

from .results import TrainingFacts


def train_or_load(
    datamodule: SplitDataModule, config: TrainConfig, cache_dir: Path, retrain: bool = False
) -> tuple[MLPClassifier, TrainingFacts]:
    """Train once with Lightning (fixed seeds) and cache the ``state_dict``; later runs load it.

    Returns:
        The trained model (eval mode) and facts about the training run (time, whether it came from the cache).
    """
    return train_cached(
        lambda: MLPClassifier(config.sizes, config.lr),
        datamodule,
        config,
        TrainingFacts,
        cache_dir / f"mlp_{config.key()}.pt",
        retrain,
    )
