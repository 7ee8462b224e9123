"""Each Torch-Pruning internal that ``_torch_pruning.py`` reaches still means what it meant (issue 22).

When a Torch-Pruning release moves one, the failing test names it. ``_torch_pruning.py`` is the only module of the
package that imports ``torch_pruning``; this test checks that too.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch_pruning as tp
from torch import nn

from lightning_actprune import _torch_pruning
from tests.helpers import ROOT

MODULE = "lightning_actprune/_torch_pruning.py"


@contextmanager
def reaching(what: str) -> Iterator[None]:
    try:
        yield
    except (AttributeError, ImportError, TypeError, KeyError) as error:
        pytest.fail(f"Torch-Pruning {tp.__version__} moved `{what}`; update {MODULE} ({type(error).__name__}: {error})")


def test_only_one_module_of_the_package_imports_torch_pruning():
    importing = [
        path.name
        for path in Path(ROOT / "lightning_actprune").glob("*.py")
        if re.search(r"^\s*(import torch_pruning|from torch_pruning)", path.read_text(), flags=re.MULTILINE)
    ]
    assert importing == ["_torch_pruning.py"]


@pytest.mark.parametrize(
    "name",
    [
        "dependency.index_mapping.update_reshape_index_mapping",
        "dependency.index_mapping.update_concat_index_mapping",
        "dependency.index_mapping.update_index_mapping",
        "dependency.shape_infer.infer_channels_between",
        "dependency.graph.Group",
        "dependency.group.Group.add_dep",
        "dependency.group.Group.has_pruning_op",
        "pruner.function.BasePruningFunc",
        "pruner.function.PrunerBox",
        "ops.module2type",
        "ops.OPTYPE.CONV",
        "ops.OPTYPE.UNBIND",
        "DependencyGraph.build_dependency",
        "DependencyGraph.get_pruning_group",
        "DependencyGraph.get_pruner_of_module",
        "DependencyGraph.is_out_channel_pruning_fn",
    ],
)
def test_internal_names_exist(name):
    value = tp
    with reaching(f"torch_pruning.{name}"):
        for part in name.split("."):
            value = getattr(value, part)


def test_a_graph_exposes_its_nodes_groups_handlers_and_root_indices():
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2)).eval()
    x = torch.randn(3, 4)
    with torch.enable_grad():
        graph = _torch_pruning.dependency_graph(model, (x,), {}, lambda output: [output])
    with reaching("DependencyGraph.module2node"):
        assert set(graph.module2node) >= {model[0], model[1], model[3]}
    with reaching("Group items: (dep, idxs), dep.target.module/type, dep.handler, item.root_idxs"):
        (group,) = [g for m, g in _torch_pruning.pruning_groups(graph) if m is model[0]]
        entries = _torch_pruning.group_entries(graph, group)
    kinds = {(type(e.module).__name__, e.dim, e.kind) for e in entries if isinstance(e.module, nn.Module)}
    assert {("Linear", "out", "safe"), ("BatchNorm1d", "out", "safe"), ("Linear", "in", "safe")} <= kinds
    assert all(e.neurons == tuple(range(6)) for e in entries if isinstance(e.module, nn.Linear))


def test_the_pruners_of_each_layer_type_cut_what_they_say():
    with reaching("PrunerBox / module2type / prune_out_channels / prune_in_channels"):
        linear = nn.Linear(4, 6)
        pruner = _torch_pruning.module_pruner(linear)
        pruner.prune_out_channels(linear, [0, 5])
        pruner.prune_in_channels(linear, [1])
    assert linear.weight.shape == (4, 3)
    assert _torch_pruning.module_pruner(nn.LayerNorm(4)) is not None
