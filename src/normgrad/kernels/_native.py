"""Native jobs: the planned calls' kernels run by every thread without entering Python.

The caller (`post_forward`, `post_backward`: GIL-free jitted code) writes the job's arrays
(as addresses: they are C-contiguous) and scalars into the board's parameter slots (named
below), and every thread, workers included, calls the job's *part*: a `cfunc` that views
them again and runs one kernel of `_loops.py` for one dtype. `part_address` compiles a part
on first use (or loads it from numba's cache); all parts are made by `_make_part` from one
template. A worker stays in its GIL-free spin from one such job to the next: no Python, none
of the caller's objects to touch.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable
from typing import Any

import numpy as np
from numba import carray, cfunc, njit
from numba import types as nbtypes
from numpy.lib.stride_tricks import as_strided

from . import _loops
from ._board import board_at, board_ctl, board_params, board_scratch
from ._intrinsics import address, float_bits
from ._pool import run_job

PART_SIGNATURE = nbtypes.void(nbtypes.int64, nbtypes.int64)  # (board address, slot)

# the board's parameter slots of a native job
_NCHUNKS, _ITEMS, _NC, _GROUPS = range(4)
_SHAPE = 4  # four slots: the 4-d block shape
_X, _DY, _OUT, _STATS, _RSTD, _C, _COUNTS, _PARTS, _EPS, _INSIDE, _M, _STREAM = range(8, 20)


@njit(cache=True, inline="always")
def _views(board, xdtype):
    """The job's parameters, and its `x`, `dy` and output (`y` or `dx`), all of `xdtype`."""
    p = board_params(board)
    s4 = (p[_SHAPE], p[_SHAPE + 1], p[_SHAPE + 2], p[_SHAPE + 3])
    x = carray(address(p[_X]), s4, xdtype)
    return p, x, carray(address(p[_DY]), s4, xdtype), carray(address(p[_OUT]), s4, xdtype)


@njit(cache=True, inline="always")
def _claim(board, slot):
    p = board_params(board)
    return (board_ctl(board, 0), p[_NCHUNKS], p[_ITEMS], slot)


@njit(cache=True, inline="always")
def _parts(board):
    """A split kernel's first-phase claim state and its two arrays of partial sums."""
    p = board_params(board)
    parts = carray(address(p[_PARTS]), (2, p[_ITEMS]), np.float64)
    return board_ctl(board, 1), parts[0], parts[1]


@njit(cache=True, inline="always")
def _forward_args(board, xdtype):
    """`forward_groups`' arguments after the claim (x stands in for weight and bias)."""
    p, x, _, y = _views(board, xdtype)
    stats = carray(address(p[_STATS]), (3, p[_GROUPS]), np.float64)
    op = (float_bits(p[_EPS]), p[_INSIDE] != 0, float_bits(p[_M]))
    return (x, x, x, y), op, stats, (False, p[_STREAM] != 0)


@njit(cache=True, inline="always")
def _forward_split_args(board, xdtype):
    p = board_params(board)
    phase, pmean, pm2 = _parts(board)
    counts = carray(address(p[_COUNTS]), p[_NC], np.float64)
    return (phase, (counts, pmean, pm2), *_forward_args(board, xdtype))


@njit(cache=True, inline="always")
def _backward_args(board, xdtype):
    """`backward_groups`' arguments after the claim (stand-ins for the weight and its sums)."""
    p, x, dy, dx = _views(board, xdtype)
    groups = p[_GROUPS]
    mean = carray(address(p[_STATS]), groups, np.float64)
    rstd = carray(address(p[_RSTD]), groups, np.float64)
    c = carray(address(p[_C]), groups, np.float64)
    zero = board_scratch(board)[:1]  # never written: need_dw, need_db are False
    acc = as_strided(zero, shape=(p[_NCHUNKS], *x.shape), strides=(0, 0, 0, 0, 0))
    flags = (False, False, False, p[_STREAM] != 0)
    return (x, dy, x, dx), (acc, acc, 0), (mean, rstd, c), float_bits(p[_M]), flags


