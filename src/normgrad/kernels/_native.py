"""Native jobs: the planned calls' kernels run by every thread without entering Python.

The caller (`post_forward`, `post_backward`: GIL-free jitted code) writes the job's arrays
(as addresses: they are C-contiguous) and scalars into the board's parameter slots (named
below), and every thread, workers included, calls the job's *part*: a `cfunc` that views
them again and runs one kernel of `_loops.py` for one dtype of x and one of the parameter
tables (`_layout.table_dtype`). `part_address` compiles a part
on first use (or loads it from numba's cache); all parts are made by `_make_part` from one
template. A worker stays in its GIL-free spin from one such job to the next: no Python, none
of the caller's objects to touch. Masked calls with whole groups run the same way
(`post_masked_forward`, `post_masked_backward`: the mask and counts in two more slots), and
so do layouts whose groups are innermost in memory (Rb = 1: "forward_columns",
"backward_columns", the sweep's column kernels in one two-phase job, whose items are chunks
of rows of a Ka block rather than of a group).
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable
from typing import Any

import numpy as np
from numba import carray, cfunc, njit
from numba import types as nbtypes

from . import _loops
from ._board import PARAMS, board_at, board_ctl, board_params
from ._intrinsics import address, float_bits
from ._pool import run_job

PART_SIGNATURE = nbtypes.void(nbtypes.int64, nbtypes.int64)  # (board address, slot)

# the board's parameter slots of a native job
_NCHUNKS, _ITEMS, _NC, _GROUPS = range(4)
_SHAPE = 4  # four slots: the 4-d block shape
_X, _DY, _OUT, _STATS, _RSTD, _C, _COUNTS, _PARTS, _EPS, _INSIDE, _M, _STREAM = range(8, 20)
_W, _B = 20, 23  # each a table: address, rows, columns; their row rules at _RULE (3 each)
_RULE = 26
_DW, _DB = 32, 36  # each gradient's sums: address, slots, rows, columns
_AFFINE, _HAS_W, _NEED_DW, _NEED_DB, _CENTER = range(40, 45)
_MASK, _COUNT = 45, 46  # a masked job's counted elements (bool, x's block shape), counts
assert _COUNT < PARAMS


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
    parts = carray(address(p[_PARTS]), (2, p[_GROUPS] * p[_NC]), np.float64)
    return board_ctl(board, 1), parts[0], parts[1]


@njit(cache=True, inline="always")
def _table(p, at, tdtype):
    return carray(address(p[at]), (p[at + 1], p[at + 2]), tdtype)


@njit(cache=True, inline="always")
def _par(p, tdtype):
    """The affine parameters' tables (of `tdtype`) and row rules (`_layout.Table`)."""
    wr = (p[_RULE], p[_RULE + 1], p[_RULE + 2])
    br = (p[_RULE + 3], p[_RULE + 4], p[_RULE + 5])
    return _table(p, _W, tdtype), _table(p, _B, tdtype), wr, br


@njit(cache=True, inline="always")
def _forward_args(board, xdtype, tdtype, sdtype):
    """`forward_groups`' arguments after the claim: x and the tables of those dtypes (the
    gradient sums' `sdtype`: backward only)."""
    p, x, _, y = _views(board, xdtype)
    stats = carray(address(p[_STATS]), (3, p[_GROUPS]), np.float64)
    op = (float_bits(p[_EPS]), p[_INSIDE] != 0, float_bits(p[_M]), p[_CENTER] != 0)
    return (x, y), _par(p, tdtype), op, stats, (p[_AFFINE] != 0, p[_STREAM] != 0)


@njit(cache=True, inline="always")
def _forward_split_args(board, xdtype, tdtype, sdtype):
    p = board_params(board)
    phase, pmean, pm2 = _parts(board)
    counts = carray(address(p[_COUNTS]), p[_NC], np.float64)
    return (phase, (counts, pmean, pm2), *_forward_args(board, xdtype, tdtype, sdtype))


@njit(cache=True, inline="always")
def _sums(p, at, sdtype):
    return carray(address(p[at]), (p[at + 1], p[at + 2], p[at + 3]), sdtype)


