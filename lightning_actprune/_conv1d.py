"""Hugging Face's ``Conv1D`` (GPT-2, GPT): a ``Linear`` whose weight is stored transposed, ``(in, out)``.

``transformers`` is an optional dependency and is never imported here: a model that holds a ``Conv1D`` has loaded
``transformers.pytorch_utils`` already, so the class is looked up there when a module is checked.
"""

from __future__ import annotations

import sys

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
