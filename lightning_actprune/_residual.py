"""Residual channels (``prune_residual``): the width of a transformer's residual stream, cut exactly.

A pre-norm transformer's residual stream couples, channel for channel, every layer that writes into it (the patch
or token embedding, each block's attention output projection and FFN output layer), the parameters added to it (a
class token, position embeddings, a layer scale), the LayerNorms that read it and every layer behind them. Removing
a channel removes it from all of them (Minitron's embedding-channel pruning). The one member that is not exact by
itself is the norm: a LayerNorm normalises over all channels, so a channel zeroed at its input still counts in the mean
and the variance over ``D`` channels, while a plain LayerNorm of the ``D'`` channels left divides by ``D'``.

:class:`WidthKeptLayerNorm` keeps the original width ``D`` in its statistics: with ``x`` the ``D'`` channels that
stay and the ``D - D'`` removed ones taken as zero,

    mean = Σ x / D,    var = (Σ (x - mean)² + (D - D') mean²) / D,

so removing the channels equals zeroing them at the LayerNorm's input (and at every layer reading what it
outputs), exactly: the zeroing check then holds, as for every other layer this package prunes. The surgery swaps
the class of a pruned LayerNorm (as it does for a pruned ``nn.MultiheadAttention``); its parameters and state dict
keep their names and shapes, so :func:`~lightning_actprune.core.load_pruned` rebuilds it from the plan.

An RMSNorm needs no new class: with the removed channels zero, ``Σ x²`` over the ``D'`` channels left is the sum over
all ``D``, so scaling its weight by ``√(D / D')`` and its ``eps`` by ``D / D'`` gives, for every channel that stays,
``w √(D/D') x / √(Σ x² / D' + eps D/D') = w x / √(Σ x² / D + eps)``: removing the channels equals zeroing them at
its input, exactly (``torch.nn.RMSNorm`` and timm's ``RmsNorm``, with a weight; one without cannot be scaled).

Parameters used outside a layer (``cls_token``, ``pos_embed``, a layer scale's ``gamma``) are pruned through the
module that holds them (:class:`ParameterOwnerPruner`): each of its own parameters loses the same entries of its last
dimension, the feature dimension Torch-Pruning assigns them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def layer_norm_over_features(module: Any) -> bool:
    """Whether ``module`` is a LayerNorm over its last dimension alone: ``nn.LayerNorm`` or timm's ``LayerNorm``.

    A subclass that normalises another dimension (timm's ``LayerNorm2d`` permutes channels first) is not one:
    only classes known to call ``F.layer_norm`` on the last dimension are, recognised by type or by timm's name.
    """
    kind = type(module)
    known = kind in (nn.LayerNorm, WidthKeptLayerNorm) or (
        kind.__name__ == "LayerNorm" and kind.__module__.startswith("timm.") and isinstance(module, nn.LayerNorm)
    )
    return known and len(module.normalized_shape) == 1


class WidthKeptLayerNorm(nn.LayerNorm):
    """A LayerNorm that lost channels and still normalises as over its original width (see the module's text).

    Attributes:
        full_width: the number of channels it had before any prune; the removed ones count as zeros.
    """

    full_width: int

    def forward(self, x: Tensor) -> Tensor:
        """LayerNorm of ``x`` with the removed channels taken as zeros in the mean and the variance."""
        width = self.full_width
        kept = x.shape[-1]
        dtype = x.dtype
        values = x.float() if dtype in (torch.float16, torch.bfloat16) else x  # as F.layer_norm computes
        mean = values.sum(-1, keepdim=True) / width
        centred = values - mean
        variance = (centred.square().sum(-1, keepdim=True) + (width - kept) * mean.square()) / width
        out = centred * torch.rsqrt(variance + self.eps)
        if self.weight is not None:
            out = out * self.weight
        if self.bias is not None:
            out = out + self.bias
        if torch.is_autocast_enabled(x.device.type):  # the dtype autocast gives layer_norm here (float32 on CUDA)
            dtype = F.layer_norm(x.new_zeros(1), (1,)).dtype
        return out.to(dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, full_width={self.full_width}"


def rms_norm_over_features(module: Any) -> bool:
    """Whether ``module`` is an RMSNorm over its last dimension alone, with a weight: ``nn.RMSNorm`` or timm's."""
    kind = type(module)
    known = kind is nn.RMSNorm or (kind.__name__ == "RmsNorm" and kind.__module__.startswith("timm."))
    shape = getattr(module, "normalized_shape", ())
    return known and len(shape) == 1 and isinstance(getattr(module, "weight", None), Tensor)


class RMSNormPruner:
    """Removes channels of an RMSNorm: its weight entries and ``normalized_shape``; :func:`rescale_rms_norms` scales."""

    def prune_out_channels(self, module: Any, idxs: Sequence[int]) -> nn.Module:
        """Remove the channels ``idxs``: a selection only, so that optimizer state can follow it entry by entry."""
        removed = {int(i) for i in idxs}
        keep = torch.tensor([i for i in range(int(module.weight.shape[0])) if i not in removed], dtype=torch.long)
        weight = module.weight
        module.weight = nn.Parameter(weight.detach()[keep.to(weight.device)], requires_grad=weight.requires_grad)
        module.normalized_shape = (len(keep),)
        return module

    prune_in_channels = prune_out_channels

    def get_out_channels(self, module: Any) -> int:
        """The number of channels."""
        return int(module.weight.shape[0])

    get_in_channels = get_out_channels


RMS_NORM_PRUNER = RMSNormPruner()


def rms_norm_widths(modules: Mapping[str, nn.Module], names: Iterable[str]) -> dict[str, int]:
    """The channels of each RMSNorm among ``names``, before a surgery."""
    return {
        name: int(module.get_parameter("weight").shape[0])
        for name in names
        if (module := modules.get(name)) is not None and rms_norm_over_features(module)
    }


def rescale_rms_norms(modules: Mapping[str, nn.Module], widths: Mapping[str, int]) -> None:
    """After a surgery, scale the weight of each RMSNorm that lost channels by ``√(D / D')``, its eps by ``D / D'``."""
    for name, width in widths.items():
        module: Any = modules[name]
        kept = int(module.weight.shape[0])
        if kept == width:
            continue
        scale = width / kept
        eps = module.eps if module.eps is not None else torch.finfo(module.weight.dtype).eps  # as F.rms_norm's None
        with torch.no_grad():  # the pruner made a new parameter: the old one, which a snapshot may restore, is intact
            module.weight.mul_(scale**0.5)
        module.eps = float(eps) * scale


def layer_norm_widths(modules: Mapping[str, nn.Module], names: Iterable[str]) -> dict[str, int]:
    """The width each LayerNorm among ``names`` normalises over, before a surgery (the original one if pruned)."""
    widths = {}
    for name in names:
        module: Any = modules.get(name)
        if module is not None and layer_norm_over_features(module):
            widths[name] = int(getattr(module, "full_width", module.normalized_shape[0]))
    return widths


def keep_layer_norm_widths(modules: Mapping[str, nn.Module], widths: Mapping[str, int]) -> None:
    """After a surgery, every LayerNorm that lost channels normalises as over its width before (see above)."""
    for name, width in widths.items():
        module: Any = modules[name]
        if int(module.normalized_shape[0]) == width:
            continue
        module.__class__ = WidthKeptLayerNorm
        module.full_width = width


def zero_norm_inputs(module: nn.Module, index: Tensor, dim: int = -1) -> torch.utils.hooks.RemovableHandle:
    """The oracle at a normalisation: the removed channels are zeroed where it reads them, before its statistics."""

    def zero(norm: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        inputs = args[0].clone()
        inputs.index_fill_(dim % inputs.dim(), index.to(inputs.device), 0)
        return (inputs, *args[1:])

    return module.register_forward_pre_hook(zero)


def owned_feature_width(module: nn.Module) -> int | None:
    """The last dimension every parameter of ``module``'s own shares (``cls_token``, ``pos_embed``), else ``None``."""
    widths = {int(p.shape[-1]) for p in module.parameters(recurse=False) if p.dim() >= 1}
    if len(widths) != 1 or any(p.dim() == 0 for p in module.parameters(recurse=False)):
        return None
    return widths.pop()


class ParameterOwnerPruner:
    """Removes features of the parameters a module uses itself: the same entries of each one's last dimension.

    For the module that holds a ViT's ``cls_token`` and ``pos_embed``, or a layer scale's ``gamma``: Torch-Pruning
    prunes such parameters along their last dimension. A module's parameters must all have that dimension equal
    (:func:`owned_feature_width`); the analysis checks that the whole of them are in the group.
    """

    def prune_out_channels(self, module: nn.Module, idxs: Sequence[int]) -> nn.Module:
        """Remove the features ``idxs`` from each of the module's own parameters (new parameters; old ones intact)."""
        width = owned_feature_width(module)
        if width is None:
            raise ValueError(f"the parameters of {type(module).__name__} do not share their last dimension")
        removed = {int(i) for i in idxs}
        keep = torch.tensor([i for i in range(width) if i not in removed], dtype=torch.long)
        for name, p in list(module.named_parameters(recurse=False)):
            kept = p.detach().index_select(-1, keep.to(p.device))
            setattr(module, name, nn.Parameter(kept, requires_grad=p.requires_grad))
        return module

    prune_in_channels = prune_out_channels

    def get_out_channels(self, module: nn.Module) -> int | None:
        """The shared last dimension of the module's own parameters."""
        return owned_feature_width(module)

    get_in_channels = get_out_channels


PARAMETER_OWNER_PRUNER = ParameterOwnerPruner()


def owned_parameters_after(module: nn.Module, removed: int) -> int | None:
    """Parameters a module keeps of its own when ``removed`` features go from each (``None``: not such a module)."""
    width = owned_feature_width(module)
    if width is None:
        return None
    return sum(p.numel() // width * (width - removed) for p in module.parameters(recurse=False))


def layer_norm_after(module: nn.Module, removed: int) -> int:
    """Parameters a LayerNorm or RMSNorm keeps without ``removed`` channels (its weight and bias, where it has them)."""
    return sum(p.numel() - removed for p in module.parameters(recurse=False))