@njit(cache=True, inline="always")
def _backward_split_args(board, xdtype):
    phase, psg, psgd = _parts(board)
    split = (board_params(board)[_NC], psg, psgd)
    return (phase, split, *_backward_args(board, xdtype))


def _template(addr, slot):
    """A part: `KERNEL(claim, *READ(board, DTYPE))` (the three names are the globals
    `_make_part` gives each copy)."""
    board = board_at(addr)
    KERNEL(_claim(board, slot), *READ(board, DTYPE))  # type: ignore[name-defined]  # noqa: F821


def _make_part(kernel: Any, read: Any, dtype: Any, name: str) -> Callable[..., None]:
    """A copy of `_template` with its own globals and name: numba caches each part by name
    (a closure's cells would enter its cache key, which changes from process to process)."""
    scope = dict(_template.__globals__, KERNEL=kernel, READ=read, DTYPE=dtype)
    part = types.FunctionType(_template.__code__, scope, name)
    part.__qualname__ = name
    return part


_KERNELS = {
    ("forward", False): (_loops.forward_groups, _forward_args),
    ("forward", True): (_loops.forward_split, _forward_split_args),
    ("backward", False): (_loops.backward_groups, _backward_args),
    ("backward", True): (_loops.backward_split, _backward_split_args),
}
_COMPILED: list[Any] = []  # kept alive: workers call them by address


@functools.cache
def part_address(direction: str, split: bool, itemsize: int) -> int:
    """The address of the part for `direction` ("forward", "backward"), split or whole
    groups, and float32 or float64 (`itemsize` 4 or 8), compiled (or loaded) on first use."""
    kernel, read = _KERNELS[direction, split]
    dtype = np.float32 if itemsize == 4 else np.float64
    name = f"_part_{direction}_{'split' if split else 'groups'}_f{8 * itemsize}"
    compiled: Any = cfunc(PART_SIGNATURE, cache=True)(_make_part(kernel, read, dtype, name))
    _COMPILED.append(compiled)
    return int(compiled.address)


@njit(cache=True, inline="always")
def _post(board, shape, x, dy, out):
    """Write the parameters every native job has; `shape = (nchunks, nc, groups)`."""
    nchunks, nc, groups = shape
    p = board_params(board)
    p[_NCHUNKS], p[_ITEMS], p[_NC], p[_GROUPS] = nchunks, groups * nc, nc, groups
    for i in range(4):
        p[_SHAPE + i] = x.shape[i]
    p[_X], p[_DY], p[_OUT] = x.ctypes.data, dy.ctypes.data, out.ctypes.data


@njit(cache=True, nogil=True)
def post_forward(board, nthreads, part, job, op, stream):
    """The caller's side of a native forward: `job = (nchunks, x, y, stats, counts, parts)`
    (`run_native` calls it)."""
    nchunks, x, y, stats, counts, parts = job
    eps, inside, m = op
    p = board_params(board)
    _post(board, (nchunks, counts.size, stats.shape[1]), x, x, y)
    p[_STATS], p[_COUNTS], p[_PARTS] = stats.ctypes.data, counts.ctypes.data, parts.ctypes.data
    p[_EPS], p[_INSIDE], p[_M], p[_STREAM] = float_bits(eps), inside, float_bits(m), stream
    run_job(board, part, nchunks, nthreads)


@njit(cache=True, nogil=True)
def post_backward(board, nthreads, part, job, stats, m, stream):
    """The caller's side of a native backward: `job = (nchunks, nc, x, dy, dx, parts)`,
    `stats = (mean, rstd, c)`."""
    nchunks, nc, x, dy, dx, parts = job
    mean, rstd, c = stats
    p = board_params(board)
    _post(board, (nchunks, nc, mean.size), x, dy, dx)
    p[_STATS], p[_RSTD], p[_C] = mean.ctypes.data, rstd.ctypes.data, c.ctypes.data
    p[_PARTS], p[_M], p[_STREAM] = parts.ctypes.data, float_bits(m), stream
    run_job(board, part, nchunks, nthreads)
