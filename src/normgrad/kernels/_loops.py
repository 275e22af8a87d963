"""Every numba loop of the fused kernels, in one file (numba caches per file).

**Views.** Every layout is viewed, without copying, as a 4-d block array `(Ka, Ra, Kb, Rb)`
(`_layout.py`): kept and reduced axes, a group `g` is a `(k0, k1)` pair, `g = k0 Kb + k1`,
and its `n = Ra Rb` elements are `Ra` runs of `Rb`, walked by a flat index `pos` over
`(ra, rb)`. `at = (k0, r0, k1)` names one run.

**Bundles** (plain tuples, which numba passes at no cost and Python passes to numba
cheaply; NamedTuples would cost microseconds at each call from Python):

    claim = (ctl, nchunks, items, slot)    the pool's claim state for this thread
    io    = (x, w, b, y)                   forward: input, weight, bias, output views
          = (x, dy, w, dx)                 backward
    op    = (eps, inside, m)               the op's scalars: m = n - ddof
    flags = (affine, stream)               forward: apply w and b; streaming stores
          = (has_w, need_dw, need_db, stream)   backward
    acc   = (dwacc, dbacc, k)              dweight/dbias sums per chunk `k` (5-d views)
    stats = (3, groups) float64: mean, var, rstd (forward); (mean, rstd, c) (backward)

**The formulas** are `_formulas.py`'s, compiled here (`rstd`, `backward_coefficients`,
`chan_merge`, `xhat`, `gradient`): the generic path and every kernel evaluate the same
expressions. The element loops (`_add_block`, `_write_y`, `_add_sums`, `_write_dx`) are the
only places that touch elements; every path (small, groups, split, sweep) calls them, so a
variant of the op is written once, there.

**Passes.** Forward: statistics (two-pass inside in-cache blocks of `BLOCK` elements, merged
with Chan's formula; shifted by the group's first element, so a constant group has exactly
zero variance and a large offset cannot overflow the squares), then `y`. Backward: `sum g`
and `sum g (x - mu)` (and dweight/dbias), then `dx`. Sums are float64, `x - mu` is float64
for float32 input, and each output is rounded once.
"""

from __future__ import annotations

import numpy as np
from numba import njit
from numba.extending import register_jitable

from .._formulas import backward_coefficients, chan_merge, gradient, rstd, xhat
from ._pool import begin, on, take, wait_done
from ._stream import stream_backward, stream_forward, stream_span

for _formula in (rstd, backward_coefficients, chan_merge, xhat, gradient):
    register_jitable(inline="always")(_formula)  # kernels call the same Python functions

BLOCK = 2048  # elements per in-cache block of the two-pass statistics (16 KiB of float64)
# Every kernel: cache=True, nogil=True (the pool runs them GIL-free), error_model="numpy"
# (IEEE: 1/0 is inf, no exception). "reassoc" lets LLVM vectorize the float64 sums: the
# kernels whose loops sum take it (inlined helpers compile with their caller's flags). Not
# "contract": FMAs in the scalar loops and none in the streaming stores would give streamed
# and ordinary outputs different bits.
_REASSOC = {"reassoc"}


# --- positions --------------------------------------------------------------------------------


@njit(cache=True, inline="always")
def _group_at(g, kb):
    k0 = g // kb
    return k0, g - k0 * kb


@njit(cache=True, inline="always")
def _next_group(kk, kb):
    """The `(k0, k1)` after `kk` (no division per group: one costs as much as its sums)."""
    k0, k1 = kk
    return (k0, k1 + 1) if k1 + 1 < kb else (k0 + 1, 0)


@njit(cache=True, inline="always")
def _piece(pos, hi, rb):
    """The run `r0` that flat position `pos` lies in, and its elements `[a, e)` below `hi`."""
    r0 = pos // rb
    a = pos - r0 * rb
    return r0, a, min(rb, a + hi - pos)


@njit(cache=True, inline="always")
def _item(i, nc, n, kb):
    """Item `i` of groups split into `nc` chunks: its group `(k0, k1)` and flat range."""
    g = i // nc
    c = i - g * nc
    k0, k1 = _group_at(g, kb)
    return k0, k1, (c * n) // nc, ((c + 1) * n) // nc


