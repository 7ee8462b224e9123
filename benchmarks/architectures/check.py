"""One model through the callback's path, in the process that runs this module (the sweep starts one per model).

``python -m benchmarks.architectures.check NAME`` prints one JSON line: a :class:`ModelResult`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import resource
import sys
import time
import traceback
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from lightning_actprune import ActivationPruning
from lightning_actprune.core import (
    ActivationRecorder,
    PruningPlan,
    ThresholdEvaluator,
    apply_plan,
    count_parameters,
    find_prunable_layers,
    plan_for_reduction,
)

from .results import ERROR, EXACT, SKIPPED, ModelResult

SAMPLES, VALIDATION_SAMPLES, TARGET = 16, 2000, 0.3
RESOLUTIONS = (32, 64, 96, 128, 160, 224, 299)
MEMORY_LIMIT_GB = 8.0
"""A model's process stops with ``MemoryError`` past this, instead of taking the machine down."""


def build(name: str) -> nn.Module:
    """The torchvision model from its config: random weights, 10 classes, eval mode."""
    import torchvision

    torch.manual_seed(0)
    extra = {"aux_logits": False, "init_weights": True} if name in ("inception_v3", "googlenet") else {}
    return torchvision.models.get_model(name, weights=None, num_classes=10, **extra).eval()


def smallest_resolution(model: nn.Module) -> int:
    """The smallest of :data:`RESOLUTIONS` at which the model runs on a batch of 2."""
    for size in RESOLUTIONS:
        try:
            with torch.no_grad():
                model(torch.randn(2, 3, size, size))
        except Exception:
            continue
        return size
    raise RuntimeError(f"runs at none of the resolutions {RESOLUTIONS}")


def validation_seconds(model: nn.Module, images: Tensor, repeats: int = 2) -> float:
    """One validation pass of :data:`VALIDATION_SAMPLES`, from the fastest of ``repeats`` timed batches."""
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            start = time.process_time()
            model(images)
            times.append(time.process_time() - start)
    return min(times) * VALIDATION_SAMPLES / len(images)


def zeroed_reference(model: nn.Module, plan: PruningPlan) -> list[Any]:
    """The oracle: the unpruned model with the removed neurons' inputs multiplied by 0 at every consumer."""
    handles = []
    for op in plan.operations:
        module = model.get_submodule(op.module)
        if op.dim != "in" or not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        channels = module.in_features if isinstance(module, nn.Linear) else module.in_channels
        mask = torch.ones(channels)
        mask[list(op.indices)] = 0.0
        shape = (-1,) if isinstance(module, nn.Linear) else (-1, 1, 1)

        mask = mask.view(shape)

        def hook(_: nn.Module, args: tuple[Tensor, ...], mask: Tensor = mask) -> tuple[Tensor, ...]:
            return (args[0] * mask, *args[1:])

        handles.append(module.register_forward_pre_hook(hook))
    return handles


def prunable_fraction(model: nn.Module, layers: list[Any]) -> float:
    touched = {piece.module for layer in layers for piece in layer.slices}
    params = sum(p.numel() for name in touched for p in model.get_submodule(name).parameters(recurse=False))
    return params / count_parameters(model)


def check(name: str) -> ModelResult:
    """Build, analyse, record, plan, prune and compare with the oracle; every failure becomes an ``error`` row."""
    model = build(name)
    result = ModelResult(name=name, status=ERROR, params=count_parameters(model))
    try:
        result.resolution = smallest_resolution(model)
        images = torch.randn(SAMPLES, 3, result.resolution, result.resolution)
        result.validation_seconds = validation_seconds(model, images)
        with ActivationRecorder(model) as recorder, torch.no_grad():
            model(images)
        start = time.process_time()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            layers = find_prunable_layers(model, recorder.example_inputs)
        result.analysis_seconds = time.process_time() - start
        result.messages = [str(w.message) for w in caught if "lightning_actprune" in str(w.message)]
        result.layers = len(layers)
        result.prunable_fraction = prunable_fraction(model, layers)
        if not layers:
            result.status = SKIPPED
            return result
        start = time.process_time()
        # the callback's defaults for a target: its criterion (fluctuation over each layer's mean), tie-breaks and floor
        settings = ActivationPruning(target_params_reduction=TARGET, pruned_checkpoint=None)
        evaluator = ThresholdEvaluator(
            model, layers, recorder.moments(), settings.scorer, settings.min_neurons, normalize=settings.normalized
        )
        choice = plan_for_reduction(evaluator, TARGET)
        result.search_seconds = time.process_time() - start
        scale = {"mean": " (over the layer mean)", "std": " (standardised)"}[settings.scorer.scale]
        result.statistic = settings.scorer.name + (scale if settings.normalized else "")
        result.reduction = choice.reduction
        if choice.plan is None:
            result.status = SKIPPED
            result.messages.append(choice.note or "target out of reach")
            return result
        result.layers_pruned = sum(len(layer.kept) < layer.neurons for layer in choice.plan.layers)
        original = copy.deepcopy(model)
        apply_plan(model, choice.plan)
        handles = zeroed_reference(original, choice.plan)
        with torch.no_grad():
            pruned, reference = model(images), original(images)
        for handle in handles:
            handle.remove()
        result.max_abs_error = float((pruned - reference).abs().max())
        scale = float(reference.abs().max())
        if torch.allclose(pruned, reference, rtol=1e-4, atol=1e-4 * max(1.0, scale)):
            result.status = EXACT
        else:
            result.error = f"the pruned model differs from the oracle by {result.max_abs_error:.3g}"
    except Exception as error:
        result.error = f"{type(error).__name__}: {error}"[:500]
        traceback.print_exc(file=sys.stderr)
    return result


def main() -> None:
    limit = int(MEMORY_LIMIT_GB * 2**30)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    torch.set_num_threads(1)
    result = check(sys.argv[1])
    result.peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(dataclasses.asdict(result)))


if __name__ == "__main__":
    main()
