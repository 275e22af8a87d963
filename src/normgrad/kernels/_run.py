"""The kernels' entry points: one function per path and direction, looked up in `RUNNERS`
by the path a `_dispatch.Plan` names. Each takes what the plan prepared and returns what the
generic path would: `(y, mean, var, rstd)` (statistics keepdims float64) or `(dx, dweight,
dbias)`. The planned paths' forwards (small, native) add a fifth result, their parameter
tables (`kept_tables`), which the context keeps so that their backward does not build them
again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from .. import _runtime
from .._formulas import backward_coefficients, rstd
from . import _layout, _loops
from ._native import (
    part_address,
    post_backward,
    post_forward,
    post_masked_backward,
    post_masked_forward,
)
from ._pool import CHUNKS_PER_THREAD, chunks, phase_ctl, run, run_native

Result = tuple[Any, ...]
_NO_PARTS = np.zeros((2, 1))  # split partials where groups are whole (never used)
_ONE_CHUNK = np.ones(1)  # a native job's chunk counts where groups are whole (never read)


def streams(out: np.ndarray) -> bool:
    """Whether to write `out` (preallocated or recycled) with non-temporal stores: where it
    cannot stay in cache. Not newly mapped outputs: their pages come zeroed from the OS,
    already in cache, and streaming past it is slower."""
    return out.nbytes >= _runtime.STATE.settings.stream_min_bytes


def new_output(shape: tuple[int, ...], dtype: Any, nbytes: int) -> tuple[np.ndarray, bool]:
    """A new C-order output (recycled memory from the recycler's `min_bytes`), and whether to
    write it with streaming stores (recycled memory is written as an `out=` is)."""
    y, recycled = _runtime.new_array(shape, dtype, nbytes)
    return y, recycled and streams(y)


def _output(x: np.ndarray, plan: Any, dtype: Any, out: Any) -> tuple[np.ndarray, Any, bool]:
    """`(output, its block view, stream)`: `out` as given, or a new array of x's shape whose
    memory order follows x's (C order for C input); kernel outputs have x's dtype."""
    lay, out4 = plan.layout, plan.views[3]
    if out is not None:
        return out, out4, streams(out)
    buf, stream = new_output(lay.new_shape, dtype, x.nbytes)
    y = buf.transpose(lay.new_perm)
    return y, _layout.view4(y, lay), stream


def _planned_output(x: np.ndarray, out: Any) -> tuple[np.ndarray, bool]:
    if out is not None:
        return out, streams(out)
    return new_output(x.shape, x.dtype, x.nbytes)


# --- parameters ----------------------------------------------------------------------------------

_NO_PAR = {  # no parameters, by the tables' dtype (never read)
    np.dtype(dt): (np.ones((1, 1), dt), np.zeros((1, 1), dt), (0, 0, 0), (0, 0, 0))
    for dt in (np.float32, np.float64)
}
_NO_SUMS = (np.zeros((1, 1, 1)), np.zeros((1, 1, 1)))  # (never written)


def _tables(x: np.ndarray, lay: Any, w: Any, b: Any) -> tuple[Any, Any]:
    """The weight's and bias's tables for the layout (the plan checked that they fit), in
    `_layout.table_dtype`."""
    dtype = _layout.table_dtype(x, (w, b))
    wt, bt = _layout.table(w, x, lay, True, dtype), _layout.table(b, x, lay, False, dtype)
    assert wt is not None and bt is not None
    return wt, bt


def kept_tables(x: np.ndarray, lay: Any, tables: Any) -> Any:
    """`(layout, tables)` for the context, or None where a table is as large as x (a
    full-shaped parameter: the context keeps nothing N-sized but x)."""
    if tables is None or any(t.values.size >= x.size for t in tables):
        return None
    return lay, tables


def _backward_tables(ctx: Any, x: np.ndarray, lay: Any) -> tuple[Any, Any]:
    """The forward's tables where it kept them for this layout, else built again."""
    kept = ctx.tables
    if kept is not None and kept[0] is lay:
        tables: tuple[Any, Any] = kept[1]
        return tables
    return _tables(x, lay, ctx.weight, ctx.bias)


def _par(tables: tuple[Any, Any]) -> tuple[Any, ...]:
    wt, bt = tables
    return (wt.values, bt.values, wt.rule, bt.rule)


def _grad_sums(ctx: Any, tables: Any, lay: Any, slots: int) -> tuple[np.ndarray, np.ndarray]:
    """Zeroed dweight and dbias sums (`_layout.accumulator`) for the context's parameters,
    both of `_layout.sums_dtype`."""
    wt, bt = tables
    used = (ctx.weight is not None, ctx.bias is not None)
    dtype = _layout.sums_dtype(tables, lay, used)
    dw = _layout.accumulator(wt, lay, slots, used[0], dtype)
    return dw, _layout.accumulator(bt, lay, slots, used[1], dtype)


def _param_grads(ctx: Any, sums: Any, tables: Any) -> tuple[Any, Any]:
    dw = _layout.param_grad(sums[0], tables[0], ctx.weight)
    return dw, _layout.param_grad(sums[1], tables[1], ctx.bias)


def _itemsizes(x: np.ndarray, par: Any, sums: Any = _NO_SUMS) -> tuple[int, int, int]:
    """A native part's itemsizes of x, the parameter tables and the gradient sums."""
    return x.itemsize, par[0].itemsize, sums[0].itemsize


def _backward_flags(ctx: Any, stream: bool) -> tuple[bool, bool, bool, bool]:
    has_w = ctx.weight is not None
    return (has_w, has_w, ctx.bias is not None, stream)


# --- forward -------------------------------------------------------------------------------------


def _small_kind(cp: Any) -> int:
    """The small kernels for a layout: groups of one run (0), of several (1), or groups
    innermost in memory (2: Rb = 1, the column loops)."""
    if cp.runs_per_group == 1:
        return 0
    return 2 if cp.columns else 1


_SMALL_FORWARD = (
    _loops.forward_small_runs,
    _loops.forward_small_spans,
    _loops.forward_small_columns,
)
_SMALL_BACKWARD = (
    _loops.backward_small_runs,
    _loops.backward_small_spans,
    _loops.backward_small_columns,
)


def forward_small(x: np.ndarray, spec: Any, w: Any, b: Any, plan: Any, out: Any) -> Result:
    if plan.mask is not None:
        return forward_masked(x, spec, w, b, plan, out)
    cp = plan.layout
    y = new_output(x.shape, x.dtype, x.nbytes)[0] if out is None else out  # (never streamed)
    st = np.empty(cp.stats)  # mean, var, rstd, each keepdims
    affine = w is not None or b is not None
    tables = _tables(x, cp.layout, w, b) if affine else None
    par = _NO_PAR[x.dtype] if tables is None else _par(tables)
    kernel = _SMALL_FORWARD[_small_kind(cp)]
    kernel(x, y, st, cp.shape4, plan.op, par, affine)
    return y, st[0], st[1], st[2], kept_tables(x, cp.layout, tables)  # (indexing: half the cost)


def _native_job(cp: Any, direction: str, per_thread: int = CHUNKS_PER_THREAD) -> Any:
    """`(direction's kernels, split, (nchunks, items), parts)` of a native job: groups split
    into `cp.nc` chunks or whole, or for groups innermost in memory (Rb = 1) the column
    kernels' items, chunks of rows of a Ka block (always split: partials and a merge)."""
    groups, columns = cp.layout.groups, cp.columns
    split = cp.nc > 1 or columns
    items = cp.shape4[0] * cp.nc if columns else groups * cp.nc
    parts = np.empty((2, groups * cp.nc)) if split else _NO_PARTS
    kind = f"{direction}_columns" if columns else direction
    return kind, split, (chunks(items, cp.threads, per_thread), items), parts


def forward_native(x: np.ndarray, spec: Any, w: Any, b: Any, plan: Any, out: Any) -> Result:
    cp = plan.layout
    y, stream = _planned_output(x, out)
    st = np.empty(cp.stats)
    kind, split, claims, parts = _native_job(cp, "forward")
    x4, y4 = x.reshape(cp.shape4), y.reshape(cp.shape4)
    job = (claims, x4, y4, st.reshape(3, -1), cp.counts, parts)
    affine = w is not None or b is not None
    tables = _tables(x, cp.layout, w, b) if affine else None
    par = _NO_PAR[x.dtype] if tables is None else _par(tables)
    part = part_address(kind, split, _itemsizes(x, par))
    run_native(post_forward, cp.threads, (part, job, plan.op, par, (affine, stream)))
    return y, st[0], st[1], st[2], kept_tables(x, cp.layout, tables)


def forward_blocked(x: np.ndarray, spec: Any, w: Any, b: Any, plan: Any, out: Any) -> Result:
    if plan.mask is not None:
        return forward_masked(x, spec, w, b, plan, out)
    lay = plan.layout
    x4, wt, bt, _ = plan.views
    y, y4, stream = _output(x, plan, spec.dtype, out)
    nc, nthreads = plan.threads
    stats = np.empty((3, lay.groups))
    common = ((x4, y4), _par((wt, bt)), plan.op, stats, (w is not None or b is not None, stream))
    if nc == 1:
        run(_loops.forward_groups, lay.groups, nthreads, common)
    else:
        items = lay.groups * nc
        nchunks = chunks(items, nthreads)
        pm = np.empty((2, items))  # partial means and M2
        split = (_layout.chunk_counts(lay.group_size, nc), pm[0], pm[1])
        args = (phase_ctl(nchunks, nthreads), split, *common)
        run(_loops.forward_split, items, nthreads, args, nchunks)
    return (y, *(_layout.stats_to_keepdims(v, lay) for v in stats))


# The sweep's kernels (statistics, y, the backward's sums, dx), and those of its layouts whose
# innermost block is kept (Rb = 1: batch norm over (N, F) or over NHWC), which go along rows.
_SWEEP_KERNELS = (
    _loops.stats_sweep,
    _loops.forward_sweep,
    _loops.sums_sweep,
    _loops.backward_sweep,
)
_COLUMN_KERNELS = (
    _loops.stats_columns,
    _loops.forward_columns,
    _loops.sums_columns,
    _loops.backward_columns,
)


def _swept(views: tuple[np.ndarray, ...], columns: bool) -> tuple[np.ndarray, ...]:
    """The sweep kernels' views: the blocks, or `(Ka, Ra, Kb)` views for the column kernels
    (C-contiguous where the blocks are: the rows' loops vectorize)."""
    return tuple(v[:, :, :, 0] for v in views) if columns else views


def forward_sweep(x: np.ndarray, spec: Any, w: Any, b: Any, plan: Any, out: Any) -> Result:
    """Partial statistics per item, their merge and `rstd` here, then `y`."""
    lay = plan.layout
    x4, wt, bt, _ = plan.views
    ka, ra, kb, rb = lay.shape4
    nc, nthreads = plan.threads
    pmean, pm2 = np.empty(ka * nc * kb), np.empty(ka * nc * kb)
    columns = lay.columns
    kernels = _COLUMN_KERNELS if columns else _SWEEP_KERNELS
    run(kernels[0], ka * nc, nthreads, (_swept((x4,), columns)[0], nc, (pmean, pm2), spec.center))
    parts = tuple(_layout.chunks_last(p, ka, nc, kb) for p in (pmean, pm2))
    counts = _layout.chunk_counts(ra, nc) * rb  # (elements in each chunk of a group: rows x Rb)
    mean, m2 = np.empty(ka * kb), np.empty(ka * kb)
    _loops.merge_parts(parts, counts, mean, m2)
    if spec.center:  # the statistics kernels work on x - shift (RMS: mean 0, no shift)
        mean = x4[:, 0, :, 0].ravel() + mean
    var = m2 / spec.m
    with np.errstate(divide="ignore"):  # eps = 0 with a zero variance: refused after the path
        r = rstd(np, var, spec.eps, spec.inside)
    y, y4, stream = _output(x, plan, spec.dtype, out)
    flags = (w is not None or b is not None, stream)
    args = (_swept((x4, y4), columns), _par((wt, bt)), (mean, r), nc, flags)
    run(kernels[1], ka * nc, nthreads, args)
    return (y, *(_layout.stats_to_keepdims(v, lay) for v in (mean, var, r)))


# --- backward ------------------------------------------------------------------------------------


def backward_small(ctx: Any, dy: np.ndarray, c: Any, plan: Any, out: Any) -> Result:
    if plan.mask is not None:
        return backward_masked(ctx, dy, c, plan, out)
    x, cp = ctx.x, plan.layout
    dx = new_output(x.shape, x.dtype, x.nbytes)[0] if out is None else out
    bst = (ctx.mean.reshape(-1), ctx.rstd.reshape(-1), c.reshape(-1), *plan.op[2:])
    kernel = _SMALL_BACKWARD[_small_kind(cp)]
    if ctx.weight is None and ctx.bias is None:
        kernel(x, dy, dx, cp.shape4, bst, _NO_PAR[x.dtype], _NO_SUMS, (False,) * 4)
        return dx, None, None
    tables = _backward_tables(ctx, x, cp.layout)
    sums = _grad_sums(ctx, tables, cp.layout, 1)
    kernel(x, dy, dx, cp.shape4, bst, _par(tables), sums, _backward_flags(ctx, False))
    return (dx, *_param_grads(ctx, sums, tables))


def backward_native(ctx: Any, dy: np.ndarray, c: Any, plan: Any, out: Any) -> Result:
    x, cp = ctx.x, plan.layout
    dx, stream = _planned_output(x, out)
    mean, rstd, cg = (np.ascontiguousarray(v.reshape(-1)) for v in (ctx.mean, ctx.rstd, c))
    x4, dy4, dx4 = (a.reshape(cp.shape4) for a in (x, dy, dx))
    affine = ctx.weight is not None or ctx.bias is not None
    tables = _backward_tables(ctx, x, cp.layout) if affine else None
    per_thread = _chunks_per_thread(ctx, tables, cp.layout)
    kind, split, claims, parts = _native_job(cp, "backward", per_thread)
    job = (claims, cp.nc, x4, dy4, dx4, parts)
    par = _par(tables) if tables is not None else _NO_PAR[x.dtype]
    sums = _grad_sums(ctx, tables, cp.layout, claims[0]) if tables is not None else _NO_SUMS
    part = part_address(kind, split, _itemsizes(x, par, sums))
    args = (part, job, (mean, rstd, cg, *plan.op[2:]), par, sums, _backward_flags(ctx, stream))
    run_native(post_backward, cp.threads, args)
    if tables is None:
        return dx, None, None
    return (dx, *_param_grads(ctx, sums, tables))


def _chunks_per_thread(ctx: Any, tables: Any, lay: Any) -> int:
    """Fewer, larger chunks with parameter gradients, as their sums are kept per chunk: one
    per thread where a shared table is large (layer norm over (C, H, W): each slot is as
    large as the table, and zeroing and adding the slots would cost more than the kernel)."""
    if ctx.weight is None and ctx.bias is None:
        return CHUNKS_PER_THREAD
    large = any(t.values.size >= SHARED_SUMS_MIN and _layout.shares_rows(t, lay) for t in tables)
    return 1 if large else 4


SHARED_SUMS_MIN = 1 << 15  # table values from which chunks sharing its rows are one per thread


def _block_dy(dy: np.ndarray, lay: Any) -> np.ndarray:
    """`dy` as a block view, in a float dtype (copied into x's memory order if need be)."""
    if dy.dtype not in (np.float32, np.float64):
        dy = dy.astype(np.float64)
    dy4 = _layout.view4(dy, lay)
    if dy4 is None:  # dy's memory order differs from x's: copy it into x's order
        buf = np.empty(lay.new_shape, dy.dtype).transpose(lay.new_perm)
        buf[...] = dy
        dy4 = _layout.view4(buf, lay)
    assert dy4 is not None  # (x's memory order merges into its blocks)
    return dy4


def backward_blocked(ctx: Any, dy: np.ndarray, c: Any, plan: Any, out: Any) -> Result:
    if plan.mask is not None:
        return backward_masked(ctx, dy, c, plan, out)
    x, lay = ctx.x, plan.layout
    x4, wt, bt, _ = plan.views
    dx, dx4, stream = _output(x, plan, ctx.dtype, out)
    nc, nthreads = plan.threads
    items = lay.groups * nc
    # dweight/dbias sums are kept per chunk where chunks share rows, so a chunk's adds land in
    # the same slot whichever thread runs it (deterministic)
    nchunks = chunks(items, nthreads, _chunks_per_thread(ctx, (wt, bt), lay))
    sums = _grad_sums(ctx, (wt, bt), lay, nchunks)
    stats = tuple(_layout.keepdims_to_groups(v, lay) for v in (ctx.mean, ctx.rstd, c))
    io = (x4, _block_dy(dy, lay), dx4)
    flags = _backward_flags(ctx, stream)
    common = (io, _par((wt, bt)), (*sums, 0), (*stats, *plan.op[2:]), flags)
    if nc == 1:
        run(_loops.backward_groups, lay.groups, nthreads, common, nchunks)
    else:
        ps = np.empty((2, items))  # partial sum g and sum g (x - mu)
        args = (phase_ctl(nchunks, nthreads), (nc, ps[0], ps[1]), *common)
        run(_loops.backward_split, items, nthreads, args, nchunks)
    return (dx, *_param_grads(ctx, sums, (wt, bt)))


def backward_sweep(ctx: Any, dy: np.ndarray, c: Any, plan: Any, out: Any) -> Result:
    """Per-group parameters: `sum g = w sum dy`, `sum g (x - mu) = w sum dy (x - mu)`,
    `dweight = r sum dy (x - mu)`, `dbias = sum dy`, from per-item partials merged in a
    fixed order."""
    x, lay = ctx.x, plan.layout
    x4, wt, bt, _ = plan.views
    ka, ra, kb, rb = lay.shape4
    nc, nthreads = plan.threads
    mean, r, cg = (_layout.keepdims_to_groups(v, lay) for v in (ctx.mean, ctx.rstd, c))
    dy4 = _block_dy(dy, lay)
    psdy, psdyd = np.empty(ka * nc * kb), np.empty(ka * nc * kb)
    columns = lay.columns
    kernels = _COLUMN_KERNELS if columns else _SWEEP_KERNELS
    run(kernels[2], ka * nc, nthreads, (_swept((x4, dy4, x4), columns), mean, nc, (psdy, psdyd)))
    sdy = psdy.reshape(ka, nc, kb).sum(axis=1).reshape(-1)
    sdyd = psdyd.reshape(ka, nc, kb).sum(axis=1).reshape(-1)
    wg = _layout.per_group(wt, lay)
    mg, beta = backward_coefficients(wg * sdy, wg * sdyd, ra * rb, plan.op[2], r, cg, ctx.center)
    if not ctx.center:  # RMS: mean_g is a scalar 0; the kernel reads one per group
        mg = np.zeros_like(beta)
    dx, dx4, stream = _output(x, plan, ctx.dtype, out)
    io = _swept((x4, dy4, dx4), columns)
    args = (io, _par((wt, bt)), (mean, r, mg, beta), nc, _backward_flags(ctx, stream))
    run(kernels[3], ka * nc, nthreads, args)
    sums = _grad_sums(ctx, (wt, bt), lay, 1)
    used = (ctx.weight is not None, ctx.bias is not None)
    for acc, t, per, given in zip(sums, (wt, bt), (r * sdyd, sdy), used, strict=True):
        if given:
            np.add.at(acc[0, :, 0], _layout.group_rows(t, lay), per)  # in group order
    return (dx, *_param_grads(ctx, sums, (wt, bt)))


# --- masks (the small and blocked plans of a masked call: `_dispatch._masked`) ------------------


def forward_masked(x: np.ndarray, spec: Any, w: Any, b: Any, plan: Any, out: Any) -> Result:
    """`(y, mean, var, rstd, count)` over the counted elements on `plan.threads[1]` threads
    (one: the small path, in the caller's thread), each group whole or, `plan.threads[0]`
    above 1, split into that many chunks."""
    lay = plan.layout
    x4, wt, bt, _, mk4 = plan.views
    y, y4, stream = _output(x, plan, spec.dtype, out)
    stats = np.empty((4, lay.groups))  # mean, var, rstd, count
    flags = (w is not None or b is not None, stream)
    par = _par((wt, bt))
    args = ((x4, y4), mk4, par, plan.op, stats, flags)
    nc, nthreads = plan.threads
    if nc == 1 and nthreads > 1 and _native_arrays(x4, y4, mk4):  # one job, no Python
        part = part_address("forward_masked", False, _itemsizes(x, par))
        job = ((chunks(lay.groups, nthreads), lay.groups), x4, y4, stats, _ONE_CHUNK, _NO_PARTS)
        run_native(post_masked_forward, nthreads, (part, job, plan.op, par, flags, mk4))
    elif nc == 1:
        run(_loops.forward_masked, lay.groups, nthreads, args)
    else:  # a few large groups, each split into `nc` chunks
        items = lay.groups * nc
        nchunks = chunks(items, nthreads)
        parts = np.empty((3, items))  # partial counts, means and M2
        split = (nc, parts[0], parts[1], parts[2])
        run(
            _loops.forward_split_masked,
            items,
            nthreads,
            (phase_ctl(nchunks, nthreads), split, *args),
            nchunks,
        )
    return (y, *(_layout.stats_to_keepdims(v, lay) for v in stats))


def backward_masked(ctx: Any, dy: np.ndarray, c: Any, plan: Any, out: Any) -> Result:
    """`(dx, dweight, dbias)` of a masked context, groups whole or split as forward."""
    x, lay = ctx.x, plan.layout
    x4, wt, bt, _, mk4 = plan.views
    dx, dx4, _ = _output(x, plan, ctx.dtype, out)
    nthreads = plan.threads[1]
    nchunks = chunks(lay.groups, nthreads, _chunks_per_thread(ctx, (wt, bt), lay))
    sums = _grad_sums(ctx, (wt, bt), lay, nchunks)
    per = (ctx.mean, ctx.rstd, c, ctx.count)
    mean, r, cg, count = (np.ascontiguousarray(_layout.keepdims_to_groups(v, lay)) for v in per)
    bst = (mean, r, cg, count, plan.op[2], ctx.center)
    io = (x4, _block_dy(dy, lay), dx4)
    par, flags = _par((wt, bt)), _backward_flags(ctx, False)
    args = (io, mk4, par, (*sums, 0), bst, flags)
    nc = plan.threads[0]
    if nc == 1 and nthreads > 1 and _native_arrays(*io, mk4):  # one job, no Python
        part = part_address("backward_masked", False, _itemsizes(x, par, sums))
        job = ((nchunks, lay.groups), 1, *io, _NO_PARTS)
        native_bst = (mean, r, cg, plan.op[2], ctx.center)
        run_native(post_masked_backward, nthreads,
                   (part, job, native_bst, par, sums, flags, (mk4, count)))  # fmt: skip
    elif nc == 1:
        run(_loops.backward_masked, lay.groups, nthreads, args, nchunks)
    else:  # split groups: partial sums, then `dx` (sums kept per chunk, as `backward_blocked`)
        items = lay.groups * nc
        nchunks = chunks(items, nthreads, _chunks_per_thread(ctx, (wt, bt), lay))
        sums = _grad_sums(ctx, (wt, bt), lay, nchunks)
        ps = np.empty((2, items))  # partial sum g and sum g (x - mu)
        split = (nc, ps[0], ps[1])
        args = (io, mk4, par, (*sums, 0), bst, flags)
        run(
            _loops.backward_split_masked,
            items,
            nthreads,
            (phase_ctl(nchunks, nthreads), split, *args),
            nchunks,
        )
    return (dx, *_param_grads(ctx, sums, (wt, bt)))


def _native_arrays(x4: np.ndarray, *others: np.ndarray) -> bool:
    """Can a native job view these block arrays by address (C-contiguous, aligned, the
    others of x's dtype or a mask)?"""
    arrays = (x4, *others)
    if not all(a.flags.c_contiguous and a.flags.aligned for a in arrays):
        return False
    return all(a.dtype == x4.dtype or a.dtype == np.bool_ for a in others)


RUNNERS: dict[tuple[str, str], Callable[..., Result]] = {
    ("forward", "small"): forward_small,
    ("forward", "native"): forward_native,
    ("forward", "blocked"): forward_blocked,
    ("forward", "sweep"): forward_sweep,
    ("backward", "small"): backward_small,
    ("backward", "native"): backward_native,
    ("backward", "blocked"): backward_blocked,
    ("backward", "sweep"): backward_sweep,
}
