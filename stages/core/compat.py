"""transformers renamed ``past_key_values`` to ``cache`` (5.x; the old name is removed in 5.40): pass the name the
installed version reads, so one call works on the whole supported range without the deprecation warning."""

from __future__ import annotations

import functools
import inspect
from typing import Any


@functools.cache
def _cache_kw(fn: Any) -> str:
    params = inspect.signature(inspect.unwrap(fn)).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwargs(fn: Any, value: Any = None) -> dict[str, Any]:
    """``{"cache": value}`` or ``{"past_key_values": value}``: whichever ``fn`` (a transformers function or a
    model's ``forward``) takes."""
    return {_cache_kw(getattr(fn, "__func__", fn)): value}


def output_cache(out: Any) -> Any:
    """The KV cache a forward returned, under its new name (``cache``) or its old one."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)
