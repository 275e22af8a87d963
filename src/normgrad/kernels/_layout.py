"""Layout planning for the kernels, in plain Python: how an array and its affine parameters
are viewed as `(Ka, Ra, Kb, Rb)` blocks, how many threads and chunks a call gets, and the
conversions of per-group values to and from keepdims statistics.

Every axes choice is viewed, without copying, as a 4-d block array: kept and reduced axes,
each block a run of axes that merge in memory (axes taken in memory order, so transposed or
sliced inputs work as well). Whole tensor is `(1, 1, 1, N)`, layer norm `(rows, 1, 1, D)`,
batch norm over `(0, 2, 3)` is `(1, N, C, H*W)`. Where the kept axes are innermost in memory
(batch norm over `(N, F)`, or over NHWC memory) the one reduced block is `Ra` and `Rb` is 1:
`(1, N, F, 1)`, `(1, N*H*W, C, 1)`, whose rows of groups the column kernels go along.
Layouts that need more than two blocks of either kind have no layout (`None`), and the
generic path takes them.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import numba
import numpy as np

from .. import _runtime

MIN_CHUNK = 16384  # smallest chunk a group is split into for threading
PARALLEL_MIN_SIZE = 1 << 15  # below this, one thread beats waking the others
SPLIT_MIN_SIZE = 1 << 17  # below this, no group is split: a split costs a merge and a call


class Layout(NamedTuple):
    """Blocks of original axes (each in memory order) for (Ka, Ra, Kb, Rb); `perm`, the
    blocks' axes in that order then the size-1 axes; `order`, every axis in memory order
    (size-1 axes last), which new outputs follow."""

    blocks: tuple[tuple[int, ...], ...]
    shape4: tuple[int, int, int, int]
    order: tuple[int, ...]
    perm: tuple[int, ...]
    # precomputed for the per-call reshapes:
    new_shape: tuple[int, ...]  # x's shape in memory order, for new outputs
    new_perm: tuple[int, ...]  # from memory order back to x's axis order
    kept_shape: tuple[int, ...]  # the group grid: kept axes in block order
    kept_perm: tuple[int, ...]  # group grid -> kept axes in axis order
    keepdims: tuple[int, ...]  # shape of the statistics
    sorted_kept_shape: tuple[int, ...]  # kept axes' sizes in axis order
    groups_perm: tuple[int, ...]  # kept axes in axis order -> group grid

    @property
    def groups(self) -> int:
        return self.shape4[0] * self.shape4[2]

    @property
    def group_size(self) -> int:
        return self.shape4[1] * self.shape4[3]

    @property
    def columns(self) -> bool:
        """Groups innermost in memory (Ra > 1, Rb = 1): the column loops walk them along rows."""
        return self.shape4[1] > 1 and self.shape4[3] == 1


def plan(
    x: np.ndarray, axes: tuple[int, ...], params: tuple[Any, ...] = (), columns: bool = True
) -> Layout | None:
    """The block layout of `x` for reducing over `axes`, or None if it needs > 4 blocks.

    Kept axes merge where `x`'s do; reduced axes only where every affine parameter (broadcast
    to x) merges too, so that a parameter repeats or varies over a whole reduced block (over
    part of a kept block, its table holds one row per kept position: see `table`). With
    `columns`, groups innermost in memory whose parameters are constant over the reduced
    axes get the column kernels' layout `(Ka, R, K, 1)` (else `(Ka, 1, K, R)`, each group
    one strided run: the group kernels')."""
    pstrides = tuple(
        np.broadcast_to(np.asarray(p), x.shape).strides for p in params if p is not None
    )
    return _plan(x.shape, x.strides, axes, pstrides, columns)


@functools.lru_cache(maxsize=256)
def _plan(
    shape: tuple[int, ...],
    strides: tuple[int, ...],
    axes: tuple[int, ...],
    pstrides: tuple[tuple[int, ...], ...],
    columns: bool = True,
) -> Layout | None:
    order = sorted((i for i in range(len(shape)) if shape[i] > 1), key=lambda i: -abs(strides[i]))
    runs = _runs(shape, order, axes, (strides, *pstrides))  # (order: stable, ties keep axes)
    kruns = [tuple(r) for red, r in runs if not red]
    rruns = [tuple(r) for red, r in runs if red]
    if len(kruns) > 2 or len(rruns) > 2:
        return None
    kept_inner = len(rruns) == 1 and not runs[-1][0]  # (kept axes innermost in memory)
    if columns and kept_inner and not any(ps[i] for ps in pstrides for i in rruns[0]):
        ka = kruns[0] if len(kruns) == 2 else ()
        return _layout(shape, axes, order, (ka, rruns[0], kruns[-1], ()))
    return _layout(shape, axes, order, _blocks(kruns, rruns, order))


