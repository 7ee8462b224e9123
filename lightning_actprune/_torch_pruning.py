"""Every use of Torch-Pruning: its dependency graph, its coupled groups and its per-layer pruners.

The rest of the package sees plain values (:class:`GroupEntry`, a pruner object with ``prune_out_channels`` /
``prune_in_channels``), never Torch-Pruning's nodes, dependencies or registries; each patch of its internals is
undone when its block ends. What its ``DependencyGraph`` does not do for us:

* Reshapes it cannot map (a channel shuffle in ShuffleNetV2) raise inside its graph building and take the whole
  model with them. Such a reshape is left unmapped instead, and every group that reaches it is skipped.
* A concatenation with an input of unknown width (a key/value cache, GPT-2's ``use_cache``) fails its index
  mapping and, with it, the whole model; such a concatenation is left unmapped, as Torch-Pruning would leave it.
* Index mappings that multiply (Swin's window partitions, Torch-Pruning issue #525) make a single group grow
  without bound. Each group holds at most :data:`GROUP_INDEX_LIMIT` indices beyond one per neuron in each member,
  and the groups of one model are built within :data:`ANALYSIS_SECONDS`; past either, the group (or every group
  left) is skipped with a message.
* Recurrent layers record their time steps in autograd (GRU), and ``pad_packed_sequence`` slices packed rows, which
  it misreads as features. While a graph is built, each recurrent layer is one opaque node from its input to its
  output sequence, its final state ``h_n`` is built from that sequence where it holds the last layer's units (one
  direction), and ``pad_packed_sequence`` is one element-wise node; a final state that cannot be followed is a
  node of its own, whose readers :func:`read_final_states` reports.
* A split along the features (a fused gate/up projection's ``chunk(2, dim=-1)``) is mapped only along dim 1, and
  its merged groups forget that gate row ``j`` and up row ``H + j`` reach the same input of the down projection.
  Such splits are mapped by the piece each consumer reads (:func:`feature_splits_mapped`), and root indices that
  reach one index are one neuron (:meth:`_BoundedGroup.add_and_merge`).
* Tracing keeps every tensor a backward pass would need, several times a forward pass's memory; none is kept
  (:func:`_nothing_saved_for_backward`). timm's ``GlobalResponseNorm`` is one node with a pruner (see ``_grn``).
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal, NamedTuple, TypeVar

import torch
import torch_pruning as tp
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from lightning_actprune._conv1d import Conv1D
from lightning_actprune._grn import global_response_norm
from lightning_actprune._grouped import GROUPED_CONV_PRUNER, couples_wrongly, grouped_convolution
from lightning_actprune._recurrent import RECURRENT_PRUNER, RecurrentShape
from lightning_actprune._residual import (
    PARAMETER_OWNER_PRUNER,
    RMS_NORM_PRUNER,
    layer_norm_over_features,
    owned_feature_width,
    rms_norm_over_features,
)
from lightning_actprune._statistics import MEASURED_TYPES, map_tensors

GROUP_INDEX_LIMIT = 100_000
"""Index entries one coupled group may hold beyond one per neuron in each member it reaches.

