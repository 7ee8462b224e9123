"""Remove the neurons that barely fire: a Lightning callback that prunes a trained model at the end of ``fit``.

The names here are what a Lightning user needs: the callback (:class:`ActivationPruning`), its report and plan
(:class:`PruningResult`, :class:`PruningPlan`), the helpers that load and export pruned checkpoints
(:func:`load_pruned`, :func:`export_pruned`, …) and pruned Hugging Face models (:func:`save_pretrained`,
:func:`from_pretrained`), and the statistics it can prune by (:data:`STATISTICS`, gathered
by the torchmetrics ``Metric`` :class:`ActivationStatistics`), or :class:`NeuronScorer` to write your own. The
plain-PyTorch building blocks (statistics → plan → surgery → report, no Lightning) live in
:mod:`lightning_actprune.core`.
"""

import importlib
import warnings
from typing import Any

from lightning_actprune import core
from lightning_actprune._callback import ActivationPruning
from lightning_actprune._checkpoint import (
    PrunedCheckpointMixin,
    export_pruned,
    load_pruned,
    pruning_plan_of,
    shrink_to_checkpoint,
)
from lightning_actprune._errors import ActivationPruningError
from lightning_actprune._huggingface import from_pretrained, save_pretrained
from lightning_actprune._scoring import NeuronScorer
from lightning_actprune._statistics import STATISTICS, ActivationStatistics
from lightning_actprune._types import PruningPlan, PruningResult

__all__ = [
    "STATISTICS",
    "ActivationPruning",
    "ActivationPruningError",
    "ActivationStatistics",
    "NeuronScorer",
    "PrunedCheckpointMixin",
    "PruningPlan",
    "PruningResult",
    "export_pruned",
    "from_pretrained",
    "load_pruned",
    "pruning_plan_of",
    "save_pretrained",
    "shrink_to_checkpoint",
]

# Names 0.1.0 exported here (and the rest of `core`), and the module that holds each now; they still resolve, with a
# DeprecationWarning.
_MOVED = {
    **dict.fromkeys(sorted(set(core.__all__) - set(__all__)), "lightning_actprune.core"),
    "ModuleSlice": "lightning_actprune._types",
    "SweepRow": "lightning_actprune._types",
    "format_sweep_table": "lightning_actprune._report",
    "plot_sweep": "lightning_actprune._report",
    "pool_moments": "lightning_actprune._statistics",
    "ModuleSnapshot": "lightning_actprune._surgery",
}


def __getattr__(name: str) -> Any:
    """Resolve the names 0.1.0 exported from the package top level, warning where they live now."""
    module = _MOVED.get(name)
    if module is None:
        raise AttributeError(f"module 'lightning_actprune' has no attribute {name!r}")
    where = (
        f"import it from `{module}`"
        if module == "lightning_actprune.core"
        else "it is internal and will stop being importable from here"
    )
    warnings.warn(
        f"`lightning_actprune.{name}` left the top-level API after 0.1.0: {where}.", DeprecationWarning, stacklevel=2
    )
    return getattr(importlib.import_module(module), name)
