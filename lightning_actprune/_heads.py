"""Whole attention heads as prunable units: where each attention implementation keeps its heads.

A head is one "neuron" of a :class:`PrunableLayer` named ``<attention>:heads``: its slices are the head's
``head_dim`` output channels in every projection that produces them (each of q, k, v, however they are stored) and
the same channels at the input of the out projection, where its activations are measured. Scoring, planning, the
zeroing check and the surgery are then those of any other layer; after the surgery the attention module's own
head-count attributes are set from its projections' new width, so it still runs, saves and exports.

How heads compete with FFN neurons under one λ or ``target_params_reduction``: a head's score is the statistic of
its channels at the out projection (``fluctuation``: Σ over its channels of variance × squared out-projection
column norm, FLAP's head fluctuation); with ``normalize`` (the default when the callback picks λ) every layer's
scores, the heads of one attention module included, are standardised within the layer, so a head and an FFN neuron
are compared by how far each stands below its own layer's typical unit. :func:`plan_for_reduction` removes units
lowest score first and counts each one's true parameter cost by sizing the pruned model (a head of a ``d``-wide
model takes about ``4·d·head_dim`` parameters with it, an FFN neuron about ``2·d``). At least ``min_neurons`` (≥ 1)
heads per module stay.

Implementations are recognised by their class's module and attributes, never by importing timm or transformers.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_actprune._conv1d import Conv1D, out_in_weight
from lightning_actprune._types import ModuleSlice, PrunableLayer

HEADS_SUFFIX = ":heads"
"""The end of a head layer's name: ``blocks.0.attn:heads``."""


class Projection(NamedTuple):
    """A module that produces every head's channels: ``blocks`` stacked copies (3 for a fused q/k/v)."""

    module: str
    blocks: int


class AttentionAdapter:
    """Where one attention implementation keeps its heads; module names are relative to the attention module."""

    kind = ""

    def matches(self, module: nn.Module) -> bool:
        """Whether ``module`` is an attention module of this implementation."""
        raise NotImplementedError

    def projections(self, module: nn.Module) -> tuple[Projection, ...]:
        """The modules that produce the heads' channels (q, k, v, a gate)."""
        raise NotImplementedError

    def out_projection(self, module: nn.Module) -> str:
        """The module that reads the concatenated heads."""
        raise NotImplementedError

    def head_dim(self, module: nn.Module) -> int:
        """Channels per head: the module's ``head_dim`` unless the implementation keeps it elsewhere."""
        return int(module.head_dim)  # type: ignore[arg-type]

    def holders(self, module: nn.Module) -> tuple[str, ...]:
        """The modules whose attributes :meth:`sync` changes (``""``: the attention module itself)."""
        return ("",)

    def unsupported(self, module: nn.Module) -> str | None:
        """Why this module's heads cannot be removed one by one, or ``None``."""
        return None

    def sync(self, module: nn.Module) -> None:
        """Set the module's head-count attributes from its (pruned) projections."""
        raise NotImplementedError


def _width(module: nn.Module) -> int:
    if isinstance(module, nn.MultiheadAttention):
        return int(module.get_parameter("in_proj_weight").shape[0])
    return int(out_in_weight(module).shape[0])


class TimmAttention(AttentionAdapter):
    """timm's ``Attention`` (ViT, DeiT, …): one fused ``qkv`` Linear, ``proj``; ``num_heads``, ``attn_dim``."""

    kind = "timm"

    def matches(self, module: nn.Module) -> bool:
        return (
            type(module).__module__.startswith("timm.")
            and isinstance(getattr(module, "qkv", None), nn.Linear)
            and isinstance(getattr(module, "proj", None), nn.Linear)
            and isinstance(getattr(module, "num_heads", None), int)
            and isinstance(getattr(module, "head_dim", None), int)
        )

    def projections(self, module: nn.Module) -> tuple[Projection, ...]:
        gate = (Projection("gate", 1),) if isinstance(getattr(module, "gate", None), nn.Linear) else ()
        return (Projection("qkv", 3), *gate)

    def out_projection(self, module: nn.Module) -> str:
        return "proj"

    def head_dim(self, module: nn.Module) -> int:
        return int(module.head_dim)  # type: ignore[arg-type]

    def unsupported(self, module: nn.Module) -> str | None:
        norm = getattr(module, "norm", None)
        if norm is not None and not isinstance(norm, nn.Identity):
            return f"its {type(norm).__name__} (scale_norm) normalises over all heads together."
        return None

    def sync(self, module: nn.Module) -> None:
        heads = _width(module.get_submodule("qkv")) // (3 * self.head_dim(module))
        module.__dict__["num_heads"] = heads  # plain attributes: not parameters, buffers or submodules
        if hasattr(module, "attn_dim"):
            module.__dict__["attn_dim"] = heads * self.head_dim(module)


