"""The model: a small Llama (grouped-query attention, SwiGLU, RMSNorm, rotary) from ``transformers.LlamaConfig``.

``transformers`` is imported when a model is built, so the rest of the benchmark (records, report) loads without it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from .data import IGNORE_INDEX, VOCAB_SIZE


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The Llama's shape and the training recipe; the defaults are the published run."""

    hidden_size: int = 128
    layers: int = 4
    heads: int = 8
    kv_heads: int = 2
    head_dim: int = 16
    intermediate_size: int = 384
    context: int = 128
    tie_embeddings: bool = False
    lr: float = 2e-3
    weight_decay: float = 0.1

    def __post_init__(self) -> None:
        if self.heads % self.kv_heads:
            raise ValueError(f"`heads` must be a multiple of `kv_heads`; got {self.heads} and {self.kv_heads}.")

    def llama_config(self) -> Any:
        """The ``transformers.LlamaConfig``: bytes + 3 specials, no KV cache (training and perplexity only)."""
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=VOCAB_SIZE,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            head_dim=self.head_dim,
            max_position_embeddings=self.context,
            tie_word_embeddings=self.tie_embeddings,
            use_cache=False,
            bos_token_id=None,
            eos_token_id=None,
            pad_token_id=None,
        )


class ByteLM(pl.LightningModule):
    """A ``LlamaForCausalLM`` on bytes: next-byte cross-entropy, AdamW at a constant rate, ``val_loss``/``val_ppl``.

    ``val_loss`` is the mean negative log-likelihood (nats) over every scored byte of the validation split (summed in
    float64 over the pass, not averaged over batches), ``val_ppl`` its exponential.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        from transformers import LlamaForCausalLM

        self.config = config
        self.model = LlamaForCausalLM(config.llama_config())
        self._nll = torch.zeros((), dtype=torch.float64)
        self._count = torch.zeros((), dtype=torch.long)

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.model(input_ids=input_ids).logits

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        inputs, targets = batch
        loss = F.cross_entropy(self(inputs).flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
        self.log("train_loss", loss)
        return loss

    def on_validation_epoch_start(self) -> None:
        self._nll = torch.zeros((), dtype=torch.float64, device=self.device)
        self._count = torch.zeros((), dtype=torch.long, device=self.device)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        inputs, targets = batch
        nll = F.cross_entropy(
            self(inputs).flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        self._nll += nll.double()
        self._count += (targets != IGNORE_INDEX).sum()

    def on_validation_epoch_end(self) -> None:
        loss = self._nll / self._count.clamp(min=1)
        self.log("val_loss", loss.float())
        self.log("val_ppl", loss.exp().float())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(
            self.parameters(), lr=self.config.lr, betas=(0.9, 0.95), weight_decay=self.config.weight_decay
        )


def evaluate(model: nn.Module, loader: DataLoader) -> float:
    """Mean negative log-likelihood (nats per scored byte) of a plain no-grad pass; the training mode is put back."""
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    with torch.inference_mode():
        for inputs, targets in loader:
            logits = model(inputs)
            nll += float(
                F.cross_entropy(
                    logits.flatten(0, 1).float(), targets.flatten(), reduction="sum", ignore_index=IGNORE_INDEX
                )
            )
            count += int((targets != IGNORE_INDEX).sum())
    model.train(was_training)
    return nll / max(count, 1)


def perplexity(loss: float) -> float:
    """``exp(loss)``, ``inf`` past float range."""
    return math.exp(loss) if loss < 700 else math.inf


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every Llama attention module (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``, ``head_dim``), by name."""
    return [(n, m) for n, m in model.named_modules() if all(hasattr(m, a) for a in ("q_proj", "k_proj", "o_proj"))]


def mlp_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every SwiGLU MLP (``gate_proj``, ``up_proj``, ``down_proj``), by name."""
    return [
        (n, m) for n, m in model.named_modules() if all(hasattr(m, a) for a in ("gate_proj", "up_proj", "down_proj"))
    ]


@dataclasses.dataclass
class LayerWidths:
    """What one decoder layer has: query heads, key/value heads and FFN neurons (read from the weights)."""

    query_heads: int
    kv_heads: int
    ffn: int


def layer_widths(model: nn.Module) -> list[LayerWidths]:
    """The widths of every decoder layer, in order, read from the projections' shapes."""
    attentions, mlps = attention_modules(model), mlp_modules(model)
    return [
        LayerWidths(
            attention.q_proj.out_features // attention.head_dim,
            attention.k_proj.out_features // attention.head_dim,
            mlp.down_proj.in_features,
        )
        for (_, attention), (_, mlp) in zip(attentions, mlps, strict=True)
    ]


def sync_attention(model: nn.Module) -> None:
    """After query heads were removed from outside (Torch-Pruning): set each module's query-per-key/value ratio.

    The Llama attention reshapes with ``-1`` heads and repeats each key/value head ``num_key_value_groups`` times;
    that count is the one attribute the forward reads.
    """
    for _, attention in attention_modules(model):
        attention.num_key_value_groups = attention.q_proj.out_features // attention.k_proj.out_features