@njit(cache=True, inline="always")
def _rows(i, nc, ra):
    """Sweep item `i`: block `k0` and its rows `[lo, hi)` (chunk `i % nc` of the `Ra` rows)."""
    k0 = i // nc
    c = i - k0 * nc
    return k0, (c * ra) // nc, ((c + 1) * ra) // nc


# --- element loops: the only code that touches elements -----------------------------------------


@njit(cache=True, inline="always")
def _add_block(x, at, a, e, shift, acc):
    """Merge the two-pass moments of `x[at][a:e] - shift` (one in-cache block) into `acc`,
    `(count, mean, M2)`."""
    k0, r0, k1 = at
    xs = x[k0, r0, k1, a:e]  # (loops from 0 over a slice: LLVM vectorizes them)
    s = 0.0
    for j in range(xs.size):
        s += xs[j] - shift
    nb = float(xs.size)
    mb = s / nb
    q = 0.0
    for j in range(xs.size):
        d = (xs[j] - shift) - mb
        q += d * d
    return chan_merge(acc[0], acc[1], acc[2], nb, mb, q)


@njit(cache=True, inline="always")
def _write_y(io, at, a, e, mu, r, flags):
    """`y = xhat w + b` on `[a, e)` of a run (`xhat` alone without `affine`); with
    `stream`, its aligned middle through non-temporal stores (`_stream`, the same bits)."""
    x, w, b, y = io
    affine, stream = flags
    k0, r0, k1 = at
    xs, ys = x[k0, r0, k1, a:e], y[k0, r0, k1, a:e]
    n = xs.size
    if affine:
        ws, bs = w[k0, r0, k1, a:e], b[k0, r0, k1, a:e]
        for j in range(n):
            ys[j] = xhat(xs[j], mu, r) * ws[j] + bs[j]
        return
    j0, j1 = stream_span(n, ys, xs, xs) if stream else (n, n)
    if j1 > j0:
        stream_forward(xs, ys, j0, j1, (mu, r))
    for j in range(j0):  # everything when not streaming
        ys[j] = xhat(xs[j], mu, r)
    for j in range(j1, n):
        ys[j] = xhat(xs[j], mu, r)


@njit(cache=True, inline="always")
def _add_sums(io, acc, at, a, e, mu, r, flags):
    """`sum g` and `sum g (x - mu)` over `[a, e)` of a run (g = dy w); adds `dy xhat` and
    `dy` into the dweight and dbias sums of chunk `k` where needed."""
    x, dy, w, _ = io
    dwacc, dbacc, k = acc
    has_w, need_dw, need_db, _ = flags
    k0, r0, k1 = at
    xs, ds = x[k0, r0, k1, a:e], dy[k0, r0, k1, a:e]
    sg = 0.0
    sgd = 0.0
    if has_w:
        ws = w[k0, r0, k1, a:e]
        for j in range(xs.size):
            gj = ds[j] * ws[j]
            sg += gj
            sgd += gj * (xs[j] - mu)
    else:
        for j in range(xs.size):
            dj = np.float64(ds[j])
            sg += dj
            sgd += dj * (xs[j] - mu)
    if need_dw:
        dws = dwacc[k, k0, r0, k1, a:e]
        for j in range(xs.size):
            dws[j] += ds[j] * xhat(xs[j], mu, r)
    if need_db:
        dbs = dbacc[k, k0, r0, k1, a:e]
        for j in range(xs.size):
            dbs[j] += ds[j]
    return sg, sgd


@njit(cache=True, inline="always")
def _write_dx(io, at, a, e, coef, flags):
    """`dx = r (g - mean_g) + beta (x - mu)` on `[a, e)` of a run, `coef = (mu, r, mean_g,
    beta)`; `stream` as in `_write_y`."""
    x, dy, w, dx = io
    mu, r, mg, bt = coef
    has_w, _, _, stream = flags
    k0, r0, k1 = at
    xs, ds, dxs = x[k0, r0, k1, a:e], dy[k0, r0, k1, a:e], dx[k0, r0, k1, a:e]
    n = xs.size
    if has_w:
        ws = w[k0, r0, k1, a:e]
        for j in range(n):
            dxs[j] = gradient(ds[j] * ws[j], xs[j] - mu, r, mg, bt)
        return
    j0, j1 = stream_span(n, dxs, xs, ds) if stream else (n, n)
    if j1 > j0:
        stream_backward(xs, ds, dxs, j0, j1, coef)
    for j in range(j0):  # everything when not streaming
        dxs[j] = gradient(ds[j], xs[j] - mu, r, mg, bt)
    for j in range(j1, n):
        dxs[j] = gradient(ds[j], xs[j] - mu, r, mg, bt)