class BertAttention(AttentionAdapter):
    """Hugging Face BERT-style attention (BERT, RoBERTa, …): ``self.query/key/value``, ``output.dense``.

    ``self`` holds ``num_attention_heads`` and ``all_head_size``.
    """

    kind = "bert"

    def matches(self, module: nn.Module) -> bool:
        inner = getattr(module, "self", None)
        output = getattr(module, "output", None)
        return (
            type(module).__module__.startswith("transformers.")
            and isinstance(inner, nn.Module)
            and all(isinstance(getattr(inner, n, None), nn.Linear) for n in ("query", "key", "value"))
            and isinstance(getattr(inner, "attention_head_size", None), int)
            and isinstance(getattr(output, "dense", None), nn.Linear)
        )

    def projections(self, module: nn.Module) -> tuple[Projection, ...]:
        return tuple(Projection(f"self.{n}", 1) for n in ("query", "key", "value"))

    def out_projection(self, module: nn.Module) -> str:
        return "output.dense"

    def head_dim(self, module: nn.Module) -> int:
        return int(module.get_submodule("self").attention_head_size)  # type: ignore[arg-type]

    def holders(self, module: nn.Module) -> tuple[str, ...]:
        return ("self",)

    def sync(self, module: nn.Module) -> None:
        inner = module.get_submodule("self")
        width = _width(inner.get_submodule("query"))
        inner.__dict__.update(num_attention_heads=width // self.head_dim(module), all_head_size=width)


class GPT2Attention(AttentionAdapter):
    """Hugging Face GPT-2's ``GPT2Attention``: one fused ``c_attn`` ``Conv1D`` (q, k, v), ``c_proj``.

    Its forward splits ``c_attn``'s output every ``split_size`` features and views each part as ``head_dim``-wide
    heads, so after the surgery ``split_size`` (and ``num_heads``) follow the heads that stay; ``embed_dim`` is the
    residual stream's width and does not change. The key/value cache stores each layer's heads as they come.
    """

    kind = "gpt2"

    def matches(self, module: nn.Module) -> bool:
        return (
            type(module).__module__.startswith("transformers.")
            and isinstance(getattr(module, "c_attn", None), Conv1D)
            and isinstance(getattr(module, "c_proj", None), Conv1D)
            and all(isinstance(getattr(module, n, None), int) for n in ("num_heads", "head_dim", "split_size"))
        )

    def projections(self, module: nn.Module) -> tuple[Projection, ...]:
        return (Projection("c_attn", 3),)

    def out_projection(self, module: nn.Module) -> str:
        return "c_proj"

    def unsupported(self, module: nn.Module) -> str | None:
        if getattr(module, "is_cross_attention", False) or hasattr(module, "q_attn"):
            return "it is cross-attention (q_attn, k/v from the encoder): only GPT-2's self-attention loses heads."
        return None

    def sync(self, module: nn.Module) -> None:
        heads = _width(module.get_submodule("c_attn")) // (3 * self.head_dim(module))
        module.__dict__.update(num_heads=heads, split_size=heads * self.head_dim(module))


class PrunedMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose heads may be fewer than ``embed_dim // head_dim``; the same ``state_dict`` keys.

    Its forward computes the attention explicitly (``F.multi_head_attention_forward`` derives the head width from
    ``embed_dim``) and calls ``out_proj`` as a module, so the heads' activations can be measured there. A pruned
    ``nn.MultiheadAttention`` becomes one; ``embed_dim`` (the model's width) stays, ``num_heads`` shrinks.
    """

    @property
    def _qkv_same_embed_dim(self) -> bool:
        # False keeps nn.Transformer*Layer off their fused fast path, which assumes `embed_dim`-wide heads and
        # would not call this forward
        return False

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """Like :meth:`nn.MultiheadAttention.forward` (``is_causal`` is a hint: ``attn_mask`` holds the mask)."""
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            key_padding_mask = key_padding_mask.unsqueeze(0) if key_padding_mask is not None else None
        elif self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        targets, batch, _ = query.shape
        sources = key.shape[0]
        weights = self.get_parameter("in_proj_weight").chunk(3)
        biases = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
        q, k, v = (
            F.linear(x, w, b).reshape(x.shape[0], batch * self.num_heads, self.head_dim).transpose(0, 1)
            for x, w, b in zip((query, key, value), weights, biases, strict=True)
        )
        scores = torch.bmm(q * self.head_dim**-0.5, k.transpose(1, 2))  # (batch * heads, targets, sources)
        for mask in (attn_mask, _per_head(key_padding_mask, self.num_heads)):
            if mask is not None:
                scores = scores + _additive(mask, scores.dtype)
        attention = scores.softmax(dim=-1)
        context = torch.bmm(F.dropout(attention, self.dropout, self.training), v)
        output = self.out_proj(context.transpose(0, 1).reshape(targets, batch, self.num_heads * self.head_dim))
        output = output.squeeze(1) if unbatched else output.transpose(0, 1) if self.batch_first else output
        if not need_weights:
            return output, None
        per_head = attention.view(batch, self.num_heads, targets, sources)
        returned = per_head.mean(dim=1) if average_attn_weights else per_head
        return output, returned.squeeze(0) if unbatched else returned


def _per_head(key_padding_mask: Tensor | None, heads: int) -> Tensor | None:
    """``(batch, sources)`` as ``(batch * heads, 1, sources)``, the layout of the scores."""
    if key_padding_mask is None:
        return None
    batch, sources = key_padding_mask.shape
    return key_padding_mask.view(batch, 1, 1, sources).expand(batch, heads, 1, sources).reshape(-1, 1, sources)


def _additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A boolean mask (``True``: not attended) as ``-inf`` where it is set; a float mask as it is."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


class TorchMultiheadAttention(AttentionAdapter):
    """``torch.nn.MultiheadAttention`` with a packed ``in_proj_weight``; pruned, it becomes the class below.

    That class is :class:`PrunedMultiheadAttention`: same parameters, a forward that allows fewer heads.
    """

    kind = "torch"

    def matches(self, module: nn.Module) -> bool:
        return type(module) in (nn.MultiheadAttention, PrunedMultiheadAttention)

    def projections(self, module: nn.Module) -> tuple[Projection, ...]:
        return (Projection("", 3),)

    def out_projection(self, module: nn.Module) -> str:
        return "out_proj"

    def head_dim(self, module: nn.Module) -> int:
        return int(module.head_dim)  # type: ignore[arg-type]

    def unsupported(self, module: nn.Module) -> str | None:
        if getattr(module, "in_proj_weight", None) is None:
            return "its key/value widths differ from the query's (kdim/vdim): separate projections are not supported."
        if getattr(module, "bias_k", None) is not None or getattr(module, "add_zero_attn", False):
            return "it adds bias_k/bias_v or a zero attention row, which head pruning does not support."
        return None

    def sync(self, module: nn.Module) -> None:
        module.__class__ = PrunedMultiheadAttention
        module.__dict__["num_heads"] = _width(module) // (3 * self.head_dim(module))


class _InProjectionPruner:
    """Removes rows of a ``nn.MultiheadAttention``'s packed ``in_proj_weight``/``in_proj_bias`` (its "outputs")."""

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        removed = set(idxs)
        keep = torch.tensor([i for i in range(_width(layer)) if i not in removed], dtype=torch.long)
        for name in ("in_proj_weight", "in_proj_bias"):
            old = getattr(layer, name)
            if old is not None:
                kept = old.detach()[keep.to(old.device)].clone()
                setattr(layer, name, nn.Parameter(kept, requires_grad=old.requires_grad))
        return layer

    def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        raise NotImplementedError("the embedding width of nn.MultiheadAttention is not pruned")

    def get_out_channels(self, layer: nn.Module) -> int:
        return _width(layer)

    def get_in_channels(self, layer: nn.Module) -> int | None:
        return None


def head_pruner(module: nn.Module) -> Any:
    """The surgery for a module that only head pruning shrinks (a packed q/k/v parameter), or ``None``."""
    return _InProjectionPruner() if TorchMultiheadAttention().matches(module) else None


@contextmanager
def measurable_attention(model: nn.Module) -> Iterator[None]:
    """Inside, every ``nn.MultiheadAttention`` calls its ``out_proj`` as a module, where heads are measured.

    ``nn.MultiheadAttention`` reads ``out_proj.weight`` without calling the layer; :class:`PrunedMultiheadAttention`
    computes the same outputs and calls it.
    """
    adapter = TorchMultiheadAttention()
    swapped = [
        m
        for m in model.modules()
        if m in _measuring or (type(m) is nn.MultiheadAttention and adapter.unsupported(m) is None)
    ]
    for module in swapped:  # contexts may nest and end in any order: the last one out restores the class
        module.__class__ = PrunedMultiheadAttention
        _measuring[module] = _measuring.get(module, 0) + 1
    try:
        yield
    finally:
        for module in swapped:
            _measuring[module] -= 1
            if not _measuring[module]:
                del _measuring[module]
                if _width(module) == 3 * int(module.embed_dim):  # type: ignore[arg-type]  # pruned meanwhile: stays so
                    module.__class__ = nn.MultiheadAttention


_measuring: weakref.WeakKeyDictionary[nn.Module, int] = weakref.WeakKeyDictionary()
"""The ``nn.MultiheadAttention`` modules :func:`measurable_attention` has swapped, with how many contexts hold them."""


ADAPTERS: tuple[AttentionAdapter, ...] = (
    TimmAttention(),
    BertAttention(),
    GPT2Attention(),
    TorchMultiheadAttention(),
)
"""The attention implementations whose heads can be pruned, tried in this order."""


def adapter_for(module: nn.Module) -> AttentionAdapter | None:
    """The adapter that knows ``module``'s attention implementation, or ``None``."""
    return next((a for a in ADAPTERS if a.matches(module)), None)


def _joined(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


def attention_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module, AttentionAdapter]]:
    """Every attention module of ``model`` that an adapter knows, with its name and adapter."""
    for name, module in model.named_modules():
        adapter = adapter_for(module)
        if adapter is not None:
            yield name, module, adapter


def projection_owners(model: nn.Module) -> dict[str, str]:
    """The name of every q/k/v projection of a known attention module, mapped to that module's name."""
    return {
        _joined(name, projection.module): name
        for name, module, adapter in attention_modules(model)
        for projection in adapter.projections(module)
    }


def head_layer(name: str, module: nn.Module, adapter: AttentionAdapter) -> PrunableLayer | str:
    """The heads of one attention module as a :class:`PrunableLayer`, or why they cannot be pruned."""
    reason = adapter.unsupported(module)
    if reason is not None:
        return reason
    head_dim = adapter.head_dim(module)
    out_name = adapter.out_projection(module)
    out = module.get_submodule(out_name)
    inner = int(out_in_weight(out).shape[1])
    heads = inner // head_dim
    if head_dim <= 0 or heads * head_dim != inner:
        return f"its out projection reads {inner} features, not a whole number of {head_dim}-channel heads."
    channels = range(inner)
    owner = [c // head_dim for c in channels]
    slices = []
    for projection in adapter.projections(module):
        width = _width(module.get_submodule(projection.module))
        if width != projection.blocks * inner:
            return f"{projection.module} outputs {width} features, not {projection.blocks} × {inner}."
        indices = tuple(b * inner + c for b in range(projection.blocks) for c in channels)
        slices.append(ModuleSlice(_joined(name, projection.module), "out", indices, tuple(owner * projection.blocks)))
    slices.append(ModuleSlice(_joined(name, out_name), "in", tuple(channels), tuple(owner)))
    producers = tuple(_joined(name, p.module) for p in adapter.projections(module))
    return PrunableLayer(name=name + HEADS_SUFFIX, neurons=heads, producers=producers, slices=tuple(slices))


def head_layers(root: nn.Module, names: Mapping[nn.Module, str]) -> Iterator[tuple[str, PrunableLayer | str]]:
    """Every known attention module under ``root``: its model name, and its head layer or why there is none."""
    for module in root.modules():
        adapter = adapter_for(module)
        if adapter is not None:
            yield names[module], head_layer(names[module], module, adapter)


def _touched_attention(model: nn.Module, touched: Iterable[str]) -> Iterator[tuple[str, nn.Module, AttentionAdapter]]:
    touched = set(touched)
    for name, module, adapter in attention_modules(model):
        if any(_joined(name, p.module) in touched for p in adapter.projections(module)):
            yield name, module, adapter


def attribute_holders(model: nn.Module, touched: Iterable[str]) -> list[str]:
    """The modules whose head-count attributes a surgery on the ``touched`` modules changes."""
    return [
        _joined(name, h)
        for name, module, adapter in _touched_attention(model, touched)
        for h in adapter.holders(module)
    ]


def sync_head_counts(model: nn.Module, touched: Iterable[str]) -> None:
    """After a surgery: every attention module whose projections were touched takes its new head count."""
    for _, module, adapter in _touched_attention(model, touched):
        adapter.sync(module)
