"""Recycled memory for the kernels' outputs of `MIN_BYTES` (1 MiB) or more.

glibc hands freed memory back to the OS (a large block at once, smaller ones when the top of
the heap is free enough), and the next allocation gets new pages that the OS zeroes at their
first write. In a loop of calls that churn can cost as much as the kernels or far more, and
it comes and goes with the order of allocations (docs/performance.md, "Recycled outputs").
`Recycler.empty` keeps the memory of a dead output and hands it out again for the next
output of the same size, as PyTorch's and CuPy's GPU allocators do; large recycled outputs
are then written with streaming stores, as an `out=` is (they are not in cache).

An output is a view of a fresh array `owner` over the kept memory (through a memoryview,
so that NumPy's views of the output keep `owner` alive rather than the memory itself);
when `owner` dies (the output and every view of it are gone), its memory goes back to the
free list. The free list holds at most `NORMGRAD_RECYCLE_MB` MiB (default: 1 GiB or a
sixteenth of physical memory, whichever is less; 0 turns recycling off), dropping the
oldest buffers first; `normgrad.release_buffers()` empties it. The process's one recycler
belongs to `_runtime`.
"""

from __future__ import annotations

import math
import os
import threading
import weakref
from collections import OrderedDict
from typing import Any

import numpy as np

from ._errors import NormgradError

MIN_BYTES = 1 << 20  # smaller outputs come from np.empty (a recycled one costs a little more)


class Recycler:
    """Dead outputs' memory by size, most recently freed last, evicted oldest first."""

    def __init__(self, min_bytes: int = MIN_BYTES, limit: int | None = None) -> None:
        self.min_bytes = min_bytes  # smaller outputs come from np.empty
        self.lock = threading.RLock()  # (a weakref callback may run in any thread)
        self.free: dict[int, list[np.ndarray]] = {}  # nbytes -> raw uint8 buffers
        self.order: OrderedDict[int, np.ndarray] = OrderedDict()  # id -> buffer, oldest first
        self.live: dict[int, tuple[weakref.ref, np.ndarray]] = {}  # id(ref to owner) -> raw
        self.held = 0  # bytes in `free`
        self.limit = limit  # bytes kept at most (None: NORMGRAD_RECYCLE_MB, read at first need)

    def limit_bytes(self) -> int:
        if self.limit is None:
            self.limit = _limit_from_environment()
        return self.limit

    def empty(self, shape: tuple[int, ...], dtype: Any) -> tuple[np.ndarray, bool]:
        """An uninitialized C-order array, and whether its memory was recycled (already
        mapped, not necessarily in cache). Small arrays come from `np.empty`."""
        dtype = np.dtype(dtype)
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes < self.min_bytes or self.limit_bytes() == 0:
            return np.empty(shape, dtype), False
        raw = self._take(nbytes)
        recycled = raw is not None
        if raw is None:
            raw = np.empty(nbytes, np.uint8)
        owner = np.frombuffer(raw.data, dtype)  # (`.data`: a memoryview)
        ref = weakref.ref(owner, self._died)
        self.live[id(ref)] = (ref, raw)
        return owner.reshape(shape), recycled

    def _take(self, nbytes: int) -> np.ndarray | None:
        with self.lock:
            stack = self.free.get(nbytes)
            if not stack:
                return None
            raw = stack.pop()
            if not stack:
                del self.free[nbytes]
            del self.order[id(raw)]
            self.held -= nbytes
            return raw

    def _died(self, ref: weakref.ref) -> None:
        """`owner` is gone, and every view of the output with it: keep its memory."""
        entry = self.live.pop(id(ref), None)
        if entry is None or self.limit is None:  # (interpreter exit: state torn down)
            return
        raw = entry[1]
        if raw.nbytes > self.limit:
            return
        with self.lock:
            self.free.setdefault(raw.nbytes, []).append(raw)
            self.order[id(raw)] = raw
            self.held += raw.nbytes
            while self.held > self.limit:
                self._evict_oldest()

    def _evict_oldest(self) -> None:
        _, old = self.order.popitem(last=False)
        stack = self.free[old.nbytes]
        assert stack[0] is old  # the oldest of its size (not `remove`: arrays compare by value)
        del stack[0]
        if not stack:
            del self.free[old.nbytes]
        self.held -= old.nbytes

    def release(self) -> int:
        """Empty the free list; the number of bytes handed back."""
        with self.lock:
            released = self.held
            self.free.clear()
            self.order.clear()
            self.held = 0
        return released

    def after_fork(self) -> None:
        self.lock = threading.RLock()  # another thread of the parent may have held it


def _limit_from_environment() -> int:
    """`NORMGRAD_RECYCLE_MB` in bytes (checked), or the default."""
    text = os.environ.get("NORMGRAD_RECYCLE_MB")
    if text is None:
        try:
            ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            ram = 16 << 30
        return min(1 << 30, ram // 16)
    try:
        mib = int(text)
    except ValueError:
        mib = -1
    if mib < 0:
        raise NormgradError(
            "NORMGRAD_RECYCLE_MB must be a whole number of MiB >= 0 (how much memory of dead "
            f"outputs normgrad keeps for reuse; 0 keeps none); got {text!r}."
        )
    return mib << 20
