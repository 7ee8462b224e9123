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
from collections import Counter, defaultdict
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple, TypeVar

import torch
from torch import Tensor, nn

from lightning_actprune._errors import ActivationPruningError
from lightning_actprune._gc import collection_paused_during
from lightning_actprune._grn import global_response_norm, zero_grn_inputs
from lightning_actprune._grouped import couples_wrongly, equal_count_blocks
from lightning_actprune._heads import GQA_UNITS, HEADS_SUFFIX, find_heads, measurable_attention
from lightning_actprune._huggingface import pretrained_models
from lightning_actprune._plan import plan_from_kept
from lightning_actprune._recurrent import RecurrentShape, hidden_units_layer, zero_hidden_units, zero_input_features
from lightning_actprune._residual import (
    layer_norm_over_features,
    owned_feature_width,
    rms_norm_over_features,
    zero_norm_inputs,
)
from lightning_actprune._statistics import FEATURES_LAST, MEASURED_TYPES, _channel_dim, map_tensors
from lightning_actprune._surgery import pruned_temporarily, restoring
from lightning_actprune._torch_pruning import (
    SPLIT_OPERATION,
    GroupEntry,
    GroupTooLarge,
    concatenations_of_unknown_size_unmapped,
    dependency_graph,
    group_entries,
    module_pruner,
    pruning_groups,
    read_final_states,
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


def outermost_called(example_inputs: ExampleInputs) -> list[str]:
    """The outermost modules that were called (nothing above them ran a forward), in the order of their first call."""
    if "" in example_inputs:
        return [""]
    names = list(example_inputs)
    return [n for n in names if not any(n.startswith(other + ".") for other in names if other != n)]


def _trace_roots(example_inputs: ExampleInputs) -> list[str]:
    return sorted(outermost_called(example_inputs))


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


@contextmanager
def _calls_counted(module: nn.Module) -> Iterator[dict[nn.Module, int]]:
    """Inside, every call of a measured layer under ``module`` is counted in the dict yielded."""
    counts: dict[nn.Module, int] = defaultdict(int)

    def count(m: nn.Module, *_: Any) -> None:
        counts[m] += 1

    handles = [m.register_forward_hook(count) for m in module.modules() if isinstance(m, MEASURED_TYPES)]
    try:
        yield counts
    finally:
        for h in handles:
            h.remove()


@collection_paused_during
def find_prunable_layers(
    model: nn.Module,
    example_inputs: Any,
    layers: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    prune_heads: bool = True,
    gqa_unit: str = "query_heads",
    prune_residual: bool = False,
) -> list[PrunableLayer]:
    """Find the groups of neurons that can be removed, with Torch-Pruning's ``DependencyGraph``.

    Every hidden ``Linear``/``Conv`` whose outputs feed another such layer is a candidate; the model's output layer
    never is. A layer that reaches a grouped convolution keeps the same number of neurons in each of its groups
    (``PrunableLayer.groups``, :mod:`lightning_actprune._grouped`); a recurrent layer (``nn.LSTM``/``nn.GRU``/
    ``nn.RNN``) is a layer named after it whose neurons are its hidden units, the same number kept in every layer
    and direction (:mod:`lightning_actprune._recurrent`). Groups that touch an operation which mixes channels
    (LayerNorm, attention, …) or a weight shared between layers are skipped with a warning that names them. A layer
    called several times per forward (ALBERT's shared transformer layer) is one member of its group, pruned once for
    every call; a fused projection whose outputs are split into pieces multiplied together (a gate/up ``chunk``) has
    one neuron per row pair; timm's Global Response Normalisation is pruned with its scale corrected. Every layer
    must then prune like zeroing. With ``prune_heads``, each attention module adds a layer ``<name>:heads`` whose
    neurons are its whole heads, found from its structure and its own numbers by probing it (see
    :mod:`lightning_actprune._heads`).

    Args:
        model: the model; it is traced once with gradients on and is not modified.
        example_inputs: a tensor or a tuple of positional arguments for ``model``, or the mapping that
            :attr:`ActivationRecorder.example_inputs` captured.
        layers: glob patterns of layer names to prune (default: all). A coupled group is pruned only when all of
            its producing layers are selected.
        exclude: glob patterns of layer names never to prune.
        prune_heads: add the heads of every attention module (one that declares ``num_heads``/``head_dim`` or
            the like, Hugging Face's families, timm's, ``nn.MultiheadAttention``) as layers of their own.
        gqa_unit: under grouped-query attention, ``"query_heads"`` removes query heads, the same number from every
            key/value group; ``"kv_groups"`` removes key/value heads with all of their query heads.
        prune_residual: let the channels of a residual stream that LayerNorms or RMSNorms normalise go too (a
            transformer's embedding width, as Minitron prunes it): the norms, the layers writing to and reading from
            the stream and the parameters added to it (``cls_token``, ``pos_embed``) lose them, and each norm keeps
            normalising as over its original width, so that removing a channel equals zeroing it
            (:mod:`lightning_actprune._residual`). Not inside Hugging Face models, whose configs derive head
            sizes from the hidden size.

    Returns:
        The prunable layers, in the model's module order.

    Raises:
        ActivationPruningError: a ``layers`` pattern matches no prunable layer, or the selection leaves nothing to
            prune; ``gqa_unit`` is not one of its values.
    """
    if gqa_unit not in GQA_UNITS:
        raise ActivationPruningError(f"`gqa_unit` can be one of {', '.join(GQA_UNITS)}; got {gqa_unit!r}.")
    names = {m: n for n, m in reversed(list(model.named_modules(remove_duplicate=False)))}
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    pretrained = {m for _, hf in pretrained_models(model) for m in hf.modules()} if prune_residual else set()
    context = _TraceContext(
        names, order, _modules_sharing_parameters(model), _parameter_owners(model), prune_residual, pretrained
    )
    inputs = _as_example_inputs(example_inputs)
    found: list[PrunableLayer] = []
    skipped: list[_Skip] = []
    owners: dict[str, str] = {}  # every projection of an attention module -> that module
    for root_name in _trace_roots(inputs):
        root = model.get_submodule(root_name) if root_name else model
        try:
            with concatenations_of_unknown_size_unmapped():  # the graph is built, and its groups too
                graph, args, kwargs, counts = _traced(root, inputs[root_name], _TRACE_SAMPLES)
                hints: dict[str, _Hint] = {}  # per layer, what to say if it fails the zeroing check
                heads = _head_candidates(model, root, args, kwargs, names, prune_heads, gqa_unit, skipped, owners)
                projections = {model.get_submodule(p) for layer in heads for p in layer.producers}
                candidates = [*_layers_of_graph(graph, counts, context, skipped, projections, hints), *heads]
            found.extend(_keep_independent(model, root, args, kwargs, _no_overlap(candidates), skipped, hints))
        except Exception as error:  # one root the tracer cannot handle must not stop the others, nor the fit
            skipped.append(_Skip(f"the layers inside {root_name or type(root).__name__}", _failure("tracing", error)))
    _warn_skipped(_attention_skips(owners, skipped, prune_heads))
    found.sort(key=lambda layer: order[layer.producers[0]])
    return _select(found, layers, exclude)


class _Skip(NamedTuple):
    """A layer (or a whole traced module) that is not pruned, and why, in words a user can act on."""

    layer: str
    reason: str
    producers: tuple[str, ...] = ()
    """The layers it names, when the name shortens them (``a and the 5 layers coupled to it``)."""


def _head_candidates(
    model: nn.Module,
    root: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    names: Mapping[nn.Module, str],
    prune_heads: bool,
    gqa_unit: str,
    skipped: list[_Skip],
    owners: dict[str, str],
) -> list[PrunableLayer]:
    """The head layers of the attention modules under ``root``; those that cannot be pruned go to ``skipped``.

    Without ``prune_heads`` the attention modules are only located, for the hint that names them.
    """
    try:
        # the probes need shapes and a little data: two samples keep every attention's recorded inputs small
        args, kwargs = _few_samples(root, (args, kwargs), size=2)
        with _traceable(root):
            search = find_heads(model, root, args, kwargs, names, prune_heads, gqa_unit)
    except Exception as error:  # the heads cannot be found: the other layers are still pruned
        if prune_heads:
            skipped.append(_Skip(f"the heads inside {names[root] or type(root).__name__}", _failure("probing", error)))
        return []
    owners.update(search.owners)
    skipped.extend(_Skip(what, why) for what, why in search.skipped)
    return search.layers


def _no_overlap(candidates: list[PrunableLayer]) -> list[PrunableLayer]:
    """The candidates without the coupled groups that share a module's outputs or inputs with a head layer.

    A q/k/v group the dependency graph found is the head layer's business: the heads decide how those features go.
    """
    taken = {
        (piece.module, piece.dim) for layer in candidates if layer.name.endswith(HEADS_SUFFIX) for piece in layer.slices
    }
    return [
        layer
        for layer in candidates
        if layer.name.endswith(HEADS_SUFFIX) or not any((p.module, p.dim) in taken for p in layer.slices)
    ]


def _attention_skips(owners: Mapping[str, str], skipped: list[_Skip], prune_heads: bool) -> list[_Skip]:
    """The q/k/v groups of attention modules: silent with head pruning (the heads say why they stay); else a hint."""
    kept = []
    for skip in skipped:
        parts = skip.producers or skip.layer.split("+")
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
    residual: bool = False
    """Whether residual channels may go (``prune_residual``): LayerNorms and parameters in a group are then safe."""
    pretrained: Collection[nn.Module] = ()
    """The modules inside a Hugging Face model: its residual width stays (its config derives head sizes from it)."""


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
    known = (*MEASURED_TYPES, nn.Embedding)
    return isinstance(weight, Tensor) and weight.dim() >= 2 and not isinstance(module, known)


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
        if _unsupported(owner) and not _normalisation(owner):
            return f"{type(owner).__name__} {context.names[owner]} (not supported)"
        if context.names.get(owner) and not any(True for _ in owner.children()):
            return _module_using_its_parameters(owner, context.names[owner])
        return f"the parameter {name} (used outside a layer)"
    if isinstance(module, nn.Module) and module in context.names:
        return f"{type(module).__name__} {context.names[module]}"
    return entry.operation


def _normalisation(module: nn.Module) -> bool:
    """A module whose class name says it normalises (``Phi3RMSNorm``, ``ConvNextV2GRN``): only its wording follows."""
    kind = type(module).__name__.lower()
    return "norm" in kind or "grn" in kind


def _module_using_its_parameters(module: nn.Module, name: str) -> str:
    """A module that uses its parameters in its own code (an RMSNorm, a GRN, a layer scale), in words."""
    kind = type(module).__name__
    if "grn" in kind.lower():
        return f"{kind} {name} (a global response normalisation over them)"
    if _normalisation(module):
        return f"{kind} {name}"  # RMSNorm, LayerNorm2d: the name says what it does to the neurons
    return f"{kind} {name} (its parameters are used outside a layer)"


def _blocker(entry: GroupEntry, description: str) -> str | None:
    """Why a member stops its group's neurons from being removed, though Torch-Pruning calls it safe; else ``None``.

    Grouped convolutions lose an equal number of channels per group (:mod:`lightning_actprune._grouped`), except
    one with ``groups == out_channels != in_channels``, which Torch-Pruning couples like a depthwise convolution.
    """
    if couples_wrongly(entry.module):
        return f"{description} (a grouped convolution with one output channel per group, groups={entry.module.groups})"
    if entry.unmapped:
        return "a reshape of its channels that cannot be followed (e.g. a channel shuffle)"
    if _uneven_split(entry):
        return "a torch.split/chunk of its features into pieces read apart (they would lose unequal numbers of neurons)"
    return None


def _uneven_split(entry: GroupEntry) -> bool:
    """A split whose pieces hold different neurons: a plan may shrink them unequally, which ``chunk`` cannot follow.

    A fused gate/up projection is fine: each neuron has a row in every piece (:func:`group_entries` ties them), so
    every piece loses the same rows.
    """
    if entry.operation != SPLIT_OPERATION:
        return False
    rows = Counter(entry.neurons)
    return len(set(rows.values())) != 1 or min(rows.values()) < 2


def _traced(
    root: nn.Module, inputs: tuple[tuple[Any, ...], dict[str, Any]], size: int
) -> tuple[Any, tuple[Any, ...], dict[str, Any], dict[nn.Module, int]]:
    """Torch-Pruning's graph of ``root``, the arguments it was traced with, and each measured layer's calls in it.

    The trace runs on the first ``size`` samples of the example batch (:func:`_cut_batch`), or on the whole batch if
    those fail to run (a model that reshapes to its batch size). The calls are counted in the trace's own forward.
    """
    small = _cut_batch(inputs, size)
    try:
        return _traced_on(root, small)
    except Exception:
        if small is inputs:
            raise
    return _traced_on(root, inputs)


def _traced_on(
    root: nn.Module, example: tuple[tuple[Any, ...], dict[str, Any]]
) -> tuple[Any, tuple[Any, ...], dict[str, Any], dict[nn.Module, int]]:
    """:func:`_traced` on these very arguments."""
    # inputs recorded under inference mode cannot enter autograd; a clone made here can
    args, kwargs = map_tensors(Tensor.clone, example)
    with _traceable(root), _calls_counted(root) as counts:
        graph = dependency_graph(root, args, kwargs, _tensors_with_grad)
    return graph, args, kwargs, dict(counts)


def _layers_of_graph(
    graph: Any,
    counts: Mapping[nn.Module, int],
    context: _TraceContext,
    skipped: list[_Skip],
    projections: Collection[nn.Module],
    hints: dict[str, _Hint],
) -> Iterator[PrunableLayer]:
    """The coupled groups of Torch-Pruning's graph as layers; none is built from ``projections`` (heads go whole).

    ``counts``: how often each measured layer is called per forward (:func:`_traced`).
    """
    states_read = read_final_states(graph)
    for recurrent in sorted(states_read, key=lambda m: context.order[context.names[m]]):
        _hidden_units_layer(recurrent, (), counts, context, skipped, state_read=True)  # says why, once each
    for module, group in pruning_groups(graph, projections, max(counts.values(), default=1)):
        if module in states_read:
            continue
        if isinstance(group, Exception):
            skipped.append(_Skip(context.names[module], _group_failure(graph, group, context)))
            continue
        try:
            entries = group_entries(graph, group, context.residual)
            if isinstance(module, nn.RNNBase):
                layer = _hidden_units_layer(module, entries, counts, context, skipped)
            else:
                layer = _layer_of_group(entries, context, skipped)
        except Exception as error:  # a group the tracer cannot describe is skipped, the others go on
            skipped.append(_Skip(context.names[module], _failure("tracing its group", error)))
            continue
        if layer is not None:
            hints[layer.name] = _hint(entries, counts, context)
            yield layer


def _group_failure(graph: Any, error: Exception, context: _TraceContext) -> str:
    """Why a group could not be built, in words: what stops its neurons, when the part that was built shows it."""
    partial = error.partial if isinstance(error, GroupTooLarge) else None
    if partial:
        try:
            unsafe = _unsafe_kinds(group_entries(graph, partial, context.residual), context)
        except Exception:  # the part built cannot be described: the failure is said as it is
            unsafe = []
        if unsafe:
            # kinds, not names: the groups of one residual stream stop at different places, and make one warning
            return (
                f"its neurons reach {_listed(unsafe)}, which cannot lose neurons here (its coupled group is too large"
                " to build whole)."
            )
    return _failure("tracing its group", error)


def _residual_blockers(module: nn.Module, context: _TraceContext) -> list[str]:
    """What stops a residual member (a LayerNorm, a module's own parameters) from losing channels, if anything.

    A Hugging Face model's hidden size: its config derives head sizes from it.
    """
    if module in context.pretrained:
        return [f"{type(module).__name__} {context.names[module]} (a Hugging Face model's hidden size)"]
    return []


def _unsafe_kinds(group: Sequence[GroupEntry], context: _TraceContext) -> list[str]:
    """The kinds of members that stop a group's neurons (``LayerNorm layers``, ``a slice of its features``), sorted."""
    kinds = set()
    for entry in group:
        if entry.kind == "output":
            continue
        blocker = _blocker(entry, _describe(entry, context))
        if entry.kind != "unsafe" and blocker is None:
            continue
        if isinstance(entry.module, nn.Parameter):
            owner = context.parameters.get(id(entry.module), ("", None))[1]
            leaf = owner is not None and context.names.get(owner) and not any(True for _ in owner.children())
            kinds.add(f"{type(owner).__name__} layers" if leaf else "parameters used outside a layer")
        elif isinstance(entry.module, nn.Module) and entry.module in context.names:
            kinds.add(f"{type(entry.module).__name__} layers")
        else:
            kinds.add(entry.operation)
    return sorted(kinds)


class _Hint(NamedTuple):
    """What a group holds that explains a failed zeroing check: a layer called several times, a split of features."""

    shared: Mapping[str, int]  # the layers called several times per forward, with their calls
    split: bool


def _hint(group: Sequence[GroupEntry], counts: Mapping[nn.Module, int], context: _TraceContext) -> _Hint:
    shared = {
        context.names[entry.module]: counts[entry.module]
        for entry in group
        if isinstance(entry.module, nn.Module) and counts.get(entry.module, 0) > 1
    }
    return _Hint(shared, any(entry.kind == "safe" and entry.operation == SPLIT_OPERATION for entry in group))


def _why_not_exact(hint: _Hint | None, outcome: _Outcome) -> str:
    """Why a layer fails the zeroing check, in words: a fused projection, a shared layer, or the general case.

    A shared layer is named when, pruned, it got inputs of its old width: a call that reads other features.
    """
    if hint is not None and hint.split:
        return (
            "its outputs are split into pieces (a fused projection, e.g. gate and up in one Linear) that could not be"
            " matched row for row, or whose sizes are fixed in code: removing its neurons does not equal zeroing them."
        )
    if hint is not None and outcome.misfed is not None and outcome.misfed in hint.shared:
        name, calls = outcome.misfed, hint.shared[outcome.misfed]
        return (
            f"{name} is called {calls} times per forward (one layer, shared weights), and not every call reads these"
            " neurons: removing them does not equal zeroing them."
        )
    return (
        "removing its neurons does not equal zeroing them (an operation between it and its consumers mixes its"
        " neurons, e.g. attention (Q·K, softmax) or a normalisation over them)."
    )


def _layer_of_group(
    group: Sequence[GroupEntry],
    context: _TraceContext,
    skipped: list[_Skip],
) -> PrunableLayer | None:
    names = context.names
    slices: list[ModuleSlice] = []
    members: list[tuple[nn.Module, ModuleSlice]] = []  # each slice with its module, for the grouped convolutions
    unsafe: list[str] = []  # operations that mix the neurons, and layers that cannot lose them
    blocking = 0  # how many of them are operations or layers other than the Linear/Conv ones
    producers: list[str] = []
    has_consumer = reaches_output = False
    owned: dict[nn.Module, set[int]] = defaultdict(set)  # parameters used outside a layer, by the module holding them
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
        if isinstance(module, nn.Parameter) and id(module) in context.parameters:  # safe with `residual` only
            owned[context.parameters[id(module)][1]].add(id(module))
            continue
        if isinstance(module, nn.Module) and context.residual and layer_norm_over_features(module):
            unsafe += _residual_blockers(module, context)
            slices.append(ModuleSlice(names[module], entry.dim, entry.indices, entry.neurons))
            members.append((module, slices[-1]))
            continue
        if not isinstance(module, nn.Module) or not any(True for _ in module.parameters(recurse=False)):
            continue
        name = names[module]
        if module in context.shared:
            unsafe.append(f"{name} (shares a parameter with another layer)")
        if isinstance(module, MEASURED_TYPES):
            if entry.dim == "out":
                producers.append(name)
            else:
                has_consumer = True
        slices.append(ModuleSlice(name, entry.dim, entry.indices, entry.neurons))
        members.append((module, slices[-1]))
    if not producers or not (has_consumer or blocking):
        return None  # the output layer: its neurons are the model's outputs
    for owner, members_owned in owned.items():
        unsafe += _residual_blockers(owner, context)
        own = {id(p) for p in owner.parameters(recurse=False)}
        if members_owned != own or owned_feature_width(owner) != len(set(group[0].neurons)):
            where = f"{type(owner).__name__} {names[owner]}" if names[owner] else f"the model ({type(owner).__name__})"
            unsafe.append(f"the parameters of {where}, not all of them of its width")
            continue
        piece = next(e for e in group if id(e.module) in members_owned)
        slices.append(ModuleSlice(names[owner], "out", piece.indices, piece.neurons))
        members.append((owner, slices[-1]))
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
                tuple(producers),
            )
        )
        return None
    neurons = len(set(group[0].neurons))  # root indices tied together (a fused gate/up projection) are one neuron
    blocks = equal_count_blocks(neurons, members)
    if isinstance(blocks, str):
        skipped.append(_Skip(name, blocks))
        return None
    return PrunableLayer(
        name=name,
        neurons=neurons,
        producers=tuple(producers),
        slices=tuple(blocks.apply(piece) for piece in slices),
        groups=blocks.groups,
    )


