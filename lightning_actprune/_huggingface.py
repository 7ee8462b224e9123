"""Hugging Face models after pruning: a config that builds them, and ``save_pretrained`` → ``from_pretrained``.

A Hugging Face ``PreTrainedModel`` is rebuilt from its config by ``from_pretrained`` before the weights are loaded, so
a pruned model loads only if its config states the new widths. Three pieces keep that true:

- **The config in step** (:func:`sync_pretrained_configs`, run by :class:`ActivationPruning` after every prune and by
  the loaders of pruned checkpoints). Each concern has its own function: hidden widths (:data:`WIDTH_FIELDS`:
  ``intermediate_size``, ``ffn_dim``, ``d_ff``, ``n_inner``, …, scalars or per-layer lists) and attention heads
  (:data:`HEAD_FIELDS`, :data:`KV_HEAD_FIELDS`, with ``head_dim`` made explicit). Which parameters a field governs is
  not written down per family: the model's class is built on the ``meta`` device (no memory, no weights) with the
  field at two values, and the parameters whose shapes move are the ones it governs. A field is given the value
  that rebuilds the pruned shapes; the changed config is checked by building it once more and comparing every
  shape. A width the config cannot hold (layers of one field pruned to different widths, a BERT pooler, heads of
  a family that derives ``head_dim`` from ``hidden_size // num_attention_heads``) is left as it was and reported.
- **Equal widths where a config needs them** (:func:`uniform_ties`, for ``uniform_widths=True``): the layers of one
  role in every block, and the layers one config field governs, keep the same number of neurons.
- **A form ``from_pretrained`` always loads** (:func:`save_pretrained`): when the config cannot hold the widths,
  the weights are written zero-padded to widths it holds (the widest layer of each field; a layer no field sets,
  and attention heads, back to their width before pruning): zeros put back at removed neurons' own positions, in
  the producing rows and the consuming columns, so every padded neuron or head adds exactly nothing and the stock
  class gives the pruned model's outputs. A small file beside them, ``actprune_padding.json``, lists the padding;
  :func:`from_pretrained` removes it again, so the model comes back at its real widths.

Attention heads plug in through :class:`HeadShape` and :func:`head_shapes` (from :func:`._heads.head_counts`).

``transformers`` is never imported: its models are recognised by their ``config`` and their class's module.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import re
import warnings
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from lightning_actprune._conv1d import Conv1D
from lightning_actprune._errors import ActivationPruningError
from lightning_actprune._heads import head_counts
from lightning_actprune._module_plan import _relative, _remember, pruning_plan_of
from lightning_actprune._surgery import apply_plan
from lightning_actprune._types import LayerPlan, ModulePruning, PrunableLayer, PruningPlan

PADDING_FILE = "actprune_padding.json"
"""Beside a zero-padded ``save_pretrained`` directory: the padding :func:`from_pretrained` removes."""

WIDTH_FIELDS = (
    "intermediate_size",
    "ffn_dim",
    "encoder_ffn_dim",
    "decoder_ffn_dim",
    "d_ff",
    "n_inner",
    "d_inner",
    "dff",
    "hidden_dim",
    "ffn_hidden_size",
    "feed_forward_size",
    "shared_expert_intermediate_size",
    "laurel_rank",
)
"""Config fields that may hold the width of a hidden (feed-forward) layer; which layers each governs is measured."""

HEAD_FIELDS = (
    "num_attention_heads",
    "n_head",
    "num_heads",
    "n_heads",
    "encoder_attention_heads",
    "decoder_attention_heads",
)
"""Config fields that may hold a number of query heads."""

KV_HEAD_FIELDS = ("num_key_value_heads", "num_kv_heads", "n_head_kv", "multi_query_group_num")
"""Config fields that may hold a number of key/value heads (grouped-query attention)."""

HEAD_DIM_FIELDS = ("head_dim", "d_kv", "kv_channels")
"""Config fields that may hold the channels per head; ``head_dim`` is set where a config has none of them."""

_ORIGINAL_CONFIG = "_actprune_original_config"  # the config before this package first changed it
_DIGITS = re.compile(r"(^|[.+])\d+(?=$|[.:+])")


# ---- recognising Hugging Face models --------------------------------------------------------------------------


def is_pretrained_model(module: nn.Module) -> bool:
    """Whether ``module`` is a Hugging Face ``PreTrainedModel`` (recognised by structure, nothing imported)."""
    config = getattr(module, "config", None)
    return (
        type(module).__module__.startswith("transformers.")
        and callable(getattr(config, "to_dict", None))
        and callable(getattr(module, "save_pretrained", None))
    )


def pretrained_models(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The outermost Hugging Face models in ``model`` (``model`` itself if it is one), with their names."""
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if any(not prefix or name.startswith(prefix + ".") for prefix, _ in found):
            continue
        if is_pretrained_model(module):
            found.append((name, module))
    return found


def _the_pretrained_model(model: nn.Module) -> tuple[str, nn.Module]:
    found = pretrained_models(model)
    if len(found) != 1:
        names = ", ".join(f"{name or '(the model)'} ({type(m).__name__})" for name, m in found) or "none"
        raise ActivationPruningError(
            f"`model` must be a Hugging Face PreTrainedModel or hold exactly one; {type(model).__name__} holds {names}."
        )
    return found[0]


