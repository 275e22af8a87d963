"""Hooks for tests and benchmarks, kept out of the hot path.

```python
from normgrad import testing
with testing.record_paths() as seen:          # [("forward", "small"), ("backward", ...)]
    normgrad.normalize(x)
with testing.settings(sweep_min_bytes=0):     # the path rules' thresholds, for a block
    ...
with testing.recycling_paused():              # every large output newly mapped
    ...
```

Each context manager restores what it changed, and `reset()` forgets every cache.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from . import _ops, _runtime
from ._recycle import MIN_BYTES, Recycler

__all__ = [
    "held_bytes",
    "private_pool",
    "record_paths",
    "recycler",
    "recycling_paused",
    "reset",
    "settings",
    "thread_handoff_ns",
]


@contextmanager
def record_paths() -> Iterator[list[tuple[str, str]]]:
    """Record `(direction, path)` of every forward and backward run inside the block."""
    seen: list[tuple[str, str]] = []
    original = _ops._runner

    def recording(direction: str, path: str) -> Any:
        seen.append((direction, path))
        return original(direction, path)

    _ops._runner = recording
    try:
        yield seen
    finally:
        _ops._runner = original


@contextmanager
def settings(**changes: Any) -> Iterator[_runtime.Settings]:
    """The path rules' size thresholds and `torch_team` (`_runtime.Settings` fields) changed
    for the block; the planned calls are planned again inside it and after it."""
    state = _runtime.STATE
    saved = state.settings
    state.settings = dataclasses.replace(saved, **changes)
    state.planned.clear()
    try:
        yield state.settings
    finally:
        state.settings = saved
        state.planned.clear()


@contextmanager
def recycling_paused() -> Iterator[None]:
    """No recycling inside the block (outputs dying there are dropped): each large output is
    newly mapped, as with NumPy alone (the benchmark's `fused_mapped`). Process-wide."""
    recycler = _runtime.STATE.recycler
    saved = recycler.limit_bytes()
    recycler.limit = 0
    try:
        yield
    finally:
        recycler.limit = saved


@contextmanager
def recycler(min_bytes: int = MIN_BYTES, limit_bytes: int | None = None) -> Iterator[Recycler]:
    """A fresh recycler as the process's for the block: outputs from `min_bytes` recycled,
    at most `limit_bytes` kept (None: `NORMGRAD_RECYCLE_MB` or its default)."""
    state = _runtime.STATE
    saved = state.recycler
    state.recycler = Recycler(min_bytes, limit_bytes)
    try:
        yield state.recycler
    finally:
        state.recycler.release()
        state.recycler = saved


def held_bytes() -> int:
    """Bytes of dead outputs kept for reuse."""
    return _runtime.STATE.recycler.held


@contextmanager
def private_pool(threads: int, sleep_check: float | None = None) -> Iterator[Any]:
    """A new thread pool of `threads` threads as the process's pool for the block (its
    workers look at the board every `sleep_check` seconds while asleep)."""
    from .kernels._pool import SLEEP_CHECK, Pool

    state = _runtime.STATE
    pool = Pool(threads, SLEEP_CHECK if sleep_check is None else sleep_check)
    saved = state.pool
    state.pool = pool
    try:
        yield pool
    finally:
        state.pool = saved


def thread_handoff_ns(turns: int = 20_000) -> float | None:
    """Nanoseconds for a cache line to pass between the two first pool threads and back (two
    threads taking turns on an atomic counter), or None without a second thread: how well
    the cores share a cache now (the benchmark records it next to its timings)."""
    from .kernels._pool import handoff_ns

    return handoff_ns(turns)


def reset() -> None:
    """Forget the planned calls, the environment's mode, the recycled memory and changed
    settings (`_runtime.reset`)."""
    _runtime.reset()
