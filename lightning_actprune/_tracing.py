"""Torch-Pruning's analysis kept bounded and honest on hard architectures.

Every reach inside Torch-Pruning's internals is here (each patch undone when its block ends). Four things its
``DependencyGraph`` does not do for us:

* Grouped convolutions (RegNet, ResNeXt): its in-channel pruner keeps the first ``kept / groups`` indices of
  every group, which is only right when the same positions go in every group. A group of neurons that reaches a
  grouped convolution is skipped, naming it.
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
from typing import Any, TypeVar

import torch_pruning as tp
from torch import nn

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


def grouped_convolution(module: Any) -> bool:
    """A convolution whose channels are split into groups, other than a plain depthwise one (one channel each)."""
    if not isinstance(module, nn.modules.conv._ConvNd) or module.groups == 1:
        return False
    return not module.groups == module.in_channels == module.out_channels


def describe_blocker(graph: Any, node: Any, description: str) -> str | None:
    """``description`` of a node that stops its group's neurons from being removed, with why; else ``None``."""
    if grouped_convolution(node.module):
        return f"{description} (a grouped convolution, groups={node.module.groups})"
    if node in getattr(graph, "_actprune_unmapped", ()):
        return "a reshape of its channels that cannot be followed (e.g. a channel shuffle)"
    return None


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