# ---- config fields, and which parameters each governs ----------------------------------------------------------


class Slot(NamedTuple):
    """One integer of a config: a field (``path`` through nested configs), or one entry of a per-layer list."""

    path: tuple[str, ...]
    entry: int | None = None

    def get(self, config: Any) -> Any:
        """The value in ``config``; None where the config refuses to give one value for every layer.

        ``transformers``' per-layer configs raise a ``RuntimeError`` on a global read of a field that varies by layer.
        """
        owner = _owner(config, self.path)
        try:
            value: Any = getattr(owner, self.path[-1], None)
        except RuntimeError:
            return None
        return value[self.entry] if self.entry is not None else value

    def set(self, config: Any, value: int) -> None:
        """Write ``value`` into ``config``."""
        owner = _owner(config, self.path)
        if self.entry is None:
            setattr(owner, self.path[-1], value)
            return
        values = list(getattr(owner, self.path[-1]))
        values[self.entry] = value
        setattr(owner, self.path[-1], values)

    def __str__(self) -> str:
        return ".".join(self.path) + (f"[{self.entry}]" if self.entry is not None else "")


def _owner(config: Any, path: tuple[str, ...]) -> Any:
    for name in path[:-1]:
        config = getattr(config, name)
    return config


def _is_config(value: object) -> bool:
    return callable(getattr(value, "to_dict", None)) and type(value).__module__.startswith("transformers.")


def _slots(config: Any, names: Sequence[str], path: tuple[str, ...] = ()) -> list[Slot]:
    """The slots of ``config`` (and of its nested configs) named in ``names``, aliases resolved."""
    fields = vars(config)
    aliases = getattr(config, "attribute_map", None) or {}
    slots: list[Slot] = []
    for name in dict.fromkeys(aliases.get(n, n) for n in names):
        if name not in fields:
            continue
        value = fields[name]
        if isinstance(value, (list, tuple)) and value and all(isinstance(v, int) for v in value):
            slots += [Slot((*path, name), i) for i in range(len(value))]
        elif value is None or (isinstance(value, int) and not isinstance(value, bool)):
            slots.append(Slot((*path, name)))
    if len(path) < 3:
        for name, value in fields.items():
            if _is_config(value):
                slots += _slots(value, names, (*path, name))
    return slots


Shapes = dict[str, tuple[int, ...]]


@contextmanager
def _quiet() -> Iterator[None]:
    """No warnings or transformers log lines from the probe builds."""
    logger = logging.getLogger("transformers")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _built_shapes(model: nn.Module, config: Any) -> Shapes | None:
    """The ``state_dict`` shapes of ``type(model)`` built from ``config`` on the meta device; None if it cannot be."""
    try:
        with _quiet(), torch.device("meta"):
            built = type(model)(config)
    except Exception:  # a value the family refuses (heads that do not divide the width, …)
        return None
    return {key: tuple(value.shape) for key, value in built.state_dict().items()}


def _shapes(state: Mapping[str, Tensor]) -> Shapes:
    return {key: tuple(value.shape) for key, value in state.items()}


class Governed(NamedTuple):
    """One parameter axis that a slot governs: ``size = slope × value + intercept``."""

    key: str
    axis: int
    slope: int
    intercept: int


def _probe(model: nn.Module, config: Any, slot: Slot, base: Shapes) -> list[Governed]:
    """The parameter axes whose size moves with ``slot``, measured by building the model at two values."""
    value = slot.get(config)
    shapes_low: Shapes | None = base
    if isinstance(value, int):
        low = value
    else:  # None: the family derives it (GPT-2's n_inner is 4 × n_embd); any value gives the affine law
        low = 8
        shapes_low = _probed_shapes(model, config, slot, low)
    shapes_high = _probed_shapes(model, config, slot, low + 1)
    if shapes_low is None or shapes_high is None:
        return []
    governed = []
    for key, high in shapes_high.items():
        before = shapes_low.get(key)
        if before is None or len(before) != len(high):
            continue
        for axis, (size_low, size_high) in enumerate(zip(before, high, strict=True)):
            if size_low != size_high:
                slope = size_high - size_low
                governed.append(Governed(key, axis, slope, size_low - slope * low))
    return governed


def _probed_shapes(model: nn.Module, config: Any, slot: Slot, value: int) -> Shapes | None:
    probe = copy.deepcopy(config)
    try:
        slot.set(probe, value)
    except Exception:  # a strict config refusing the value
        return None
    return _built_shapes(model, probe)


def _module_of(key: str) -> str:
    return key.rsplit(".", 1)[0] if "." in key else ""


class Update(NamedTuple):
    """A config value to write, with the parameters it governs (what must then match the model)."""

    slot: Slot
    value: int
    keys: frozenset[str]


# ---- the concerns: hidden widths and attention heads ------------------------------------------------------------


