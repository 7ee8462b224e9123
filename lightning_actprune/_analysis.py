"""Which neurons can be removed: the layers whose outputs may lose neurons, and what is coupled to them.

Torch-Pruning's ``DependencyGraph`` (through :mod:`lightning_actprune._torch_pruning`) groups every module that must
shrink together; each group becomes a :class:`PrunableLayer` unless it reaches an operation that mixes its neurons,
which is said in a warning. Every layer is then checked on the example batch: removing its neurons must give what
zeroing them gives.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple, TypeVar

import torch
from torch import Tensor, nn

from lightning_actprune._errors import ActivationPruningError
from lightning_actprune._heads import head_layers, measurable_attention, projection_owners
from lightning_actprune._plan import plan_from_kept
from lightning_actprune._statistics import FEATURES_LAST, MEASURED_TYPES, map_tensors
from lightning_actprune._surgery import pruned_temporarily
from lightning_actprune._torch_pruning import (
    GroupEntry,
    concatenations_of_unknown_size_unmapped,
    dependency_graph,
    group_entries,
    pruning_groups,
)
from lightning_actprune._types import ModuleSlice, PrunableLayer, PruningPlan

ExampleInputs = Mapping[str, tuple[tuple[Any, ...], dict[str, Any]]]
"""Forward arguments by module name (``""`` is the model itself), as :class:`ActivationRecorder` captures them."""

T = TypeVar("T")


def _as_example_inputs(example_inputs: Any) -> ExampleInputs:
    if isinstance(example_inputs, Mapping) and all(
        isinstance(v, tuple) and len(v) == 2 and isinstance(v[1], dict) for v in example_inputs.values()
    ):
        return example_inputs
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    return {"": (args, {})}


def _trace_roots(example_inputs: ExampleInputs) -> list[str]:
    """The outermost modules that were called: nothing above them ran a forward."""
    if "" in example_inputs:
        return [""]
    names = sorted(example_inputs)
    return [n for n in names if not any(n.startswith(other + ".") for other in names if other != n)]


@contextmanager
def _traceable(module: nn.Module) -> Iterator[None]:
    """Eval mode (no BatchNorm update), grad on, every parameter requiring grad; all restored afterwards."""
    modes = {m: m.training for m in module.modules()}
    frozen = [p for p in module.parameters() if not p.requires_grad]
    module.eval()
    try:
        for p in frozen:
            p.requires_grad_(True)
        with torch.enable_grad():
            yield
    finally:
        for p in frozen:
            p.requires_grad_(False)
        for m, training in modes.items():
            m.training = training


def _call_counts(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, dict[nn.Module, int]]:
    counts: dict[nn.Module, int] = defaultdict(int)

    def count(m: nn.Module, *_: Any) -> None:
        counts[m] += 1

    handles = [m.register_forward_hook(count) for m in module.modules() if isinstance(m, MEASURED_TYPES)]
    try:
        output = module(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return output, counts


def find_prunable_layers(
    model: nn.Module,
    example_inputs: Any,
    layers: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    prune_heads: bool = True,
) -> list[PrunableLayer]:
    """Find the groups of neurons that can be removed, with Torch-Pruning's ``DependencyGraph``.

    Every hidden ``Linear``/``Conv`` whose outputs feed another such layer is a candidate; the model's output layer
    never is. Groups that touch an operation which mixes channels (LayerNorm, attention, …), a layer called more
    than once per forward, or a weight shared between layers are skipped with a warning that names them. With
    ``prune_heads``, each attention module of a known implementation adds a layer ``<name>:heads`` whose neurons
    are its whole heads (see :mod:`lightning_actprune._heads`).

    Args:
        model: the model; it is traced once with gradients on and is not modified.
        example_inputs: a tensor or a tuple of positional arguments for ``model``, or the mapping that
            :attr:`ActivationRecorder.example_inputs` captured.
        layers: glob patterns of layer names to prune (default: all). A coupled group is pruned only when all of
            its producing layers are selected.
        exclude: glob patterns of layer names never to prune.
        prune_heads: add the heads of every known attention module (timm ``Attention``, Hugging Face BERT-style
            attention, GPT-2's ``GPT2Attention``, ``nn.MultiheadAttention``) as layers of their own.

    Returns:
        The prunable layers, in the model's module order.

    Raises:
        ActivationPruningError: a ``layers`` pattern matches no prunable layer, or the selection leaves nothing to
            prune.
    """
    names = {m: n for n, m in reversed(list(model.named_modules(remove_duplicate=False)))}
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    context = _TraceContext(names, order, _modules_sharing_parameters(model), _parameter_owners(model))
    inputs = _as_example_inputs(example_inputs)
    found: list[PrunableLayer] = []
    skipped: list[_Skip] = []
    for root_name in _trace_roots(inputs):
        root = model.get_submodule(root_name) if root_name else model
        skipped.extend(_recurrent_layers(root, names))
        try:
            few, counts = _few_samples_counted(root, inputs[root_name], _TRACE_SAMPLES)
            # inputs recorded under inference mode cannot enter autograd; a clone made here can
            args, kwargs = map_tensors(Tensor.clone, few)
            candidates = list(_layers_of_root(root, args, kwargs, counts, context, skipped))
            if prune_heads:
                candidates += _head_candidates(root, names, skipped)
            found.extend(_keep_independent(model, root, args, kwargs, candidates, skipped))
        except Exception as error:  # one root the tracer cannot handle must not stop the others, nor the fit
            skipped.append(_Skip(f"the layers inside {root_name or type(root).__name__}", _failure("tracing", error)))
    _warn_skipped(_attention_skips(model, skipped, prune_heads))
    found.sort(key=lambda layer: order[layer.producers[0]])
    return _select(found, layers, exclude)


class _Skip(NamedTuple):
    """A layer (or a whole traced module) that is not pruned, and why, in words a user can act on."""

    layer: str
    reason: str


def _head_candidates(root: nn.Module, names: Mapping[nn.Module, str], skipped: list[_Skip]) -> list[PrunableLayer]:
    """The head layers of the attention modules under ``root``; those that cannot be pruned go to ``skipped``."""
    layers = []
    for name, layer in head_layers(root, names):
        if isinstance(layer, str):
            skipped.append(_Skip(f"the heads of {name}", layer))
        else:
            layers.append(layer)
    return layers


def _attention_skips(model: nn.Module, skipped: list[_Skip], prune_heads: bool) -> list[_Skip]:
    """The q/k/v groups of known attention modules: silent with head pruning, which handles them; else a hint."""
    owners = projection_owners(model)
    kept = []
    for skip in skipped:
        parts = skip.layer.split("+")
        if not all(part in owners for part in parts):
            kept.append(skip)
        elif not prune_heads:
            reason = f"inside attention {owners[parts[0]]}: use head pruning (`prune_heads: true`)."
            kept.append(_Skip(skip.layer, reason))
    return kept


class _TraceContext(NamedTuple):
    names: Mapping[nn.Module, str]
    order: Mapping[str, int]
    shared: set[nn.Module]
    parameters: Mapping[int, tuple[str, nn.Module]]


_MAX_NAMES = 3  # layers named per warning; the rest are counted
_MAX_DETAIL = 120  # characters of an exception's message quoted in a warning


def _failure(step: str, error: Exception) -> str:
    message = " ".join(str(error).split())
    if len(message) > _MAX_DETAIL:
        message = message[: _MAX_DETAIL - 1] + "…"
    return f"{step} failed: {type(error).__name__}: {message}"


def _listed(names: Sequence[str]) -> str:
    """``a, b, c and 4 more``: a list that stays one short line however many names it holds."""
    unique = list(dict.fromkeys(names))
    if len(unique) <= _MAX_NAMES:
        return ", ".join(unique)
    return f"{', '.join(unique[:_MAX_NAMES])} and {len(unique) - _MAX_NAMES} more"


def _warn_skipped(skipped: Sequence[_Skip]) -> None:
    """One warning per reason, naming the layers it stops: many layers with one reason make one line."""
    layers_by_reason: dict[str, list[str]] = defaultdict(list)
    for skip in skipped:
        layers_by_reason[skip.reason].append(skip.layer)
    for reason, layers in layers_by_reason.items():
        warnings.warn(f"lightning_actprune: not pruning {_listed(layers)}: {reason}", stacklevel=3)


def _parameter_owners(model: nn.Module) -> dict[int, tuple[str, nn.Module]]:
    """Each parameter's name and the module that holds it, by ``id``."""
    owners = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for name, p in module.named_parameters(recurse=False):
            owners[id(p)] = (f"{module_name}.{name}" if module_name else name, module)
    return owners


def _unsupported(module: nn.Module) -> bool:
    """A layer with a matrix or kernel that this package does not prune (``ConvTranspose2d``, ``Bilinear``)."""
    weight = getattr(module, "weight", None)
    known = (*MEASURED_TYPES, nn.Embedding, nn.RNNBase)
    return isinstance(weight, Tensor) and weight.dim() >= 2 and not isinstance(module, known)


def _recurrent_layers(root: nn.Module, names: Mapping[nn.Module, str]) -> Iterator[_Skip]:
    for module in root.modules():
        if isinstance(module, nn.RNNBase):
            name = f"the hidden size of {type(module).__name__} {names[module]}"
            yield _Skip(name, "recurrent layers keep their sizes.")


def _tensors_with_grad(output: Any) -> list[Tensor]:
    """What Torch-Pruning traces back from: the output's tensors that autograd produced, whatever holds them."""
    return [t for t in _output_tensors(output) if t.grad_fn is not None]


def _describe(entry: GroupEntry, context: _TraceContext) -> str:
    """A member of a coupled group in a user's words: the layer's type and name, never the tracer's node name."""
    module = entry.module
    if isinstance(module, nn.Parameter):
        if id(module) not in context.parameters:
            return "a parameter used outside a layer"
        name, owner = context.parameters[id(module)]
        if _unsupported(owner):
            return f"{type(owner).__name__} {context.names[owner]} (not supported)"
        return f"the parameter {name} (used outside a layer)"
    if isinstance(module, nn.RNNBase):
        return f"{type(module).__name__} {context.names[module]} (recurrent layers are not pruned)"
    if isinstance(module, nn.Module) and module in context.names:
        return f"{type(module).__name__} {context.names[module]}"
    return entry.operation


def grouped_convolution(module: Any) -> bool:
    """A convolution whose channels are split into groups, other than a plain depthwise one (one channel each)."""
    if not isinstance(module, nn.modules.conv._ConvNd) or module.groups == 1:
        return False
    return not module.groups == module.in_channels == module.out_channels


def _blocker(entry: GroupEntry, description: str) -> str | None:
    """Why a member stops its group's neurons from being removed, though Torch-Pruning calls it safe; else ``None``.

    Grouped convolutions (RegNet, ResNeXt): Torch-Pruning's in-channel pruner keeps the first ``kept / groups``
    indices of every group, which is only right when the same positions go in every group.
    """
    if grouped_convolution(entry.module):
        return f"{description} (a grouped convolution, groups={entry.module.groups})"
    if entry.unmapped:
        return "a reshape of its channels that cannot be followed (e.g. a channel shuffle)"
    return None


def _layers_of_root(
    root: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    counts: Mapping[nn.Module, int],
    context: _TraceContext,
    skipped: list[_Skip],
) -> Iterator[PrunableLayer]:
    with concatenations_of_unknown_size_unmapped():  # the graph is built, and its groups too
        with _traceable(root):
            graph = dependency_graph(root, args, kwargs, _tensors_with_grad)
        for module, group in pruning_groups(graph):
            if isinstance(group, Exception):
                skipped.append(_Skip(context.names[module], _failure("tracing its group", group)))
                continue
            try:
                layer = _layer_of_group(group_entries(graph, group), counts, context, skipped)
            except Exception as error:  # a group the tracer cannot describe is skipped, the others go on
                skipped.append(_Skip(context.names[module], _failure("tracing its group", error)))
                continue
            if layer is not None:
                yield layer


def _layer_of_group(
    group: Sequence[GroupEntry],
    counts: Mapping[nn.Module, int],
    context: _TraceContext,
    skipped: list[_Skip],
) -> PrunableLayer | None:
    names = context.names
    slices: list[ModuleSlice] = []
    unsafe: list[str] = []  # operations that mix the neurons, and layers that cannot lose them
    blocking = 0  # how many of them are operations or layers other than the Linear/Conv ones
    producers: list[str] = []
    has_consumer = reaches_output = False
    for entry in group:
        module = entry.module
        if entry.kind == "output":
            reaches_output = True
            continue
        description = _describe(entry, context)
        blocker = _blocker(entry, description)
        if entry.kind == "unsafe" or blocker is not None:
            unsafe.append(blocker or description)
            blocking += 1
            continue
        if not isinstance(module, nn.Module) or not any(True for _ in module.parameters(recurse=False)):
            continue
        name = names[module]
        if counts.get(module, 0) > 1:
            unsafe.append(f"{name} (called {counts[module]} times per forward)")
        if module in context.shared:
            unsafe.append(f"{name} (shares a parameter with another layer)")
        if isinstance(module, MEASURED_TYPES):
            if entry.dim == "out":
                producers.append(name)
            else:
                has_consumer = True
        slices.append(ModuleSlice(name, entry.dim, entry.indices, entry.neurons))
    if not producers or not (has_consumer or blocking):
        return None  # the output layer: its neurons are the model's outputs
    producers = sorted(set(producers), key=context.order.__getitem__)
    name = "+".join(producers)
    if reaches_output and has_consumer:
        unsafe.append("the model's output")
    if unsafe:
        # a residual stream couples a layer of every block: naming them all would not fit one line
        label = name if len(producers) <= 2 else f"{producers[0]} and the {len(producers) - 1} layers coupled to it"
        skipped.append(
            _Skip(
                label,
                f"its neurons reach {_listed(unsafe)}, which cannot lose neurons here.",
            )
        )
        return None
    neurons = len(group[0].neurons)
    return PrunableLayer(name=name, neurons=neurons, producers=tuple(producers), slices=tuple(slices))


_TRACE_SAMPLES = 2
"""Samples the analysis traces and checks with: each forward it runs costs that many samples' worth. Two rather than
one, so that a model that squeezes its batch dimension keeps its shapes."""


def _few_samples(
    root: nn.Module, inputs: tuple[tuple[Any, ...], dict[str, Any]], size: int = 8
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The first ``size`` samples of an example batch: tracing and checking need the shapes, not the data.

    Every tensor whose first dimension is the batch's is cut; if the module then fails to run, the batch is used
    whole.
    """
    return _few_samples_counted(root, inputs, size)[0]


def _few_samples_counted(
    root: nn.Module, inputs: tuple[tuple[Any, ...], dict[str, Any]], size: int
) -> tuple[tuple[tuple[Any, ...], dict[str, Any]], dict[nn.Module, int]]:
    """:func:`_few_samples`, and how often each layer is called per forward, counted by the run that tries them."""
    tensors = [t for t in _output_tensors(inputs) if t.dim() > 0]
    if tensors and tensors[0].shape[0] > size:
        batch = tensors[0].shape[0]
        small = map_tensors(lambda t: t[:size] if t.dim() > 0 and t.shape[0] == batch else t, inputs)
        try:
            with _traceable(root), torch.no_grad():
                _, counts = _call_counts(root, *small)
        except Exception:
            pass
        else:
            return small, counts
    with _traceable(root), torch.no_grad():
        _, counts = _call_counts(root, *inputs)
    return inputs, counts


def _output_tensors(output: Any) -> list[Tensor]:
    """Every tensor in ``output``: nested tuples, lists, dicts and dataclasses (``ModelOutput``).

    Other objects (a cache, a string) hold none that the checks compare.
    """
    if isinstance(output, Tensor):
        return [output]
    if isinstance(output, Mapping):
        values: Any = output.values()
    elif isinstance(output, (tuple, list)):
        values = output
    elif dataclasses.is_dataclass(output) and not isinstance(output, type):
        values = [getattr(output, field.name) for field in dataclasses.fields(output)]
    else:
        return []
    return [tensor for value in values for tensor in _output_tensors(value)]


def _same_outputs(pruned: list[Tensor], reference: list[Tensor]) -> bool:
    if len(pruned) != len(reference):
        return False
    for a, b in zip(pruned, reference, strict=True):
        if a.shape != b.shape:
            return False
        if not b.is_floating_point():
            if not torch.equal(a, b):
                return False
            continue
        scale = float(b.detach().abs().max()) if b.numel() else 0.0
        if not torch.allclose(a, b, rtol=1e-4, atol=1e-5 * max(1.0, scale), equal_nan=True):
            return False
    return True


def _zero_at_consumers(model: nn.Module, plan: PruningPlan) -> list[torch.utils.hooks.RemovableHandle]:
    """Force the planned neurons' activations to zero where their consumers read them (the pruning oracle)."""
    handles = []
    for operation in plan.operations:
        module = model.get_submodule(operation.module)
        if operation.dim != "in" or not isinstance(module, MEASURED_TYPES):
            continue
        index = torch.tensor(operation.indices)

        def zero(consumer: nn.Module, args: tuple[Any, ...], index: Tensor = index) -> tuple[Any, ...]:
            inputs = args[0].clone()
            if isinstance(consumer, FEATURES_LAST):
                inputs[..., index.to(inputs.device)] = 0
            else:
                inputs[:, index.to(inputs.device)] = 0
            return (inputs, *args[1:])

        handles.append(module.register_forward_pre_hook(zero))
    return handles


def _keep_independent(
    model: nn.Module,
    root: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    layers: list[PrunableLayer],
    skipped: list[_Skip],
) -> list[PrunableLayer]:
    """Keep the layers whose pruning really equals zeroing their neurons, checked on the example batch.

    Torch-Pruning calls every operation it does not know "element-wise", including functional ones that mix the
    neurons of a layer (``F.softmax``, ``F.layer_norm``, subtracting the mean over features). For each layer, every
    other neuron is removed for real and the outputs are compared with the unpruned model whose removed neurons are
    zeroed at their consumers; a layer where they differ, or whose check fails, is added to ``skipped``. The layers
    are checked together first, and only the sets that fail are split (:func:`failing_alone`).
    """
    independent = []
    # the zeroing oracle hooks the out projection, which nn.MultiheadAttention does not call as a module
    with _traceable(root), torch.no_grad(), measurable_attention(root):

        def together(group: Sequence[PrunableLayer]) -> bool:
            try:
                return _prunes_like_zeroing(model, root, args, kwargs, group)
            except Exception:
                return False

        failing = {layer.name for layer in failing_alone([layer for layer in layers if layer.neurons >= 2], together)}
        for layer in layers:
            if layer.name not in failing:
                independent.append(layer)
                continue
            try:  # again, alone, to say why
                same = _prunes_like_zeroing(model, root, args, kwargs, [layer])
            except Exception as error:  # the unpruned model failed with hooks on: this layer alone is skipped
                skipped.append(_Skip(layer.name, _failure("checking it", error)))
                continue
            if same:
                independent.append(layer)
            else:
                skipped.append(
                    _Skip(
                        layer.name,
                        "removing its neurons does not equal zeroing them (an operation between it and its consumers"
                        " mixes its neurons, e.g. attention (Q·K, softmax) or a normalisation over them).",
                    )
                )
    return independent


def _prunes_like_zeroing(
    model: nn.Module, root: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], layers: Sequence[PrunableLayer]
) -> bool:
    """Whether removing about half the neurons of each of ``layers`` gives the outputs that zeroing them gives.

    Every other neuron goes, and one more: the count that stays then shares no factor but 1 or 2 with an even width,
    so a reshape into attention heads (``view(batch, tokens, -1, head_size)``) fails, where exactly half the neurons
    would still fit.
    """

    def kept(layer: PrunableLayer) -> range:
        every_other = range(1, layer.neurons, 2)
        return every_other[:-1] if len(every_other) > 1 else every_other

    plan = plan_from_kept(layers, {layer.name: kept(layer) for layer in layers})
    try:
        with pruned_temporarily(model, plan):
            pruned = _output_tensors(root(*args, **kwargs))
    except Exception:
        return False  # the pruned model does not run: its shapes do not follow the neurons
    handles = _zero_at_consumers(model, plan)
    try:
        reference = _output_tensors(root(*args, **kwargs))
    finally:
        for handle in handles:
            handle.remove()
    return _same_outputs(pruned, reference)


def layer_inventory(model: nn.Module) -> str:
    """``Conv1D ×24 (not supported), LayerNorm ×13``: the types of the modules that hold parameters."""
    kinds: dict[tuple[str, str], int] = defaultdict(int)
    for module in model.modules():
        if any(True for _ in module.parameters(recurse=False)):
            kinds[(type(module).__name__, " (not supported)" if _unsupported(module) else "")] += 1
    ranked = sorted(kinds.items(), key=lambda kv: (-kv[1], kv[0]))
    return ", ".join(f"{kind} ×{count}{note}" for (kind, note), count in ranked)


def _modules_sharing_parameters(model: nn.Module) -> set[nn.Module]:
    owners: dict[int, list[nn.Module]] = defaultdict(list)
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners[id(p)].append(module)
    return {m for mods in owners.values() if len(mods) > 1 for m in mods}


def _select(found: list[PrunableLayer], layers: Sequence[str] | None, exclude: Sequence[str]) -> list[PrunableLayer]:
    candidates = sorted({p for layer in found for p in layer.producers})
    # an `exclude` pattern that matches no prunable layer (the output layer, a skipped one) is harmless
    for argument, patterns in (("layers", layers or ()),):
        for pattern in patterns:
            if not fnmatch.filter(candidates, pattern):
                raise ActivationPruningError(
                    f"`{argument}` pattern {pattern!r} matches no prunable layer; prunable layers are: "
                    f"{', '.join(candidates) or '(none)'}."
                )

    def selected(name: str) -> bool:
        included = layers is None or any(fnmatch.fnmatchcase(name, p) for p in layers)
        return included and not any(fnmatch.fnmatchcase(name, p) for p in exclude)

    chosen = [layer for layer in found if all(selected(p) for p in layer.producers)]
    if found and not chosen:
        raise ActivationPruningError(
            f"`layers`={list(layers) if layers is not None else None} and `exclude`={list(exclude)} leave no layer"
            f" to prune; prunable layers are: {', '.join(candidates)}."
        )
    return chosen


def failing_alone(items: Sequence[T], passes: Callable[[Sequence[T]], bool]) -> list[T]:
    """The items that fail ``passes`` on their own, found by checking them together and halving the sets that fail.

    With ``k`` failing items among ``n`` this costs about ``2k·log2(n/k)`` checks instead of ``n``. A set that fails
    while both its halves pass (items that fail only in each other's company) is not split further: as when every
    item is checked alone, such an interaction passes.

    Example:
        >>> failing_alone(list(range(8)), lambda chunk: 5 not in chunk)
        [5]
    """
    if not items or passes(items):
        return []
    if len(items) == 1:
        return list(items)
    middle = len(items) // 2
    return failing_alone(items[:middle], passes) + failing_alone(items[middle:], passes)
