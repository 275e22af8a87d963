"""Recycled memory for the kernels' large outputs.

NumPy takes an array of 32 MiB or more straight from the OS (glibc's mmap threshold) and
gives it back when the array dies, so in a loop every call gets new pages, which the OS
zeroes at their first write: here about 2.4 ms per 40 MB, as long as the kernel's own work
on them. `empty` keeps the memory of a dead output and hands it out again for the next
output of the same size, as PyTorch's and CuPy's GPU allocators do. Those pages are not in
cache either, so the kernels write them with streaming stores, as they write an `out=`.

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
from collections.abc import Iterator
from typing import Any

import numpy as np

from ._errors import NormgradError

MIN_BYTES = 32 << 20  # below it glibc's heap already reuses freed memory

_lock = threading.RLock()  # (a finalizer may run in any thread, or inside this module)
_free: list[np.ndarray] = []  # raw uint8 buffers, oldest first
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
    """An uninitialized C-order array, and whether its memory was recycled (out of cache and
    already mapped: worth streaming stores). Small arrays come from `np.empty`."""
    global _held
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < MIN_BYTES or _limit_bytes() == 0:
        return np.empty(shape, dtype), False
    raw = None
    with _lock:
        for i in range(len(_free) - 1, -1, -1):  # the most recently freed first
            if _free[i].nbytes == nbytes:
                raw = _free.pop(i)
                _held -= nbytes
                break
    recycled = raw is not None
    if raw is None:
        raw = np.empty(nbytes, np.uint8)
    owner = np.frombuffer(raw.data, dtype)  # (`.data`: a memoryview)
    weakref.finalize(owner, _give_back, raw).atexit = False
    return owner.reshape(shape), recycled


def _give_back(raw: np.ndarray) -> None:
    global _held
    limit = _limit_bytes()
    if raw.nbytes > limit:
        return
    with _lock:
        _free.append(raw)
        _held += raw.nbytes
        while _held > limit:
            _held -= _free.pop(0).nbytes


def release_buffers() -> int:
    """Return the memory normgrad keeps for reuse to the system; the number of bytes.

    The fused kernels keep the memory of dead outputs of 32 MiB or more (up to
    `NORMGRAD_RECYCLE_MB` MiB) and reuse it for the next output of the same size, saving the
    OS's zeroing of new pages. Outputs still alive are not affected."""
    global _held
    with _lock:
        released = _held
        _free.clear()
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
    """Bytes of dead outputs kept for reuse (tests and benchmarks)."""
    return _held


def _after_fork() -> None:
    global _lock
    _lock = threading.RLock()  # another thread of the parent may have held it


os.register_at_fork(after_in_child=_after_fork)