# --- spans: flat ranges of one group, walked run by run -------------------------------------------


@njit(cache=True, inline="always")
def _span_stats(x, k0, k1, lo, hi, shift):
    """`(count, mean, M2)` of `x - shift` over flat `[lo, hi)` of group `(k0, k1)`."""
    rb = x.shape[3]
    acc = (0.0, 0.0, 0.0)
    pos = lo
    while pos < hi:
        r0, a, e = _piece(pos, hi, rb)
        s = a
        while s < e:
            t = min(e, s + BLOCK)
            acc = _add_block(x, (k0, r0, k1), s, t, shift, acc)
            s = t
        pos += e - a
    return acc


@njit(cache=True, inline="always")
def _span_y(io, k0, k1, lo, hi, mu, r, flags):
    rb = io[0].shape[3]
    pos = lo
    while pos < hi:
        r0, a, e = _piece(pos, hi, rb)
        _write_y(io, (k0, r0, k1), a, e, mu, r, flags)
        pos += e - a


@njit(cache=True, inline="always")
def _span_sums(io, acc, k0, k1, lo, hi, mu, r, flags):
    rb = io[0].shape[3]
    sg = 0.0
    sgd = 0.0
    pos = lo
    while pos < hi:
        r0, a, e = _piece(pos, hi, rb)
        g1, g2 = _add_sums(io, acc, (k0, r0, k1), a, e, mu, r, flags)
        sg += g1
        sgd += g2
        pos += e - a
    return sg, sgd


@njit(cache=True, inline="always")
def _span_dx(io, k0, k1, lo, hi, coef, flags):
    rb = io[0].shape[3]
    pos = lo
    while pos < hi:
        r0, a, e = _piece(pos, hi, rb)
        _write_dx(io, (k0, r0, k1), a, e, coef, flags)
        pos += e - a


# --- whole groups -------------------------------------------------------------------------------


@njit(cache=True, inline="always")
def _finish_stats(x, k0, k1, moments, op):
    """`(mean, var, rstd)` of a group from the moments of `x - shift` (shift: its first
    element)."""
    eps, inside, m = op
    mu = np.float64(x[k0, 0, k1, 0]) + moments[1]  # (np.float64: float() keeps float32)
    v = moments[2] / m
    return mu, v, rstd(np, v, eps, inside)


@njit(cache=True, inline="always")
def _run_stats(x, at, rb, shift):
    """`(count, mean, M2)` of `x - shift` over one whole run, block by block."""
    acc = (0.0, 0.0, 0.0)
    s = 0
    while s < rb:
        e = min(rb, s + BLOCK)
        acc = _add_block(x, at, s, e, shift, acc)
        s = e
    return acc


@njit(cache=True, inline="always")
def _forward_run(io, g, kk, op, stats, flags):
    """Statistics, `rstd` and `y` of group `g = (k0, k1)` made of one run (rows, instances,
    whole)."""
    x = io[0]
    k0, k1 = kk
    at = (k0, 0, k1)
    moments = _run_stats(x, at, x.shape[3], np.float64(x[k0, 0, k1, 0]))
    stats[0, g], stats[1, g], stats[2, g] = _finish_stats(x, k0, k1, moments, op)
    _write_y(io, at, 0, x.shape[3], stats[0, g], stats[2, g], flags)


@njit(cache=True, inline="always")
def _forward_span(io, g, kk, op, stats, flags):
    """Statistics, `rstd` and `y` of group `g = (k0, k1)` of several runs, walked as a span."""
    x = io[0]
    _, ra, _, rb = x.shape
    k0, k1 = kk
    moments = _span_stats(x, k0, k1, 0, ra * rb, np.float64(x[k0, 0, k1, 0]))
    stats[0, g], stats[1, g], stats[2, g] = _finish_stats(x, k0, k1, moments, op)
    _span_y(io, k0, k1, 0, ra * rb, stats[0, g], stats[2, g], flags)