def _hidden_units_layer(
    module: nn.RNNBase,
    group: Sequence[GroupEntry],
    counts: Mapping[nn.Module, int],
    context: _TraceContext,
    skipped: list[_Skip],
    state_read: bool = False,
) -> PrunableLayer | None:
    """The hidden units of a recurrent layer (:mod:`lightning_actprune._recurrent`), from the group of its outputs.

    Without a projection the outputs are the last layer's units: what reads them (found in ``group``) reads those
    units. With one, the outputs (``proj_size`` wide) stay, and only the module itself reads its cell units.
    ``state_read``: the model reads a final state that the tracer does not follow (a bidirectional layer's ``h_n``,
    the cell state ``c_n`` beside a projection).
    """
    name = context.names[module]
    shape = RecurrentShape.of(module)
    if state_read:
        reason = (
            "its cell state c_n is read beside a projection, which hides its units from the outputs."
            if shape.proj
            else "its final state h_n (or c_n) is read and it is bidirectional: only one direction's final state is"
            " followed (the output sequence is, in both directions)."
        )
        skipped.append(_Skip(name, reason))
        return None
    if shape.proj:
        unsafe = [f"{name} (called {counts[module]} times per forward)"] if counts.get(module, 0) > 1 else []
        unsafe += [f"{name} (shares a parameter with another layer)"] if module in context.shared else []
        if unsafe:
            skipped.append(_Skip(name, f"its neurons reach {_listed(unsafe)}, which cannot lose neurons here."))
            return None
        return hidden_units_layer(name, shape)
    others = [e.module for e in group if isinstance(e.module, nn.RNNBase) and e.module is not module and e.dim == "out"]
    if others:
        other = f"{type(others[0]).__name__} {context.names[others[0]]}"
        skipped.append(_Skip(name, f"its outputs are coupled to those of {other}, a recurrent layer too."))
        return None
    outputs = _layer_of_group(group, context, skipped)
    if outputs is None:
        return None
    if outputs.groups > 1:
        skipped.append(_Skip(outputs.name, "its outputs reach a grouped convolution, which cannot follow its units."))
        return None
    readers = [piece for piece in outputs.slices if not (piece.module == name and piece.dim == "out")]
    return hidden_units_layer(name, shape, readers, outputs.name, outputs.producers)


