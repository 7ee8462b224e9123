"""The models of the cost table, built from their configs at their native resolutions (random weights, 10 classes)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn


@dataclasses.dataclass(frozen=True)
class Model:
    """One row of the table: how to build the network and the input side it was designed for."""

    name: str
    build: Callable[[], nn.Module]
    resolution: int
    prune: bool = True
    """``False``: only the per-batch cost of recording statistics is measured (a model kept for its layer count)."""


def _torchvision(name: str, **kwargs: object) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision

        return torchvision.models.get_model(name, weights=None, num_classes=10, **kwargs)

    return build


def _timm(name: str, **kwargs: object) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, num_classes=10, **kwargs)

    return build


MODELS: dict[str, Model] = {
    model.name: model
    for model in (
        Model("densenet161", _torchvision("densenet161"), 224),
        Model("densenet201", _torchvision("densenet201"), 224),
        Model("resnet50", _torchvision("resnet50"), 224),
        Model("inception_v3", _torchvision("inception_v3", aux_logits=False, init_weights=True), 299),
        Model("vit_b_16", _torchvision("vit_b_16"), 224),
        # a ViT of about 1.2M parameters (issue 23's user model): ViT-Tiny's layout at width 96, depth 10
        Model("vit_1m", _timm("vit_tiny_patch16_224", embed_dim=96, depth=10, num_heads=3), 224),
        # 326 measured layers: the per-batch cost of recording many small layers
        Model("hrnet_w18", _timm("hrnet_w18"), 224, prune=False),
    )
}
"""Every model the benchmark knows, by name."""


def build(name: str) -> nn.Module:
    """The model ``name`` with the same random weights in every process, in eval mode."""
    torch.manual_seed(0)
    return MODELS[name].build().eval()
