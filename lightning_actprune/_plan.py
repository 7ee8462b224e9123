"""Which neurons go: the coupled-layer analysis (Torch-Pruning) and the threshold plan (pure)."""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import warnings
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Literal, NamedTuple

import torch
import torch_pruning as tp
from torch import Tensor, nn

from lightning_actprune._conv1d import CONV1D_PRUNER, Conv1D
from lightning_actprune._errors import ActivationPruningError
from lightning_actprune._heads import head_layers, measurable_attention, projection_owners
from lightning_actprune._scoring import MomentStatistic, NeuronScorer, _squared_column_norms, as_scorer, input_columns
from lightning_actprune._statistics import (
    FEATURES_LAST,
    MEASURED_TYPES,
    ActivationMoments,
    map_tensors,
)
from lightning_actprune._surgery import pruned_temporarily
from lightning_actprune._tracing import (
    BudgetExhausted,
    bounded_groups,
    concatenations_of_unknown_size_unmapped,
    describe_blocker,
    failing_alone,
    unmapped_reshapes,
)
from lightning_actprune._types import BiasUpdate, LayerPlan, ModulePruning, ModuleSlice, PrunableLayer, PruningPlan

ExampleInputs = Mapping[str, tuple[tuple[Any, ...], dict[str, Any]]]
"""Forward arguments by module name (``""`` is the model itself), as :class:`ActivationRecorder` captures them."""

# Operations whose channels may be removed without changing what the other channels compute.
_SAFE_TYPES = frozenset(
    {
        tp.ops.OPTYPE.CONV,
        tp.ops.OPTYPE.LINEAR,
        tp.ops.OPTYPE.BN,
        tp.ops.OPTYPE.DEPTHWISE_CONV,
        tp.ops.OPTYPE.PRELU,
        tp.ops.OPTYPE.ELEMENTWISE,
        tp.ops.OPTYPE.RESHAPE,
        tp.ops.OPTYPE.CONCAT,
        tp.ops.OPTYPE.SPLIT,
    }
)


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
            # inputs recorded under inference mode cannot enter autograd; a clone made here can
            args, kwargs = map_tensors(Tensor.clone, _few_samples(root, inputs[root_name]))
            candidates = list(_layers_of_root(root, args, kwargs, context, skipped))
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


class _OpaqueRecurrent(tp.pruner.function.BasePruningFunc):
    """Makes Torch-Pruning see a recurrent layer as one node (its own LSTM pruner is not exact, GRU/RNN crash).

    The groups that reach such a node are skipped, so its prune functions are never called.
    """

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        raise NotImplementedError("lightning_actprune does not prune recurrent layers")

    def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        raise NotImplementedError("lightning_actprune does not prune recurrent layers")

    def get_out_channels(self, layer: nn.RNNBase) -> int:
        return int(layer.hidden_size) * (2 if layer.bidirectional else 1)

    def get_in_channels(self, layer: nn.RNNBase) -> int:
        return int(layer.input_size)


class _Opaque(torch.autograd.Function):
    """``output`` as one autograd node whose only input is ``inputs``: the tracer does not walk inside the layer."""

    @staticmethod
    def forward(inputs: Tensor, output: Tensor) -> Tensor:
        return output.clone()

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        pass

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor]:
        return None, grad


