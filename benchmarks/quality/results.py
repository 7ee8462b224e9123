"""The quality benchmark's records: one row per (seed, target, method, epochs after the prune), and the run."""

from __future__ import annotations

import dataclasses

from benchmarks.common import JsonRecord, Machine

from .models import QualityConfig

UNPRUNED = "unpruned"
OURS = "ours (default criterion)"
OURS_BEFORE = "ours (per-layer standardised fluctuation)"
"""Before issue 21 the default for networks without BatchNorm (with it, their channels were scored by RMS)."""
OURS_DISTILLED = "ours + distillation (`distill_weight: 0.5`)"
OURS_RESIDUAL = "ours + residual channels (`prune_residual: true`)"
OURS_RESIDUAL_DISTILLED = "ours + residual channels + distillation"
SCRATCH = "from scratch, our widths"


def torch_pruning_method(importance: str, global_pruning: bool) -> str:
    """The row name of a Torch-Pruning setting."""
    return f"Torch-Pruning {importance}, {'global' if global_pruning else 'uniform'}"


@dataclasses.dataclass
class Row(JsonRecord):
    """One model measured.

    Attributes:
        seed: the base's seed (its initialisation and data order).
        reduction: the parameter reduction asked for (0 for the unpruned model).
        method: what pruned it (see the constants).
        epochs: training epochs after the prune (0: one-shot; from scratch: every epoch it trained).
        params: its parameter count.
        test_acc: accuracy on the 10,000 test images.
        widths: what it kept (embedding width, heads × head width / FFN per block).
        epoch_seconds: seconds of each training epoch after the prune.
    """

    seed: int
    reduction: float
    method: str
    epochs: int
    params: int
    test_acc: float
    widths: str
    epoch_seconds: list[float] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class QualityResults(JsonRecord):
    """A whole run: the recipe, every row, the machine, the command and how long it took."""

    config: QualityConfig
    base_epoch_seconds: dict[int, float]
    rows: list[Row]
    machine: Machine
    command: str
    minutes: float
