"""Whole attention heads as prunable units: one layer ``<attention>:heads`` per attention module.

A head is one "neuron" of a :class:`PrunableLayer`: its slices are the head's output blocks in every projection that
produces it (q, k, v however they are stored, a position-bias column) and its ``head_dim`` channels at the input of
the out projection, where its activations are measured. Where heads are is found by :mod:`lightning_actprune._attention`
from the module structure and the model's own numbers, by probing the module alone, for every implementation alike
(timm, Hugging Face's families, your own); ``nn.MultiheadAttention``, whose q/k/v are one packed parameter that its
forward never calls as a layer, is the one implementation described here by hand. Scoring, planning, the zeroing check
and the surgery are those of any other layer; after the surgery the module's own head counts follow
(:func:`sync_head_counts`), so it still runs, generates with its key/value cache, saves and reloads.

Grouped-query attention has two units (``gqa_unit``): ``"query_heads"`` (default) removes query heads, the same number
from every key/value group (the layer's ``groups`` are the key/value heads, so ``num_key_value_groups`` stays whole);
``"kv_groups"`` removes a key/value head with all of its query heads. Heads whose position biases are passed from layer
to layer (T5: the first layer of a stack computes them for all) are coupled across those layers: head ``h`` goes from
every layer of the stack at once, with its column of the bias table.

How heads compete with FFN neurons under one λ or ``target_params_reduction``: a head's score is the statistic of
its channels at the out projection (``fluctuation``: Σ over its channels of variance × squared out-projection
column norm, FLAP's head fluctuation); with ``normalize`` (the default when the callback picks λ) every layer's
scores, the heads of one attention module included, are standardised within the layer, so a head and an FFN neuron
are compared by how far each stands below its own layer's typical unit. :func:`plan_for_reduction` removes units
lowest score first and counts each one's true parameter cost by sizing the pruned model (a head of a ``d``-wide
model takes about ``4·d·head_dim`` parameters with it, an FFN neuron about ``2·d``). At least ``min_neurons`` (≥ 1)
heads per module stay.

Implementations are recognised by their structure and attributes, never by importing timm or transformers.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_actprune._attention import (
    STATE,
    Call,
    HeadNumbers,
    HeadsSnapshot,
    HeadState,
    Layout,
    Site,
    capture,
    declares_heads,
    head_numbers,
    head_state,
    holder_of,
    innermost_holders,
    install_head_inputs,
    locate,
    probe,
    set_head_numbers,
)
from lightning_actprune._conv1d import Conv1D, out_in_weight
from lightning_actprune._errors import ActivationPruningError
from lightning_actprune._types import ModuleSlice, PrunableLayer, PruningPlan

HEADS_SUFFIX = ":heads"
"""The end of a head layer's name: ``blocks.0.attn:heads``."""

GQA_UNITS: tuple[str, ...] = ("query_heads", "kv_groups")
"""What one unit of a grouped-query attention module is: a query head, or a key/value head with its query heads."""


def _width(module: nn.Module) -> int:
    if isinstance(module, nn.MultiheadAttention):
        return int(module.get_parameter("in_proj_weight").shape[0])
    return int(out_in_weight(module).shape[0])


def known_limit(module: nn.Module) -> str | None:
    """Why an implementation known by its structure cannot lose heads one by one, said before any probe; or ``None``.

    timm's ``scale_norm`` normalises the heads together before the out projection; GPT-2's cross-attention is kept
    whole (its heads are not removed: only GPT-2's self-attention loses heads).
    """
    norm = getattr(module, "norm", None)
    if type(module).__module__.startswith("timm.") and norm is not None and not isinstance(norm, nn.Identity):
        return f"its {type(norm).__name__} (scale_norm) normalises over all heads together."
    if isinstance(getattr(module, "c_attn", None), Conv1D) and (
        getattr(module, "is_cross_attention", False) or hasattr(module, "q_attn")
    ):
        return "it is cross-attention (q_attn, k/v from the encoder): only GPT-2's self-attention loses heads."
    return None


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


