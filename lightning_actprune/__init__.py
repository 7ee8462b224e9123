"""Remove the neurons that barely fire: a Lightning callback and the plain functions behind it.

The callback composes four steps that also work on a plain ``nn.Module``:

1. statistics: :class:`ActivationRecorder` / :class:`ActivationStatistics`;
2. plan: :func:`find_prunable_layers` and :func:`plan_pruning`;
3. surgery: :func:`apply_plan` (:func:`apply_plan_with_optimizers` in the middle of training);
4. report: :class:`PruningResult`;

and the λ table: :class:`ThresholdEvaluator`, :func:`threshold_for_reduction`, :func:`write_sweep_files`.
"""

from lightning_actprune._callback import ActivationPruning
from lightning_actprune._checkpoint import (
    PrunedCheckpointMixin,
    export_pruned,
    load_pruned,
    pruning_plan_of,
    shrink_to_checkpoint,
)
from lightning_actprune._errors import ActivationPruningError
from lightning_actprune._optimizer import apply_plan_with_optimizers
from lightning_actprune._plan import (
    BiasUpdate,
    LayerPlan,
    ModulePruning,
    ModuleSlice,
    PrunableLayer,
    PruningPlan,
    find_prunable_layers,
    layer_scores,
    plan_from_kept,
    plan_pruning,
)
from lightning_actprune._report import (
    PruningResult,
    SweepRow,
    count_parameters,
    format_sweep_table,
    model_size_mb,
    plot_sweep,
    write_sweep_files,
)
from lightning_actprune._statistics import (
    STATISTICS,
    ActivationMoments,
    ActivationRecorder,
    ActivationStatistics,
    neuron_statistic,
    pool_moments,
)
from lightning_actprune._surgery import ModuleSnapshot, apply_plan
from lightning_actprune._sweep import ThresholdEvaluator, threshold_for_reduction

__all__ = [
    "STATISTICS",
    "ActivationMoments",
    "ActivationPruning",
    "ActivationPruningError",
    "ActivationRecorder",
    "ActivationStatistics",
    "BiasUpdate",
    "LayerPlan",
    "ModulePruning",
    "ModuleSlice",
    "ModuleSnapshot",
    "PrunableLayer",
    "PrunedCheckpointMixin",
    "PruningPlan",
    "PruningResult",
    "SweepRow",
    "ThresholdEvaluator",
    "apply_plan",
    "apply_plan_with_optimizers",
    "count_parameters",
    "export_pruned",
    "find_prunable_layers",
    "format_sweep_table",
    "layer_scores",
    "load_pruned",
    "model_size_mb",
    "neuron_statistic",
    "plan_from_kept",
    "plan_pruning",
    "plot_sweep",
    "pool_moments",
    "pruning_plan_of",
    "shrink_to_checkpoint",
    "threshold_for_reduction",
    "write_sweep_files",
]