def width_updates(model: nn.Module, config: Any, base: Shapes, current: Shapes) -> tuple[list[Update], list[str]]:
    """The hidden-width fields that rebuild ``current``, and the fields whose layers disagree (for the report).

    Each slot of :data:`WIDTH_FIELDS` governs some parameter axes, ``size = slope × value + intercept``; the value
    that gives every governed axis its current size is the slot's new value, when there is one.
    """
    updates: list[Update] = []
    disagreeing: list[str] = []
    for slot in _slots(config, WIDTH_FIELDS):
        governed = _probe(model, config, slot, base)
        values: set[int | None] = set()
        for g in governed:
            size = current.get(g.key)
            if size is None or g.axis >= len(size):
                continue
            width, remainder = divmod(size[g.axis] - g.intercept, g.slope)
            values.add(width if not remainder and width >= 1 else None)
        (solved, *others) = values or {None}
        if solved is not None and not others:
            updates.append(Update(slot, solved, frozenset(g.key for g in governed)))
        elif len(values) > 1:
            widths = sorted(v for v in values if v is not None)
            disagreeing.append(f"{slot} (its layers have {', '.join(map(str, widths)) or 'other'} neurons)")
    return updates, disagreeing


class HeadShape(NamedTuple):
    """The attention geometry of one attention module, as a config states it.

    Attributes:
        heads: query heads.
        kv_heads: key/value heads (equal to ``heads`` without grouped-query attention).
        head_dim: channels per head.
    """

    heads: int
    kv_heads: int
    head_dim: int


def head_shapes(model: nn.Module) -> dict[str, HeadShape]:
    """Every attention module of ``model`` with its current :class:`HeadShape`, from :func:`._heads.head_counts`.

    The interface between head pruning and the config: keyed by the module that declares the head numbers (a
    Llama ``self_attn``, a BERT ``attention.self``), query and key/value heads counted separately.
    """
    return {name: HeadShape(c.heads, c.kv_heads, c.head_dim) for name, c in head_counts(model).items()}


def head_updates(model: nn.Module, config: Any, shapes: Mapping[str, HeadShape]) -> tuple[list[Update], list[str]]:
    """The head-count fields (and an explicit head width) that state the attention modules' current shapes.

    ``head_dim`` is written first (into the config's own field, or as ``head_dim``, which the Llama-style families
    read), so that a head count is a count and not a width: then the modules whose projections move with a head
    field are the ones it governs, and they must all have the same number of heads.
    """
    dims = {shape.head_dim for shape in shapes.values()}
    if len(dims) != 1:
        return [], []
    (head_dim,) = dims
    explicit = copy.deepcopy(config)
    dim_slots = _slots(explicit, HEAD_DIM_FIELDS)
    top = [s for s in dim_slots if len(s.path) == 1 and s.entry is None] or [Slot(("head_dim",))]
    try:
        for slot in top:
            slot.set(explicit, head_dim)
    except (AttributeError, TypeError):  # a head width the config derives and will not take (Falcon's property)
        return [], [f"{top[0]} (the config derives the head width and cannot state it)"]
    base = _built_shapes(model, explicit)
    if base is None:
        return [], []
    updates: list[Update] = []
    disagreeing: list[str] = []
    governed_keys: set[str] = set()
    for fields, count in ((HEAD_FIELDS, "heads"), (KV_HEAD_FIELDS, "kv_heads")):
        for slot in _slots(explicit, fields):
            keys = {g.key for g in _probe(model, explicit, slot, base)}
            modules = {name for name in shapes if any(k.startswith(f"{name}.") for k in keys)}
            values = {getattr(shapes[name], count) for name in modules}
            if len(values) == 1:
                updates.append(Update(slot, values.pop(), frozenset(keys)))
                governed_keys |= keys
            elif len(values) > 1:
                disagreeing.append(f"{slot} (its attention modules have {', '.join(map(str, sorted(values)))} heads)")
    changed = [u for u in updates if u.slot.get(config) != u.value]
    if not changed:
        return [], disagreeing
    return [*(Update(s, head_dim, frozenset(governed_keys)) for s in top), *updates], disagreeing


# ---- keeping the config in step --------------------------------------------------------------------------------


def sync_pretrained_configs(
    model: nn.Module, head_shapes_of: Mapping[str, Mapping[str, HeadShape]] | None = None
) -> list[str]:
    """Write the current widths of every Hugging Face model inside ``model`` into its config, where it can hold them.

    Every config change is checked by building the model's class from the new config on the meta device and
    comparing every parameter shape; a field whose layers have different widths (or a layer no field governs) keeps
    its value and is reported. The model's pruning plan (:func:`pruning_plan_of`) is also recorded on the Hugging
    Face model itself, relative to it, for :func:`save_pretrained`.

    Args:
        model: a pruned model, a Hugging Face model or a module that holds some.
        head_shapes_of: per Hugging Face model name, the attention shapes to state (default: :func:`head_shapes`).

    Returns:
        One line per Hugging Face model whose config cannot hold its widths, saying which and what to do.
    """
    plan = pruning_plan_of(model)
    messages = []
    for prefix, pretrained in pretrained_models(model):
        if prefix and plan is not None:
            _remember(pretrained, _relative(plan, prefix))
        shapes = head_shapes(pretrained) if head_shapes_of is None else head_shapes_of.get(prefix, {})
        unexpressed = _sync_config(pretrained, shapes)
        if unexpressed:
            where = f"{prefix} ({type(pretrained).__name__})" if prefix else type(pretrained).__name__
            messages.append(
                f"the config of {where} cannot state {unexpressed}: `save_pretrained` would write weights that"
                " `from_pretrained` cannot load. Save it with `lightning_actprune.save_pretrained` (zero-padded to"
                " widths the config states; same outputs), or keep those layers unpruned (`exclude`) or equal in"
                " every block (`uniform_widths`)."
            )
    return messages