A legitimate group gives each member at most one index per neuron, however many members it has (DenseNet-201's last
transition layer reaches 137 of them through its block's concatenations: 122,752 indices, none beyond); only a
conv flattened into a Linear gives more, one per position (25,088 for 512 channels at 7×7). Index mappings that
multiply (Swin's window partitions, Torch-Pruning issue #525; a channel shuffle) give one member a million indices,
or reach the same member again and again: those are what the limit counts."""

ANALYSIS_SECONDS = 30.0
"""Seconds spent building the coupled groups of one traced module before the remaining ones are skipped."""

T = TypeVar("T")

_index_mapping: Any = tp.dependency.index_mapping
_shape_infer: Any = tp.dependency.shape_infer
_graph_module: Any = tp.dependency.graph


class GroupTooLarge(Exception):
    """A coupled group grew past :data:`GROUP_INDEX_LIMIT` indices; ``partial`` holds what was built of it."""

    def __init__(self, message: str, partial: Any = None) -> None:
        super().__init__(message)
        self.partial = partial


class BudgetExhausted(Exception):
    """Building the coupled groups took longer than :data:`ANALYSIS_SECONDS`."""

    def __init__(self) -> None:
        super().__init__(f"the analysis ran past its {ANALYSIS_SECONDS:g} s budget; these groups were not built")


@contextmanager
def _patched(owner: Any, name: str, replacement: Any) -> Iterator[None]:
    original = getattr(owner, name)
    setattr(owner, name, replacement)
    try:
        yield
    finally:
        setattr(owner, name, original)


@contextmanager
def unmapped_reshapes(graph: Any) -> Iterator[None]:
    """While the graph is built, a reshape whose index mapping fails is recorded on it, not raised."""
    unmapped: set[Any] = set()
    graph._actprune_unmapped = unmapped
    update: Callable[..., None] = _index_mapping.update_reshape_index_mapping

    @functools.wraps(update)
    def tolerant(graph: Any, node: Any) -> None:
        try:
            update(graph, node)
        except Exception:
            unmapped.add(node)

    with _patched(_index_mapping, "update_reshape_index_mapping", tolerant):
        yield


@contextmanager
def concatenations_of_unknown_size_unmapped() -> Iterator[None]:
    """While building a graph, a concatenation with an input of unknown width gets no index mapping.

    Torch-Pruning (1.6) gives up on such a concatenation too, but only after summing the widths, which fails on the
    unknown one: a key/value cache concatenates each step's keys with a cache tensor that autograd never saw, and the
    whole model could not be traced. A width whose inference fails (a partial rotary embedding's concatenation of the
    pieces of a per-head split) is unknown too.
    """
    update: Callable[..., None] = _index_mapping.update_concat_index_mapping

    @functools.wraps(update)
    def tolerant(graph: Any, node: Any) -> None:
        if node.type == tp.ops.OPTYPE.CONCAT and node.module.concat_sizes is None:
            try:
                widths = [_shape_infer.infer_channels_between(graph, source, node) for source in node.inputs]
            except (IndexError, KeyError, TypeError):  # a width it cannot infer (a split it does not know): unknown
                return
            if None in widths:
                return
        update(graph, node)

    with _patched(_index_mapping, "update_concat_index_mapping", tolerant):
        yield


def _signed(dim: int) -> int:
    """A dimension as autograd saved it: a negative one reads back as its unsigned 64-bit value."""
    return dim - 2**64 if dim >= 2**63 else dim


def _split_sizes(grad_fn: Any) -> tuple[int, list[int]] | None:
    """The dimension a ``split``/``chunk`` cut (normalised) and the size of each piece, from its saved values."""
    shape = getattr(grad_fn, "_saved_self_sym_sizes", None)
    dim = getattr(grad_fn, "_saved_dim", None)
    if shape is None or dim is None or not shape:
        return None
    dim = _signed(int(dim))
    if not -len(shape) <= dim < len(shape):
        return None
    dim %= len(shape)
    total = int(shape[dim])
    if hasattr(grad_fn, "_saved_split_sizes"):
        sizes = [int(size) for size in grad_fn._saved_split_sizes]
    elif hasattr(grad_fn, "_saved_split_size"):
        step = max(int(grad_fn._saved_split_size), 1)
        sizes = [min(step, total - start) for start in range(0, total, step)]
    else:
        return None
    return (dim, sizes) if sum(sizes) == total else None


def _map_split_pieces(node: Any, sizes: list[int]) -> bool:
    """Give each dependency of a split node the index mapping of the piece it reads; ``False`` if unclear.

    Which piece a consumer reads is the output number autograd recorded for it (Torch-Pruning assumes the order in
    which it met the consumers).
    """
    offsets = [0]
    for size in sizes:
        offsets.append(offsets[-1] + size)

    def mapping(piece: int, reverse: bool) -> Any:
        return _index_mapping._SplitIndexMapping(offset=offsets[piece : piece + 2], reverse=reverse)

    def pieces(consumer: Any) -> list[int]:
        functions = getattr(consumer.grad_fn, "next_functions", ()) or ()
        return [int(number) for function, number in functions if function is node.grad_fn]

    forward: dict[int, list[int]] = {}
    mappings: list[tuple[Any, Any]] = []
    consumers = {id(consumer) for consumer in node.outputs}
    for dep in node.dependencies:
        if id(dep.target) not in consumers:
            continue  # the dependency on the split's input
        numbers = forward.setdefault(id(dep.target), pieces(dep.target))
        if not numbers:
            return False
        mappings.append((dep, mapping(numbers.pop(0), reverse=False)))
    for consumer in dict.fromkeys(node.outputs):
        numbers = pieces(consumer)
        for dep in consumer.dependencies:
            if dep.target is node:
                if not numbers:
                    return False
                mappings.append((dep, mapping(numbers.pop(0), reverse=True)))
    for dep, piece_mapping in mappings:
        dep.index_mapping[0] = piece_mapping
    return True


@contextmanager
def feature_splits_mapped() -> Iterator[None]:
    """While a graph is built, a ``split``/``chunk`` along the last dimension maps its pieces' indices.

    Torch-Pruning maps a split along dimension 1 only (a conv's channels), and none downstream of a 3-D parameter
    (its fix for a ViT's class token): the fused gate/up projection of a gated MLP (``fc1(x).chunk(2, dim=-1)``,
    Phi-3, timm's ``GluMlp``) then couples its rows wrongly, or not at all. Along the last dimension, the features of
    a ``Linear``, each piece is mapped to the rows it came from; whether that is right is checked afterwards, with
    every layer (removing neurons must equal zeroing them).
    """
    update: Callable[..., None] = _index_mapping.update_split_index_mapping

    @functools.wraps(update)
    def along_features(graph: Any, node: Any) -> None:
        split = _split_sizes(node.grad_fn) if node.type == tp.ops.OPTYPE.SPLIT else None
        if split is not None and split[0] == len(node.grad_fn._saved_self_sym_sizes) - 1:
            sizes = split[1]
            node.module.split_sizes = sizes
            node.module.offsets = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
            if _map_split_pieces(node, sizes):
                return
        update(graph, node)

    with _patched(_index_mapping, "update_split_index_mapping", along_features):
        yield


class _BoundedGroup(tp.dependency.group.Group):
    """A group that stops growing past the index limit or the deadline, and finds its own entries in O(1)."""

    deadline = float("inf")
    limit = GROUP_INDEX_LIMIT

    def __init__(self) -> None:
        super().__init__()
        self._entries = 0
        self._neurons: int | None = None
        self._seen: dict[tuple[int, Any], set[tuple[Any, ...]]] = {}
        self._root_at: dict[tuple[int, Any], dict[int, int]] = {}
        self.tied: list[tuple[int, int]] = []

    def add_dep(self, dep: Any, idxs: Any) -> None:
        key = (id(dep.target), dep.handler)
        if self._neurons is None:  # the root: every neuron once
            self._neurons = len(idxs)
        # a member reached again counts whole, a first visit only its indices beyond one per neuron
        self._entries += len(idxs) if key in self._seen else max(0, len(idxs) - self._neurons)
        if self._entries > self.limit:
            raise GroupTooLarge(
                f"its coupled group grows past {self.limit:,} indices beyond one per neuron and member (index"
                " mappings that multiply, e.g. window attention; Torch-Pruning issue #525)",
                partial=self,
            )
        if time.perf_counter() > self.deadline:
            raise BudgetExhausted
        self._seen.setdefault(key, set()).add(tuple(idxs))
        super().add_dep(dep, idxs)

    def has_pruning_op(self, dep: Any, idxs: Any) -> bool:
        # the index lists hold (idx, root_idx) tuples: a set finds an equal list without comparing to every one
        return tuple(idxs) in self._seen.get((id(dep.target), dep.handler), ())

    def add_and_merge(self, dep: Any, idxs: Any) -> None:
        """Merge as Torch-Pruning does, noting the root indices that reach one index of a member: they are tied.

        Torch-Pruning keeps the first root index it sees at each index of a member and forgets the others: for a
        fused gate/up projection split by ``chunk(2)`` and multiplied, gate row ``j`` and up row ``H + j`` both reach
        input ``j`` of the down projection, and must go together.
        """
        firsts = self._root_at.setdefault((id(dep.target), dep.handler), {})
        pairs = [(int(index.idx), int(index.root_idx)) for index in idxs]
        fresh = dict(pairs)
        if len(fresh) == len(pairs) and firsts.keys().isdisjoint(fresh):  # the usual case: no index met twice
            firsts.update(fresh)
        else:
            for index, root in pairs:
                first = firsts.setdefault(index, root)
                if first != root:
                    self.tied.append((first, root))
        super().add_and_merge(dep, idxs)


_HybridIndex: Any = tp._helpers._HybridIndex


def _shifted(idxs: Sequence[Any], offset: Sequence[int], inside: bool) -> list[Any]:
    """Each index moved by an offset, as a concatenation's or a split's mapping moves it, without keyword arguments.

    ``inside``: keep only the indices in ``[offset[0], offset[1])`` and move them down to the piece's own (from the
    concatenated tensor to one input, or from the split tensor to one piece); else move them all up by ``offset[0]``.
    Torch-Pruning's mappings build each index with keyword arguments, a tenth of DenseNet-201's group building.
    """
    start, new = int(offset[0]), tuple.__new__
    if inside:
        stop = int(offset[1])
        return [new(_HybridIndex, (i[0] - start, i[1])) for i in idxs if start <= i[0] < stop]
    return [new(_HybridIndex, (i[0] + start, i[1])) for i in idxs]


def _concat_mapping(self: Any, idxs: Sequence[Any]) -> list[Any]:
    return _shifted(idxs, self.offset, inside=self.reverse)


def _split_mapping(self: Any, idxs: Sequence[Any]) -> list[Any]:
    return _shifted(idxs, self.offset, inside=not self.reverse)


@contextmanager
def bounded_groups(calls: int = 1) -> Iterator[None]:
    """Groups built inside are bounded in size and, all together, in time (:data:`ANALYSIS_SECONDS`).

    A layer called ``calls`` times per forward (ALBERT's shared layer) puts each call's operations in its groups:
    they may hold ``calls`` times :data:`GROUP_INDEX_LIMIT` indices. The index mappings were computed when the graph
    was built and do not change while it is only read: Torch-Pruning recomputing them for every group (a walk over the
    whole graph each time) is skipped, and the offsets of concatenations and splits are applied by :func:`_shifted`.
    """
    _BoundedGroup.deadline = time.perf_counter() + ANALYSIS_SECONDS
    _BoundedGroup.limit = GROUP_INDEX_LIMIT * max(calls, 1)
    try:
        with (
            _patched(_graph_module, "Group", _BoundedGroup),
            _patched(_index_mapping, "update_index_mapping", lambda graph: None),
            _patched(_index_mapping._ConcatIndexMapping, "__call__", _concat_mapping),
            _patched(_index_mapping._SplitIndexMapping, "__call__", _split_mapping),
        ):
            yield
    finally:
        _BoundedGroup.deadline = float("inf")
        _BoundedGroup.limit = GROUP_INDEX_LIMIT


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

# Torch-Pruning marks the model's outputs in its graph (1.6); looked up by name, as older releases did not
_OUTPUT = getattr(tp.ops.OPTYPE, "OUTPUT", None)
SPLIT_OPERATION = "a split of its features (torch.split, torch.chunk)"
_WORDS = {
    tp.ops.OPTYPE.SPLIT: SPLIT_OPERATION,
    tp.ops.OPTYPE.UNBIND: "a torch.unbind of its features (e.g. splitting attention heads)",
    tp.ops.OPTYPE.SLICE: "a slice of its features",
    tp.ops.OPTYPE.EXPAND: "a torch.expand of its features",
}


class GroupEntry(NamedTuple):
    """One member of a coupled group, in plain terms: what it is, which of its indices carry which neuron.

    Attributes:
        module: the layer (an ``nn.Module``), a parameter used outside a layer (``nn.Parameter``), or an operation
            of the traced graph (anything else: described by ``operation``).
        operation: the operation in words (``"a torch.unbind of its features …"``), for members that are no layer.
        kind: ``"output"`` (the model's output), ``"safe"`` (its channels can go without changing the others:
            Linear/Conv/BatchNorm, element-wise, reshapes, concatenations) or ``"unsafe"`` (it mixes them).
        dim: ``"out"`` (the member produces the neurons) or ``"in"`` (it reads them).
        indices: the member's own channel indices.
        neurons: for each index, the neuron of the group it carries.
        unmapped: a reshape whose index mapping could not be followed (:func:`unmapped_reshapes`).
    """

    module: Any
    operation: str
    kind: Literal["output", "safe", "unsafe"]
    dim: Literal["out", "in"]
    indices: tuple[int, ...]
    neurons: tuple[int, ...]
    unmapped: bool


def _indices_and_roots(item: Any) -> tuple[list[int], list[int]]:
    """A group member's own indices and, for each, the root index it carries."""
    roots = getattr(item, "root_idxs", None)
    if roots is None:  # a group not merged (a part of one): its indices still hold their root index
        return [int(index.idx) for index in item.idxs], [int(index.root_idx) for index in item.idxs]
    return [int(i) for i in item.idxs], [int(r) for r in roots]


def _neuron_of_root(group: Any) -> Callable[[int], int]:
    """Each root index's neuron: root indices tied in the group (:meth:`_BoundedGroup.add_and_merge`) are one neuron.

    Neurons are numbered by their smallest root index; without ties, a root index is its own neuron.
    """
    parent: dict[int, int] = {}

    def find(root: int) -> int:
        while parent.get(root, root) != root:
            root = parent[root] = parent.get(parent[root], parent[root])
        return root

    for a, b in getattr(group, "tied", ()):
        first, second = sorted((find(a), find(b)))
        if first != second:
            parent[second] = first
    if not parent:
        return int
    roots = sorted({int(r) for item in group for r in _indices_and_roots(item)[1]})
    number = {root: n for n, root in enumerate(r for r in roots if find(r) == r)}
    return lambda root: number[find(root)]


_RESIDUAL_TYPES = frozenset({tp.ops.OPTYPE.PARAMETER, tp.ops.OPTYPE.EXPAND, tp.ops.OPTYPE.SLICE})
"""Members of a residual stream that are safe with ``residual``: a parameter added to it (``cls_token``,
``pos_embed``, pruned by its owner), the expand of a class token over the batch, a slice of the tokens (the register
tokens dropped before pooling); the zeroing check confirms, and refuses a slice of the features."""


def group_entries(graph: tp.DependencyGraph, group: Any, residual: bool = False) -> list[GroupEntry]:
    """The members of one of Torch-Pruning's groups (:func:`pruning_groups`) as :class:`GroupEntry` values.

    With ``residual``, the members a residual stream's channels go through are safe too: LayerNorms over the
    features (made exact by :mod:`lightning_actprune._residual`), parameters used outside a layer, expands.
    """
    neuron = _neuron_of_root(group)
    entries = []
    for item in group:
        dep = item.dep
        indices, roots = _indices_and_roots(item)
        node = dep.target
        module, optype = node.module, node.type
        if _OUTPUT is not None and optype == _OUTPUT:
            kind: Literal["output", "safe", "unsafe"] = "output"
        elif optype in _SAFE_TYPES or isinstance(module, (Conv1D, nn.RNNBase)) or global_response_norm(module):
            # Conv1D and recurrent layers: customized nodes, like a Linear; a GRN: one made exact by its pruner
            kind = "safe"
        elif residual and (optype in _RESIDUAL_TYPES or layer_norm_over_features(module)):
            kind = "safe"
        else:
            kind = "unsafe"
        entries.append(
            GroupEntry(
                module=module,
                operation=_WORDS.get(optype, f"a {optype.name.lower()} operation"),
                kind=kind,
                dim="out" if graph.is_out_channel_pruning_fn(dep.handler) else "in",
                indices=tuple(indices),
                neurons=tuple(neuron(int(r)) for r in roots),
                unmapped=node in getattr(graph, "_actprune_unmapped", ()),
            )
        )
    return entries


class _OpaqueRecurrent(tp.pruner.function.BasePruningFunc):
    """Makes Torch-Pruning see a recurrent layer as one node (its own LSTM pruner is not exact, GRU/RNN crash).

    Its outputs are the last layer's output features (``proj_size`` or ``hidden_size`` per direction), its inputs the
    input features; the analysis turns the group of its outputs into its hidden units
    (:mod:`lightning_actprune._recurrent`), and the surgery never calls these prune functions.
    """

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        raise NotImplementedError("recurrent layers are pruned by lightning_actprune._recurrent")

    def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        raise NotImplementedError("recurrent layers are pruned by lightning_actprune._recurrent")

    def get_out_channels(self, layer: nn.RNNBase) -> int:
        shape = RecurrentShape.of(layer)
        return shape.directions * shape.outputs

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


def _final_state(module: nn.RNNBase, sequence: Tensor, state: Tensor) -> Tensor:
    """The final hidden state as the tracer sees it: the last layer's units, from the traced output sequence.

    ``h_n[-1]`` (and ``h_n.squeeze(0)`` of one layer) holds the units of the last layer; built from the traced
    sequence, what reads it joins the group of those units. A model that reads another layer's final state gets the
    wrong units here, and the zeroing check that follows skips the layer.
    """
    step = sequence
    while step.dim() > 1:
        step = step.select(0, 0)
    return step + torch.zeros(*state.shape[:-1], 1, dtype=step.dtype, device=step.device)


class _Unfollowed(_Opaque):
    """A final state the tracer does not follow: a node of its own, after the layer's, that says it is read."""


def _traced_outputs(graph: Any, module: nn.RNNBase, inputs: Any, output: Any) -> Any:
    """The module's outputs for the tracer: the sequence one opaque node of the input; the final states from it.

    The final states follow the sequence where the last layer's units are all they hold (one direction; with a
    projection, its outputs). The others (a bidirectional layer's, an LSTM's cell state beside a projection) become
    :class:`_Unfollowed` nodes, so that :func:`read_final_states` can tell whether the model reads them.
    """
    sequence, states = output
    packed = isinstance(sequence, PackedSequence)
    source = inputs.data if packed else inputs
    if not source.requires_grad:  # the model's own input: the layer is a node all the same, with no input node
        source = torch.zeros((), dtype=source.dtype, device=source.device, requires_grad=True)
    data = _Opaque.apply(source, (sequence.data if packed else sequence).detach())
    traced = PackedSequence(data, *sequence[1:]) if packed else data
    shape = RecurrentShape.of(module)

    def final(state: Tensor) -> Tensor:
        projected = shape.proj and state.shape[-1] == shape.proj
        if shape.directions == 1 and (projected or not shape.proj):
            return _final_state(module, data, state)
        unfollowed = _Unfollowed.apply(data, state.detach())
        # a projected state's width never changes: whether it is read does not matter
        graph._actprune_final_states[unfollowed.grad_fn] = None if projected else module
        return unfollowed

    return traced, map_tensors(final, states)


def read_final_states(graph: Any) -> set[nn.RNNBase]:
    """The recurrent layers whose unfollowed final states (:func:`_traced_outputs`) something in the graph reads."""
    markers: dict[Any, nn.RNNBase | None] = getattr(graph, "_actprune_final_states", {})
    read = {markers.get(node.grad_fn) for node in graph.module2node.values()}
    return {module for module in read if module is not None}


@contextmanager
def _recurrent_layers_opaque(root: nn.Module, graph: Any) -> Iterator[None]:
    """Recurrent layers seen as single nodes: some (GRU) record their time steps, which Torch-Pruning misreads."""
    graph._actprune_final_states = {}

    def opaque(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        if not (args and isinstance(args[0], (Tensor, PackedSequence)) and isinstance(output, tuple)):
            return None
        return _traced_outputs(graph, module, args[0], output)  # type: ignore[arg-type]

    handles = [m.register_forward_hook(opaque) for m in root.modules() if isinstance(m, nn.RNNBase)]
    try:
        with _padding_opaque() if handles else contextlib.nullcontext():
            yield
    finally:
        for handle in handles:
            handle.remove()


def _nothing_saved_for_backward() -> Any:
    """Autograd keeps the graph's nodes but none of the tensors a backward pass would need.

    Torch-Pruning reads the graph's structure and the sizes and dimensions its nodes saved (plain ints), never a saved
    tensor, and no backward pass runs: tracing then holds no more activations than a forward pass without gradients
    (ConvMixer-768/32 at 224 px held some 13 GB of them for 8 samples).
    """
    return torch.autograd.graph.saved_tensors_hooks(lambda _: None, _never_unpacked)


def _never_unpacked(_: Any) -> Tensor:
    raise RuntimeError("lightning_actprune traces without saving tensors for backward: no backward may run")


@contextmanager
def _response_norms_opaque(root: nn.Module) -> Iterator[None]:
    """Each GRN seen as one node from its input to its output, as a BatchNorm is: its pruner makes it exact."""

    def opaque(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        if not (args and isinstance(args[0], Tensor) and isinstance(output, Tensor)):
            return None
        return _Opaque.apply(args[0], output.detach())

    handles = [m.register_forward_hook(opaque) for m in root.modules() if global_response_norm(m)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def _padding_opaque() -> Iterator[None]:
    """``pad_packed_sequence`` as one element-wise node, from the packed features to the padded ones.

    Its backward slices the packed rows (dim 0), which Torch-Pruning would map as if they were features.
    """
    pad: Callable[..., tuple[Tensor, Tensor]] = torch._VF._pad_packed_sequence

    def opaque(data: Tensor, *args: Any) -> tuple[Tensor, Tensor]:
        padded, lengths = pad(data, *args)
        return (_Opaque.apply(data, padded.detach()) if data.requires_grad else padded), lengths

    setattr(torch._VF, "_pad_packed_sequence", opaque)  # noqa: B010  # torch._VF forwards unknown names to C++
    try:
        yield
    finally:
        delattr(torch._VF, "_pad_packed_sequence")


def dependency_graph(
    root: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], outputs: Callable[[Any], list[Tensor]]
) -> tp.DependencyGraph:
    """Torch-Pruning's graph of ``root``: every recurrent layer one opaque node, Hugging Face's ``Conv1D`` a layer.

    ``outputs`` picks, from what ``root`` returns, the tensors the graph is traced back from. The caller sets the
    modes (eval, gradients on) the trace needs.
    """
    customized: dict[type, tp.pruner.function.BasePruningFunc] = {}
    for module in root.modules():
        if isinstance(module, nn.RNNBase):
            customized[type(module)] = _OpaqueRecurrent()
        elif isinstance(module, Conv1D):
            customized[type(module)] = CONV1D_PRUNER
        elif global_response_norm(module):
            customized[type(module)] = GRN_PRUNER
    graph = tp.DependencyGraph()
    with (
        _recurrent_layers_opaque(root, graph),
        _response_norms_opaque(root),
        unmapped_reshapes(graph),
        feature_splits_mapped(),
        _nothing_saved_for_backward(),
    ):
        graph.build_dependency(
            _comparable_modules(root) if customized else root,
            example_inputs=(args, kwargs),
            forward_fn=lambda _, x: root(*x[0], **x[1]),
            output_transform=outputs,
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


def pruning_groups(
    graph: tp.DependencyGraph, skip: Collection[nn.Module] = (), calls: int = 1
) -> Iterator[tuple[nn.Module, Any]]:
    """Like ``graph.get_all_groups``, but a group that fails to build is handed back as its exception.

    No group is built from the modules in ``skip`` (the q/k/v projections whose heads are pruned as a whole).
    ``calls``: the most times one layer is called per forward (see :func:`bounded_groups`).
    """
    visited: set[nn.Module] = set()
    built: list[tuple[nn.Module, Any]] = []
    candidates = [m for m in graph.module2node if isinstance(m, MEASURED_TYPES)]
    with bounded_groups(calls):  # built first, so that the bounds apply to Torch-Pruning's work alone
        for position, module in enumerate(candidates):
            if module in visited or module in skip:
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


class Conv1DPruner(tp.pruner.function.BasePruningFunc):
    """Torch-Pruning's prune functions for ``Conv1D``: those of a ``Linear``, on the transposed weight."""

    TARGET_MODULES = None

    def prune_out_channels(self, layer: Any, idxs: Sequence[int]) -> nn.Module:
        """Remove the output features ``idxs``: weight columns and bias entries."""
        keep = sorted(set(range(int(layer.nf))) - {int(i) for i in idxs})
        layer.weight = self._prune_parameter_and_grad(layer.weight, keep, 1)
        if layer.bias is not None:
            layer.bias = self._prune_parameter_and_grad(layer.bias, keep, 0)
        layer.nf = len(keep)
        return layer

    def prune_in_channels(self, layer: Any, idxs: Sequence[int]) -> nn.Module:
        """Remove the input features ``idxs``: weight rows."""
        keep = sorted(set(range(self.get_in_channels(layer))) - {int(i) for i in idxs})
        layer.weight = self._prune_parameter_and_grad(layer.weight, keep, 0)
        if hasattr(layer, "nx"):
            layer.nx = len(keep)
        return layer

    def get_out_channels(self, layer: Any) -> int:
        """``nf``, the number of output features."""
        return int(layer.nf)

    def get_in_channels(self, layer: Any) -> int:
        """The number of input features: the weight's first dimension."""
        return int(layer.weight.shape[0])


CONV1D_PRUNER = Conv1DPruner()


class GlobalResponseNormPruner(tp.pruner.function.BasePruningFunc):
    """Removes channels of a GRN: their weight and bias entries (:func:`rescale_response_norms` then scales)."""

    TARGET_MODULES = None

    def prune_out_channels(self, layer: Any, idxs: Sequence[int]) -> nn.Module:
        """Remove the channels ``idxs``: a selection only, so that optimizer state can follow it entry by entry."""
        keep = sorted(set(range(int(layer.weight.shape[0]))) - {int(i) for i in idxs})
        layer.weight = self._prune_parameter_and_grad(layer.weight, keep, 0)
        layer.bias = self._prune_parameter_and_grad(layer.bias, keep, 0)
        return layer

    prune_in_channels = prune_out_channels  # one set of channels: Torch-Pruning couples its input and output

    def get_out_channels(self, layer: Any) -> int:
        """The number of channels."""
        return int(layer.weight.shape[0])

    get_in_channels = get_out_channels


GRN_PRUNER = GlobalResponseNormPruner()


def module_pruner(module: nn.Module) -> Any:
    """The pruner for this kind of layer (``prune_out_channels``, ``prune_in_channels``, …), or None.

    Torch-Pruning's, except where it has none (Hugging Face's ``Conv1D``, GRU, RNN) or its own is not exact (grouped
    convolutions: :mod:`lightning_actprune._grouped`; LSTM: :mod:`lightning_actprune._recurrent`).
    """
    if isinstance(module, Conv1D):  # Torch-Pruning has none for it
        return CONV1D_PRUNER
    if global_response_norm(module):
        return GRN_PRUNER
    if isinstance(module, nn.RNNBase):
        return RECURRENT_PRUNER
    if grouped_convolution(module) and not couples_wrongly(module):
        return GROUPED_CONV_PRUNER
    if rms_norm_over_features(module):
        return RMS_NORM_PRUNER
    pruner = tp.pruner.function.PrunerBox.get(tp.ops.module2type(module))
    if pruner is None and owned_feature_width(module) is not None:  # it holds a cls_token, pos_embed, gamma
        return PARAMETER_OWNER_PRUNER
    return pruner
