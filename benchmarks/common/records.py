"""Typed result records and their JSON: a dataclass that writes itself and reads itself back, nested ones included."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R", bound="JsonRecord")


class JsonRecord:
    """Mixin for a dataclass of plain values and nested dataclasses: ``to_json`` and ``from_json`` round-trip it.

    Example:
        >>> @dataclasses.dataclass
        ... class Point(JsonRecord):
        ...     x: float
        ...     tags: list[str]
        >>> Point.from_json(Point(1.5, ["a"]).to_json()) == Point(1.5, ["a"])
        True
    """

    def to_json(self) -> str:
        """The record as an indented JSON object (``dataclasses.asdict``)."""
        return json.dumps(dataclasses.asdict(typing.cast(Any, self)), indent=2)

    @classmethod
    def from_json(cls: type[R], text: str) -> R:
        """The record back from :meth:`to_json`'s text."""
        return from_plain(cls, json.loads(text))


class FlatJsonRecord(JsonRecord):
    """Mixin for a dataclass whose fields are records: its JSON is one flat object, the fields of each in turn.

    Example:
        >>> @dataclasses.dataclass
        ... class Size(JsonRecord):
        ...     params: int
        >>> @dataclasses.dataclass
        ... class Where(JsonRecord):
        ...     cpu: str
        >>> @dataclasses.dataclass
        ... class Run(FlatJsonRecord):
        ...     size: Size
        ...     where: Where
        >>> json.loads(Run(Size(10), Where("x86")).to_json())
        {'params': 10, 'cpu': 'x86'}
    """

    def to_json(self) -> str:
        """One JSON object: the ``dataclasses.asdict`` of every field, merged in field order."""
        merged: dict[str, Any] = {}
        for field in dataclasses.fields(typing.cast(Any, self)):
            merged |= dataclasses.asdict(getattr(self, field.name))
        return json.dumps(merged, indent=2)

    @classmethod
    def from_json(cls: type[R], text: str) -> R:
        """The records back from :meth:`to_json`'s text: each field's record from the same flat object."""
        data = json.loads(text)
        hints = typing.get_type_hints(cls)
        fields = dataclasses.fields(typing.cast(Any, cls))
        return cls(**{field.name: from_plain(hints[field.name], data) for field in fields})


def from_plain(kind: type[T], value: Any) -> T:
    """Rebuild a value of type ``kind`` (a dataclass, or lists, tuples, dicts and optionals of them) from JSON data.

    Keys of ``dict[int, ...]`` come back as ints (JSON has only string keys); fields missing from ``value`` take
    their defaults, so records written before a field was added still load. A dataclass whose JSON changed shape
    reads older data through its classmethod ``from_older(data) -> data``, if it has one.
    """
    return typing.cast(T, _from_plain(kind, value))


def _from_plain(kind: Any, value: Any) -> Any:
    if value is None:
        return None
    if isinstance(kind, type) and dataclasses.is_dataclass(kind):
        if hasattr(kind, "from_older"):
            value = kind.from_older(value)
        hints = typing.get_type_hints(kind)
        fields = [f.name for f in dataclasses.fields(kind) if f.init and f.name in value]
        return kind(**{name: _from_plain(hints[name], value[name]) for name in fields})
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        inner = [arg for arg in args if arg is not type(None)]
        return _from_plain(inner[0], value) if len(inner) == 1 else value
    if origin is list:
        return [_from_plain(args[0], item) for item in value]
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_from_plain(args[0], item) for item in value)
        return tuple(_from_plain(arg, item) for arg, item in zip(args, value, strict=True))
    if origin is dict:
        key_type, item_type = args
        return {key_type(key): _from_plain(item_type, item) for key, item in value.items()}
    return value


def short_hash(fields: Any) -> str:
    """12 hex digits of the SHA-256 of ``fields`` as sorted JSON: a cache file name for what a result depends on.

    Example:
        >>> short_hash({"seed": 0, "epochs": 4}) == short_hash({"epochs": 4, "seed": 0})
        True
    """
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]