@njit(cache=True, inline="always")
def _forward_runs(io, i0, i1, op, stats, flags):
    """Groups `[i0, i1)` of one run each, whole (both passes while the group is in cache)."""
    kb = io[0].shape[2]
    kk = _group_at(i0, kb)
    for g in range(i0, i1):
        _forward_run(io, g, kk, op, stats, flags)
        kk = _next_group(kk, kb)


@njit(cache=True, inline="always")
def _forward_spans(io, i0, i1, op, stats, flags):
    """Groups `[i0, i1)` of several runs each, whole."""
    kb = io[0].shape[2]
    kk = _group_at(i0, kb)
    for g in range(i0, i1):
        _forward_span(io, g, kk, op, stats, flags)
        kk = _next_group(kk, kb)


@njit(cache=True, inline="always")
def _forward_range(io, i0, i1, op, stats, flags):
    """Groups `[i0, i1)`, each whole. The layout's branch is taken once, outside the loop
    over groups: inside it, it kept LLVM from optimizing the group's loops
    (docs/performance.md, "Code shape")."""
    if io[0].shape[1] == 1:
        _forward_runs(io, i0, i1, op, stats, flags)
    else:
        _forward_spans(io, i0, i1, op, stats, flags)


@njit(cache=True, inline="always")
def _backward_run(io, acc, g, kk, stats, m, flags):
    """Sums and `dx` of group `g = (k0, k1)` made of one run; `stats = (mean, rstd, c)`."""
    mean, rs, c = stats
    rb = io[0].shape[3]
    k0, k1 = kk
    mu, r = mean[g], rs[g]
    sg, sgd = _add_sums(io, acc, (k0, 0, k1), 0, rb, mu, r, flags)
    mg, bt = backward_coefficients(sg, sgd, rb, m, r, c[g])
    _write_dx(io, (k0, 0, k1), 0, rb, (mu, r, mg, bt), flags)


@njit(cache=True, inline="always")
def _backward_span(io, acc, g, kk, stats, m, flags):
    """Sums and `dx` of group `g = (k0, k1)` of several runs, walked as a span."""
    mean, rs, c = stats
    _, ra, _, rb = io[0].shape
    k0, k1 = kk
    mu, r = mean[g], rs[g]
    sg, sgd = _span_sums(io, acc, k0, k1, 0, ra * rb, mu, r, flags)
    mg, bt = backward_coefficients(sg, sgd, ra * rb, m, r, c[g])
    _span_dx(io, k0, k1, 0, ra * rb, (mu, r, mg, bt), flags)


@njit(cache=True, inline="always")
def _backward_runs(io, acc, i0, i1, stats, m, flags):
    kb = io[0].shape[2]
    kk = _group_at(i0, kb)
    for g in range(i0, i1):
        _backward_run(io, acc, g, kk, stats, m, flags)
        kk = _next_group(kk, kb)


@njit(cache=True, inline="always")
def _backward_spans(io, acc, i0, i1, stats, m, flags):
    kb = io[0].shape[2]
    kk = _group_at(i0, kb)
    for g in range(i0, i1):
        _backward_span(io, acc, g, kk, stats, m, flags)
        kk = _next_group(kk, kb)


@njit(cache=True, inline="always")
def _backward_range(io, acc, i0, i1, stats, m, flags):
    """Groups `[i0, i1)`, each whole; the layout's branch outside the loop, as forward."""
    if io[0].shape[1] == 1:
        _backward_runs(io, acc, i0, i1, stats, m, flags)
    else:
        _backward_spans(io, acc, i0, i1, stats, m, flags)


# The small kernels: the whole call of a small C-contiguous input on one thread, no affine
# parameters (`xin`, `yin`/`dxin`, `stats_in` of any shape, viewed here as `shape4`, (3,
# groups)). One kernel for groups of one run, one for several, so that a first call
# compiles only the one it needs (both in one kernel compiled twice as long).


