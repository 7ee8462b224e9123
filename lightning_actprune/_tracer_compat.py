"""Where Torch-Pruning's tracer needs help, in one place: each reach inside it is here, and tested."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch_pruning as tp
from torch_pruning.dependency import index_mapping, shape_infer


@contextmanager
def concatenations_of_unknown_size_unmapped() -> Iterator[None]:
    """While building a graph, a concatenation with an input of unknown width gets no index mapping.

    Torch-Pruning (1.6) gives up on such a concatenation too, but only after summing the widths, which fails on the
    unknown one: a key/value cache (GPT-2's ``use_cache``) concatenates each step's keys with a cache tensor that
    autograd never saw, and the whole model could not be traced.
    """
    original = index_mapping.update_concat_index_mapping

    def update(graph: Any, node: Any) -> None:
        if node.type == tp.ops.OPTYPE.CONCAT and node.module.concat_sizes is None:
            widths = [shape_infer.infer_channels_between(graph, source, node) for source in node.inputs]
            if None in widths:
                return
        original(graph, node)

    index_mapping.update_concat_index_mapping = update
    try:
        yield
    finally:
        index_mapping.update_concat_index_mapping = original
