"""The plain-PyTorch building blocks behind :class:`~lightning_actprune.ActivationPruning`.

Nothing here imports Lightning: every function takes a plain ``nn.Module`` and tensors, so the same steps run in
any training loop. The callback composes them in this order.

1. Statistics. :class:`ActivationRecorder` hooks the prunable layers and accumulates, per output neuron, the
   moments of its activation (:class:`ActivationMoments`, summed in float64 by the torchmetrics ``Metric``
   :class:`ActivationStatistics`); :func:`neuron_statistic` turns moments into one of :data:`STATISTICS`.
2. Plan. :func:`find_prunable_layers` traces the model with Torch-Pruning and returns each layer whose output
   neurons can be removed (:class:`PrunableLayer`, with the coupled modules); :func:`layer_scores` scores the
   neurons (by a built-in statistic or your own :class:`NeuronScorer`) and :func:`plan_pruning` keeps those whose
   score reaches λ. The result is a :class:`PruningPlan`: plain data (:class:`LayerPlan`, :class:`ModulePruning`,
   :class:`BiasUpdate`) that loads with ``weights_only=True``.
   :func:`plan_from_kept` builds one from the indices you choose yourself.
3. Surgery. :func:`apply_plan` removes the neurons in place, all or nothing
   (:func:`apply_plan_with_optimizers` in the middle of training: the optimizers follow the parameters).
4. Report. :func:`count_parameters` and :func:`model_size_mb` measure the model; :class:`ThresholdEvaluator`
   evaluates a list of λ (restoring the model between them), :func:`threshold_for_reduction` and
   :func:`plan_for_reduction` find λ for a parameter reduction, :func:`write_sweep_files` writes the λ table of a
   :class:`PruningResult`.

Example:
    >>> import torch
    >>> from lightning_actprune.core import ActivationRecorder, apply_plan, find_prunable_layers, plan_pruning
    >>> _ = torch.manual_seed(0)
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)).eval()
    >>> with ActivationRecorder(model) as recorder, torch.no_grad():
    ...     _ = model(torch.randn(32, 4))
    >>> layers = find_prunable_layers(model, recorder.example_inputs)
    >>> plan = plan_pruning(layers, recorder.moments(), threshold=0.05, statistic="mean")
    >>> apply_plan(model, plan)
    >>> model[0].out_features == 8 - len(plan.layers[0].removed)
    True
"""

from lightning_actprune._analysis import find_prunable_layers
from lightning_actprune._errors import ActivationPruningError
from lightning_actprune._optimizer import apply_plan_with_optimizers
from lightning_actprune._plan import layer_scores, plan_from_kept, plan_pruning
from lightning_actprune._report import write_sweep_files
from lightning_actprune._scoring import NeuronScorer
from lightning_actprune._statistics import (
    STATISTICS,
    ActivationMoments,
    ActivationRecorder,
    ActivationStatistics,
    neuron_statistic,
)
from lightning_actprune._surgery import apply_plan
from lightning_actprune._sweep import ReductionChoice, ThresholdEvaluator, plan_for_reduction, threshold_for_reduction
from lightning_actprune._types import (
    BiasUpdate,
    LayerPlan,
    ModulePruning,
    PrunableLayer,
    PruningPlan,
    PruningResult,
    count_parameters,
    model_size_mb,
)

__all__ = [
    "STATISTICS",
    "ActivationMoments",
    "ActivationPruningError",
    "ActivationRecorder",
    "ActivationStatistics",
    "BiasUpdate",
    "LayerPlan",
    "ModulePruning",
    "NeuronScorer",
    "PrunableLayer",
    "PruningPlan",
    "PruningResult",
    "ReductionChoice",
    "ThresholdEvaluator",
    "apply_plan",
    "apply_plan_with_optimizers",
    "count_parameters",
    "find_prunable_layers",
    "layer_scores",
    "model_size_mb",
    "neuron_statistic",
    "plan_for_reduction",
    "plan_from_kept",
    "plan_pruning",
    "threshold_for_reduction",
    "write_sweep_files",
]
