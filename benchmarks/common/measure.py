"""What every classifier benchmark measures on a model: test accuracy, validation passes, activation statistics."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from lightning_actprune.core import ActivationMoments, ActivationRecorder, PrunableLayer, find_prunable_layers

from .models import quiet_trainer


class Evaluator:
    """Test accuracy and validation passes through one quiet Lightning Trainer."""

    def __init__(self, datamodule: pl.LightningDataModule) -> None:
        self.datamodule = datamodule
        self.trainer = quiet_trainer()
        self.calls = 0

    def test_accuracy(self, model: pl.LightningModule) -> float:
        """Accuracy on the test set."""
        self.calls += 1
        (result,) = self.trainer.test(model, datamodule=self.datamodule, verbose=False)
        return float(result["test_acc"])

    def test_correct(self, model: nn.Module) -> Tensor:
        """Whether each test example is classified correctly (in order); its mean is the test accuracy.

        A plain forward over the test loader, not ``trainer.test``: paired comparisons need the examples, not only
        their mean (which is the same number ``trainer.test`` logs).
        """
        self.calls += 1
        model.eval()
        with torch.inference_mode():
            return torch.cat([model(x).argmax(-1) == y for x, y in self.datamodule.test_dataloader()])

    def validate(self, model: pl.LightningModule) -> dict[str, float]:
        """One plain validation pass; returns the logged metrics."""
        (result,) = self.trainer.validate(model, datamodule=self.datamodule, verbose=False)
        return {k: float(v) for k, v in result.items()}


def gather_statistics(
    evaluator: Evaluator, model: pl.LightningModule, prune_residual: bool = False
) -> tuple[list[PrunableLayer], dict[str, ActivationMoments], dict[str, int]]:
    """One validation pass with an :class:`ActivationRecorder` attached: the prunable layers and their moments.

    ``prune_residual``: residual channels are layers too (``find_prunable_layers(..., prune_residual=True)``).

    Returns:
        The layers, the moments by measured module, and the bytes of every layer's metric state.
    """
    with ActivationRecorder(model) as recorder:
        evaluator.validate(model)
    recorder.check_finite()
    layers = find_prunable_layers(model, recorder.example_inputs, prune_residual=prune_residual)
    state_bytes = {
        name: sum(t.numel() * t.element_size() for t in metric.metric_state.values() if isinstance(t, Tensor))
        for name, metric in recorder.metrics.items()
    }
    return layers, recorder.moments(), state_bytes
