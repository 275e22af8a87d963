"""Recycled memory for the kernels' outputs of 1 MiB or more.

glibc hands freed memory back to the OS (a block of 32 MiB or more at once, smaller ones
when the top of the heap is free enough), and the next allocation gets new pages that the
OS zeroes at their first write. In a loop of calls that churn costs as much as the kernels
or far more, and it comes and goes with the order of allocations: a float64 forward+backward
of 5*10^5 elements took 2.2 ms with new outputs and 0.17 ms with `out=`; at 10^7 float32
elements it is about 2.4 ms per 40 MB output. `empty` keeps the memory of a dead output and
hands it out again for the next output of the same size, as PyTorch's and CuPy's GPU
allocators do; outputs of `STREAM_MIN_BYTES` or more are then written with streaming
stores, as an `out=` is (they are not in cache).

An output is a view of a fresh array `owner` over the kept memory (through a memoryview,
so that NumPy's views of the output keep `owner` alive rather than the memory itself);
when `owner` dies (the output and every view of it are gone), its memory goes back to the
free list. The free list holds at most `NORMGRAD_RECYCLE_MB` MiB (default: 1 GiB or a
sixteenth of physical memory, whichever is less; 0 turns recycling off), dropping the
oldest buffers first; `release_buffers()` empties it.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import numpy as np

from ._errors import NormgradError

MIN_BYTES = 1 << 20  # smaller outputs: np.empty (a recycled one costs 0.3 us more)

_lock = threading.RLock()  # (a weakref callback may run in any thread, or inside this module)
_free: dict[int, list[np.ndarray]] = {}  # nbytes -> raw uint8 buffers, most recent last
_order: OrderedDict[int, np.ndarray] = OrderedDict()  # id -> the same buffers, oldest first
_live: dict[int, tuple[weakref.ref, np.ndarray]] = {}  # id(ref to owner) -> (ref, raw)
_held = 0  # bytes in _free
_limit: int | None = None


def _limit_bytes() -> int:
    """`NORMGRAD_RECYCLE_MB` in bytes, read and checked at the first large output."""
    global _limit
    if _limit is None:
        text = os.environ.get("NORMGRAD_RECYCLE_MB")
        if text is None:
            try:
                ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            except (ValueError, OSError, AttributeError):
                ram = 16 << 30
            _limit = min(1 << 30, ram // 16)
        else:
            try:
                mib = int(text)
            except ValueError:
                mib = -1
            if mib < 0:
                raise NormgradError(
                    "NORMGRAD_RECYCLE_MB must be a whole number of MiB >= 0 (how much memory "
                    f"of dead outputs normgrad keeps for reuse; 0 keeps none); got {text!r}."
                )
            _limit = mib << 20
    return _limit


def empty(shape: tuple[int, ...], dtype: Any) -> tuple[np.ndarray, bool]:
    """An uninitialized C-order array, and whether its memory was recycled (already mapped,
    not necessarily in cache). Small arrays come from `np.empty`."""
    global _held
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < MIN_BYTES or _limit_bytes() == 0:
        return np.empty(shape, dtype), False
    raw = None
    with _lock:
        stack = _free.get(nbytes)
        if stack:
            raw = stack.pop()
            if not stack:
                del _free[nbytes]
            del _order[id(raw)]
            _held -= nbytes
    recycled = raw is not None
    if raw is None:
        raw = np.empty(nbytes, np.uint8)
    owner = np.frombuffer(raw.data, dtype)  # (`.data`: a memoryview)
    ref = weakref.ref(owner, _died)
    _live[id(ref)] = (ref, raw)
    return owner.reshape(shape), recycled


def _died(ref: weakref.ref) -> None:
    """`owner` is gone: every view of the output with it. Keep its memory for reuse."""
    global _held
    try:
        raw = _live.pop(id(ref))[1]
    except AttributeError:  # at interpreter exit, when module globals are already None
        return
    limit = _limit_bytes()
    if raw.nbytes > limit:
        return
    with _lock:
        _free.setdefault(raw.nbytes, []).append(raw)
        _order[id(raw)] = raw
        _held += raw.nbytes
        while _held > limit:
            _, old = _order.popitem(last=False)
            stack = _free[old.nbytes]
            assert stack[0] is old  # the oldest of its size (not `remove`: arrays compare by value)
            del stack[0]
            if not stack:
                del _free[old.nbytes]
            _held -= old.nbytes


def release_buffers() -> int:
    """Return the memory normgrad keeps for reuse to the system; the number of bytes.

    The fused kernels keep the memory of dead outputs of 1 MiB or more (up to
    `NORMGRAD_RECYCLE_MB` MiB) and reuse it for the next output of the same size, saving the
    OS's zeroing of new pages. Outputs still alive are not affected."""
    global _held
    with _lock:
        released = _held
        _free.clear()
        _order.clear()
        _held = 0
    return released


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """No recycling inside the block (outputs dying there are dropped): each large output is
    newly mapped, as with NumPy alone (the benchmark's `fused_mapped`). Process-wide."""
    global _limit
    saved = _limit_bytes()
    _limit = 0
    try:
        yield
    finally:
        _limit = saved


def held_bytes() -> int:
    """Bytes of dead outputs kept for reuse (for tests)."""
    return _held


def _after_fork() -> None:
    global _lock
    _lock = threading.RLock()  # another thread of the parent may have held it


os.register_at_fork(after_in_child=_after_fork)