@contextmanager
def _recurrent_layers_opaque(root: nn.Module) -> Iterator[None]:
    """Recurrent layers seen as single nodes: some (GRU) record their time steps, which Torch-Pruning misreads."""

    def opaque(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        if not (args and isinstance(args[0], Tensor) and isinstance(output, tuple) and isinstance(output[0], Tensor)):
            return None  # a PackedSequence: left as it is
        return map_tensors(lambda t: _Opaque.apply(args[0], t.detach()), output)

    handles = [m.register_forward_hook(opaque) for m in root.modules() if isinstance(m, nn.RNNBase)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _tensors_with_grad(output: Any) -> list[Tensor]:
    """What Torch-Pruning traces back from: the output's tensors that autograd produced, whatever holds them."""
    return [t for t in _output_tensors(output) if t.grad_fn is not None]


_WORDS = {
    tp.ops.OPTYPE.UNBIND: "a torch.unbind of its features (e.g. splitting attention heads)",
    tp.ops.OPTYPE.SLICE: "a slice of its features",
    tp.ops.OPTYPE.EXPAND: "a torch.expand of its features",
}
# Torch-Pruning marks the model's outputs in its graph (1.6); looked up by name, as older releases did not
_OUTPUT = getattr(tp.ops.OPTYPE, "OUTPUT", None)


def _describe(module: Any, optype: tp.ops.OPTYPE, context: _TraceContext) -> str:
    """A node of Torch-Pruning's graph in a user's words: the layer's type and name, never the tracer's node name."""
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
    return _WORDS.get(optype, f"a {optype.name.lower()} operation")


def _groups(graph: tp.DependencyGraph, root: nn.Module) -> Iterator[tuple[nn.Module, Any]]:
    """Like ``graph.get_all_groups``, but a group that fails to build is handed back as its exception."""
    visited: set[nn.Module] = set()
    built: list[tuple[nn.Module, Any]] = []
    candidates = [m for m in graph.module2node if isinstance(m, MEASURED_TYPES)]
    with bounded_groups():  # built first, so that the bounds apply to Torch-Pruning's work alone
        for position, module in enumerate(candidates):
            if module in visited:
                continue
            try:
                pruner = graph.get_pruner_of_module(module)
                channels = list(range(pruner.get_out_channels(module)))
                group = graph.get_pruning_group(module, pruner.prune_out_channels, channels)
            except BudgetExhausted as error:
                built += [(m, error) for m in candidates[position:] if m not in visited]
                break
            except Exception as error:
                built.append((module, error))
                continue
            visited.update(dep.target.module for dep, _ in group if graph.is_out_channel_pruning_fn(dep.handler))
            built.append((module, group))
    yield from built


def _dependency_graph(root: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tp.DependencyGraph:
    """Torch-Pruning's graph of ``root``: every recurrent layer one opaque node, Hugging Face's ``Conv1D`` a layer."""
    customized: dict[type, tp.pruner.function.BasePruningFunc] = {}
    for module in root.modules():
        if isinstance(module, nn.RNNBase):
            customized[type(module)] = _OpaqueRecurrent()
        elif isinstance(module, Conv1D):
            customized[type(module)] = CONV1D_PRUNER
    graph = tp.DependencyGraph()
    with _traceable(root), _recurrent_layers_opaque(root), unmapped_reshapes(graph):
        graph.build_dependency(
            _comparable_modules(root) if customized else root,
            example_inputs=(args, kwargs),
            forward_fn=lambda _, x: root(*x[0], **x[1]),
            output_transform=_tensors_with_grad,
            customized_pruners=customized or None,
            verbose=False,
        )
    return graph


def _comparable_modules(root: nn.Module) -> nn.Module:
    """The modules of ``root`` Torch-Pruning may compare, gathered in a container that is never called.

    With customized pruners, Torch-Pruning tests ``module in ignored_layers`` on every module, and a module whose
    ``==`` answers with an object (torchmetrics' ``Metric`` builds a new metric) makes every module look ignored.
    """

    def compares(module: nn.Module) -> bool:
        return type(module).__eq__ is not nn.Module.__eq__

    container = nn.Module()
    container.layers = nn.ModuleList(m for m in root.modules() if not any(compares(s) for s in m.modules()))
    return container


def _layers_of_root(
    root: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    context: _TraceContext,
    skipped: list[_Skip],
) -> Iterator[PrunableLayer]:
    with _traceable(root):
        _, counts = _call_counts(root, args, kwargs)
    with concatenations_of_unknown_size_unmapped():  # the graph is built, and its groups too
        graph = _dependency_graph(root, args, kwargs)
        for module, group in _groups(graph, root):
            if isinstance(group, Exception):
                skipped.append(_Skip(context.names[module], _failure("tracing its group", group)))
                continue
            try:
                layer = _layer_of_group(graph, group, counts, context, skipped)
            except Exception as error:  # a group the tracer cannot describe is skipped, the others go on
                skipped.append(_Skip(context.names[module], _failure("tracing its group", error)))
                continue
            if layer is not None:
                yield layer


def _layer_of_group(
    graph: tp.DependencyGraph,
    group: Any,
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
    for item in group:
        dep, indices = item
        module, optype = dep.target.module, dep.target.type
        if _OUTPUT is not None and optype == _OUTPUT:
            reaches_output = True
            continue
        blocker = describe_blocker(graph, dep.target, _describe(module, optype, context))
        # Conv1D: a customized node, like a Linear
        if (optype not in _SAFE_TYPES and not isinstance(module, Conv1D)) or blocker is not None:
            unsafe.append(blocker or _describe(module, optype, context))
            blocking += 1
            continue
        if not isinstance(module, nn.Module) or not any(True for _ in module.parameters(recurse=False)):
            continue
        name = names[module]
        if counts.get(module, 0) > 1:
            unsafe.append(f"{name} (called {counts[module]} times per forward)")
        if module in context.shared:
            unsafe.append(f"{name} (shares a parameter with another layer)")
        dim: Literal["out", "in"] = "out" if graph.is_out_channel_pruning_fn(dep.handler) else "in"
        if isinstance(module, MEASURED_TYPES):
            if dim == "out":
                producers.append(name)
            else:
                has_consumer = True
        slices.append(ModuleSlice(name, dim, tuple(int(i) for i in indices), tuple(int(r) for r in item.root_idxs)))
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
    neurons = len(group[0].root_idxs)
    return PrunableLayer(name=name, neurons=neurons, producers=tuple(producers), slices=tuple(slices))


def _few_samples(
    root: nn.Module, inputs: tuple[tuple[Any, ...], dict[str, Any]], size: int = 8
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The first ``size`` samples of an example batch: tracing and checking need the shapes, not the data.

    Every tensor whose first dimension is the batch's is cut; if the module then fails to run, the batch is used
    whole.
    """
    tensors = [t for t in _output_tensors(inputs) if t.dim() > 0]
    if not tensors or tensors[0].shape[0] <= size:
        return inputs
    batch = tensors[0].shape[0]
    small = map_tensors(lambda t: t[:size] if t.dim() > 0 and t.shape[0] == batch else t, inputs)
    try:
        with _traceable(root), torch.no_grad():
            root(*small[0], **small[1])
    except Exception:
        return inputs
    return small


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


def consumer_weight_energy(layer: PrunableLayer, model: nn.Module, norms: dict[str, Tensor] | None = None) -> Tensor:
    """``Σ ‖W[:, f]‖²`` per neuron, over every consumer weight column (and kernel position) that reads it.

    How strongly the next layers listen to a neuron: the tie-break between neurons whose activation statistics
    are equal (e.g. neurons that never fire).

    ``norms`` caches each consumer's column norms across calls (a DenseNet layer is read by every later one).

    Returns:
        A float64 CPU tensor with one value per neuron.
    """
    norms = {} if norms is None else norms
    energy = torch.zeros(layer.neurons, dtype=torch.float64)
    for consumer in layer.consumers:
        if consumer.module not in norms:
            module = model.get_submodule(consumer.module)
            norms[consumer.module] = _squared_column_norms(module).detach().cpu().to(torch.float64)
        energy.index_add_(0, torch.tensor(consumer.neurons), norms[consumer.module][torch.tensor(consumer.indices)])
    return energy


def layer_scores(
    layer: PrunableLayer,
    moments: Mapping[str, ActivationMoments],
    statistic: str | NeuronScorer,
    model: nn.Module | None = None,
    normalize: bool = False,
) -> Tensor:
    """The score of every neuron of ``layer``: its statistic, the largest over the layers that consume it.

    A neuron that reaches several consumers (a residual stream) stays when any of them sees it active: the
    group's score is the maximum over consumers. A conv channel flattened into a Linear is averaged over its
    positions. ``fluctuation`` (FLAP) is the activation variance times the squared norm of the consumer's weight
    column, summed over a neuron's positions: the energy the neuron's fluctuations put into the consumer's
    output, in squared output units.

    Args:
        layer: a prunable layer.
        moments: the moments of every measured layer input, by module name.
        statistic: one of :data:`lightning_actprune.STATISTICS`, or your own :class:`NeuronScorer`.
        model: the model, needed for ``fluctuation`` and your own scorers (the weights).
        normalize: standardise the scores within the layer (``(s - mean) / std``), so one λ means the same in
            layers of different scales; λ is then in standard deviations and may be negative.

    Returns:
        A float64 tensor with one score per neuron (on the moments' device for the built-in statistics).
    """
    scorer = as_scorer(statistic)
    if isinstance(scorer, MomentStatistic):
        scores = scorer(layer, moments)
    elif model is None:
        raise ActivationPruningError(f"`statistic={scorer.name!r}` needs the model: the weights it reads.")
    else:
        scores = scorer(layer, moments, model)
    if not isinstance(scores, Tensor) or tuple(scores.shape) != (layer.neurons,):
        shape = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise ActivationPruningError(
            f"`statistic={scorer.name!r}` must return one score per neuron, a tensor of shape ({layer.neurons},)"
            f" for {layer.name}; got {shape}."
        )
    scores = scores.detach().to(torch.float64)
    if normalize:
        spread = scores.std(unbiased=False)
        scores = (scores - scores.mean()) / spread if spread > 0 else torch.zeros_like(scores)
    return scores


def _bias_updates(
    layers: Sequence[PrunableLayer],
    removed: Mapping[str, set[int]],
    moments: Mapping[str, ActivationMoments],
    model: nn.Module,
) -> tuple[BiasUpdate, ...]:
    """What each consumer's bias must absorb so its output stays as if the removed inputs were at their mean."""
    deltas: dict[str, Tensor] = {}
    for layer in layers:
        for consumer in layer.consumers:
            features = [f for f, n in zip(consumer.indices, consumer.neurons, strict=True) if n in removed[layer.name]]
            if not features or consumer.module not in moments:
                continue
            module = model.get_submodule(consumer.module)
            index = torch.tensor(features)
            means = moments[consumer.module].mean.detach().cpu().to(torch.float64)[index]
            columns = input_columns(module).cpu().to(torch.float64)[index]  # (removed, out)
            delta = means @ columns
            deltas[consumer.module] = deltas[consumer.module] + delta if consumer.module in deltas else delta
    return tuple(BiasUpdate(name, tuple(float(v) for v in delta)) for name, delta in deltas.items())


def plan_pruning(
    layers: Sequence[PrunableLayer],
    moments: Mapping[str, ActivationMoments],
    threshold: float,
    statistic: str | NeuronScorer = "mean",
    min_neurons: int = 1,
    model: nn.Module | None = None,
    compensate: bool = False,
    normalize: bool = False,
) -> PruningPlan:
    """Select, in every layer, the neurons whose statistic is below ``threshold``, keeping ``min_neurons``.

    Args:
        layers: from :func:`find_prunable_layers`.
        moments: from :meth:`ActivationRecorder.moments`.
        threshold: λ.
        statistic: one of :data:`lightning_actprune.STATISTICS`, or your own :class:`NeuronScorer` (the plan records
            its ``name``).
        min_neurons: the fewest neurons a layer keeps; the highest-scoring ones stay.
        model: the model (needed for ``fluctuation``, your own scorers and ``compensate``).
        compensate: fold each removed neuron's mean activation into its consumers' biases, so a neuron that is
            nearly constant is removed almost without a trace.
        normalize: standardise scores per layer before comparing with λ (see :func:`layer_scores`).

    Returns:
        The plan, as plain data.

    Raises:
        ActivationPruningError: a layer's scores are NaN/Inf or were never recorded.

    Example:
        >>> import torch
        >>> from lightning_actprune.core import ActivationRecorder
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        >>> x = torch.randn(8, 3)
        >>> with ActivationRecorder(model) as rec, torch.no_grad():
        ...     _ = model(x)
        >>> plan = plan_pruning(find_prunable_layers(model, x), rec.moments(), threshold=1e9)
        >>> plan.neurons_after
        1
    """
    scores = _all_scores(layers, moments, statistic, model, normalize)
    name = as_scorer(statistic).name
    return _plan_at(layers, scores, threshold, name, min_neurons, moments, model, compensate, normalize)


def _all_scores(
    layers: Sequence[PrunableLayer],
    moments: Mapping[str, ActivationMoments],
    statistic: str | NeuronScorer,
    model: nn.Module | None,
    normalize: bool,
) -> dict[str, Tensor]:
    """Every layer's scores, on the CPU; they do not depend on λ, so one computation serves every λ."""
    scores = {}
    for layer in layers:
        values = layer_scores(layer, moments, statistic, model, normalize).cpu()
        if not bool(torch.isfinite(values).all()):
            name = as_scorer(statistic).name
            raise ActivationPruningError(f"the {name} of {layer.name} contains NaN or Inf; cannot prune on it.")
        scores[layer.name] = values
    return scores


def _plan_at(
    layers: Sequence[PrunableLayer],
    scores: Mapping[str, Tensor],
    threshold: float,
    statistic: str,
    min_neurons: int,
    moments: Mapping[str, ActivationMoments],
    model: nn.Module | None,
    compensate: bool,
    normalize: bool,
) -> PruningPlan:
    """The plan at λ from scores already computed by :func:`_all_scores`."""
    kept: dict[str, Sequence[int]] = {}
    for layer in layers:
        values = scores[layer.name]
        keep = values >= threshold
        floor = min(min_neurons, layer.neurons)
        if int(keep.sum()) < floor:
            order = sorted(range(layer.neurons), key=lambda i: (-float(values[i]), i))
            keep[order[:floor]] = True
        kept[layer.name] = [int(i) for i in torch.nonzero(keep).flatten()]
    plan = plan_from_kept(layers, kept, moments=moments, model=model, compensate=compensate)
    return dataclasses.replace(plan, threshold=float(threshold), statistic=statistic, normalize=normalize)


def plan_from_kept(
    layers: Sequence[PrunableLayer],
    kept: Mapping[str, Sequence[int]],
    moments: Mapping[str, ActivationMoments] | None = None,
    model: nn.Module | None = None,
    compensate: bool = False,
) -> PruningPlan:
    """The plan that keeps the given neurons of every layer, whatever chose them (a threshold, a magnitude, …).

    Args:
        layers: from :func:`find_prunable_layers`.
        kept: per layer name, the indices of the neurons that stay (a layer not listed keeps all).
        moments: from :meth:`ActivationRecorder.moments`; needed with ``compensate``.
        model: the unpruned model; needed with ``compensate``.
        compensate: fold the removed neurons' mean activations into their consumers' biases.

    Returns:
        A plan whose ``threshold`` is NaN and ``statistic`` empty (:func:`plan_pruning` fills them in).

    Raises:
        ActivationPruningError: an index is out of range, or ``compensate`` lacks ``moments``/``model``.
    """
    if compensate and (model is None or moments is None):
        raise ActivationPruningError("`compensate=True` needs the model and the moments: consumers' weights and means.")
    plans: list[LayerPlan] = []
    removals: dict[tuple[str, str], set[int]] = defaultdict(set)
    removed_neurons: dict[str, set[int]] = {}
    for layer in layers:
        keep = sorted({int(i) for i in kept.get(layer.name, range(layer.neurons))})
        if keep and not 0 <= keep[0] <= keep[-1] < layer.neurons:
            raise ActivationPruningError(
                f"`kept` for {layer.name} must be indices in [0, {layer.neurons}); got {keep[0]}..{keep[-1]}."
            )
        plans.append(LayerPlan(layer.name, layer.neurons, tuple(keep)))
        removed = set(range(layer.neurons)) - set(keep)
        removed_neurons[layer.name] = removed
        for piece in layer.slices:
            removals[(piece.module, piece.dim)].update(
                idx for idx, neuron in zip(piece.indices, piece.neurons, strict=True) if neuron in removed
            )
    operations = tuple(
        ModulePruning(module, dim, tuple(sorted(indices)))  # type: ignore[arg-type]
        for (module, dim), indices in removals.items()
        if indices
    )
    bias_updates: tuple[BiasUpdate, ...] = ()
    if compensate and model is not None and moments is not None:
        bias_updates = _bias_updates(layers, removed_neurons, moments, model)
    return PruningPlan(math.nan, "", tuple(plans), operations, bias_updates)