def _sync_config(pretrained: nn.Module, shapes: Mapping[str, HeadShape]) -> str:
    """Bring one Hugging Face model's config in step; what it cannot state ("" when everything)."""
    config = pretrained.config
    current = _shapes(pretrained.state_dict())
    base = _built_shapes(pretrained, config)
    if base is None:
        return f"anything: {type(pretrained).__name__} cannot be rebuilt from it to check"
    if base == current:
        return ""
    widths, disagreeing = width_updates(pretrained, config, base, current)
    heads, heads_disagreeing = head_updates(pretrained, config, shapes)
    updates = [*widths, *heads]
    proposed = _with(config, updates)
    built = _built_shapes(pretrained, proposed) or {}
    wrong = {key for key, shape in current.items() if built.get(key) != shape}
    good = [u for u in updates if not u.keys & wrong]
    refused = _refusal(_with(config, good))
    if refused is not None and heads:  # the head counts the config's own checks refuse stay unstated
        good = [u for u in good if u not in heads]
        heads_disagreeing = [*heads_disagreeing, f"the head counts ({refused})"]
    if any(u.slot.get(config) != u.value for u in good):
        final = _with(config, good)
        built = _built_shapes(pretrained, final) or {}
        if pretrained.__dict__.get(_ORIGINAL_CONFIG) is None:
            pretrained.__dict__[_ORIGINAL_CONFIG] = copy.deepcopy(config)
        for update in good:
            update.slot.set(config, update.value)
    else:
        built = base
    mismatched = sorted({_module_of(key) for key, shape in current.items() if built.get(key) != shape})
    if not mismatched:
        return ""
    shown = ", ".join(mismatched[:4]) + (f" and {len(mismatched) - 4} more" if len(mismatched) > 4 else "")
    fields = [*disagreeing, *heads_disagreeing]
    return f"the widths of {shown}" + (f" ({'; '.join(fields)})" if fields else " (no config field sets them)")


def _refusal(config: Any) -> str | None:
    """Why the config's own checks refuse it (a Llama config wants ``hidden_size`` divisible by the heads), or None."""
    validate = getattr(config, "validate", None)
    if not callable(validate):
        return None
    try:
        validate()
    except Exception as error:
        return " ".join(str(error).split())[-160:]
    return None


def _with(config: Any, updates: Sequence[Update]) -> Any:
    changed = copy.deepcopy(config)
    for update in updates:
        update.slot.set(changed, update.value)
    return changed


# ---- uniform widths --------------------------------------------------------------------------------------------


def role(layer_name: str) -> str:
    """A layer's name with every block index masked: ``model.layers.*.mlp.gate_proj+model.layers.*.mlp.up_proj``.

    Example:
        >>> role("encoder.layer.3.attention:heads")
        'encoder.layer.*.attention:heads'
    """
    return _DIGITS.sub(r"\1*", layer_name)


def uniform_ties(model: nn.Module, layers: Sequence[PrunableLayer]) -> list[list[str]]:
    """The sets of layers that keep equal widths under ``uniform_widths``: one set per role.

    Layers have the same role when their names are equal once every block index is masked (:func:`role`), their
    producers are of the same types, and they have the same number of neurons and groups. In a Hugging Face model,
    the layers one config field governs (T5's ``d_ff``, in its encoder and its decoder) are one role too.

    Returns:
        Sets of layer names for ``plan_pruning(..., tied=...)`` / ``ThresholdEvaluator(..., tied=...)``.

    Example:
        >>> from lightning_actprune.core import find_prunable_layers
        >>> blocks = nn.ModuleList(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4)) for _ in range(3))
        >>> model = nn.Sequential(*blocks)
        >>> uniform_ties(model, find_prunable_layers(model, torch.randn(2, 4)))  # the last block's output stays
        [['0.0', '1.0', '2.0'], ['0.2', '1.2']]
    """
    by_name = {layer.name: layer for layer in layers}
    parent = {name: name for name in by_name}

    def find(name: str) -> str:
        while parent[name] != name:
            parent[name] = parent[parent[name]]
            name = parent[name]
        return name

    def union(names: Sequence[str]) -> None:
        shapes: dict[tuple[int, int], str] = {}
        for name in names:
            layer = by_name[name]
            first = shapes.setdefault((layer.neurons, layer.groups), name)
            parent[find(name)] = find(first)

    roles: dict[tuple[str, tuple[str, ...]], list[str]] = defaultdict(list)
    for layer in layers:
        kinds = tuple(type(model.get_submodule(p)).__name__ for p in layer.producers)
        roles[(role(layer.name), kinds)].append(layer.name)
    for names in roles.values():
        union(names)
    for prefix, pretrained in pretrained_models(model):
        for modules in _field_roles(pretrained):
            governed = {f"{prefix}.{m}" if prefix else m for m in modules}
            union([layer.name for layer in layers if governed.intersection(layer.producers)])
    sets: dict[str, list[str]] = defaultdict(list)
    for layer in layers:
        sets[find(layer.name)].append(layer.name)
    return [names for names in sets.values() if len(names) > 1]


