"""One family through the callback's planning, the oracle, ``save_pretrained``/``from_pretrained`` and ``generate``.

:func:`check` runs in whatever process calls it; the sweep (:mod:`.run`) gives each family a process of its own.
"""

from __future__ import annotations

import copy
import inspect
import resource
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_actprune import from_pretrained, save_pretrained
from lightning_actprune._config import PruningSettings
from lightning_actprune._conv1d import Conv1D
from lightning_actprune._counting import parameters_after
from lightning_actprune._heads import head_counts
from lightning_actprune._huggingface import sync_pretrained_configs, uniform_ties
from lightning_actprune.core import (
    ActivationMoments,
    ActivationRecorder,
    PrunableLayer,
    PruningPlan,
    ThresholdEvaluator,
    apply_plan,
    count_parameters,
    find_prunable_layers,
    plan_for_reduction,
)

from .families import Family, build
from .results import CLOSE, DIFFERS, ERROR, EXACT, NOTHING, PRUNED, SKIPPED, Comparison, FamilyResult, HeadInfo

TARGET = 0.3
"""``target_params_reduction`` of every family (half its prunable fraction where that is less)."""
RTOL, ATOL = 1e-4, 1e-5
"""Outputs within ``RTOL`` and ``ATOL`` × their largest magnitude are equal up to float rounding."""
NEW_TOKENS = 4
MESSAGE_CHARACTERS = 600