@njit(cache=True, nogil=True, error_model="numpy", fastmath=_REASSOC)
def forward_small_runs(xin, yin, stats_in, shape4, op):
    x = xin.reshape(shape4)
    stats = stats_in.reshape((3, shape4[0] * shape4[2]))
    _forward_runs((x, x, x, yin.reshape(shape4)), 0, stats.shape[1], op, stats, (False, False))


@njit(cache=True, nogil=True, error_model="numpy", fastmath=_REASSOC)
def forward_small_spans(xin, yin, stats_in, shape4, op):
    x = xin.reshape(shape4)
    stats = stats_in.reshape((3, shape4[0] * shape4[2]))
    _forward_spans((x, x, x, yin.reshape(shape4)), 0, stats.shape[1], op, stats, (False, False))


@njit(cache=True, inline="always")
def _small_backward_args(xin, dyin, dxin, shape4):
    """The io and the (never used, writable) dweight/dbias stand-ins of a small backward."""
    x = xin.reshape(shape4)
    none = dxin.reshape((1, 1, 1, 1, dxin.size))
    return (x, dyin.reshape(shape4), x, dxin.reshape(shape4)), (none, none, 0)


@njit(cache=True, nogil=True, error_model="numpy", fastmath=_REASSOC)
def backward_small_runs(xin, dyin, dxin, shape4, mean, rstd_, c, m):
    """`mean`, `rstd_`, `c` flat per group (apart: a tuple costs the call from Python more)."""
    io, acc = _small_backward_args(xin, dyin, dxin, shape4)
    flags = (False, False, False, False)
    _backward_runs(io, acc, 0, mean.size, (mean, rstd_, c), m, flags)


@njit(cache=True, nogil=True, error_model="numpy", fastmath=_REASSOC)
def backward_small_spans(xin, dyin, dxin, shape4, mean, rstd_, c, m):
    io, acc = _small_backward_args(xin, dyin, dxin, shape4)
    flags = (False, False, False, False)
    _backward_spans(io, acc, 0, mean.size, (mean, rstd_, c), m, flags)


@njit(cache=True, nogil=True, error_model="numpy", fastmath=_REASSOC)
def forward_groups(claim, io, op, stats, flags):
    """Groups as items, each whole, on the claimed ranges."""
    while True:
        k, i0, i1 = take(claim)
        if k < 0:
            return
        _forward_range(io, i0, i1, op, stats, flags)


@njit(cache=True, nogil=True, error_model="numpy", fastmath=_REASSOC)
def backward_groups(claim, io, acc, stats, m, flags):
    """Groups as items, each whole, dweight/dbias sums per chunk."""
    dwacc, dbacc, _ = acc
    while True:
        k, i0, i1 = take(claim)
        if k < 0:
            return
        _backward_range(io, (dwacc, dbacc, k), i0, i1, stats, m, flags)


# --- split groups: chunks of groups, partial sums, a barrier, the merge, the second pass ---------


@njit(cache=True, nogil=True, error_model="numpy", fastmath=_REASSOC)
def _stats_items(claim, x, nc, parts):
    pmean, pm2 = parts
    _, ra, kb, rb = x.shape
    while True:
        k, i0, i1 = take(claim)
        if k < 0:
            return
        for i in range(i0, i1):
            k0, k1, lo, hi = _item(i, nc, ra * rb, kb)
            shift = np.float64(x[k0, 0, k1, 0])
            _, pmean[i], pm2[i] = _span_stats(x, k0, k1, lo, hi, shift)


@njit(cache=True, nogil=True, error_model="numpy")
def merge_parts(parts, counts, mean, m2):
    """Chan-merge each group's `nc = counts.size` partial moments (`parts[.][g nc + c]`, in
    chunk order) into its mean and M2."""
    pmean, pm2 = parts
    nc = counts.size
    for g in range(mean.size):
        acc = (0.0, 0.0, 0.0)
        for c in range(nc):
            i = g * nc + c
            acc = chan_merge(acc[0], acc[1], acc[2], counts[c], pmean[i], pm2[i])
        mean[g] = acc[1]
        m2[g] = acc[2]