def _field_roles(pretrained: nn.Module) -> list[set[str]]:
    """Per width or head field of the config, the modules whose parameters it governs."""
    config = pretrained.config
    base = _built_shapes(pretrained, config)
    if base is None:
        return []
    explicit = copy.deepcopy(config)
    dims = {shape.head_dim for shape in head_shapes(pretrained).values()}
    explicit_base = None
    try:
        if len(dims) == 1 and not _slots(explicit, HEAD_DIM_FIELDS):
            Slot(("head_dim",)).set(explicit, dims.pop())
        explicit_base = _built_shapes(pretrained, explicit)
    except (AttributeError, TypeError):  # a head width the config derives and will not take (Falcon's property)
        pass  # its head counts cannot be stated (`head_updates`): they tie nothing
    roles = [_producers(pretrained, _probe(pretrained, config, slot, base)) for slot in _slots(config, WIDTH_FIELDS)]
    if explicit_base is not None:
        for slot in _slots(explicit, (*HEAD_FIELDS, *KV_HEAD_FIELDS)):
            roles.append(_producers(pretrained, _probe(pretrained, explicit, slot, explicit_base)))
    return [modules for modules in roles if modules]


def _producers(pretrained: nn.Module, governed: Sequence[Governed]) -> set[str]:
    """The modules whose *outputs* move with a field: the layers whose neurons it counts (not those reading them)."""
    modules = set()
    for g in governed:
        name = _module_of(g.key)
        try:
            module = pretrained.get_submodule(name)
            tensor = dict(_tensors(module))[g.key.rsplit(".", 1)[-1]]
            if _axis(module, g.key.rsplit(".", 1)[-1], tensor, "out") == g.axis:
                modules.add(name)
        except (AttributeError, KeyError, ActivationPruningError):
            continue
    return modules


# ---- zero padding: a form the stock class loads whatever the widths ---------------------------------------------


def _axis(module: nn.Module, name: str, tensor: Tensor, dim: str) -> int | None:
    """The axis of ``module``'s tensor ``name`` that holds its outputs (``dim="out"``) or inputs (``"in"``)."""
    if tensor.dim() == 0:
        return None
    if isinstance(module, Conv1D):  # weight (in, out)
        return {"weight": {"out": 1, "in": 0}, "bias": {"out": 0}}.get(name, {}).get(dim)
    if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
        transposed = isinstance(module, nn.modules.conv._ConvTransposeNd)
        if dim == "in" and getattr(module, "groups", 1) != 1:
            raise ActivationPruningError(f"cannot zero-pad the inputs of a grouped {type(module).__name__}.")
        if name == "weight":
            return (1 if dim == "out" else 0) if transposed else (0 if dim == "out" else 1)
        return 0 if name == "bias" and dim == "out" else None
    if isinstance(module, nn.MultiheadAttention):
        return 0 if name in ("in_proj_weight", "in_proj_bias") and dim == "out" else None
    if isinstance(module, nn.Embedding):  # (entries, features): its outputs are its features (T5's bias per head)
        return 1 if name == "weight" and dim == "out" else None
    if dim == "out" and all(t.dim() <= 1 for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]):
        return 0  # BatchNorm and other per-channel layers
    raise ActivationPruningError(f"cannot zero-pad the {dim}puts of {type(module).__name__} for save_pretrained.")


def _tensors(module: nn.Module) -> Iterator[tuple[str, Tensor]]:
    yield from module.named_parameters(recurse=False)
    yield from ((n, b) for n, b in module.named_buffers(recurse=False) if b is not None)


class Padding(NamedTuple):
    """Zeros put back into one module along its outputs or inputs: a pruning operation partly or wholly undone.

    Attributes:
        module: the module's name.
        dim: ``"out"`` or ``"in"``.
        removed: the operation's removed indices (positions before pruning).
        reinserted: those of them that come back as zeros.
    """

    module: str
    dim: str
    removed: tuple[int, ...]
    reinserted: tuple[int, ...]

    def positions(self, size: int) -> tuple[list[int], list[int]]:
        """In the padded axis of a module with ``size`` entries now: where the entries kept are, and the zeros."""
        back, gone = set(self.reinserted), set(self.removed) - set(self.reinserted)
        present = [i for i in range(size + len(self.removed)) if i not in gone]
        return [p for p, i in enumerate(present) if i not in back], [p for p, i in enumerate(present) if i in back]


def _padded_state(model: nn.Module, paddings: Sequence[Padding]) -> dict[str, Tensor]:
    """``model``'s ``state_dict`` with the zeros of ``paddings`` put back (the other tensors are not copied)."""
    state = dict(model.state_dict())
    for padding in paddings:
        module = model.get_submodule(padding.module)
        for name, tensor in _tensors(module):
            axis = _axis(module, name, tensor, padding.dim)
            key = _key(padding.module, name)
            if axis is None or key not in state:
                continue
            kept, _ = padding.positions(tensor.shape[axis])
            shape = list(tensor.shape)
            shape[axis] += len(padding.reinserted)
            index = torch.tensor(kept, dtype=torch.long, device=tensor.device)
            state[key] = tensor.detach().new_zeros(shape).index_copy_(axis, index, tensor.detach())
    return state