class TorchMultiheadAttention:
    """``torch.nn.MultiheadAttention`` with a packed ``in_proj_weight``; pruned, it becomes the class below.

    That class is :class:`PrunedMultiheadAttention`: same parameters, a forward that allows fewer heads.
    """

    def matches(self, module: nn.Module) -> bool:
        """Whether ``module`` is one (pruned or not)."""
        return type(module) in (nn.MultiheadAttention, PrunedMultiheadAttention)

    def out_projection(self, module: nn.Module) -> str:
        """Its out projection, relative to it."""
        return "out_proj"

    def head_dim(self, module: nn.Module) -> int:
        """Channels per head."""
        return int(module.head_dim)  # type: ignore[arg-type]

    def unsupported(self, module: nn.Module) -> str | None:
        """Why its heads cannot be removed one by one, or ``None``."""
        if getattr(module, "in_proj_weight", None) is None:
            return "its key/value widths differ from the query's (kdim/vdim): separate projections are not supported."
        if getattr(module, "bias_k", None) is not None or getattr(module, "add_zero_attn", False):
            return "it adds bias_k/bias_v or a zero attention row, which head pruning does not support."
        return None

    def sync(self, module: nn.Module) -> None:
        """Become a :class:`PrunedMultiheadAttention` whose head count follows the packed projection."""
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


