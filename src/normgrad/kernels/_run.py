"""The kernels' entry points: one function per path and direction, looked up in `RUNNERS`
by the path a `_dispatch.Plan` names. Each takes what the plan prepared and returns what the
generic path would: `(y, mean, var, rstd)` (statistics keepdims float64) or `(dx, dweight,
dbias)`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from .. import _runtime
from .._formulas import backward_coefficients, rstd
from . import _layout, _loops
from ._native import part_address, post_backward, post_forward
from ._pool import CHUNKS_PER_THREAD, chunks, phase_ctl, run, run_native

Result = tuple[Any, ...]
_NO_PARTS = np.zeros((2, 1))  # split partials where groups are whole (never used)


def streams(out: np.ndarray) -> bool:
    """Whether to write `out` (preallocated or recycled) with non-temporal stores: where it
    cannot stay in cache. Not newly mapped outputs: their pages come zeroed from the OS,
    already in cache, and streaming past it is slower."""
    return out.nbytes >= _runtime.STATE.settings.stream_min_bytes


def new_output(shape: tuple[int, ...], dtype: Any, nbytes: int) -> tuple[np.ndarray, bool]:
    """A new C-order output (recycled memory from the recycler's `min_bytes`), and whether to
    write it with streaming stores (recycled memory is written as an `out=` is)."""
    recycler = _runtime.STATE.recycler
    if nbytes < recycler.min_bytes:  # (checked here too: small calls' budget is microseconds)
        return np.empty(shape, dtype), False
    y, recycled = recycler.empty(shape, dtype)
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


# --- forward -------------------------------------------------------------------------------------


def forward_small(x: np.ndarray, spec: Any, w: Any, b: Any, plan: Any, out: Any) -> Result:
    cp = plan.layout
    y = new_output(x.shape, x.dtype, x.nbytes)[0] if out is None else out  # (never streamed)
    st = np.empty(cp.stats)  # mean, var, rstd, each keepdims
    kernel = _loops.forward_small_runs if cp.runs_per_group == 1 else _loops.forward_small_spans
    kernel(x, y, st, cp.shape4, plan.op)
    return y, st[0], st[1], st[2]  # (indexing: half the cost of unpacking)


def forward_native(x: np.ndarray, spec: Any, w: Any, b: Any, plan: Any, out: Any) -> Result:
    cp = plan.layout
    y, stream = _planned_output(x, out)
    st = np.empty(cp.stats)
    groups = cp.shape4[0] * cp.shape4[2]
    parts = np.empty((2, groups * cp.nc)) if cp.nc > 1 else _NO_PARTS
    part = part_address("forward", cp.nc > 1, x.itemsize)
    x4, y4 = x.reshape(cp.shape4), y.reshape(cp.shape4)
    job = (chunks(groups * cp.nc, cp.threads), x4, y4, st.reshape(3, groups), cp.counts, parts)
    run_native(post_forward, cp.threads, (part, job, plan.op, stream))
    return y, st[0], st[1], st[2]


def forward_blocked(x: np.ndarray, spec: Any, w: Any, b: Any, plan: Any, out: Any) -> Result:
    lay = plan.layout
    x4, wp, bp, _ = plan.views
    y, y4, stream = _output(x, plan, spec.dtype, out)
    nc, nthreads = plan.threads
    stats = np.empty((3, lay.groups))
    io = (x4, wp.view, bp.view, y4)
    flags = (w is not None or b is not None, stream)
    if nc == 1:
        run(_loops.forward_groups, lay.groups, nthreads, (io, plan.op, stats, flags))
    else:
        items = lay.groups * nc
        nchunks = chunks(items, nthreads)
        pm = np.empty((2, items))  # partial means and M2
        split = (_layout.chunk_counts(lay.group_size, nc), pm[0], pm[1])
        args = (phase_ctl(nchunks, nthreads), split, io, plan.op, stats, flags)
        run(_loops.forward_split, items, nthreads, args, nchunks)
    return (y, *(_layout.stats_to_keepdims(v, lay) for v in stats))


def forward_sweep(x: np.ndarray, spec: Any, w: Any, b: Any, plan: Any, out: Any) -> Result:
    """Partial statistics per item, their merge and `rstd` here, then `y`."""
    lay = plan.layout
    x4, wp, bp, _ = plan.views
    ka, ra, kb, rb = lay.shape4
    nc, nthreads = plan.threads
    pmean, pm2 = np.empty(ka * nc * kb), np.empty(ka * nc * kb)
    run(_loops.stats_sweep, ka * nc, nthreads, (x4, nc, (pmean, pm2)))
    parts = tuple(_layout.chunks_last(p, ka, nc, kb) for p in (pmean, pm2))
    counts = np.array([((c + 1) * ra // nc - c * ra // nc) * rb for c in range(nc)], float)
    mean, m2 = np.empty(ka * kb), np.empty(ka * kb)
    _loops.merge_parts(parts, counts, mean, m2)
    mean = x4[:, 0, :, 0].ravel() + mean  # the statistics kernels work on x - shift
    var = m2 / spec.m
    with np.errstate(divide="ignore"):  # eps = 0 with a zero variance: refused after the path
        r = rstd(np, var, spec.eps, spec.inside)
    y, y4, stream = _output(x, plan, spec.dtype, out)
    coefs = (mean, r, _layout.per_group(wp), _layout.per_group(bp))
    flags = (w is not None or b is not None, stream)
    run(_loops.forward_sweep, ka * nc, nthreads, ((x4, x4, x4, y4), coefs, nc, flags))
    return (y, *(_layout.stats_to_keepdims(v, lay) for v in (mean, var, r)))


# --- backward ------------------------------------------------------------------------------------


def backward_small(ctx: Any, dy: np.ndarray, c: Any, plan: Any, out: Any) -> Result:
    x = ctx.x
    dx = new_output(x.shape, x.dtype, x.nbytes)[0] if out is None else out
    mean, rstd, cg = ctx.mean.reshape(-1), ctx.rstd.reshape(-1), c.reshape(-1)
    cp = plan.layout
    kernel = _loops.backward_small_runs if cp.runs_per_group == 1 else _loops.backward_small_spans
    kernel(x, dy, dx, cp.shape4, mean, rstd, cg, plan.op[2])
    return dx, None, None


def backward_native(ctx: Any, dy: np.ndarray, c: Any, plan: Any, out: Any) -> Result:
    x, cp = ctx.x, plan.layout
    dx, stream = _planned_output(x, out)
    groups = cp.shape4[0] * cp.shape4[2]
    parts = np.empty((2, groups * cp.nc)) if cp.nc > 1 else _NO_PARTS
    stats = tuple(np.ascontiguousarray(v.reshape(-1)) for v in (ctx.mean, ctx.rstd, c))
    part = part_address("backward", cp.nc > 1, x.itemsize)
    x4, dy4, dx4 = (a.reshape(cp.shape4) for a in (x, dy, dx))
    job = (chunks(groups * cp.nc, cp.threads), cp.nc, x4, dy4, dx4, parts)
    run_native(post_backward, cp.threads, (part, job, stats, plan.op[2], stream))
    return dx, None, None


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
    x, lay = ctx.x, plan.layout
    x4, wp, bp, _ = plan.views
    dx, dx4, stream = _output(x, plan, ctx.dtype, out)
    nc, nthreads = plan.threads
    has_w, has_b = ctx.weight is not None, ctx.bias is not None
    items = lay.groups * nc
    # dweight/dbias sums are kept per chunk, so a chunk's adds land in the same slot whichever
    # thread runs it (deterministic); fewer, larger chunks keep those copies few
    nchunks = chunks(items, nthreads, 4 if has_w or has_b else CHUNKS_PER_THREAD)
    dwacc, dw5 = _layout.accumulator(wp, nchunks, lay, has_w)
    dbacc, db5 = _layout.accumulator(bp, nchunks, lay, has_b)
    stats = tuple(_layout.keepdims_to_groups(v, lay) for v in (ctx.mean, ctx.rstd, c))
    io = (x4, _block_dy(dy, lay), wp.view, dx4)
    common = (io, (dw5, db5, 0), stats, plan.op[2], (has_w, has_w, has_b, stream))
    if nc == 1:
        run(_loops.backward_groups, lay.groups, nthreads, common, nchunks)
    else:
        ps = np.empty((2, items))  # partial sum g and sum g (x - mu)
        args = (phase_ctl(nchunks, nthreads), (nc, ps[0], ps[1]), *common)
        run(_loops.backward_split, items, nthreads, args, nchunks)
    dw = _layout.param_grad(dwacc, wp, lay, x, ctx.weight)
    return dx, dw, _layout.param_grad(dbacc, bp, lay, x, ctx.bias)


def backward_sweep(ctx: Any, dy: np.ndarray, c: Any, plan: Any, out: Any) -> Result:
    """Per-group parameters: `sum g = w sum dy`, `sum g (x - mu) = w sum dy (x - mu)`,
    `dweight = r sum dy (x - mu)`, `dbias = sum dy`, from per-item partials merged in a
    fixed order."""
    x, lay = ctx.x, plan.layout
    x4, wp, bp, _ = plan.views
    ka, ra, kb, rb = lay.shape4
    nc, nthreads = plan.threads
    mean, r, cg = (_layout.keepdims_to_groups(v, lay) for v in (ctx.mean, ctx.rstd, c))
    dy4 = _block_dy(dy, lay)
    psdy, psdyd = np.empty(ka * nc * kb), np.empty(ka * nc * kb)
    run(_loops.sums_sweep, ka * nc, nthreads, ((x4, dy4, x4, x4), mean, nc, (psdy, psdyd)))
    sdy = psdy.reshape(ka, nc, kb).sum(axis=1).reshape(-1)
    sdyd = psdyd.reshape(ka, nc, kb).sum(axis=1).reshape(-1)
    wg = _layout.per_group(wp)
    mg, beta = backward_coefficients(wg * sdy, wg * sdyd, ra * rb, plan.op[2], r, cg)
    dx, dx4, stream = _output(x, plan, ctx.dtype, out)
    flags = (ctx.weight is not None, False, False, stream)
    args = ((x4, dy4, x4, dx4), (mean, r, mg, beta), wg, nc, flags)
    run(_loops.backward_sweep, ka * nc, nthreads, args)
    dw = _layout.param_grad(_layout.group_accumulator(r * sdyd, wp, lay), wp, lay, x, ctx.weight)
    db = _layout.param_grad(_layout.group_accumulator(sdy, bp, lay), bp, lay, x, ctx.bias)
    return dx, dw, db


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
