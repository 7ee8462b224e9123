"""Remove the neurons that barely fire: a Lightning callback and the plain functions behind it.

The callback composes four steps that also work on a plain ``nn.Module``:

1. statistics: :class:`ActivationRecorder` / :class:`ActivationStatistics`;
2. plan: :func:`find_prunable_layers` and :func:`plan_pruning`;
3. surgery: :func:`apply_plan`;
4. report: :class:`PruningResult`.
"""

from lightning_actprune._callback import ActivationPruning
from lightning_actprune._errors import ActivationPruningError
from lightning_actprune._plan import (
    LayerPlan,
    ModulePruning,
    ModuleSlice,
    PrunableLayer,
    PruningPlan,
    find_prunable_layers,
    layer_scores,
    plan_pruning,
)
from lightning_actprune._report import PruningResult, count_parameters, model_size_mb
from lightning_actprune._statistics import (
    STATISTICS,
    ActivationMoments,
    ActivationRecorder,
    ActivationStatistics,
    neuron_statistic,
    pool_moments,
)
from lightning_actprune._surgery import ModuleSnapshot, apply_plan

__all__ = [
    "STATISTICS",
    "ActivationMoments",
    "ActivationPruning",
    "ActivationPruningError",
    "ActivationRecorder",
    "ActivationStatistics",
    "LayerPlan",
    "ModulePruning",
    "ModuleSlice",
    "ModuleSnapshot",
    "PrunableLayer",
    "PruningPlan",
    "PruningResult",
    "apply_plan",
    "count_parameters",
    "find_prunable_layers",
    "layer_scores",
    "model_size_mb",
    "neuron_statistic",
    "plan_pruning",
    "pool_moments",
]
