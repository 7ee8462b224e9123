"""Every use of Torch-Pruning: its dependency graph, its coupled groups and its per-layer pruners.

The rest of the package sees plain values (:class:`GroupEntry`, a pruner object with ``prune_out_channels`` /
``prune_in_channels``), never Torch-Pruning's nodes, dependencies or registries; each patch of its internals is
undone when its block ends. Four things its ``DependencyGraph`` does not do for us:

* Reshapes it cannot map (a channel shuffle in ShuffleNetV2) raise inside its graph building and take the whole
  model with them. Such a reshape is left unmapped instead, and every group that reaches it is skipped.
* A concatenation with an input of unknown width (a key/value cache, GPT-2's ``use_cache``) fails its index
  mapping and, with it, the whole model; such a concatenation is left unmapped, as Torch-Pruning would leave it.
* Index mappings that multiply (Swin's window partitions, Torch-Pruning issue #525) make a single group grow
  without bound. Each group holds at most :data:`GROUP_INDEX_LIMIT` indices, and the groups of one model are built
  within :data:`ANALYSIS_SECONDS`; past either, the group (or every group left) is skipped with a message.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal, NamedTuple, TypeVar

import torch
import torch_pruning as tp
from torch import Tensor, nn

from lightning_actprune._conv1d import Conv1D
from lightning_actprune._statistics import MEASURED_TYPES, map_tensors

GROUP_INDEX_LIMIT = 100_000
"""Index entries one coupled group may hold; a legitimate group (a wide residual stream read by a few dozen layers,
a conv flattened into a Linear) holds a few tens of thousands (at most 43k in torchvision's models)."""

ANALYSIS_SECONDS = 30.0
"""Seconds spent building the coupled groups of one traced module before the remaining ones are skipped."""

T = TypeVar("T")

_index_mapping: Any = tp.dependency.index_mapping
_shape_infer: Any = tp.dependency.shape_infer
_graph_module: Any = tp.dependency.graph


class GroupTooLarge(Exception):
    """A coupled group grew past :data:`GROUP_INDEX_LIMIT` indices."""


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
    whole model could not be traced.
    """
    update: Callable[..., None] = _index_mapping.update_concat_index_mapping

    @functools.wraps(update)
    def tolerant(graph: Any, node: Any) -> None:
        if node.type == tp.ops.OPTYPE.CONCAT and node.module.concat_sizes is None:
            widths = [_shape_infer.infer_channels_between(graph, source, node) for source in node.inputs]
            if None in widths:
                return
        update(graph, node)

    with _patched(_index_mapping, "update_concat_index_mapping", tolerant):
        yield


class _BoundedGroup(tp.dependency.group.Group):
    """A group that stops growing past the index limit or the deadline, and finds its own entries in O(1)."""

    deadline = float("inf")

    def __init__(self) -> None:
        super().__init__()
        self._entries = 0
        self._seen: dict[tuple[int, Any], list[Any]] = {}

    def add_dep(self, dep: Any, idxs: Any) -> None:
        self._entries += len(idxs)
        if self._entries > GROUP_INDEX_LIMIT:
            raise GroupTooLarge(
                f"its coupled group grows past {GROUP_INDEX_LIMIT:,} indices (index mappings that multiply, e.g."
                " window attention; Torch-Pruning issue #525)"
            )
        if time.perf_counter() > self.deadline:
            raise BudgetExhausted
        self._seen.setdefault((id(dep.target), dep.handler), []).append(idxs)
        super().add_dep(dep, idxs)

    def has_pruning_op(self, dep: Any, idxs: Any) -> bool:
        return any(seen == idxs for seen in self._seen.get((id(dep.target), dep.handler), ()))


@contextmanager
def bounded_groups() -> Iterator[None]:
    """Groups built inside are bounded in size and, all together, in time (:data:`ANALYSIS_SECONDS`).

    The index mappings were computed when the graph was built and do not change while it is only read: Torch-Pruning
    recomputing them for every group (a walk over the whole graph each time) is skipped.
    """
    _BoundedGroup.deadline = time.perf_counter() + ANALYSIS_SECONDS
    try:
        with (
            _patched(_graph_module, "Group", _BoundedGroup),
            _patched(_index_mapping, "update_index_mapping", lambda graph: None),
        ):
            yield
    finally:
        _BoundedGroup.deadline = float("inf")


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
_WORDS = {
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


def group_entries(graph: tp.DependencyGraph, group: Any) -> list[GroupEntry]:
    """The members of one of Torch-Pruning's groups (:func:`pruning_groups`) as :class:`GroupEntry` values."""
    entries = []
    for item in group:
        dep, indices = item
        node = dep.target
        module, optype = node.module, node.type
        if _OUTPUT is not None and optype == _OUTPUT:
            kind: Literal["output", "safe", "unsafe"] = "output"
        elif optype in _SAFE_TYPES or isinstance(module, Conv1D):  # Conv1D: a customized node, like a Linear
            kind = "safe"
        else:
            kind = "unsafe"
        entries.append(
            GroupEntry(
                module=module,
                operation=_WORDS.get(optype, f"a {optype.name.lower()} operation"),
                kind=kind,
                dim="out" if graph.is_out_channel_pruning_fn(dep.handler) else "in",
                indices=tuple(int(i) for i in indices),
                neurons=tuple(int(r) for r in item.root_idxs),
                unmapped=node in getattr(graph, "_actprune_unmapped", ()),
            )
        )
    return entries


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
    graph = tp.DependencyGraph()
    with _recurrent_layers_opaque(root), unmapped_reshapes(graph):
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


def pruning_groups(graph: tp.DependencyGraph) -> Iterator[tuple[nn.Module, Any]]:
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


def module_pruner(module: nn.Module) -> Any:
    """Torch-Pruning's pruner for this kind of layer (``prune_out_channels``, ``prune_in_channels``, …), or None."""
    if isinstance(module, Conv1D):  # Torch-Pruning has none for it
        return CONV1D_PRUNER
    return tp.pruner.function.PrunerBox.get(tp.ops.module2type(module))
