"""Python's cyclic garbage collector held off while the prune step builds and drops many small objects."""

from __future__ import annotations

import functools
import gc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import ParamSpec, TypeVar

_P = ParamSpec("_P")
_R = TypeVar("_R")


@contextmanager
def collection_paused() -> Iterator[None]:
    """Inside, the cyclic collector does not run; afterwards it is as it was (on, unless the caller had it off).

    The analysis and the planning allocate hundreds of thousands of short-lived index tuples: each automatic
    collection then walks every object of the process (the model's modules, the dependency graph), which cost a
    third of building DenseNet-201's coupled groups. Nothing inside is a long loop over user data (no validation
    pass runs inside), so the garbage it leaves is bounded and is collected as usual once the block ends.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def collection_paused_during(function: Callable[_P, _R]) -> Callable[_P, _R]:
    """``function`` run inside :func:`collection_paused`."""

    @functools.wraps(function)
    def wrapped(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        with collection_paused():
            return function(*args, **kwargs)

    return wrapped