_TRACE_SAMPLES = 2
"""Samples the analysis traces and checks with: each forward it runs costs that many samples' worth. Two rather than
one, so that a model that squeezes its batch dimension keeps its shapes."""


def _cut_batch(inputs: tuple[tuple[Any, ...], dict[str, Any]], size: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The first ``size`` samples of an example batch: every tensor whose first dimension is the batch's is cut.

    ``inputs`` itself when the batch has no more than ``size`` samples. Nothing is run: the caller tries the cut.
    """
    tensors = [t for t in _output_tensors(inputs) if t.dim() > 0]
    if not tensors or tensors[0].shape[0] <= size:
        return inputs
    batch = tensors[0].shape[0]
    return map_tensors(lambda t: t[:size] if t.dim() > 0 and t.shape[0] == batch else t, inputs)


def _few_samples(
    root: nn.Module, inputs: tuple[tuple[Any, ...], dict[str, Any]], size: int = 8
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The first ``size`` samples of an example batch: tracing and checking need the shapes, not the data.

    If the module fails to run on them, the batch is used whole.
    """
    small = _cut_batch(inputs, size)
    if small is inputs:
        return inputs
    try:
        with _traceable(root), torch.no_grad():
            args, kwargs = small
            root(*args, **kwargs)
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


@contextmanager
def _zeroed_at_consumers(model: nn.Module, plan: PruningPlan) -> Iterator[None]:
    """Force the planned neurons' activations to zero where their consumers read them (the pruning oracle).

    A recurrent layer's hidden units are zeroed at their source instead: their rows of every gate are zeroed, so
    their states stay zero at every time step (:func:`lightning_actprune._recurrent.zero_hidden_units`).
    """
    handles = []
    recurrent: dict[str, list[int]] = {}
    for operation in plan.operations:
        module = model.get_submodule(operation.module)
        index = torch.tensor(operation.indices)
        if global_response_norm(module):  # it normalises over the neurons: they are zero where it reads them
            handles.append(zero_grn_inputs(module, index))
            continue
        if layer_norm_over_features(module) or rms_norm_over_features(module):  # a residual channel: likewise
            handles.append(zero_norm_inputs(module, index))
            continue
        if operation.dim != "in" or not isinstance(module, MEASURED_TYPES):
            continue
        if isinstance(module, nn.RNNBase):
            inputs = int(module.input_size)
            features = [i for i in operation.indices if i < inputs]
            recurrent[operation.module] = [i - inputs for i in operation.indices if i >= inputs]
            if features:
                handles.append(module.register_forward_pre_hook(_zero_recurrent_inputs(torch.tensor(features))))
            continue

        def zero(consumer: nn.Module, args: tuple[Any, ...], index: Tensor = index) -> tuple[Any, ...]:
            inputs = args[0].clone()
            if isinstance(consumer, FEATURES_LAST):
                inputs[..., index.to(inputs.device)] = 0
            else:
                inputs[:, index.to(inputs.device)] = 0
            return (inputs, *args[1:])

        handles.append(module.register_forward_pre_hook(zero))
    try:
        with restoring(model, list(recurrent), always=True):
            for name, units in recurrent.items():
                if units:
                    zero_hidden_units(model.get_submodule(name), units)  # type: ignore[arg-type]
            yield
    finally:
        for handle in handles:
            handle.remove()


def _zero_recurrent_inputs(features: Tensor) -> Callable[[nn.Module, tuple[Any, ...]], tuple[Any, ...]]:
    def zero(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (zero_input_features(args[0], features), *args[1:])

    return zero


def _keep_independent(
    model: nn.Module,
    root: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    layers: list[PrunableLayer],
    skipped: list[_Skip],
    hints: Mapping[str, _Hint],
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
                outcome = _pruned_outcome(model, root, args, kwargs, [layer])
            except Exception as error:  # the unpruned model failed with hooks on: this layer alone is skipped
                skipped.append(_Skip(_label(layer), _failure("checking it", error)))
                continue
            if outcome.same:
                independent.append(layer)
            elif layer.name.endswith(HEADS_SUFFIX):
                skipped.append(_Skip(_label(layer), _heads_differ(model, root, args, kwargs, layer)))
            else:
                skipped.append(_Skip(layer.name, _why_not_exact(hints.get(layer.name), outcome)))
    return independent


def _label(layer: PrunableLayer) -> str:
    """A layer as a warning names it: ``the heads of blocks.0`` for a head layer."""
    if not layer.name.endswith(HEADS_SUFFIX):
        return layer.name
    return ", ".join(f"the heads of {name}" for name in layer.name.removesuffix(HEADS_SUFFIX).split("+"))


def _heads_differ(
    model: nn.Module, root: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], layer: PrunableLayer
) -> str:
    """Why removing a head layer's heads does not give what zeroing them gives, in words."""
    try:
        with pruned_temporarily(model, plan_from_kept([layer], {layer.name: _kept_for_check(layer)})):
            root(*args, **kwargs)
    except Exception as error:
        return (
            f"with fewer heads the model does not run ({_failure('its forward', error)}): it splits or reshapes its"
            " projections into a head count that its attributes do not give."
        )
    return (
        "removing heads does not equal zeroing them before the out projection: something beside its projections"
        " depends on every head (a normalisation over all heads, a per-head bias or weight built elsewhere)."
    )


def _kept_for_check(layer: PrunableLayer) -> list[int]:
    """About half the neurons of each block of ``layer``: every other one, and one more goes where it can.

    The count that stays then shares no factor but 1 or 2 with an even width, so a reshape into attention heads
    (``view(batch, tokens, -1, head_size)``) fails, where exactly half the neurons would still fit. Every block of a
    layer whose blocks keep equal counts (:attr:`PrunableLayer.groups`) keeps the same number, each starting one
    position later than the block before: a consumer whose columns follow the wrong block (a recurrent layer's final
    state of another layer than the last) then fails the check.
    """
    size = layer.neurons // layer.groups
    count = max(1, len(range(1, size, 2)) - 1) if size > 1 else 1
    kept = []
    for block, neurons in enumerate(layer.blocks()):
        kept += [neurons[(1 + block + 2 * i) % size] for i in range(count)]
    return kept


def _prunes_like_zeroing(
    model: nn.Module, root: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], layers: Sequence[PrunableLayer]
) -> bool:
    """Whether removing about half the neurons of each of ``layers`` gives the outputs that zeroing them gives."""
    return _pruned_outcome(model, root, args, kwargs, layers).same


class _Outcome(NamedTuple):
    """How the model pruned by a check compares with zeroing: the same, or why not."""

    same: bool
    runs: bool = True
    misfed: str | None = None  # a layer that got inputs of its old width: one of its calls reads other features


def _pruned_outcome(
    model: nn.Module, root: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], layers: Sequence[PrunableLayer]
) -> _Outcome:
    """Removing about half the neurons of each of ``layers``, compared with zeroing them.

    The neurons that go are those of :func:`_kept_for_check`.
    """
    plan = plan_from_kept(layers, {layer.name: _kept_for_check(layer) for layer in layers})
    misfed: list[str] = []
    try:
        with pruned_temporarily(model, plan), _inputs_checked(model, plan, misfed):
            pruned = _output_tensors(root(*args, **kwargs))
    except Exception:  # its shapes do not follow the neurons
        return _Outcome(same=False, runs=False, misfed=misfed[0] if misfed else None)
    with _zeroed_at_consumers(model, plan):
        reference = _output_tensors(root(*args, **kwargs))
    return _Outcome(same=_same_outputs(pruned, reference))


@contextmanager
def _inputs_checked(model: nn.Module, plan: PruningPlan, misfed: list[str]) -> Iterator[None]:
    """While the block runs, the consumers the plan prunes note in ``misfed`` if they get inputs of another width."""
    handles = []
    for name in {operation.module for operation in plan.operations if operation.dim == "in"}:
        module = model.get_submodule(name)
        pruner = module_pruner(module)
        if not isinstance(module, MEASURED_TYPES) or pruner is None:
            continue

        def check(consumer: nn.Module, args: tuple[Any, ...], name: str = name, pruner: Any = pruner) -> None:
            if args and isinstance(args[0], Tensor):
                width = args[0].shape[_channel_dim(consumer, args[0])]
                if width != pruner.get_in_channels(consumer):
                    misfed.append(name)

        handles.append(module.register_forward_pre_hook(check))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


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