def _key(module: str, name: str) -> str:
    return f"{module}.{name}" if module else name


def _size_along(model: nn.Module, module_name: str, dim: str) -> int | None:
    module = model.get_submodule(module_name)
    for name, tensor in _tensors(module):
        axis = _axis(module, name, tensor, dim)
        if axis is not None:
            return int(tensor.shape[axis])
    return None


def _needs_padding(model: nn.Module, operation: ModulePruning, built: Shapes) -> bool:
    """Whether the stock class builds a different size than ``model`` has along ``operation``'s axis."""
    module = model.get_submodule(operation.module)
    for name, tensor in _tensors(module):
        axis = _axis(module, name, tensor, operation.dim)
        shape = built.get(_key(operation.module, name))
        if axis is not None and (shape is None or axis >= len(shape) or shape[axis] != tensor.shape[axis]):
            return True
    return False


class _Layout(NamedTuple):
    """How an operation's indices carry a layer's neurons: ``blocks`` copies of ``width`` indices per neuron."""

    layer: LayerPlan
    blocks: int
    width: int

    def indices(self, neurons: Iterable[int]) -> set[int]:
        """The module indices that carry ``neurons``."""
        total, width = self.layer.neurons, self.width
        return {b * total * width + n * width + c for b in range(self.blocks) for n in neurons for c in range(width)}


