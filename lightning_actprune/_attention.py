"""Attention heads found from the module structure and the model's own numbers, by probing the module alone.

An attention module *declares* its heads: an integer attribute such as ``num_heads`` or ``head_dim`` (the count may
also come from its ``config``: ``num_attention_heads``, ``num_key_value_heads``). Its *out projection* is the last
``Linear`` it calls whose input, ``heads × head_dim`` features wide, is computed inside it (in BERT-style models the
module that declares is ``self`` and the out projection, ``output.dense``, sits in its parent, which is then the
attention module). Every other ``Linear``, Hugging Face ``Conv1D`` or ``Embedding`` it calls before the out projection
may produce heads: its outputs are hypothesised to be ``head_dim``-wide blocks (one column per head for a table of
position biases, T5's), and each block is *probed*: the attention module runs alone on the inputs it received in the
example forward with that block zeroed, and the heads whose channels change at the out projection's input are the
block's heads. A query block changes one head; a key or value block changes the query heads of its key/value head.
So fused layouts (``[q | k | v]``, q/k/v interleaved per head, grouped per key/value head) and grouped-query
attention come out of the probe, not out of a class name. A layout that does not fit says why; a head layer built
from one that fits is still checked by the zeroing check of :mod:`lightning_actprune._analysis`, so a wrong
hypothesis is skipped, never applied.

After a surgery the module's own numbers follow the heads that stay (:func:`set_head_numbers`), and inputs shaped like
attention scores with one slice per head (BLOOM's ALiBi biases, built by the model for all heads) are cut to the
heads that stay when the module is called (:class:`HeadInputs`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from lightning_actprune._conv1d import Conv1D

HEADS = ("num_heads", "num_attention_heads", "n_heads", "n_head")
"""Attributes that hold a module's number of (query) heads."""

KV_HEADS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads")
"""Attributes that hold its number of key/value heads (grouped-query attention)."""

GROUPS = ("num_key_value_groups", "num_kv_groups")
"""Attributes that hold its query heads per key/value head."""

HEAD_DIM = ("head_dim", "head_size", "attention_head_size", "key_value_proj_dim", "d_kv")
"""Attributes that hold the channels per head."""

WIDTHS = ("all_head_size", "inner_dim", "attn_dim", "split_size")
"""Attributes that hold ``heads × head_dim``, the width of the heads together (never the model's own width)."""

PRODUCER_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, Conv1D, nn.Embedding)
"""Layers whose outputs (features last) may carry heads."""

OUT_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, Conv1D)
"""Layers that may read the concatenated heads."""

_PROBE_TOLERANCE = 1e-5  # a head "changes" when its channels move by more than this share of the largest value