def _joined(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


def _torch_attention(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    adapter = TorchMultiheadAttention()
    for name, module in model.named_modules():
        if adapter.matches(module):
            yield name, module


def projection_owners(model: nn.Module) -> dict[str, str]:
    """The packed q/k/v "projection" of every ``nn.MultiheadAttention``: the module itself, by its name.

    Its q/k/v are not layers of their own; every other implementation's projections are ``Linear`` layers, found by
    :func:`find_heads`.
    """
    return {name: name for name, _ in _torch_attention(model)}


def _torch_head_layer(name: str, module: nn.Module) -> PrunableLayer | str:
    """The heads of one ``nn.MultiheadAttention``, or why they cannot be pruned."""
    adapter = TorchMultiheadAttention()
    reason = adapter.unsupported(module)
    if reason is not None:
        return reason
    head_dim = adapter.head_dim(module)
    out_name = adapter.out_projection(module)
    inner = int(out_in_weight(module.get_submodule(out_name)).shape[1])
    heads = inner // head_dim
    channels = range(inner)
    owner = [c // head_dim for c in channels]
    if _width(module) != 3 * inner:
        return f"its packed in_proj_weight has {_width(module)} rows, not 3 × {inner}."
    indices = tuple(b * inner + c for b in range(3) for c in channels)
    slices = (
        ModuleSlice(name, "out", indices, tuple(owner * 3)),
        ModuleSlice(_joined(name, out_name), "in", tuple(channels), tuple(owner)),
    )
    return PrunableLayer(name=name + HEADS_SUFFIX, neurons=heads, producers=(name,), slices=slices)


# --- finding the heads of a model ------------------------------------------------------------------------------------


class HeadSearch(NamedTuple):
    """What :func:`find_heads` found under one traced module.

    Attributes:
        layers: one head layer per attention module (or per set of modules whose heads are coupled).
        skipped: ``(what, why)`` for every attention module whose heads stay.
        owners: every projection of a located attention module (what makes its heads), mapped to the module's name.
    """

    layers: list[PrunableLayer]
    skipped: list[tuple[str, str]]
    owners: dict[str, str]


def _parents(root: nn.Module) -> dict[nn.Module, nn.Module]:
    return {child: module for module in root.modules() for child in module.children()}


def find_heads(
    model: nn.Module,
    root: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    names: Mapping[nn.Module, str],
    probe_heads: bool = True,
    gqa_unit: str = "query_heads",
) -> HeadSearch:
    """Every attention module under ``root``: its projections, and its head layer or why it has none.

    ``root`` runs once on ``args``/``kwargs`` (its first call of each attention module is kept), then each attention
    module runs alone, once per probed block (:mod:`lightning_actprune._attention`). Without ``probe_heads`` only the
    modules and their projections are located (for the hints of ``prune_heads=False``).
    """
    search = HeadSearch([], [], {})
    for _name, module in _torch_attention(root):
        search.owners[names[module]] = names[module]
        if probe_heads:
            layer = _torch_head_layer(names[module], module)
            if isinstance(layer, str):
                search.skipped.append((f"the heads of {names[module]}", layer))
            else:
                search.layers.append(layer)
    holders = [m for _, m in innermost_holders(root)]
    if not holders:
        return search
    captured = capture(root, args, kwargs, holders)
    sites = {holder: _located(names, holder, [holder], captured.calls) for holder in holders}
    # BERT-style: the declaring module (`self`) holds no out projection; its parent (`output.dense`) does
    parents = _parents(root)
    declaring = {id(m) for m in holders}
    around = {
        holder: parents[holder]
        for holder, site in sites.items()
        if isinstance(site, str)
        and holder in parents
        and not any(id(c) in declaring for c in parents[holder].modules() if c is not holder)
    }
    if around:
        calls = capture(root, args, kwargs, list(around.values())).calls
        for holder, parent in around.items():
            sites[holder] = _located(names, holder, [parent], {**captured.calls, **calls}, str(sites[holder]))
            captured.calls[parent] = calls[parent]
    layouts: dict[str, Layout | str] = {}
    module_of: dict[nn.Module, str] = {}  # declaring module -> attention module name
    for holder, site in sites.items():
        label = site.module if isinstance(site, Site) else names[holder]
        module_of[holder] = label
        if isinstance(site, Site):
            search.owners.update(dict.fromkeys(site.producers, site.module))
        if not probe_heads:
            continue
        limit = known_limit(holder)
        if isinstance(site, Site) and limit is None:
            limit = _shared_weights(model, site)
        if limit is not None or isinstance(site, str):
            layouts[label] = limit or str(site)
            continue
        call = captured.calls.pop(model.get_submodule(site.module))  # its arguments are not needed after its probe
        try:
            layouts[label] = probe(model, site, call)
        except Exception as error:
            layouts[label] = _failure("probing its heads", error)
    if probe_heads:
        for members in _coupled(layouts, captured.ties, module_of):
            layer = head_layer([layouts[m] for m in members], gqa_unit, members)
            if isinstance(layer, str):
                search.skipped.append((", ".join(f"the heads of {m}" for m in members), layer))
            else:
                search.layers.append(layer)
    return search


def _located(
    names: Mapping[nn.Module, str],
    holder: nn.Module,
    candidates: Sequence[nn.Module],
    calls: Mapping[nn.Module, Call],
    otherwise: str | None = None,
) -> Site | str:
    """The site around ``holder`` in the first of ``candidates`` that holds its out projection, or why none does."""
    try:
        site = locate(names[holder], holder, [(names[m], m) for m in candidates], calls)
    except Exception as error:  # one module that cannot be located must not stop the others
        return _failure("locating its out projection", error)
    return site if isinstance(site, Site) or otherwise is None else otherwise


def _shared_weights(model: nn.Module, site: Site) -> str | None:
    """Why the site's projections cannot shrink alone: one shares a parameter with another module; or ``None``."""
    holders: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for parameter in module.parameters(recurse=False):
            holders.setdefault(id(parameter), []).append(name)
    for name in (*site.producers, site.out_projection):
        for key, parameter in model.get_submodule(name).named_parameters(recurse=False):
            others = [other for other in holders[id(parameter)] if other != name]
            if others:
                return f"its {name}.{key} is shared with {others[0]} (tied weights), which would lose rows with it."
    return None


def _failure(step: str, error: Exception) -> str:
    message = " ".join(str(error).split())
    return f"{step} failed: {type(error).__name__}: {message[:119] + '…' if len(message) > 120 else message}"


def _coupled(
    layouts: Mapping[str, Layout | str], ties: Sequence[tuple[nn.Module, nn.Module]], module_of: Mapping[nn.Module, str]
) -> list[list[str]]:
    """The attention modules in sets whose heads go together: those that pass per-head biases on are one set."""
    root = {name: name for name in layouts}

    def find(name: str) -> str:
        while root[name] != name:
            root[name] = root[root[name]]
            name = root[name]
        return name

    for a, b in ties:
        first, second = module_of.get(a), module_of.get(b)
        if first in root and second in root:
            root[find(second)] = find(first)
    sets: dict[str, list[str]] = {}
    for name in layouts:
        sets.setdefault(find(name), []).append(name)
    return list(sets.values())


def head_layer(layouts: Sequence[Layout | str], gqa_unit: str, members: Sequence[str]) -> PrunableLayer | str:
    """The head layer of one attention module, or of modules whose heads are coupled; or why there is none.

    Args:
        layouts: each module's probed layout, or why it has none.
        gqa_unit: ``"query_heads"`` or ``"kv_groups"`` (see the module's documentation).
        members: the modules' names.
    """
    reasons = [(m, x) for m, x in zip(members, layouts, strict=True) if isinstance(x, str)]
    if reasons:
        if len(members) == 1:
            return reasons[0][1]
        others = [m for m in members if m != reasons[0][0]]
        return (
            f"its heads share position biases with {_short(others)} (passed from layer to layer), and"
            f" {reasons[0][0]}'s heads cannot go: {reasons[0][1]}"
        )
    found = [x for x in layouts if not isinstance(x, str)]
    numbers = {x.site.numbers for x in found}
    if len(numbers) > 1:
        return f"its heads share position biases with {_short(members[1:])}, which has other head counts."
    heads, kv_heads, head_dim = found[0].site.numbers
    head_dim = int(head_dim or 0)
    size = heads // kv_heads
    by_groups = gqa_unit == "kv_groups" and kv_heads < heads
    if by_groups and kv_heads == 1:
        return (
            "it has one key/value head (multi-query attention): no key/value group can go with"
            " `gqa_unit='kv_groups'`; `gqa_unit='query_heads'` removes its query heads."
        )

    def unit(head: int) -> int:
        return head // size if by_groups else head

    slices = []
    producers: list[str] = []
    for layout in found:
        pieces: dict[str, tuple[list[int], list[int]]] = {}
        for block in layout.blocks:
            units = {unit(h) for h in block.heads}
            if len(units) != 1 or (not by_groups and len(block.heads) != 1):
                continue  # a key/value block (query-head unit) or one shared by groups: it stays while they do
            indices, neurons = pieces.setdefault(block.module, ([], []))
            indices.extend(range(block.start, block.stop))
            neurons.extend([units.pop()] * (block.stop - block.start))
        for module, (indices, neurons) in pieces.items():
            slices.append(ModuleSlice(module, "out", tuple(indices), tuple(neurons)))
            producers.append(module)
        channels = range(heads * head_dim)
        owner = tuple(unit(c // head_dim) for c in channels)
        slices.append(ModuleSlice(layout.site.out_projection, "in", tuple(channels), owner))
    groups = kv_heads if not by_groups and 1 < kv_heads < heads else 1
    return PrunableLayer(
        name="+".join(members) + HEADS_SUFFIX,
        neurons=kv_heads if by_groups else heads,
        producers=tuple(producers),
        slices=tuple(slices),
        groups=groups,
    )


def _short(names: Sequence[str]) -> str:
    return names[0] if len(names) == 1 else f"{names[0]} and {len(names) - 1} more"


# --- after the surgery -----------------------------------------------------------------------------------------------


def attribute_holders(model: nn.Module, touched: Iterable[str]) -> list[str]:
    """The modules whose head counts a surgery on the ``touched`` modules may change (to snapshot them first)."""
    holders = []
    adapter = TorchMultiheadAttention()
    modules = dict(model.named_modules(remove_duplicate=False))  # a shared module under every name
    seen: dict[str, bool] = {}
    for name in touched:
        module = modules.get(name)
        if module is None:  # the caller says which module is missing
            continue
        if adapter.matches(module):
            holders.append(name)
            continue
        holder = holder_of(name, model, modules, seen)
        if holder is not None:
            holders.append(holder)
    return list(dict.fromkeys(holders))


def _declaring(model: nn.Module, name: str) -> nn.Module:
    """The module that declares the heads of attention module ``name``: itself, or the one inside it that does."""
    module = model.get_submodule(name)
    if declares_heads(module):
        return module
    inside = [m for m in module.modules() if declares_heads(m)]
    if len(inside) != 1:
        raise ActivationPruningError(
            f"{name} declares no head count of its own and holds {len(inside)} modules that do."
        )
    return inside[0]


def _kept_heads(name: str, numbers: HeadNumbers, neurons: int, kept: Sequence[int]) -> tuple[tuple[int, ...], int]:
    """The query heads a head layer's plan keeps, and the key/value heads that stay."""
    heads, kv_heads, _ = numbers
    if neurons == heads:  # query heads are the units; key/value heads stay unless they are the same heads
        return tuple(kept), kv_heads if kv_heads < heads else len(kept)
    if neurons == kv_heads:  # key/value groups are the units
        size = heads // kv_heads
        return tuple(g * size + i for g in kept for i in range(size)), len(kept)
    raise ActivationPruningError(
        f"the plan's heads of {name} number {neurons}; it has {heads} heads and {kv_heads} key/value heads."
    )


def sync_head_counts(model: nn.Module, plan: PruningPlan) -> None:
    """After a surgery: every attention module whose heads the plan removes takes its new head counts.

    Its attributes that hold the counts follow (:func:`~lightning_actprune._attention.set_head_numbers`), it remembers
    its counts as built and the heads that stay, and inputs with one slice per head are cut to those heads when it is
    called (:class:`~lightning_actprune._attention.HeadInputs`).
    """
    adapter = TorchMultiheadAttention()
    for layer in plan.layers:
        if not layer.name.endswith(HEADS_SUFFIX) or len(layer.kept) == layer.neurons:
            continue
        for name in layer.name[: -len(HEADS_SUFFIX)].split("+"):
            module = model.get_submodule(name)
            if adapter.matches(module):
                adapter.sync(module)
                continue
            holder = _declaring(model, name)
            numbers = head_numbers(holder)
            if numbers is None:
                raise ActivationPruningError(f"{name} no longer says how many heads it has.")
            kept, kv_heads = _kept_heads(layer.name, numbers, layer.neurons, layer.kept)
            state = head_state(holder) or HeadState(numbers.heads, numbers.kv_heads, tuple(range(numbers.heads)))
            set_head_numbers(holder, numbers, len(kept), kv_heads)
            vars(holder)[STATE] = state._replace(kept=tuple(state.kept[h] for h in kept))
            install_head_inputs(holder)


def heads_snapshot(module: nn.Module) -> HeadsSnapshot:
    """What the head surgery adds to ``module`` beyond its public attributes (restored with them on failure)."""
    return HeadsSnapshot(module)


class HeadCounts(NamedTuple):
    """The heads of one attention module now and as it was built.

    Attributes:
        heads: query heads now.
        kv_heads: key/value heads now.
        head_dim: channels per head (pruning never changes it).
        heads_before: query heads as built.
        kv_heads_before: key/value heads as built.
    """

    heads: int
    kv_heads: int
    head_dim: int
    heads_before: int
    kv_heads_before: int

    @property
    def pruned(self) -> bool:
        """Whether the module lost heads."""
        return self.heads != self.heads_before


def head_counts(model: nn.Module) -> dict[str, HeadCounts]:
    """Every attention module's head counts, now and as built, by the name of the module that declares them.

    What writing a Hugging Face ``config`` per layer needs (``num_attention_heads``, ``num_key_value_heads``,
    ``head_dim``): plain ints. Modules that say nothing of their head width are left out.

    Example:
        >>> import torch
        >>> head_counts(torch.nn.MultiheadAttention(8, 2))
        {'': HeadCounts(heads=2, kv_heads=2, head_dim=4, heads_before=2, kv_heads_before=2)}
    """
    counts = {}
    for name, module in _torch_attention(model):
        heads, head_dim = int(module.num_heads), int(module.head_dim)  # type: ignore[arg-type]
        before = int(module.embed_dim) // head_dim  # type: ignore[arg-type]
        counts[name] = HeadCounts(heads, heads, head_dim, before, before)
    for name, holder in innermost_holders(model):
        numbers = head_numbers(holder)
        if numbers is None or numbers.head_dim is None:
            continue
        state = head_state(holder)
        original = (state.heads, state.kv_heads) if state is not None else (numbers.heads, numbers.kv_heads)
        counts[name] = HeadCounts(numbers.heads, numbers.kv_heads, numbers.head_dim, *original)
    return counts