class Net(nn.Module):
    """A Hugging Face model whose output is one tensor: its logits, else its first tensor output."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, **inputs: Tensor) -> Tensor:
        output = self.model(**inputs)
        logits = getattr(output, "logits", None)
        if isinstance(logits, Tensor):
            return logits
        values = output.to_tuple() if hasattr(output, "to_tuple") else output
        values = values if isinstance(values, (tuple, list)) else (values,)
        return next(value for value in values if isinstance(value, Tensor))


def _short(error: BaseException) -> str:
    text = " ".join(f"{type(error).__name__}: {error}".split())
    return text[:MESSAGE_CHARACTERS]


def compare(actual: Tensor, expected: Tensor) -> Comparison:
    """Bit for bit, within float rounding, or not at all (a shape mismatch differs too)."""
    if actual.shape != expected.shape:
        return Comparison(DIFFERS, float("inf"), f"shapes {list(actual.shape)} and {list(expected.shape)}")
    if actual.dtype in (torch.long, torch.int, torch.bool):
        return Comparison(EXACT if torch.equal(actual, expected) else DIFFERS, 0.0)
    error = float((actual.float() - expected.float()).abs().max()) if actual.numel() else 0.0
    if torch.equal(actual, expected):
        return Comparison(EXACT, 0.0)
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    close = torch.allclose(actual.float(), expected.float(), rtol=RTOL, atol=ATOL * max(1.0, scale))
    return Comparison(CLOSE if close else DIFFERS, error)


def zeroed_at_consumers(model: nn.Module, plan: PruningPlan) -> list[torch.utils.hooks.RemovableHandle]:
    """The oracle: on the unpruned ``model``, the removed neurons' activations are zeroed at every consumer.

    A consumer is a ``Linear`` (Hugging Face's ``Conv1D`` too: features last) or a convolution (channels at dim 1)
    whose input columns the plan removes; for a ``:heads`` layer that is the out projection's columns of each removed
    head. Remove the returned hooks to restore the model.
    """
    handles = []
    for operation in plan.operations:
        module = model.get_submodule(operation.module)
        if operation.dim != "in" or not isinstance(module, (nn.Linear, Conv1D, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            continue
        index = torch.tensor(operation.indices, dtype=torch.long)
        features_last = isinstance(module, (nn.Linear, Conv1D))

        def hook(_: nn.Module, args: tuple[Any, ...], index: Tensor = index, last: bool = features_last) -> Any:
            x = args[0].clone()
            if last:
                x[..., index] = 0
            else:
                x[:, index] = 0
            return (x, *args[1:])

        handles.append(module.register_forward_pre_hook(hook))
    return handles


def head_info(model: nn.Module, layers: list[PrunableLayer]) -> HeadInfo:
    """The first attention module's head counts and what a neuron of its ``:heads`` layer is."""
    counts = list(head_counts(model).values())
    info = HeadInfo(attention_modules=len(counts))
    if counts:
        info.heads, info.kv_heads, info.head_dim = counts[0].heads, counts[0].kv_heads, counts[0].head_dim
    heads = [layer for layer in layers if is_head_layer(layer)]
    if heads:
        first = heads[0]
        info.unit = "key/value group" if info.grouped and first.neurons == info.kv_heads else "query head"
    return info


def is_head_layer(layer: PrunableLayer) -> bool:
    return layer.name.endswith(":heads")


def evaluator(
    net: nn.Module, layers: list[PrunableLayer], moments: dict[str, ActivationMoments], settings: PruningSettings
) -> ThresholdEvaluator:
    """What ``ActivationPruning`` plans with (``PruningPipeline.evaluator``), for ``settings``, without validation."""
    return ThresholdEvaluator(
        net,
        layers,
        moments,
        settings.scorer,
        settings.min_neurons,
        compensate=settings.compensate,
        normalize=settings.normalized,
        tied=uniform_ties(net, layers) if settings.uniform_widths else (),
    )


def most_removable(search: ThresholdEvaluator) -> float:
    """The reduction of removing every prunable neuron (``min_neurons`` kept per layer)."""
    plan = search.plan_removing(len(search.removal_order()))
    params = parameters_after(search.model, plan, search.params_before)
    return 1.0 - (params / search.params_before if params is not None else search.size(plan).params_kept)


def plan_at_target(search: ThresholdEvaluator, result: FamilyResult) -> PruningPlan | None:
    """The plan for :data:`TARGET` (or half the prunable fraction), as ``target_params_reduction`` chooses it."""
    result.prunable_fraction = most_removable(search)
    result.target = TARGET if result.prunable_fraction >= TARGET else result.prunable_fraction / 2
    choice = plan_for_reduction(search, result.target)
    result.reduction = choice.reduction
    return choice.plan


@contextmanager
def _stage(result: FamilyResult, stage: str, into: Comparison | None = None) -> Iterator[None]:
    """Run one step: its exception becomes the family's error (or the comparison's), the sweep goes on."""
    result.stage = stage
    try:
        yield
    except Exception as error:
        traceback.print_exc()
        if into is None:
            raise
        into.outcome, into.error = DIFFERS, f"{stage}: {_short(error)}"


def _quietly(function: Callable[[], Any]) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return function()


def generated(model: nn.Module, ids: Tensor, use_cache: bool) -> Tensor:
    """Greedy tokens, :data:`NEW_TOKENS` of them."""
    pad = getattr(model.config, "pad_token_id", None)  # type: ignore[union-attr]
    with torch.no_grad():
        return _quietly(
            lambda: model.generate(  # type: ignore[operator]
                ids, max_new_tokens=NEW_TOKENS, do_sample=False, use_cache=use_cache, pad_token_id=pad or 0
            )
        )


def check_generate(net: Net, original: Net, plan: PruningPlan, ids: Tensor) -> Comparison:
    """With the cache, without it, and the zeroing oracle's tokens: all three the same."""
    with_cache = generated(net.model, ids, use_cache=True)
    without = compare(with_cache, generated(net.model, ids, use_cache=False))
    if without.outcome != EXACT:
        return Comparison(DIFFERS, error="with and without the cache")
    handles = zeroed_at_consumers(original, plan)
    try:
        reference = generated(original.model, ids, use_cache=True)
    finally:
        for handle in handles:
            handle.remove()
    oracle = compare(with_cache, reference)
    return oracle if oracle.outcome == EXACT else Comparison(DIFFERS, error="against the zeroing oracle")


def loaded(auto_class: str, directory: Path, ours: bool = False) -> Net:
    """``AutoModel….from_pretrained(directory)``, or ours (the padding removed), wrapped like the pruned model."""
    import transformers

    auto = getattr(transformers, auto_class)
    model = _quietly(lambda: from_pretrained(auto, directory) if ours else auto.from_pretrained(directory))
    return Net(model.float().eval())


def outputs(net: nn.Module, inputs: dict[str, Any]) -> Tensor:
    with torch.no_grad():
        return _quietly(lambda: net(**inputs))


def check_round_trip(net: Net, plan: PruningPlan, family: Family, inputs: dict[str, Any], result: FamilyResult) -> None:
    """Ours ``save_pretrained`` (padded where the config cannot state a width) → the stock loader, and ours."""
    expected = outputs(net, inputs)
    with tempfile.TemporaryDirectory(prefix="hf_families_") as directory:
        path = Path(directory)
        with _stage(result, "save_pretrained", result.stock_load):
            _quietly(lambda: save_pretrained(net, path, plan=plan))
            result.padded = (path / "actprune_padding.json").is_file()
        if result.stock_load.outcome == DIFFERS:  # the save failed: its error, not the empty directory's, in both
            result.ours_load = Comparison(DIFFERS, error=result.stock_load.error)
            return
        with _stage(result, "stock from_pretrained", result.stock_load):
            result.stock_load = compare(outputs(loaded(family.auto_class, path), inputs), expected)
        with _stage(result, "from_pretrained", result.ours_load):
            ours = loaded(family.auto_class, path, ours=True)
            result.ours_load = compare(outputs(ours, inputs), expected)
            if result.ours_load.equal and count_parameters(ours) != count_parameters(net):
                result.ours_load = Comparison(DIFFERS, error=f"{count_parameters(ours)} parameters after loading")


def check_uniform(
    original: Net,
    layers: list[PrunableLayer],
    moments: dict[str, ActivationMoments],
    family: Family,
    inputs: dict[str, Any],
    result: FamilyResult,
) -> None:
    """``uniform_widths=True``: the config states every width, the model's own ``save_pretrained`` loads back."""
    net = copy.deepcopy(original)
    search = evaluator(net, layers, moments, PruningSettings(target_params_reduction=TARGET, uniform_widths=True))
    choice = plan_for_reduction(search, result.target)
    result.uniform_reduction = choice.reduction
    if choice.plan is None:
        result.uniform_load = Comparison(DIFFERS, error=f"uniform widths: {choice.note}")
        return
    apply_plan(net, choice.plan)
    result.uniform_unstated = _quietly(lambda: sync_pretrained_configs(net))
    expected = outputs(net, inputs)
    with tempfile.TemporaryDirectory(prefix="hf_families_") as directory:
        path = Path(directory)
        _quietly(lambda: net.model.save_pretrained(path))  # type: ignore[operator]
        reloaded = loaded(family.auto_class, path)
        result.uniform_load = compare(outputs(reloaded, inputs), expected)
        if result.uniform_load.equal and count_parameters(reloaded) != count_parameters(net):
            result.uniform_load = Comparison(DIFFERS, error=f"{count_parameters(reloaded)} parameters after loading")


def check(family: Family) -> FamilyResult:
    """Build, record, analyse, plan (``target_params_reduction``), prune, and check every column of the table."""
    result = FamilyResult(family.name, family.model_type, family.model_class, family.task, family.curated)
    started = time.process_time()
    try:
        _check(family, result)
    except Exception as error:
        traceback.print_exc()
        result.error = _short(error)
    result.total_seconds = time.process_time() - started
    result.peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def _check(family: Family, result: FamilyResult) -> None:
    result.status = SKIPPED  # until the model builds and runs on its batch
    start = time.process_time()
    model, inputs = build(family)
    net = Net(model)
    result.stage = "forward"
    try:
        outputs(net, inputs)
    except Exception:
        if "use_cache" not in inspect.signature(model.forward).parameters:
            raise
        inputs["use_cache"] = False  # hybrid caches some families cannot fill in a plain forward
        outputs(net, inputs)
    result.build_seconds = time.process_time() - start
    result.status, result.params = ERROR, count_parameters(net)
    original = copy.deepcopy(net)

    result.stage = "statistics"
    with ActivationRecorder(net) as recorder, torch.no_grad():
        _quietly(lambda: net(**inputs))
    moments = recorder.moments()
    result.stage = "analysis"
    start = time.process_time()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layers = find_prunable_layers(net, recorder.example_inputs)
    result.analysis_seconds = time.process_time() - start
    result.messages = [str(w.message) for w in caught if "lightning_actprune" in str(w.message)]
    result.head_layers = sum(map(is_head_layer, layers))
    result.ffn_layers = len(layers) - result.head_layers
    result.attention = head_info(net, layers)
    if not layers:
        result.status = NOTHING
        return

    result.stage = "plan"
    start = time.process_time()
    plan = plan_at_target(evaluator(net, layers, moments, PruningSettings(target_params_reduction=TARGET)), result)
    result.plan_seconds = time.process_time() - start
    if plan is None:
        raise RuntimeError(f"no plan reaches {result.target:.3f} of a prunable {result.prunable_fraction:.3f}")
    by_name = {layer.name: layer for layer in layers}
    pruned = [layer for layer in plan.layers if len(layer.kept) < by_name[layer.name].neurons]
    result.heads_pruned = sum(1 for layer in pruned if layer.name.endswith(":heads"))
    result.ffn_pruned = len(pruned) - result.heads_pruned
    result.stage = "apply"
    apply_plan(net, plan)
    result.status = PRUNED

    with _stage(result, "oracle", result.oracle):
        handles = zeroed_at_consumers(original, plan)
        try:
            result.oracle = compare(outputs(net, inputs), outputs(original, inputs))
        finally:
            for handle in handles:
                handle.remove()
    if family.generates:
        with _stage(result, "generate", result.generate):
            ids = inputs["input_ids"][:2, :6]
            result.generate = check_generate(net, original, plan, ids)
    check_round_trip(net, plan, family, inputs, result)
    with _stage(result, "uniform widths", result.uniform_load):
        check_uniform(original, layers, moments, family, inputs, result)
    result.stage = "done"
