"""Global Response Normalisation (ConvNeXt-V2's GRN, timm's ``GlobalResponseNorm``): exact removal of its channels.

GRN divides each channel's spatial L2 norm ``G_c`` by the mean of all channels' norms::

    y_c = x_c + b_c + w_c · x_c · G_c / (Σ_k G_k / C + eps)

A channel that is zeroed at the GRN's input adds 0 to the sum, but still counts in ``C``; removing it changes the
divisor to ``C' = C - removed``. Scaling ``w`` and ``eps`` by ``C / C'`` gives, for every channel that stays,
``w_c C/C' · G_c / (Σ G / C' + eps C/C') = w_c · G_c / (Σ G / C + eps)``: removing the channels equals zeroing them
at the GRN's input (and at the layers reading its output), exactly. Only a GRN whose ``eps`` is an attribute can be
scaled so. The pruner only selects entries (optimizer state follows them one by one); the surgery scales afterwards.
``timm`` is optional and never imported: the class is recognised by its name, module and attributes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn


def global_response_norm(module: Any) -> bool:
    """Whether ``module`` is timm's ``GlobalResponseNorm``: a weight and bias per channel, ``eps``, ``channel_dim``."""
    kind = type(module)
    if kind.__name__ != "GlobalResponseNorm" or not kind.__module__.startswith("timm."):
        return False
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    return (
        isinstance(weight, Tensor)
        and isinstance(bias, Tensor)
        and weight.dim() == bias.dim() == 1
        and weight.shape == bias.shape
        and isinstance(getattr(module, "eps", None), float)
        and getattr(module, "channel_dim", None) in (1, -1)
    )


def response_norm_channels(model: nn.Module, names: Iterable[str]) -> dict[str, int]:
    """The channels of each GRN among the modules ``names``, before a surgery."""
    channels = {}
    for name in names:
        module = model.get_submodule(name)
        if global_response_norm(module):
            channels[name] = int(module.get_parameter("weight").shape[0])
    return channels


def rescale_response_norms(model: nn.Module, channels_before: Mapping[str, int]) -> None:
    """After a surgery, scale the ``weight`` and ``eps`` of each GRN that lost channels by ``C / C'`` (see above)."""
    for name, channels in channels_before.items():
        module: Any = model.get_submodule(name)
        kept = int(module.weight.shape[0])
        if kept == channels:
            continue
        scale = channels / kept
        with torch.no_grad():  # the pruner made a new parameter: the old one, which a snapshot may restore, is intact
            module.weight.mul_(scale)
        module.eps = float(module.eps) * scale


def zero_grn_inputs(module: nn.Module, index: Tensor) -> torch.utils.hooks.RemovableHandle:
    """The oracle at a GRN: the removed channels are zeroed where it reads them, before the mean over channels."""
    channel_dim = int(getattr(module, "channel_dim", -1))

    def zero(grn: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        inputs = args[0].clone()
        inputs.index_fill_(channel_dim % inputs.dim(), index.to(inputs.device), 0)
        return (inputs, *args[1:])

    return module.register_forward_pre_hook(zero)