def _blocks(kruns: list[Any], rruns: list[Any], order: list[int]) -> tuple[Any, ...]:
    """(Ka, Ra, Kb, Rb) of at most two runs of each kind, the reduced one innermost."""
    rb = rruns[-1] if rruns else ()
    ra = rruns[0] if len(rruns) == 2 else ()
    if len(kruns) == 2:
        ka, kb = kruns
    elif kruns and (not rruns or order.index(kruns[0][0]) < order.index(rruns[0][0])):
        ka, kb = kruns[0], ()
    else:
        ka, kb = (), (kruns[0] if kruns else ())
    return ka, ra, kb, rb


def _runs(
    shape: tuple[int, ...], order: list[int], axes: tuple[int, ...], views: tuple[Any, ...]
) -> list[tuple[bool, list[int]]]:
    """Axes in memory order, grouped into runs of kept axes that merge in x (`views[0]`) and
    of reduced axes that merge in every view."""
    runs: list[tuple[bool, list[int]]] = []
    for i in order:
        red = i in axes
        if (
            runs
            and runs[-1][0] == red
            and all(
                _mergeable(shape, v, runs[-1][1][-1], i) for v in views[: len(views) if red else 1]
            )
        ):
            runs[-1][1].append(i)
        else:
            runs.append((red, [i]))
    return runs


def _layout(
    shape: tuple[int, ...], axes: tuple[int, ...], order: list[int], blocks: tuple[Any, ...]
) -> Layout:
    ka, ra, kb, rb = blocks
    shape4 = tuple(math.prod(shape[i] for i in blk) for blk in blocks)
    rest = tuple(i for i in range(len(shape)) if shape[i] == 1)
    full_order = tuple(order) + rest
    kept = ka + kb
    srt = sorted(kept)
    return Layout(
        blocks,
        shape4,
        full_order,
        ka + ra + kb + rb + rest,
        tuple(shape[i] for i in full_order),
        tuple(int(i) for i in np.argsort(full_order)),
        tuple(shape[i] for i in kept),
        tuple(int(i) for i in np.argsort(kept)),
        tuple(1 if i in axes else shape[i] for i in range(len(shape))),
        tuple(shape[i] for i in srt),
        tuple(srt.index(i) for i in kept),
    )