@njit(cache=True, nogil=True, error_model="numpy")
def forward_split(claim, phase, split, io, op, stats, flags):
    """Groups split into `nc = counts.size` chunks, in one job: partial statistics (claimed
    on `phase`), a barrier, then every thread merges them in the same order and takes `rstd`,
    then `y` (claimed on the job's own state, each thread's last-read chunks first). Slot 0
    writes `stats`. `split = (counts, pmean, pm2)`."""
    counts, pmean, pm2 = split
    x = io[0]
    begin(claim)
    _stats_items(on(claim, phase), x, counts.size, (pmean, pm2))
    if not wait_done(phase, claim):
        return
    groups = stats.shape[1]
    mean = np.empty(groups)
    m2 = np.empty(groups)
    merge_parts((pmean, pm2), counts, mean, m2)
    mine = np.empty((3, groups))
    kb = x.shape[2]
    for g in range(groups):
        k0, k1 = _group_at(g, kb)
        mine[0, g], mine[1, g], mine[2, g] = _finish_stats(x, k0, k1, (0.0, mean[g], m2[g]), op)
        if claim[3] == 0:
            stats[:, g] = mine[:, g]
    _items_y(claim, io, counts.size, mine, flags)


@njit(cache=True, nogil=True, error_model="numpy")
def _items_y(claim, io, nc, stats, flags):
    _, ra, kb, rb = io[0].shape
    while True:
        k, i0, i1 = take(claim, True)
        if k < 0:
            return
        for i in range(i0, i1):
            k0, k1, lo, hi = _item(i, nc, ra * rb, kb)
            g = k0 * kb + k1
            _span_y(io, k0, k1, lo, hi, stats[0, g], stats[2, g], flags)


@njit(cache=True, nogil=True, error_model="numpy", fastmath=_REASSOC)
def _sums_items(claim, io, acc, stats, split, flags):
    mean, rs, _ = stats
    nc, psg, psgd = split
    _, ra, kb, rb = io[0].shape
    dwacc, dbacc, _ = acc
    while True:
        k, i0, i1 = take(claim)
        if k < 0:
            return
        for i in range(i0, i1):
            k0, k1, lo, hi = _item(i, nc, ra * rb, kb)
            g = k0 * kb + k1
            psg[i], psgd[i] = _span_sums(
                io, (dwacc, dbacc, k), k0, k1, lo, hi, mean[g], rs[g], flags
            )


@njit(cache=True, nogil=True, error_model="numpy")
def _items_dx(claim, io, coefs, nc, flags):
    mean, rs, mg, beta = coefs
    _, ra, kb, rb = io[0].shape
    while True:
        k, i0, i1 = take(claim, True)
        if k < 0:
            return
        for i in range(i0, i1):
            k0, k1, lo, hi = _item(i, nc, ra * rb, kb)
            g = k0 * kb + k1
            _span_dx(io, k0, k1, lo, hi, (mean[g], rs[g], mg[g], beta[g]), flags)


@njit(cache=True, nogil=True, error_model="numpy")
def backward_split(claim, phase, split, io, acc, stats, m, flags):
    """The backward of groups split into `nc` chunks, in one job: partial `sum g` and
    `sum g (x - mu)` (claimed on `phase`), a barrier, the sums in chunk order, then `dx`
    (last-read chunks first). `split = (nc, psg, psgd)`."""
    nc, psg, psgd = split
    mean, rs, c = stats
    begin(claim)
    _sums_items(on(claim, phase), io, acc, stats, split, flags)
    if not wait_done(phase, claim):
        return
    _, ra, _, rb = io[0].shape
    mg = np.empty(mean.size)
    beta = np.empty(mean.size)
    for g in range(mean.size):
        sg = 0.0
        sgd = 0.0
        for i in range(g * nc, (g + 1) * nc):
            sg += psg[i]
            sgd += psgd[i]
        mg[g], beta[g] = backward_coefficients(sg, sgd, ra * rb, m, rs[g], c[g])
    _items_dx(claim, io, (mean, rs, mg, beta), nc, flags)


# --- sweeps (batch norm): items are row ranges of one Ka block, every group, memory order -------
# Item i = (k0, chunk of the Ra rows) covers rows [lo, hi) of every kb group, so each thread
# streams one contiguous region (and first-touches its own pages of a fresh output). Partial
# results sit at [i * kb + k1]. Affine parameters are constant per group: scalars per group.