def _layouts(model: nn.Module, plan: PruningPlan) -> dict[ModulePruning, _Layout | None] | None:
    """For every operation, the layer whose neurons it removes and how; None when a module's size cannot be read.

    A layer's neuron ``n`` sits at ``b · neurons · width + n · width + c`` in every module the plan touches for it
    (a Linear: ``width`` 1; the channels of a head: ``head_dim``; GPT-2's fused q/k/v: 3 blocks). The layout is
    accepted only when it gives exactly the operation's indices, and the layer whose name shares the longest
    prefix with the module wins. An operation that no layout gives maps to None (Falcon's fused q/k/v, whose axis
    also holds the key/value heads).
    """
    layouts: dict[ModulePruning, _Layout | None] = {}
    for operation in plan.operations:
        size = _size_along(model, operation.module, operation.dim)
        if size is None:
            return None
        size += len(operation.indices)
        matches = []
        for layer in plan.layers:
            removed = layer.removed
            if not removed or len(operation.indices) % len(removed):
                continue
            per_neuron = len(operation.indices) // len(removed)
            for blocks in (b for b in range(1, per_neuron + 1) if per_neuron % b == 0):
                layout = _Layout(layer, blocks, per_neuron // blocks)
                if blocks * layer.neurons * layout.width == size and layout.indices(removed) == set(operation.indices):
                    matches.append(layout)
        shared = [_shared_components(m.layer.name, operation.module) for m in matches]
        best = [m for m, n in zip(matches, shared, strict=True) if n == max(shared, default=-1)]
        layouts[operation] = best[0] if len({m.layer.name for m in best}) == 1 else None
    return layouts


def _owners(plan: PruningPlan, layouts: Mapping[ModulePruning, _Layout | None] | None) -> dict[ModulePruning, str]:
    """The layer whose neurons each operation removes: from its layout, else by name.

    Where no layout tells (Falcon's fused q/k/v, whose axis holds key/value heads beside the query heads), the layer
    that removed neurons in a number dividing the operation's indices and shares the longest name prefix with the
    module; an operation that no single layer claims has no owner.
    """
    owners = {}
    for operation in plan.operations:
        layout = layouts.get(operation) if layouts is not None else None
        if layout is not None:
            owners[operation] = layout.layer.name
            continue
        count = len(operation.indices)
        fits = [layer.name for layer in plan.layers if layer.removed and not count % len(layer.removed)]
        shared = {name: _shared_components(name, operation.module) for name in fits}
        best = [name for name, n in shared.items() if n == max(shared.values())]
        if len(best) == 1:
            owners[operation] = best[0]
    return owners


def _shared_components(layer: str, module: str) -> int:
    """How many leading name components a layer (``a.0.fc1+a.0.fc2``, ``a.0.attn:heads``) shares with a module."""
    shared = 0
    for ours, theirs in zip(re.split(r"[.+:]", layer), module.split("."), strict=False):
        if ours != theirs:
            break
        shared += 1
    return shared


class _PaddedForm(NamedTuple):
    config: Any
    state: dict[str, Tensor]
    unpadding: PruningPlan  # removes the zeros again, in the padded model's positions


def _unpadding(model: nn.Module, paddings: Sequence[Padding], layers: Sequence[LayerPlan]) -> PruningPlan:
    operations = []
    for padding in paddings:
        size = _size_along(model, padding.module, padding.dim)
        _, zeros = padding.positions(int(size or 0))
        operations.append(ModulePruning(padding.module, padding.dim, tuple(zeros)))  # type: ignore[arg-type]
    return PruningPlan(math.nan, "zero padding", tuple(layers), tuple(operations))


def _to_widest(
    pretrained: nn.Module,
    plan: PruningPlan,
    built: Shapes,
    layouts: Mapping[ModulePruning, _Layout | None],
    owners: Mapping[ModulePruning, str],
) -> tuple[list[Padding], list[LayerPlan]] | None:
    """Zeros that bring each layer the config cannot state to the widest width of the layers its field governs.

    A layer that no width field governs (a pooler, attention heads), or one with an operation whose layout is not
    known, comes back to its width before pruning. None when an operation that needs padding has no owner.
    """
    layers = {layer.name: layer for layer in plan.layers}
    needing = [operation for operation in layouts if _needs_padding(pretrained, operation, built)]
    if any(operation not in owners for operation in needing):
        return None
    padded = {owners[operation] for operation in needing}
    whole = {owners[operation] for operation, layout in layouts.items() if layout is None and operation in owners}
    # a layer's producers: its operations' outputs, or its name for a layer that lost nothing (and has none)
    producers = {name: set(name.split("+")) for name in layers}
    for operation, name in owners.items():
        if operation.dim == "out":
            producers[name].add(operation.module)
    target = {name: layers[name].neurons for name in padded}
    for slot in _slots(pretrained.config, WIDTH_FIELDS):
        governed = _producers(pretrained, _probe(pretrained, pretrained.config, slot, built))
        members = [name for name in layers if producers[name] & governed]
        widest = max((len(layers[name].kept) for name in members), default=0)
        target.update({name: min(target[name], widest) for name in members if name in padded and name not in whole})
    back = {name: layers[name].removed[: target[name] - len(layers[name].kept)] for name in padded}
    paddings = []
    for operation, layout in layouts.items():
        owner = owners.get(operation)
        if owner is None or not back.get(owner):
            continue
        reinserted = layout.indices(back[owner]) if layout is not None else set(operation.indices)  # whole: all back
        if reinserted:
            paddings.append(Padding(operation.module, operation.dim, operation.indices, tuple(sorted(reinserted))))
    unpadded = []
    for name, neurons in back.items():
        if neurons:
            present = sorted({*layers[name].kept, *neurons})
            kept = tuple(p for p, n in enumerate(present) if n not in set(neurons))
            unpadded.append(LayerPlan(name, len(present), kept))
    return paddings, unpadded


def _padded_form(pretrained: nn.Module, plan: PruningPlan | None) -> _PaddedForm | None:
    """The config and weights the stock class loads; None when the model's own config already builds it.

    Tried in order, each checked by building the class from the config it comes with: each layer the config cannot
    state padded to the widest layer its field governs (to its width before pruning if no field does); those
    layers' operations padded to their width before pruning; every operation of the plan, with the config the model
    had before it was pruned.
    """
    current = _shapes(pretrained.state_dict())
    built = _built_shapes(pretrained, pretrained.config)
    if built is None:
        raise ActivationPruningError(
            f"cannot check that {type(pretrained).__name__} can be rebuilt from its config (building it on the meta"
            " device failed); save it with its own `save_pretrained`."
        )
    if built == current:
        return None
    wrong = [key for key, shape in current.items() if built.get(key) != shape]
    if plan is None:
        raise ActivationPruningError(
            f"the config of {type(pretrained).__name__} does not build its weights ({_mismatch(wrong, built, current)})"
            " and no pruning plan is recorded for it: pass the plan that pruned it (`plan=`)."
        )
    layouts = _layouts(pretrained, plan)
    owners = _owners(plan, layouts)
    original = pretrained.__dict__.get(_ORIGINAL_CONFIG)
    original = pretrained.config if original is None else original
    needed = [o for o in plan.operations if _needs_padding(pretrained, o, built)]
    candidates: list[tuple[list[Padding], Sequence[LayerPlan], Any]] = []
    widest = _to_widest(pretrained, plan, built, layouts, owners) if layouts is not None else None
    if widest is not None:
        candidates.append((*widest, None))  # the config: solved from the padded shapes
    for operations, config in ((needed, pretrained.config), (plan.operations, original)):
        paddings = [Padding(o.module, o.dim, o.indices, o.indices) for o in operations]
        if len(operations) == len(plan.operations):  # everything padded back: the plan's layers undo it all
            candidates.append((paddings, list(plan.layers), config))
            continue
        names = {owners.get(o) for o in operations}
        if None in names or any(o not in operations for o, name in owners.items() if name in names):
            continue  # a layer whose head counts would not follow its padded operations
        candidates.append((paddings, [layer for layer in plan.layers if layer.name in names], config))
    for paddings, unpadded, config in candidates:
        state = _padded_state(pretrained, paddings)
        shapes = _shapes(state)
        if config is None:
            config = _with(pretrained.config, width_updates(pretrained, pretrained.config, built, shapes)[0])
        if _built_shapes(pretrained, config) == shapes:
            return _PaddedForm(copy.deepcopy(config), state, _unpadding(pretrained, paddings, unpadded))
    raise ActivationPruningError(
        f"cannot write {type(pretrained).__name__} in a form its class loads: zero-padded to its pruning plan, its"
        f" weights still differ from what its config builds ({_mismatch(wrong, built, current)}). Was it pruned"
        " by another tool too?"
    )


def _mismatch(keys: Sequence[str], built: Shapes, current: Shapes) -> str:
    shown = [f"{k}: config {list(built.get(k, ()))}, model {list(current[k])}" for k in keys[:3]]
    return "; ".join(shown) + ("; …" if len(keys) > 3 else "")


@contextmanager
def _config_swapped(pretrained: nn.Module, config: Any) -> Iterator[None]:
    own = pretrained.config
    pretrained.config = config
    try:
        yield
    finally:
        pretrained.config = own


def save_pretrained(
    model: nn.Module, save_directory: str | os.PathLike[str], *, plan: PruningPlan | None = None, **kwargs: Any
) -> None:
    """Save a pruned Hugging Face model so that the stock ``from_pretrained`` loads it, with the same outputs.

    When its config can state its widths (``uniform_widths=True``, or widths equal by chance), this is the model's
    own ``save_pretrained`` after the config is brought in step: the directory holds the pruned model at its real
    size. Otherwise the weights are written **zero-padded** to widths the config states: each removed neuron or head
    comes back as zeros in the rows that produce it and the columns that read it, so it contributes exactly nothing,
    ``AutoModel….from_pretrained(directory)`` (pipelines, PEFT, serving engines) loads a model whose outputs equal the
    pruned model's, and ``actprune_padding.json`` beside the weights lists the padding, which
    :func:`from_pretrained` removes again. The padding costs what it holds: first only the layers the config cannot
    state are padded (a pooler, per-layer widths), back to their widths before pruning.

    Args:
        model: a pruned Hugging Face ``PreTrainedModel``, or a module (a LightningModule) that holds exactly one.
        save_directory: the directory to write.
        plan: the plan that pruned ``model`` from its full size; default: the one recorded when
            :class:`ActivationPruning` or a loader of this package pruned it (:func:`pruning_plan_of`).
        **kwargs: passed to the model's ``save_pretrained`` (``safe_serialization``, ``max_shard_size``, …).

    Raises:
        ActivationPruningError: ``model`` holds no or several Hugging Face models, or its weights cannot be written
            in a form its class rebuilds (no plan recorded for a model whose config does not build it).

    Example::

        trainer.fit(lit_module)  # ActivationPruning prunes lit_module.model, a LlamaForCausalLM
        save_pretrained(lit_module, "pruned-llama")
        model = AutoModelForCausalLM.from_pretrained("pruned-llama")  # the same outputs (padded if need be)
        model = from_pretrained(AutoModelForCausalLM, "pruned-llama")  # the same, at its pruned widths
    """
    prefix, pretrained = _the_pretrained_model(model)
    sync_pretrained_configs(model)
    plan = _relative(plan, prefix) if plan is not None else pruning_plan_of(pretrained)  # recorded by the sync
    form = _padded_form(pretrained, plan)
    padding = Path(save_directory) / PADDING_FILE
    if form is None:
        pretrained.save_pretrained(save_directory, **kwargs)  # type: ignore[operator]
        padding.unlink(missing_ok=True)  # a directory written before holds no stale padding
        return
    with _config_swapped(pretrained, form.config):
        pretrained.save_pretrained(save_directory, state_dict=form.state, **kwargs)  # type: ignore[operator]
    unpadding = form.unpadding.to_dict()
    padding.write_text(json.dumps({"format": 1, "layers": unpadding["layers"], "operations": unpadding["operations"]}))


def from_pretrained(model_class: Any, pretrained_model_name_or_path: str | os.PathLike[str], **kwargs: Any) -> Any:
    """Load what :func:`save_pretrained` wrote, at the pruned widths: the stock loader, then the padding removed.

    A directory without ``actprune_padding.json`` (a config that states the widths, or any other model) loads exactly
    as ``model_class.from_pretrained`` loads it.

    Args:
        model_class: a Hugging Face model class or auto class (``AutoModelForCausalLM``).
        pretrained_model_name_or_path: a local directory written by :func:`save_pretrained` (a Hub repository loads
            with its padding: the same outputs, at the padded size).
        **kwargs: passed to ``model_class.from_pretrained``.

    Returns:
        The model, with its config in step with its widths and its plan recorded (:func:`pruning_plan_of`).

    Raises:
        ActivationPruningError: the padded weights are no longer zero (the directory was changed after it was
            written), so removing them would change the outputs.

    Example::

        model = from_pretrained(AutoModelForCausalLM, "pruned-llama")
    """
    model = model_class.from_pretrained(pretrained_model_name_or_path, **kwargs)
    padding = Path(pretrained_model_name_or_path) / PADDING_FILE
    if not padding.is_file():
        return model
    data = json.loads(padding.read_text())
    plan = PruningPlan.from_dict({"threshold": math.nan, "statistic": "zero padding", **data})
    for operation in plan.operations:
        module = model.get_submodule(operation.module)
        for name, tensor in _tensors(module):
            axis = _axis(module, name, tensor, operation.dim)
            index = torch.tensor(operation.indices, dtype=torch.long, device=tensor.device)
            if axis is not None and bool(tensor.detach().index_select(axis, index).any()):
                raise ActivationPruningError(
                    f"{_key(operation.module, name)} in {os.fspath(pretrained_model_name_or_path)!r} is not zero where"
                    f" {PADDING_FILE} says it was padded: the weights changed after they were saved. Load it with"
                    f" `{getattr(model_class, '__name__', 'its class')}.from_pretrained` (at the padded size)."
                )
    apply_plan(model, plan)
    _remember(model, plan)
    sync_pretrained_configs(model)
    return model