def _broadcast_strides(pshape: tuple[int, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    """Strides (in elements) of a C-contiguous parameter of `pshape` broadcast to `shape`."""
    return np.broadcast_to(np.empty(pshape, np.int8), shape).strides


def _mergeable(shape: tuple[int, ...], strides: tuple[int, ...], outer: int, inner: int) -> bool:
    return strides[outer] == strides[inner] * shape[inner]


def view4(a: np.ndarray, lay: Layout) -> np.ndarray | None:
    """`a` (of x's shape) as a (Ka, Ra, Kb, Rb) view, or None if a block does not merge."""
    t = a.transpose(lay.perm)
    try:
        return np.reshape(t, lay.shape4, copy=False)
    except ValueError:  # NumPy would have to copy
        return None
    except TypeError:  # NumPy < 2.1: no copy= argument; setting .shape never copies
        v = t.view()
        try:
            v.shape = lay.shape4
        except AttributeError:
            return None
        return v


def stats_to_keepdims(v: np.ndarray, lay: Layout) -> np.ndarray:
    """Per-group values (group order = kept axes of the layout) -> keepdims array."""
    return v.reshape(lay.kept_shape).transpose(lay.kept_perm).reshape(lay.keepdims)


def keepdims_to_groups(v: np.ndarray, lay: Layout) -> np.ndarray:
    """Inverse of `stats_to_keepdims`: a flat contiguous float64 array in group order."""
    v = np.asarray(v, dtype=np.float64).reshape(lay.sorted_kept_shape)
    return np.ascontiguousarray(v.transpose(lay.groups_perm)).reshape(-1)


# --- affine parameters as tables ---------------------------------------------------------------


class Table(NamedTuple):
    """An affine parameter as the kernels read it: `values`, a C-contiguous (rows, cols)
    array in `table_dtype` (the kernels convert each value to float64 as they read it); the
    run `(k0, r0, k1)` reads row `k0 rule[0] + r0 rule[1] + k1 rule[2]`,
    either element by element (`cols == Rb`) or as one value for the whole run (`cols == 1`).
    A per-position weight (layer norm) is one row of Rb values, a per-channel one (batch or
    instance norm) a column of one value per group."""

    values: np.ndarray
    rule: tuple[int, int, int]
    varies: tuple[bool, bool, bool, bool]  # along (Ka, Ra, Kb, Rb)
    reshape: bool = False  # the values are the parameter reshaped (its axes in block order)
    gather: np.ndarray | None = None  # else: values = parameter.ravel()[gather]


_ABSENT = {
    (np.dtype(dt), one): Table(np.full((1, 1), float(one), dt), (0, 0, 0), (False,) * 4, True)
    for dt in (np.float32, np.float64)
    for one in (0, 1)
}


def table_dtype(x: np.ndarray, params: tuple[Any, Any]) -> np.dtype:
    """The dtype of the planned kernels' tables: x's (float32 or float64) where every given
    parameter has it, so that a float32 parameter is read where it lies, with no float64
    copy (as large as x for a full-shaped weight); float64 otherwise (a float64 weight of
    float32 x keeps its precision)."""
    if all(p is None or p.dtype == x.dtype for p in params):
        return x.dtype
    return np.dtype(np.float64)


class Recipe(NamedTuple):
    """How to build a parameter's table for a layout, found once per (shapes, layout): the
    table's row rule, where the parameter varies, and either that a plain reshape of the
    parameter gives the table (its axes in block order: the common case) or `gather`, the
    flat positions in the parameter of the table's values (a gather, read-only)."""

    compact: tuple[int, int, int, int]
    rule: tuple[int, int, int]
    varies: tuple[bool, bool, bool, bool]
    reshape: bool
    gather: np.ndarray | None


def table(p: Any, x: np.ndarray, lay: Layout, one: bool, dtype: Any = np.float64) -> Table | None:
    """An affine parameter as a `Table` of `dtype` values (a stand-in of ones or zeros when
    absent); None if it varies over part of the reduced block Rb only (the table would be as
    large as x)."""
    if p is None:
        return _ABSENT[np.dtype(dtype), int(one)]
    p = np.asarray(p)
    recipe = _recipe(p.shape, x.shape, lay)
    if recipe is None:
        return None
    if recipe.reshape:
        values = _contiguous(p, dtype).reshape(-1, recipe.compact[3])
        return Table(values, recipe.rule, recipe.varies, True)
    values = np.asarray(p, dtype=dtype).reshape(-1)[recipe.gather]
    return Table(values, recipe.rule, recipe.varies, False, recipe.gather)


@functools.lru_cache(maxsize=256)
def _recipe(pshape: tuple[int, ...], shape: tuple[int, ...], lay: Layout) -> Recipe | None:
    """Found on a stand-in parameter that holds its own flat positions: a block the
    parameter varies over part of (its axes do not merge where x's do) is kept whole in the
    table, one row per kept position (group norm's per-channel weight on merged (batch,
    group) axes); the reduced block Rb only wholly or not at all (None otherwise)."""
    full = np.broadcast_to(np.arange(math.prod(pshape)).reshape(pshape), shape)
    el = [s // full.itemsize for s in full.strides]
    varies = tuple(any(el[i] for i in blk) for blk in lay.blocks)
    if varies[3] and not all(el[i] for i in lay.blocks[3]):
        return None
    compact = tuple(n if v else 1 for n, v in zip(lay.shape4, varies, strict=True))
    _, ra, kb, _ = compact
    rule = (ra * kb if varies[0] else 0, kb if varies[1] else 0, 1 if varies[2] else 0)
    block_varies = {i: v for blk, v in zip(lay.blocks, varies, strict=True) for i in blk}
    pick = tuple(slice(None) if block_varies.get(i) else slice(0, 1) for i in range(len(shape)))
    index = np.array(full[pick].transpose(lay.perm), order="C").reshape(-1, compact[3])
    reshape = bool(np.array_equal(index.ravel(), np.arange(math.prod(pshape))))
    index.flags.writeable = False
    return Recipe(compact, rule, varies, reshape, None if reshape else index)  # type: ignore[arg-type]


def per_group(t: Table, lay: Layout) -> np.ndarray:
    """A parameter constant within each group: its value per group, in group order."""
    return t.values[group_rows(t, lay), 0]


def group_rows(t: Table, lay: Layout) -> np.ndarray:
    """The table row of each group's runs (a parameter constant within each group)."""
    k0 = np.arange(lay.shape4[0])[:, None] * t.rule[0]
    return (k0 + np.arange(lay.shape4[2])[None, :] * t.rule[2]).reshape(-1)


def accumulator(t: Table, lay: Layout, slots: int, used: bool, dtype: Any) -> np.ndarray:
    """Zeroed sums of `dtype` (`sums_dtype`) for a parameter's gradient, `(slots, rows,
    cols)` like its table: one slot per chunk where chunks share rows (summed in chunk
    order), else one."""
    if not used:
        return _NO_SUMS[np.dtype(dtype)]
    rows, cols = t.values.shape
    return _zeros((slots if shares_rows(t, lay) or cols == 1 else 1, rows, cols), dtype)


def sums_dtype(tables: tuple[Table, Table], lay: Layout, used: tuple[bool, bool]) -> np.dtype:
    """The gradient sums' dtype: float32 where every used parameter is float32 and varies
    per element (each sum then receives one value, rounded once: the same bits as a float64
    sum, and the sums are the gradient itself); float64 where values add up."""
    for t, u in zip(tables, used, strict=True):
        if u and (t.values.dtype != np.float32 or t.values.shape[1] == 1 or shares_rows(t, lay)):
            return np.dtype(np.float64)
    return np.dtype(np.float32) if any(used) else np.dtype(np.float64)


def shares_rows(t: Table, lay: Layout) -> bool:
    """Whether several runs read the same table row (the parameter is constant along a
    block of more than one run): their gradient sums then add up across chunks."""
    n, v = lay.shape4, t.varies  # (no generator: small calls' budget is microseconds)
    return (n[0] > 1 and not v[0]) or (n[1] > 1 and not v[1]) or (n[2] > 1 and not v[2])


_NO_SUMS = {np.dtype(dt): np.zeros((1, 1, 1), dt) for dt in (np.float32, np.float64)}  # (unused)


def param_grad(acc: np.ndarray, t: Table, like: Any) -> Any:
    """Sum the accumulator's slots (in order) and give the result the parameter's own shape
    and dtype: a reshape, or the gather's adjoint (each table value's sum added back to the
    parameter position it was read from, in table order)."""
    if like is None:
        return None
    total = acc[0] if acc.shape[0] == 1 else acc.sum(axis=0)
    dtype = like.dtype if like.dtype.kind == "f" else np.float64  # (issubdtype: 0.5 us)
    if t.gather is not None:
        total = np.bincount(t.gather.reshape(-1), weights=total.reshape(-1), minlength=like.size)
    elif total.dtype == dtype:  # one slot in the gradient's dtype: the sums are the gradient
        return total.reshape(like.shape)
    out = _runtime.new_array(like.shape, dtype, total.size * np.dtype(dtype).itemsize)[0]
    np.copyto(out, total.reshape(like.shape))
    return out


# Tables, sums and gradients of parameters as large as x (a full-shaped weight) come from the
# recycler (`_recycle.py`) as the outputs do: newly mapped memory of that size would cost a
# page fault per 4 KiB on every call, most of them inside the kernels' threads.


def _contiguous(p: np.ndarray, dtype: Any) -> np.ndarray:
    """`np.ascontiguousarray(p, dtype)`: p itself where it already is, large copies in
    recycled memory."""
    if p.dtype == dtype and p.flags.c_contiguous:
        return p
    out = _runtime.new_array(p.shape, dtype, p.size * np.dtype(dtype).itemsize)[0]
    np.copyto(out, p)
    return out


def _zeros(shape: tuple[int, int, int], dtype: Any) -> np.ndarray:
    nbytes = shape[0] * shape[1] * shape[2] * np.dtype(dtype).itemsize
    out = _runtime.new_array(shape, dtype, nbytes)[0]
    out.fill(0.0)
    return out


# --- threads ------------------------------------------------------------------------------------


def max_threads() -> int:
    return max(1, int(numba.config.NUMBA_NUM_THREADS))  # type: ignore[attr-defined]


def threads_for(groups: int, n: int) -> tuple[int, int]:
    """(chunks per group, threads): enough items to keep every thread busy, chunks not tiny;
    one thread below `PARALLEL_MIN_SIZE` elements, where starting threads costs more, and
    whole groups only below `SPLIT_MIN_SIZE`."""
    if groups * n < PARALLEL_MIN_SIZE:
        return 1, 1
    nthreads = max_threads()
    if groups * n < SPLIT_MIN_SIZE:
        return 1, min(nthreads, groups)
    want = -(-8 * nthreads // groups)  # ceil
    nc = max(1, min(want, n // MIN_CHUNK))
    return nc, min(nthreads, groups * nc)


def sweep_threads(shape4: tuple[int, int, int, int]) -> tuple[int, int]:
    """(row chunks per Ka block, threads) for the sweep kernels: chunks of `MIN_CHUNK`
    elements or more (each chunk's partials are a merge per group)."""
    ka, ra, kb, rb = shape4
    if ka * ra * kb * rb < PARALLEL_MIN_SIZE:
        return 1, 1
    nthreads = max_threads()
    nc = max(1, min(-(-8 * nthreads // ka), ra, ra * kb * rb // MIN_CHUNK))
    return nc, min(nthreads, ka * nc)


def chunk_counts(n: int, nc: int) -> np.ndarray:
    """Elements in each of the `nc` chunks of a group of `n` (the merge's weights)."""
    return np.array([((c + 1) * n) // nc - (c * n) // nc for c in range(nc)], float)


def chunks_last(p: np.ndarray, ka: int, nc: int, kb: int) -> np.ndarray:
    """Sweep partials from [k0, chunk, k1] order to `merge_parts`' [group, chunk]."""
    return np.ascontiguousarray(p.reshape(ka, nc, kb).transpose(0, 2, 1)).reshape(-1)


# --- the planned calls: C-contiguous inputs viewed by plain reshapes ----------------------------


class CallPlan(NamedTuple):
    """How a C-contiguous input is viewed by the planned calls: plain reshapes, no copies."""

    stats: tuple[int, ...]  # (3, *shape of mean/var/rstd), groups in C order
    nc: int  # chunks per group on the pool (`threads_for`; 1: whole groups; Rb = 1: of rows)
    threads: int
    counts: np.ndarray  # elements in each chunk of a group (the merge's weights)
    layout: Layout  # the blocks (parameters' tables follow them)

    @property
    def shape4(self) -> tuple[int, int, int, int]:
        return self.layout.shape4

    @property
    def runs_per_group(self) -> int:
        """Ra: more than 1 is a batch-norm layout (the sweep kernels fit)."""
        return self.layout.shape4[1]

    @property
    def columns(self) -> bool:
        return self.layout.columns


@functools.lru_cache(maxsize=256)
def call_plan(
    shape: tuple[int, ...], axes: tuple[int, ...], pshapes: tuple[tuple[int, ...], ...] = ()
) -> CallPlan | None:
    """The block layout of a C-contiguous array of `shape` (with affine parameters of
    `pshapes`) if its blocks are in axis order (whole tensor, trailing axes, batch-norm
    axes...), so that `reshape` gives the blocks and groups come out in C order of the kept
    axes; None otherwise."""
    strides = tuple(math.prod(shape[i + 1 :]) for i in range(len(shape)))  # C order, in items
    pstrides = tuple(_broadcast_strides(ps, shape) for ps in pshapes)
    lay = _plan(shape, strides, axes, pstrides)
    if lay is None:
        return None
    big = [i for i in lay.perm if shape[i] > 1]
    if big != sorted(big):
        return None
    keepdims = tuple(1 if i in axes else s for i, s in enumerate(shape))
    if lay.columns:  # chunks of rows, as a sweep
        nc, nthreads = sweep_threads(lay.shape4)
        counts = chunk_counts(lay.shape4[1], nc)
    else:
        nc, nthreads = threads_for(lay.groups, lay.group_size)
        counts = chunk_counts(lay.group_size, nc)
    return CallPlan((3, *keepdims), nc, nthreads, counts, lay)