@njit(cache=True, inline="always")
def _backward_args(board, xdtype, tdtype, sdtype):
    """`backward_groups`' arguments after the claim; dtypes as `_forward_args`'."""
    p, x, dy, dx = _views(board, xdtype)
    groups = p[_GROUPS]
    mean = carray(address(p[_STATS]), groups, np.float64)
    rstd = carray(address(p[_RSTD]), groups, np.float64)
    c = carray(address(p[_C]), groups, np.float64)
    acc = (_sums(p, _DW, sdtype), _sums(p, _DB, sdtype), 0)
    flags = (p[_HAS_W] != 0, p[_NEED_DW] != 0, p[_NEED_DB] != 0, p[_STREAM] != 0)
    bst = (mean, rstd, c, float_bits(p[_M]), p[_CENTER] != 0)
    return (x, dy, dx), _par(p, tdtype), acc, bst, flags


@njit(cache=True, inline="always")
def _backward_split_args(board, xdtype, tdtype, sdtype):
    phase, psg, psgd = _parts(board)
    split = (board_params(board)[_NC], psg, psgd)
    return (phase, split, *_backward_args(board, xdtype, tdtype, sdtype))


@njit(cache=True, inline="always")
def _mask(p):
    s4 = (p[_SHAPE], p[_SHAPE + 1], p[_SHAPE + 2], p[_SHAPE + 3])
    return carray(address(p[_MASK]), s4, np.bool_)


@njit(cache=True, inline="always")
def _forward_masked_args(board, xdtype, tdtype, sdtype):
    """`forward_masked`'s arguments after the claim: `op[2]` is ddof, `stats` (4, groups)."""
    io, par, op, _, flags = _forward_args(board, xdtype, tdtype, sdtype)
    p = board_params(board)
    stats = carray(address(p[_STATS]), (4, p[_GROUPS]), np.float64)
    return io, _mask(p), par, op, stats, flags


@njit(cache=True, inline="always")
def _backward_masked_args(board, xdtype, tdtype, sdtype):
    """`backward_masked`'s arguments after the claim: `bst = (mean, rstd, c, count, ddof,
    center)`."""
    io, par, acc, bst, flags = _backward_args(board, xdtype, tdtype, sdtype)
    p = board_params(board)
    mean, r, c, ddof, center = bst
    count = carray(address(p[_COUNT]), p[_GROUPS], np.float64)
    return io, _mask(p), par, acc, (mean, r, c, count, ddof, center), flags


def _template(addr, slot):
    """A part: `KERNEL(claim, *READ(board, DTYPE, TDTYPE, SDTYPE))` (the five names are the
    globals `_make_part` gives each copy)."""
    board = board_at(addr)
    args = READ(board, DTYPE, TDTYPE, SDTYPE)  # type: ignore[name-defined]  # noqa: F821
    KERNEL(_claim(board, slot), *args)  # type: ignore[name-defined]  # noqa: F821


def _make_part(kernel: Any, read: Any, dtypes: tuple[Any, ...], name: str) -> Callable[..., None]:
    """A copy of `_template` with its own globals and name (`dtypes`: x's, the tables' and
    the gradient sums'): numba caches each part by name (a closure's cells would enter its
    cache key, which changes from process to process)."""
    scope = dict(_template.__globals__, KERNEL=kernel, READ=read)
    scope.update(DTYPE=dtypes[0], TDTYPE=dtypes[1], SDTYPE=dtypes[2])
    part = types.FunctionType(_template.__code__, scope, name)
    part.__qualname__ = name
    return part


_KERNELS = {
    ("forward", False): (_loops.forward_groups, _forward_args),
    ("forward", True): (_loops.forward_split, _forward_split_args),
    ("backward", False): (_loops.backward_groups, _backward_args),
    ("backward", True): (_loops.backward_split, _backward_split_args),
    ("forward_columns", True): (_loops.forward_split_columns, _forward_split_args),
    ("backward_columns", True): (_loops.backward_split_columns, _backward_split_args),
    ("forward_masked", False): (_loops.forward_masked, _forward_masked_args),
    ("backward_masked", False): (_loops.backward_masked, _backward_masked_args),
}
_COMPILED: list[Any] = []  # kept alive: workers call them by address


