"""The networks of the quality benchmark and their recipes, on Fashion-MNIST, each trained once per seed.

The small ViT of issue 21 (timm's ``VisionTransformer``), the MLP of the recovery benchmark and the BatchNorm ResNet of
the CNN benchmark.
"""

from __future__ import annotations

import dataclasses

from torch import Tensor

from benchmarks.common import Classifier, MLPClassifier, ResNetClassifier, short_hash

ARCHITECTURES = ("vit", "mlp", "resnet")


@dataclasses.dataclass(frozen=True)
class QualityConfig:
    """A network's recipe: what its cached weights depend on (:func:`recipe` gives each architecture's).

    ``arch="vit"``: 6 blocks × 4 heads, width 128, FFN 512, 7×7 patches (16 tokens and a class token), 1,199,882
    parameters. ``arch="mlp"``: 784-1024-1024-10 (ReLU), 1,863,690 parameters; ``arch="resnet"``: the BatchNorm
    ResNet of 8/16/32 channels, 19,810 parameters; the ViT's fields are not used by the others.
    """

    embed_dim: int = 128
    depth: int = 6
    num_heads: int = 4
    mlp_ratio: float = 4.0
    patch_size: int = 7
    lr: float = 5e-4
    batch_size: int = 128
    epochs: int = 4
    train_images: int = 20_000
    num_val: int = 5_000
    seed: int = 0
    arch: str = "vit"

    def key(self) -> str:
        """A short hash of the configuration, for the cache file name."""
        fields = dataclasses.asdict(self)
        if self.arch == "vit":  # the ViT's hash from before the field existed: its cached weights stay valid
            del fields["arch"]
        return short_hash(fields)


def recipe(arch: str, seed: int) -> QualityConfig:
    """The recipe of ``arch``: the ViT as issue 21 measured it, the MLP and the ResNet as their benchmarks train."""
    if arch == "vit":
        return QualityConfig(seed=seed)
    if arch == "mlp":
        return QualityConfig(arch="mlp", lr=1e-3, epochs=10, train_images=50_000, num_val=10_000, seed=seed)
    if arch == "resnet":  # the BatchNorm ResNet benchmark's recipe
        return QualityConfig(arch="resnet", lr=1e-3, epochs=2, train_images=50_000, num_val=10_000, seed=seed)
    raise ValueError(f"`arch` can be one of {', '.join(ARCHITECTURES)}; got {arch!r}.")


class ViTClassifier(Classifier):
    """timm's ``VisionTransformer`` on 1×28×28 images (flattened pixels in, reshaped), trained with Adam.

    Args:
        embed_dim: the residual stream's width.
        depth: transformer blocks.
        num_heads: attention heads per block (``head_dim = embed_dim // num_heads``).
        mlp_ratio: the FFN's width over ``embed_dim``.
        patch_size: the side of a patch.
        lr: Adam's learning rate.
    """

    def __init__(
        self,
        embed_dim: int = 128,
        depth: int = 6,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        patch_size: int = 7,
        lr: float = 5e-4,
    ) -> None:
        super().__init__(10, lr)
        self.save_hyperparameters()
        from timm.models.vision_transformer import VisionTransformer  # optional: only this benchmark needs timm

        self.vit = VisionTransformer(
            img_size=28,
            patch_size=patch_size,
            in_chans=1,
            num_classes=10,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.vit(x.reshape(-1, 1, 28, 28))


def build(config: QualityConfig) -> Classifier:
    """The untrained network of ``config``."""
    if config.arch == "mlp":
        return MLPClassifier((784, 1024, 1024, 10), config.lr)
    if config.arch == "resnet":
        return ResNetClassifier((8, 16, 32), None, config.lr)
    return ViTClassifier(
        config.embed_dim, config.depth, config.num_heads, config.mlp_ratio, config.patch_size, config.lr
    )
