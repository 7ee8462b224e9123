"""Hugging Face's ``Conv1D`` (GPT-2, GPT): a ``Linear`` whose weight is stored transposed, ``(in, out)``.

``transformers`` is an optional dependency and is never imported here: a model that holds a ``Conv1D`` has loaded
``transformers.pytorch_utils`` already, so the class is looked up there when a module is checked.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import torch_pruning as tp
from torch import Tensor, nn


def transformers_conv1d() -> type | None:
    """``transformers.pytorch_utils.Conv1D`` when ``transformers`` is loaded, else None (nothing is imported)."""
    conv1d = getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)
    return conv1d if isinstance(conv1d, type) else None


class _LooksUpConv1D(type):
    def __instancecheck__(cls, instance: object) -> bool:
        conv1d = transformers_conv1d()
        return conv1d is not None and isinstance(instance, conv1d)


class Conv1D(nn.Module, metaclass=_LooksUpConv1D):
    """Stands for ``transformers.pytorch_utils.Conv1D`` in ``isinstance`` checks; never instantiated.

    ``isinstance(module, Conv1D)`` is true for the Hugging Face layer (and its subclasses) once ``transformers`` is
    loaded, and false for everything else, so it can sit in a tuple of layer types beside ``nn.Linear``.
    """

    def __init__(self) -> None:
        raise TypeError("lightning_actprune's Conv1D only stands for transformers.pytorch_utils.Conv1D")


def out_in_weight(module: nn.Module) -> Tensor:
    """The layer's weight with outputs first, ``(out, in, *kernel)``, as ``Linear`` and ``Conv`` store it."""
    weight = module.get_parameter("weight")
    return weight.t() if isinstance(module, Conv1D) else weight


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