@functools.cache
def part_address(direction: str, split: bool, itemsizes: tuple[int, int, int]) -> int:
    """The address of the part for `direction` ("forward", "backward", "forward_masked",
    "backward_masked", "forward_columns", "backward_columns"), split or whole groups
    (masked: whole only; columns: split only), x, the parameter tables
    and the gradient sums (8 for a forward) each float32 or float64 (`itemsizes`: 4 or 8
    each), compiled (or loaded) on first use."""
    kernel, read = _KERNELS[direction, split]
    dtypes = tuple(np.float32 if size == 4 else np.float64 for size in itemsizes)
    tables = "" if itemsizes[1] == itemsizes[0] else f"_t{8 * itemsizes[1]}"
    sums = "" if itemsizes[2] == 8 else f"_s{8 * itemsizes[2]}"
    name = f"_part_{direction}_{'split' if split else 'groups'}_f{8 * itemsizes[0]}{tables}{sums}"
    part = _make_part(kernel, read, dtypes, name)
    compiled: Any = cfunc(PART_SIGNATURE, cache=True)(part)
    _COMPILED.append(compiled)
    return int(compiled.address)


@njit(cache=True, inline="always")
def _post(board, shape, x, dy, out):
    """Write the parameters every native job has; `shape = ((nchunks, items), nc, groups)`
    (items: groups times nc, or for the column kernels Ka times nc)."""
    (nchunks, items), nc, groups = shape
    p = board_params(board)
    p[_NCHUNKS], p[_ITEMS], p[_NC], p[_GROUPS] = nchunks, items, nc, groups
    for i in range(4):
        p[_SHAPE + i] = x.shape[i]
    p[_X], p[_DY], p[_OUT] = x.ctypes.data, dy.ctypes.data, out.ctypes.data


@njit(cache=True, inline="always")
def _post_par(p, par):
    wt, bt, wr, br = par
    for at, t in ((_W, wt), (_B, bt)):
        p[at], p[at + 1], p[at + 2] = t.ctypes.data, t.shape[0], t.shape[1]
    for i in range(3):
        p[_RULE + i], p[_RULE + 3 + i] = wr[i], br[i]


@njit(cache=True, nogil=True)
def post_forward(board, nthreads, part, job, op, par, flags):
    """The caller's side of a native forward: `job = ((nchunks, items), x, y, stats, counts,
    parts)` (`run_native` calls it)."""
    claims, x, y, stats, counts, parts = job
    eps, inside, m, center = op
    p = board_params(board)
    _post(board, (claims, counts.size, stats.shape[1]), x, x, y)
    _post_par(p, par)
    p[_STATS], p[_COUNTS], p[_PARTS] = stats.ctypes.data, counts.ctypes.data, parts.ctypes.data
    p[_EPS], p[_INSIDE], p[_M], p[_CENTER] = float_bits(eps), inside, float_bits(m), center
    p[_AFFINE], p[_STREAM] = flags
    run_job(board, part, claims[0], nthreads)


@njit(cache=True, nogil=True)
def post_backward(board, nthreads, part, job, bst, par, sums, flags):
    """The caller's side of a native backward: `job = ((nchunks, items), nc, x, dy, dx,
    parts)`, `bst = (mean, rstd, c, m, center)`, `sums = (dw, db)` (their slots)."""
    claims, nc, x, dy, dx, parts = job
    mean, rstd, c, m, center = bst
    p = board_params(board)
    _post(board, (claims, nc, mean.size), x, dy, dx)
    _post_par(p, par)
    p[_STATS], p[_RSTD], p[_C] = mean.ctypes.data, rstd.ctypes.data, c.ctypes.data
    p[_PARTS], p[_M], p[_CENTER] = parts.ctypes.data, float_bits(m), center
    for at, a in ((_DW, sums[0]), (_DB, sums[1])):
        p[at], p[at + 1], p[at + 2], p[at + 3] = a.ctypes.data, a.shape[0], a.shape[1], a.shape[2]
    p[_HAS_W], p[_NEED_DW], p[_NEED_DB], p[_STREAM] = flags
    run_job(board, part, claims[0], nthreads)


@njit(cache=True, nogil=True)
def post_masked_forward(board, nthreads, part, job, op, par, flags, mask):
    """`post_forward` of a masked job (`op[2]` ddof, stats (4, groups), no split groups)."""
    board_params(board)[_MASK] = mask.ctypes.data
    post_forward(board, nthreads, part, job, op, par, flags)


@njit(cache=True, nogil=True)
def post_masked_backward(board, nthreads, part, job, bst, par, sums, flags, masked):
    """`post_backward` of a masked job: `bst = (mean, rstd, c, ddof, center)`, `masked =
    (mask, count)`."""
    p = board_params(board)
    p[_MASK], p[_COUNT] = masked[0].ctypes.data, masked[1].ctypes.data
    post_backward(board, nthreads, part, job, bst, par, sums, flags)