@njit(cache=True, nogil=True, error_model="numpy", fastmath=_REASSOC)
def stats_sweep(claim, x, nc, parts):
    pmean, pm2 = parts
    _, ra, kb, rb = x.shape
    while True:
        k, i0, i1 = take(claim)
        if k < 0:
            return
        for i in range(i0, i1):
            k0, lo, hi = _rows(i, nc, ra)
            cnt = 0.0  # every group of the item has seen the same rows
            for r0 in range(lo, hi):
                for k1 in range(kb):
                    acc = (cnt, pmean[i * kb + k1], pm2[i * kb + k1])
                    shift = np.float64(x[k0, 0, k1, 0])
                    s = 0
                    while s < rb:
                        e = min(rb, s + BLOCK)
                        acc = _add_block(x, (k0, r0, k1), s, e, shift, acc)
                        s = e
                    pmean[i * kb + k1], pm2[i * kb + k1] = acc[1], acc[2]
                cnt += rb


@njit(cache=True, nogil=True, error_model="numpy")
def forward_sweep(claim, io, coefs, nc, flags):
    """`y` of the swept rows; `coefs = (mean, rstd, wg, bg)` per group."""
    x, _, _, y = io
    mean, rs, wg, bg = coefs
    affine, stream = flags
    _, ra, kb, rb = x.shape
    while True:
        k, i0, i1 = take(claim)
        if k < 0:
            return
        for i in range(i0, i1):
            k0, lo, hi = _rows(i, nc, ra)
            for r0 in range(lo, hi):
                for k1 in range(kb):
                    g = k0 * kb + k1
                    mu, r = mean[g], rs[g]
                    if affine:
                        wv, bv = wg[g], bg[g]
                        for j in range(rb):
                            y[k0, r0, k1, j] = xhat(x[k0, r0, k1, j], mu, r) * wv + bv
                    else:
                        _write_y(io, (k0, r0, k1), 0, rb, mu, r, (False, stream))


@njit(cache=True, nogil=True, error_model="numpy", fastmath=_REASSOC)
def sums_sweep(claim, io, mean, nc, parts):
    """Partial `sum dy` and `sum dy (x - mu)` per item and group (a per-group weight
    multiplies them later)."""
    psdy, psdyd = parts
    _, ra, kb, rb = io[0].shape
    none = (psdy.reshape((1, 1, 1, 1, -1)), psdy.reshape((1, 1, 1, 1, -1)), 0)  # never used
    while True:
        k, i0, i1 = take(claim)
        if k < 0:
            return
        for i in range(i0, i1):
            k0, lo, hi = _rows(i, nc, ra)
            for k1 in range(kb):
                psdy[i * kb + k1] = 0.0
                psdyd[i * kb + k1] = 0.0
            for r0 in range(lo, hi):
                for k1 in range(kb):
                    mu = mean[k0 * kb + k1]
                    flags = (False, False, False, False)
                    sg, sgd = _add_sums(io, none, (k0, r0, k1), 0, rb, mu, 1.0, flags)
                    psdy[i * kb + k1] += sg
                    psdyd[i * kb + k1] += sgd


@njit(cache=True, nogil=True, error_model="numpy")
def backward_sweep(claim, io, coefs, wg, nc, flags):
    """`dx` of the swept rows; `coefs = (mean, rstd, mean_g, beta)` per group, `wg` the
    per-group weight (read where `has_w`)."""
    x, dy, _, dx = io
    mean, rs, mg, beta = coefs
    has_w, _, _, stream = flags
    _, ra, kb, rb = x.shape
    while True:
        k, i0, i1 = take(claim)
        if k < 0:
            return
        for i in range(i0, i1):
            k0, lo, hi = _rows(i, nc, ra)
            for r0 in range(lo, hi):
                for k1 in range(kb):
                    g = k0 * kb + k1
                    mu, r, mgg, bt = mean[g], rs[g], mg[g], beta[g]
                    if has_w:
                        wv = wg[g]
                        for j in range(rb):
                            gj = dy[k0, r0, k1, j] * wv
                            dx[k0, r0, k1, j] = gradient(gj, x[k0, r0, k1, j] - mu, r, mgg, bt)
                    else:
                        coef = (mu, r, mgg, bt)
                        _write_dx(io, (k0, r0, k1), 0, rb, coef, (False, False, False, stream))