def _count(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _config_count(config: object, name: str) -> int | None:
    """``config.<name>`` as a head count; None where it is missing or the config refuses one value for every layer.

    ``transformers``' per-layer configs raise a ``RuntimeError`` on a global read of a field that varies by layer.
    """
    try:
        return _count(getattr(config, name, None))
    except RuntimeError:
        return None


def _own(module: nn.Module, names: Sequence[str]) -> tuple[str, int] | None:
    """The first of ``names`` that ``module`` holds itself as a positive int, with its value."""
    attributes = vars(module)
    for name in names:
        value = _count(attributes.get(name))
        if value is not None:
            return name, value
    return None


def declares_heads(module: nn.Module) -> bool:
    """Whether ``module`` holds a head count or a head width of its own, and layers that may project heads.

    ``nn.MultiheadAttention`` is described by hand; a module with no ``Linear`` (a rotary or position-bias helper
    that knows the head count) is not an attention module.
    """
    return (
        not isinstance(module, nn.MultiheadAttention)
        and _own(module, HEADS + HEAD_DIM) is not None
        and any(isinstance(m, OUT_TYPES) for m in module.modules())
    )


def _innermost(module: nn.Module) -> bool:
    """A declaring module that holds no other (BLOOM's model declares ``num_heads`` too, for its position biases)."""
    return declares_heads(module) and not any(
        declares_heads(m) or isinstance(m, nn.MultiheadAttention) for m in module.modules() if m is not module
    )


class HeadNumbers(NamedTuple):
    """What an attention module says about its heads.

    Attributes:
        heads: query heads.
        kv_heads: key/value heads (``heads`` unless grouped-query attention).
        head_dim: channels per head; ``None`` when the module does not say (the out projection's width tells).
    """

    heads: int
    kv_heads: int
    head_dim: int | None


def head_numbers(holder: nn.Module) -> HeadNumbers | None:
    """The numbers ``holder`` declares, from its attributes or else its ``config``; ``None`` without a head count."""
    own = _own(holder, HEADS)
    config = getattr(holder, "config", None)
    heads = own[1] if own is not None else _config_count(config, "num_attention_heads")
    if heads is None:
        return None
    kv = _own(holder, KV_HEADS)
    groups = _own(holder, GROUPS)
    config_kv = _config_count(config, "num_key_value_heads") if own is None else None
    if kv is not None:
        kv_heads = kv[1]
    elif groups is not None and heads % groups[1] == 0:
        kv_heads = heads // groups[1]
    elif config_kv is not None and heads % config_kv == 0:
        kv_heads = config_kv
    else:
        kv_heads = heads
    dim = _own(holder, HEAD_DIM)
    return HeadNumbers(heads, kv_heads, dim[1] if dim is not None else None)


def innermost_holders(root: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules under ``root`` that declare heads and hold no other such module: the attention modules."""
    return [(name, m) for name, m in root.named_modules() if _innermost(m)]


def holder_of(
    name: str, model: nn.Module, modules: Mapping[str, nn.Module] | None = None, seen: dict[str, bool] | None = None
) -> str | None:
    """The innermost declaring module that holds ``name`` (itself included), or ``None``.

    ``modules`` (``dict(model.named_modules())``) and ``seen`` (which names were found innermost, filled in here) let
    a caller asking for many names look each module up and test it once.
    """
    seen = {} if seen is None else seen
    parts = name.split(".") if name else []
    for end in range(len(parts), -1, -1):
        candidate = ".".join(parts[:end])
        if candidate not in seen:
            module = modules.get(candidate) if modules is not None else None
            if module is None:
                try:
                    module = model.get_submodule(candidate)
                except AttributeError:
                    return None
            seen[candidate] = _innermost(module)
        if seen[candidate]:
            return candidate
    return None


# --- the module's own numbers, after a surgery ------------------------------------------------------------------


class ConfigView:
    """One module's view of its model's ``config``: its own head counts, everything else read from the model's.

    Phi-3's attention reads ``self.config.num_attention_heads`` to split its fused ``qkv_proj``; the config is the
    model's, shared by every layer, and is not written: the pruned module gets this view instead, which reads through
    to the model's config (a later ``set_attn_implementation`` still reaches it) except for the counts it overrides.
    """

    def __init__(self, base: Any, overrides: Mapping[str, int]) -> None:
        vars(self).update(_base=base, _overrides=dict(overrides))

    def __getattr__(self, name: str) -> Any:
        attributes = vars(self)
        if "_base" not in attributes:  # being unpickled
            raise AttributeError(name)
        if name in attributes["_overrides"]:
            return attributes["_overrides"][name]
        return getattr(attributes["_base"], name)

    def __setattr__(self, name: str, value: Any) -> None:
        overrides = vars(self)["_overrides"]
        if name in overrides:
            overrides[name] = value
        else:
            setattr(vars(self)["_base"], name, value)

    def __repr__(self) -> str:
        return f"ConfigView({type(vars(self)['_base']).__name__}, {vars(self)['_overrides']})"

    @property
    def base(self) -> Any:
        """The model's config."""
        return vars(self)["_base"]


def set_head_numbers(holder: nn.Module, before: HeadNumbers, heads: int, kv_heads: int) -> None:
    """Write ``heads`` and ``kv_heads`` into every attribute of ``holder`` that held ``before``'s counts.

    Head counts, key/value head counts, query heads per key/value head and ``heads × head_dim`` widths are matched by
    name and old value; a ``config`` the module holds is replaced by a :class:`ConfigView` with its own counts.
    """
    attributes = vars(holder)
    old_groups, new_groups = before.heads // before.kv_heads, heads // kv_heads
    updates: list[tuple[Sequence[str], int, int]] = [
        (HEADS, before.heads, heads),
        (KV_HEADS, before.kv_heads, kv_heads),
        (GROUPS, old_groups, new_groups),
    ]
    if before.head_dim is not None:
        updates.append((WIDTHS, before.heads * before.head_dim, heads * before.head_dim))
    for names, old, new in updates:
        for name in names:
            if _count(attributes.get(name)) == old:
                attributes[name] = new  # plain attributes: not parameters, buffers or submodules
    config = attributes.get("config")
    if config is None:
        return
    base = config.base if isinstance(config, ConfigView) else config
    overrides = dict(vars(config)["_overrides"]) if isinstance(config, ConfigView) else {}
    for name, old, new in (
        ("num_attention_heads", before.heads, heads),
        ("num_key_value_heads", before.kv_heads, kv_heads),
    ):
        if _config_count(config, name) == old:
            overrides[name] = new
    if overrides:
        attributes["config"] = ConfigView(base, overrides)


class HeadState(NamedTuple):
    """What a pruned attention module remembers: its counts as built and the heads that stay, in that numbering."""

    heads: int
    kv_heads: int
    kept: tuple[int, ...]


STATE = "_actprune_heads"
"""The attribute of the declaring module that holds its :class:`HeadState` once pruned."""


def head_state(holder: nn.Module) -> HeadState | None:
    """The module's :class:`HeadState`, or ``None`` if it never lost heads."""
    state = vars(holder).get(STATE)
    return state if isinstance(state, HeadState) else None


class HeadInputs:
    """A forward pre-hook that cuts per-head inputs to the heads that stay.

    A tensor argument shaped like attention scores with one slice per head of the module as built, ``(batch or 1,
    heads, …)`` in 4 dimensions or ``(batch × heads, …)`` in 3, comes from outside the module for all of its heads
    (BLOOM's ALiBi biases, a per-head mask); the slices of the heads that stay are kept. A module that received such a
    tensor only from another attention module with the same heads (T5's position bias, passed from layer to layer)
    is tied to it instead, and the tensor already has the kept heads' slices only.
    """

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        state = head_state(module)
        if state is None or len(state.kept) == state.heads or not args or not isinstance(args[0], Tensor):
            return None
        batch = int(args[0].shape[0])
        index = torch.tensor(state.kept)
        changed = False

        def cut(value: Any) -> Any:
            nonlocal changed
            if per_head_dim(value, state.heads, batch) is None:
                return value
            changed = True
            kept = index.to(value.device)
            if value.dim() == 4:
                return value.index_select(1, kept)
            rest = value.shape[1:]
            return value.reshape(batch, state.heads, *rest).index_select(1, kept).reshape(batch * len(kept), *rest)

        new_args = (args[0], *(cut(a) for a in args[1:]))
        new_kwargs = {k: cut(v) for k, v in kwargs.items()}
        return (new_args, new_kwargs) if changed else None


def per_head_dim(value: Any, heads: int, batch: int) -> int | None:
    """Where ``value`` has one slice per head: a tensor shaped like attention scores (see :class:`HeadInputs`)."""
    if not isinstance(value, Tensor) or not value.is_floating_point() or heads < 2:
        return None
    if value.dim() == 4 and value.shape[1] == heads and value.shape[0] in (1, batch):
        return 1
    if value.dim() == 3 and value.shape[0] == batch * heads:
        return 0
    return None


def install_head_inputs(holder: nn.Module) -> None:
    """Register :class:`HeadInputs` on ``holder`` once."""
    if not any(isinstance(hook, HeadInputs) for hook in holder._forward_pre_hooks.values()):
        holder.register_forward_pre_hook(HeadInputs(), with_kwargs=True)


class HeadsSnapshot:
    """What :func:`set_head_numbers` and :class:`HeadInputs` add beyond a module's public attributes, to restore."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.state = vars(module).get(STATE)
        self.hooks = {k for k, hook in module._forward_pre_hooks.items() if isinstance(hook, HeadInputs)}

    def restore(self) -> None:
        """Put the state and the hook back as they were."""
        attributes = vars(self.module)
        if self.state is None:
            attributes.pop(STATE, None)
        else:
            attributes[STATE] = self.state
        for key, hook in list(self.module._forward_pre_hooks.items()):
            if isinstance(hook, HeadInputs) and key not in self.hooks:
                del self.module._forward_pre_hooks[key]
                self.module._forward_pre_hooks_with_kwargs.pop(key, None)


# --- probing: which block of which projection feeds which head ------------------------------------------------------


class Call(NamedTuple):
    """The arguments of a module's first call in the example forward, copied when they were passed."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]


def _tensors(value: Any) -> Iterator[Tensor]:
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


_PLAIN = (str, bytes, int, float, bool, complex, type(None), torch.dtype, torch.device)


def _tensors_inside(value: Any, seen: set[int], depth: int = 0) -> Iterator[Tensor]:
    """The tensors an argument holds: in containers and in the attributes of objects (a key/value cache)."""
    if id(value) in seen or depth > 8 or isinstance(value, (*_PLAIN, type)):
        return
    seen.add(id(value))
    if isinstance(value, Tensor):
        yield value
        return
    if isinstance(value, dict):
        items: Any = value.values()
    elif isinstance(value, (list, tuple, set, frozenset)):
        items = value
    elif hasattr(value, "__dict__"):
        items = vars(value).values()
    else:
        return
    for item in items:
        yield from _tensors_inside(item, seen, depth + 1)


def _copied(value: Any) -> Any:
    """A copy of the arguments' structure that shares their tensors; the arguments themselves if that fails.

    A key/value cache the module updates (by rebinding its tensors, as Hugging Face's do) must not grow from probe
    to probe, and copying every cached tensor for every probe of every layer would cost memory and time.
    """
    memo: dict[int, Any] = {id(t): t for t in _tensors_inside(value, set())}
    try:
        return copy.deepcopy(value, memo)
    except Exception:  # an argument that cannot be copied is passed as it is
        return value


class Capture(NamedTuple):
    """What one example forward shows about the attention modules."""

    calls: dict[nn.Module, Call]
    ties: list[tuple[nn.Module, nn.Module]]
    """Pairs of declaring modules where one's per-head output (a position bias) is the other's per-head input."""


def capture(root: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], modules: Sequence[nn.Module]) -> Capture:
    """Run ``root`` once and keep the first call's arguments of each of ``modules``; see which pass heads on."""
    calls: dict[nn.Module, Call] = {}
    produced: dict[int, nn.Module] = {}  # id of a per-head tensor -> the declaring module that returned it
    received: list[tuple[int, nn.Module]] = []
    alive: list[Tensor] = []  # ids are only compared while the tensors are alive
    numbers = {m: head_numbers(m) for m in modules if declares_heads(m)}

    def before(module: nn.Module, margs: tuple[Any, ...], mkwargs: dict[str, Any]) -> None:
        if module not in calls:
            calls[module] = Call(*_copied((margs, mkwargs)))
        found = numbers.get(module)
        if found is None or not margs or not isinstance(margs[0], Tensor):
            return
        batch = int(margs[0].shape[0])
        for value in (*margs[1:], *mkwargs.values()):
            if per_head_dim(value, found.heads, batch) is not None:
                alive.append(value)
                received.append((id(value), module))

    def after(module: nn.Module, margs: tuple[Any, ...], output: Any) -> None:
        found = numbers.get(module)
        if found is None or not margs or not isinstance(margs[0], Tensor):
            return
        batch = int(margs[0].shape[0])
        for value in _tensors(output):
            if per_head_dim(value, found.heads, batch) is not None:
                alive.append(value)
                produced.setdefault(id(value), module)

    handles = []
    for module in dict.fromkeys(modules):
        handles.append(module.register_forward_pre_hook(before, with_kwargs=True))
        handles.append(module.register_forward_hook(after))
    try:
        with torch.no_grad():
            root(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    ties = [(produced[key], module) for key, module in received if key in produced and produced[key] is not module]
    return Capture(calls, ties)


def _run(module: nn.Module, call: Call, hooks: Sequence[tuple[nn.Module, Callable[..., Any]]] = ()) -> Any:
    """``module`` alone on a fresh copy of its recorded arguments, with forward hooks on some of its submodules."""
    args, kwargs = _copied((call.args, call.kwargs))
    handles = [m.register_forward_hook(h) for m, h in hooks]
    try:
        with torch.no_grad():
            return module(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()


class Site(NamedTuple):
    """Where one attention module's heads are: found from its structure and one call, before any probe.

    Attributes:
        module: the attention module's name (the declaring module, or its parent when the out projection is there).
        holder: the declaring module's name.
        numbers: its head counts, with ``head_dim`` known.
        out_projection: the layer that reads the heads.
        producers: the layers with weights it calls before the out projection, in call order.
    """

    module: str
    holder: str
    numbers: HeadNumbers
    out_projection: str
    producers: tuple[str, ...]


class _Recorded(NamedTuple):
    order: list[nn.Module]
    inputs: dict[nn.Module, Tensor]
    widths: dict[nn.Module, int]


def _record_calls(module: nn.Module, call: Call) -> _Recorded:
    layers = [m for m in module.modules() if isinstance(m, PRODUCER_TYPES)]
    recorded = _Recorded([], {}, {})

    def note(layer: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if layer in recorded.inputs or not args or not isinstance(args[0], Tensor) or not isinstance(output, Tensor):
            return
        recorded.order.append(layer)
        recorded.inputs[layer] = args[0]
        recorded.widths[layer] = int(output.shape[-1])

    _run(module, call, [(layer, note) for layer in layers])
    return recorded


def _zeroing(start: int, stop: int) -> Callable[..., Tensor]:
    def zero(layer: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
        output = output.clone()
        output[..., start:stop] = 0
        return output

    return zero


def _out_input(module: nn.Module, call: Call, out: nn.Module, zeroed: Sequence[tuple[nn.Module, int, int]]) -> Tensor:
    """The out projection's input on its first call, with some producers' output blocks zeroed."""
    seen: list[Tensor] = []

    def keep(layer: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if not seen:
            seen.append(args[0].detach().clone())

    _run(module, call, [*((m, _zeroing(a, b)) for m, a, b in zeroed), (out, keep)])
    if not seen:
        raise RuntimeError("the out projection was not called")
    return seen[0]


def locate(
    holder_name: str, holder: nn.Module, candidates: Sequence[tuple[str, nn.Module]], calls: Mapping[nn.Module, Call]
) -> Site | str:
    """The attention module around ``holder`` (itself, or its parent) and its out projection, or why there is none.

    Args:
        holder_name: the declaring module's name.
        holder: the declaring module.
        candidates: ``(name, module)`` of the modules that may be the attention module, tried in order.
        calls: the recorded first call of each candidate.
    """
    numbers = head_numbers(holder)
    if numbers is None:
        return "it gives a head width but no head count (no num_heads, num_attention_heads or config)."
    if not any(module in calls for _, module in candidates):
        return "it was not called on the example batch."
    for name, module in candidates:
        if module not in calls or "forward" in vars(module):
            continue
        call = calls[module]
        try:
            site = _site_in(name, holder_name, module, call, _record_calls(module, call), numbers)
        except Exception:  # the module alone does not run on its recorded arguments
            continue
        if site is not None:
            return site
    return (
        f"no Linear reads its {numbers.heads} heads together (an out projection of {numbers.heads} ×"
        f" {numbers.head_dim or 'head_dim'} features, called after its projections)."
    )


def _site_in(
    name: str, holder_name: str, module: nn.Module, call: Call, recorded: _Recorded, numbers: HeadNumbers
) -> Site | None:
    names = {m: n for n, m in module.named_modules()}
    for index in range(len(recorded.order) - 1, 0, -1):
        out = recorded.order[index]
        if not isinstance(out, OUT_TYPES):
            continue
        width = int(recorded.inputs[out].shape[-1])
        head_dim = numbers.head_dim or (width // numbers.heads if width % numbers.heads == 0 else None)
        if head_dim is None or width != numbers.heads * head_dim:
            continue
        producers = [m for m in recorded.order[:index] if m is not out]
        if not producers:
            continue
        try:  # the out projection reads what the producers make: zeroing all of them changes its input
            base = _out_input(module, call, out, [])
            silenced = _out_input(module, call, out, [(m, 0, recorded.widths[m]) for m in producers])
        except Exception:
            continue
        if torch.equal(base, silenced):
            continue
        prefix = f"{name}." if name else ""
        if name != holder_name and _beside(module, call, holder_name.removeprefix(prefix), base):
            continue  # in the parent, a holder with projections of its own: a Linear pair beside it is not its heads
        return Site(
            module=name,
            holder=holder_name,
            numbers=numbers._replace(head_dim=head_dim),
            out_projection=prefix + names[out],
            producers=tuple(prefix + names[m] for m in producers),
        )
    return None


def _beside(parent: nn.Module, call: Call, relative: str, out_input: Tensor) -> bool:
    """Whether a site found in the holder's ``parent`` lies beside the holder (``relative``: its name in the parent).

    A holder that owns Linear layers (its projections) has its heads where its own output goes: the out projection
    in the parent must read exactly what the holder returns (BERT's ``self`` → ``output.dense``), in any order of its
    values (a transpose, a reshape). A Linear pair elsewhere in the parent is something else that happens to have a
    multiple of its head count: Swin's block MLP, where the attention calls its projections' weights through
    ``F.linear`` (Swin-V2's attention also holds a position-bias MLP, so being called inside the holder is no proof).
    A holder without Linear layers (projections kept by its parent) keeps any site.
    """
    holder = parent.get_submodule(relative)
    if not any(isinstance(m, OUT_TYPES) for m in holder.modules()):
        return False
    returned: list[Tensor] = []

    def keep(layer: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        first = next(_tensors(output), None)
        if not returned and first is not None:
            returned.append(first.detach())

    _run(parent, call, [(holder, keep)])
    return not returned or not _same_values(returned[0], out_input)


def _same_values(a: Tensor, b: Tensor) -> bool:
    """The same numbers, whatever their order (a transpose or a reshape between them)."""
    if a.numel() != b.numel():
        return False
    return torch.equal(a.flatten().sort().values, b.flatten().to(a.dtype).sort().values)


class Block(NamedTuple):
    """Output features ``[start, stop)`` of a producer and the heads that change when they are zeroed."""

    module: str
    start: int
    stop: int
    heads: frozenset[int]


class Layout(NamedTuple):
    """The probed layout of one attention module: every block of its producers, with its heads."""

    site: Site
    blocks: tuple[Block, ...]


def probe(model: nn.Module, site: Site, call: Call) -> Layout | str:
    """Zero each hypothesised block of each producer and see which heads change at the out projection."""
    module = model.get_submodule(site.module)
    out = model.get_submodule(site.out_projection)
    heads, kv_heads, head_dim = site.numbers.heads, site.numbers.kv_heads, int(site.numbers.head_dim or 0)
    base = _out_input(module, call, out, [])
    tolerance = _PROBE_TOLERANCE * max(float(base.abs().max()), 1e-30)
    if not torch.allclose(base, _out_input(module, call, out, []), rtol=0, atol=tolerance):
        return "two identical calls give different outputs (randomness or state kept between calls): not probed."
    per_head = base.reshape(-1, heads, head_dim)

    def changed(zeroed: Sequence[tuple[nn.Module, int, int]]) -> frozenset[int]:
        moved = (_out_input(module, call, out, zeroed).reshape(-1, heads, head_dim) - per_head).abs()
        return frozenset(int(h) for h in torch.nonzero(moved.amax(dim=(0, 2)) > tolerance).flatten())

    blocks: list[Block] = []
    for producer_name in site.producers:
        producer = model.get_submodule(producer_name)
        width = _out_width(producer)
        if width % head_dim == 0:
            size = head_dim
        elif width % heads == 0:
            size = width // heads  # a table with a column per head (T5's relative position bias)
        else:
            if changed([(producer, 0, width)]):
                return f"{producer_name}'s {width} outputs are not a whole number of {head_dim}-channel heads."
            continue
        found = [Block(producer_name, a, a + size, changed([(producer, a, a + size)])) for a in range(0, width, size)]
        if not any(block.heads for block in found):
            continue  # it does not feed the heads (or not on this batch)
        silent = [block for block in found if not block.heads]
        if silent:
            return (
                f"zeroing outputs {silent[0].start}-{silent[0].stop - 1} of {producer_name} changes no head on the"
                " example batch, so the head they belong to cannot be proven."
            )
        blocks += found
    if not blocks:
        return "no projection it calls feeds its heads blockwise."
    return _checked(Layout(site, tuple(blocks)), heads, kv_heads)


def _out_width(module: nn.Module) -> int:
    if isinstance(module, nn.Embedding):
        return int(module.embedding_dim)
    if isinstance(module, Conv1D):
        return int(module.get_parameter("weight").shape[1])
    return int(module.get_parameter("weight").shape[0])


def _checked(layout: Layout, heads: int, kv_heads: int) -> Layout | str:
    """The layout if its blocks fit ``kv_heads`` consecutive groups of query heads; else why not."""
    if kv_heads < 1 or heads % kv_heads:
        return f"its {heads} heads cannot form {kv_heads} equal key/value groups."
    size = heads // kv_heads
    group = [frozenset(range(g * size, (g + 1) * size)) for g in range(kv_heads)]

    def shown(block: Block) -> str:
        return (
            f"zeroing its outputs {block.start}-{block.stop - 1} changes heads"
            f" {', '.join(str(h) for h in sorted(block.heads))}"
        )

    for block in layout.blocks:
        touched = {h // size for h in block.heads}
        if len(touched) > 1 and not all(group[g] <= block.heads for g in touched):
            return (
                f"the layout of {block.module} could not be proven: {shown(block)}, which is neither one head nor the"
                f" heads of whole key/value groups (it declares {kv_heads} key/value heads for {heads} heads)."
            )
    if not any(len(block.heads) == 1 for block in layout.blocks):
        block = layout.blocks[0]
        return (
            f"the layout of {block.module} could not be proven: {shown(block)}, and no block of its projections feeds"
            " a single head (its channels are not stored head by head)."
        )
    return layout
