"""Every numba loop of the fused kernels, in one file (numba caches per file).

**Views.** Every layout is viewed, without copying, as a 4-d block array `(Ka, Ra, Kb, Rb)`
(`_layout.py`): kept and reduced axes, a group `g` is a `(k0, k1)` pair, `g = k0 Kb + k1`,
and its `n = Ra Rb` elements are `Ra` runs of `Rb`, walked by a flat index `pos` over
`(ra, rb)`. `at = (k0, r0, k1)` names one run.

**Bundles** (plain tuples, which numba passes at no cost and Python passes to numba
cheaply; NamedTuples would cost microseconds at each call from Python):

    claim = (ctl, nchunks, items, slot)    the pool's claim state for this thread
    io    = (x, y), (x, dy, dx)            forward, backward: 4-d block views
    par   = (w, b, w_rule, b_rule)         the affine parameters as tables (`_layout.Table`)
    op    = (eps, inside, m, center)       the op's scalars: m = n - ddof; center False: RMS
    flags = (affine, stream)               forward: apply w and b; streaming stores
          = (has_w, need_dw, need_db, stream)   backward
    acc   = (dw, db, k)                    dweight/dbias sums, slot `k` (`_layout.accumulator`)
    stats = (3, groups) float64: mean, var, rstd (forward)
    bst   = (mean, rstd, c, m, center)     backward: per group, then m and center

**The formulas** are `_formulas.py`'s, compiled here (`rstd`, `backward_coefficients`,
`chan_merge`, `xhat`, `gradient`): the generic path and every kernel evaluate the same
expressions. The element loops (`_add_block`, `_write_y`, `_add_sums`, `_write_dx`) are the
only places that touch elements; every path (small, groups, split, sweep) calls them, so a
variant of the op is written once, there. Layouts whose groups are innermost in memory
(Rb = 1: batch norm over (N, F) or NHWC) have their own four, the column loops
(`_column_block`, `_column_y`, `_column_sums`, `_column_dx`), which go along rows of groups
with the same formulas.

**RMS** (`center=False`): `_add_block` sums `x^2` instead of the block's squared deviations
(a zero mean, which Chan's merge keeps at zero: the merged "M2" is `sum x^2`), the shift is
0 (`_origin`), so the saved mean is exactly 0 and every `x - mu` is `x`; the backward's
`backward_coefficients` drops the mean path. Nothing else knows of the variant.

**Passes.** Forward: statistics (in-cache blocks of `BLOCK` elements, merged with Chan's
formula: two-pass for float64, one pass of sums shifted by the block's first element for
float32 (`shifted_moments`); relative to the group's first element, so a constant group has
exactly zero variance and a large offset cannot overflow the squares), then `y`. Backward: `sum g`
and `sum g (x - mu)` (and dweight/dbias), then `dx`. Sums are float64, `x - mu` is float64
for float32 input, and each output is rounded once.
"""

from __future__ import annotations

import numpy as np
from numba import njit
from numba.extending import register_jitable

from .._formulas import (
    backward_coefficients,
    chan_merge,
    chan_step,
    chan_weights,
    gradient,
    rstd,
    shifted_moments,
    xhat,
)
from ._pool import begin, on, take, wait_done
from ._stream import stream_backward, stream_forward, stream_span

_FORMULAS = (rstd, backward_coefficients, chan_weights, chan_step, chan_merge, shifted_moments)
for _formula in (*_FORMULAS, xhat, gradient):
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
def _row(rule, at):
    """The table row a parameter gives run `at = (k0, r0, k1)` (see `_layout.Table`)."""
    return at[0] * rule[0] + at[1] * rule[1] + at[2] * rule[2]


@njit(cache=True, inline="always")
def _origin(x, kk, center):
    """The shift of group `kk`'s moments: its first element, or 0 for RMS (no mean)."""
    return np.float64(x[kk[0], 0, kk[1], 0]) if center else 0.0


@njit(cache=True, inline="always")
def _add_block(x, at, a, e, shift, acc, center):
    """Merge the moments of `x[at][a:e] - shift` (one in-cache block) into `acc`, `(count,
    mean, M2)`: float64 two-pass; float32 in one pass of float64 sums shifted by the block's
    first element (`shifted_moments`: its error bound is far below float32's ulp, and the
    pass costs half). Without `center` (RMS), `(count, 0, sum x^2)`."""
    k0, r0, k1 = at
    xs = x[k0, r0, k1, a:e]  # (loops from 0 over a slice: LLVM vectorizes them)
    if not center:
        q = 0.0
        for j in range(xs.size):
            v = np.float64(xs[j])
            q += v * v
        return chan_merge(acc[0], 0.0, acc[2], float(xs.size), 0.0, q)
    nb = float(xs.size)
    if xs.itemsize == 4:  # float32: one pass of shifted sums (`shifted_moments`)
        s0 = np.float64(xs[0])
        s = 0.0
        q = 0.0
        for j in range(xs.size):
            d = xs[j] - s0
            s += d
            q += d * d
        mb, m2 = shifted_moments(nb, s, q)
        return chan_merge(acc[0], acc[1], acc[2], nb, (s0 - shift) + mb, m2)
    s = 0.0
    for j in range(xs.size):
        s += xs[j] - shift
    mb = s / nb
    q = 0.0
    for j in range(xs.size):
        d = (xs[j] - shift) - mb
        q += d * d
    return chan_merge(acc[0], acc[1], acc[2], nb, mb, q)


@njit(cache=True, inline="always")
def _affine_y(xs, ys, par, at, a, coef):
    """`y = xhat w + b` on a piece of a run starting at `a`, each parameter one value for
    the run or one per element (tables of 1 or Rb columns)."""
    wt, bt, wr, br = par
    mu, r = coef
    wi, bi = _row(wr, at), _row(br, at)
    n = xs.size
    if wt.shape[1] == 1 and bt.shape[1] == 1:
        wv, bv = np.float64(wt[wi, 0]), np.float64(bt[bi, 0])
        for j in range(n):
            ys[j] = xhat(xs[j], mu, r) * wv + bv
    elif bt.shape[1] == 1:
        ws, bv = wt[wi, a : a + n], np.float64(bt[bi, 0])
        for j in range(n):
            ys[j] = xhat(xs[j], mu, r) * np.float64(ws[j]) + bv
    elif wt.shape[1] == 1:
        wv, bs = np.float64(wt[wi, 0]), bt[bi, a : a + n]
        for j in range(n):
            ys[j] = xhat(xs[j], mu, r) * wv + np.float64(bs[j])
    else:
        ws, bs = wt[wi, a : a + n], bt[bi, a : a + n]
        for j in range(n):
            ys[j] = xhat(xs[j], mu, r) * np.float64(ws[j]) + np.float64(bs[j])


@njit(cache=True, inline="always")
def _write_y(io, par, at, a, e, coef, flags):
    """`y = xhat w + b` on `[a, e)` of a run (`xhat` alone without `affine`), `coef = (mu,
    r)`; with `stream`, the aligned middle through non-temporal stores (the same bits)."""
    x, y = io
    affine, stream = flags
    k0, r0, k1 = at
    xs, ys = x[k0, r0, k1, a:e], y[k0, r0, k1, a:e]
    if affine:
        _affine_y(xs, ys, par, at, a, coef)
        return
    mu, r = coef
    n = xs.size
    j0, j1 = stream_span(n, ys, xs, xs) if stream else (n, n)
    if j1 > j0:
        stream_forward(xs, ys, j0, j1, coef)
    for j in range(j0):  # everything when not streaming
        ys[j] = xhat(xs[j], mu, r)
    for j in range(j1, n):
        ys[j] = xhat(xs[j], mu, r)


@njit(cache=True, fastmath=_REASSOC)
def _sums_per_element(pieces, sums, coef):
    """`sum g`, `sum g (x - mu)` and the dweight and dbias sums of a piece of a run whose
    weight and bias vary per element, in one pass (`pieces = (x, dy, w)`, `sums = (dw,
    db)`, the same piece of their rows)."""
    xs, ds, ws = pieces
    dws, dbs = sums
    mu, r = coef
    sg = 0.0
    sgd = 0.0
    for j in range(xs.size):
        d = xs[j] - mu
        gj = np.float64(ds[j]) * np.float64(ws[j])
        sg += gj
        sgd += gj * d
        dws[j] += ds[j] * (d * r)
        dbs[j] += ds[j]
    return sg, sgd


@njit(cache=True, fastmath=_REASSOC)
def _weight_sums_per_element(pieces, dws, coef):
    """`_sums_per_element` without a bias (RMS norm's usual call): `sum g`, `sum g (x - mu)`
    and the dweight sums in one pass."""
    xs, ds, ws = pieces
    mu, r = coef
    sg = 0.0
    sgd = 0.0
    for j in range(xs.size):
        d = xs[j] - mu
        gj = np.float64(ds[j]) * np.float64(ws[j])
        sg += gj
        sgd += gj * d
        dws[j] += ds[j] * (d * r)
    return sg, sgd


# The parameter-sum helpers (with `_add_run_sums`) are plain jitted functions, not inlined: inlined
# (`inline="always"`) one after the other into `_add_sums`, the second one's adds were lost
# (numba 0.68's IR inliner; a test runs every parameter layout against the generic path).
@njit(cache=True, fastmath=_REASSOC)
def _add_weight_sums(sums, row, a, pieces, coef):
    """Add `dy xhat` of a piece of a run (`pieces = (x, dy)`, starting at element `a`) into
    row `row` of one slot of the dweight sums: per element, or one sum for the run."""
    px, pd = pieces
    mu, r = coef
    n = pd.size
    if sums.shape[1] > 1:
        out = sums[row, a : a + n]
        for j in range(n):
            out[j] += pd[j] * xhat(px[j], mu, r)
    else:
        total = 0.0
        for j in range(n):
            total += pd[j] * xhat(px[j], mu, r)
        sums[row, 0] += total


@njit(cache=True, fastmath=_REASSOC)
def _add_bias_sums(sums, row, a, ds):
    """Add `dy` of a piece of a run into row `row` of one slot of the dbias sums."""
    n = ds.size
    if sums.shape[1] > 1:
        out = sums[row, a : a + n]
        for j in range(n):
            out[j] += ds[j]
    else:
        total = 0.0
        for j in range(n):
            total += ds[j]
        sums[row, 0] += total


@njit(cache=True)
def _add_run_sums(accs, rows, need, sums):
    """Add a run's `sum dy xhat` and `sum dy` into row `rows[1]` of slot `rows[0]` of the
    dweight sums and row `rows[3]` of slot `rows[2]` of the dbias sums, where needed."""
    if need[0]:
        accs[0][rows[0], rows[1], 0] += sums[0]
    if need[1]:
        accs[1][rows[2], rows[3], 0] += sums[1]


@njit(cache=True, inline="always")
def _add_sums(io, par, acc, at, a, e, coef, flags):
    """`sum g` and `sum g (x - mu)` over `[a, e)` of a run (g = dy w); adds `dy xhat` and
    `dy` into slot `k` of the dweight and dbias sums where needed (`acc = (dw, db, k)`)."""
    x, dy = io[0], io[1]
    wt, wr, br = par[0], par[2], par[3]
    dwa, dba, k = acc
    has_w, need_dw, need_db = flags[0], flags[1], flags[2]
    k0, r0, k1 = at
    xs, ds = x[k0, r0, k1, a:e], dy[k0, r0, k1, a:e]
    mu = coef[0]
    dw_run = not need_dw or dwa.shape[2] == 1
    db_run = not need_db or dba.shape[2] == 1
    if wt.shape[1] == 1 and dw_run and db_run:
        # one weight for the run (or none), run sums for its parameters (batch, group and
        # instance norm): sum dy and sum dy (x - mu) give all four sums in one pass
        sdy = 0.0
        sdyd = 0.0
        for j in range(xs.size):
            dj = np.float64(ds[j])
            sdy += dj
            sdyd += dj * (xs[j] - mu)
        rows = (min(k, dwa.shape[0] - 1), _row(wr, at), min(k, dba.shape[0] - 1), _row(br, at))
        _add_run_sums((dwa, dba), rows, (need_dw, need_db), (sdyd * coef[1], sdy))
        wv = np.float64(wt[_row(wr, at), 0]) if has_w else 1.0
        return sdy * wv, sdyd * wv
    if need_dw and wt.shape[1] > 1 and dwa.shape[2] > 1:
        dws = dwa[min(k, dwa.shape[0] - 1), _row(wr, at), a:e]
        ws = wt[_row(wr, at), a:e]
        if not need_db:  # per-element weight, no bias (RMS norm): every sum in one pass
            return _weight_sums_per_element((xs, ds, ws), dws, coef)
        if dba.shape[2] > 1:  # per-element weight and bias (layer norm): the same
            dbs = dba[min(k, dba.shape[0] - 1), _row(br, at), a:e]
            return _sums_per_element((xs, ds, ws), (dws, dbs), coef)
    sg = 0.0
    sgd = 0.0
    if has_w and wt.shape[1] > 1:
        ws = wt[_row(wr, at), a:e]
        for j in range(xs.size):
            gj = np.float64(ds[j]) * np.float64(ws[j])
            sg += gj
            sgd += gj * (xs[j] - mu)
    else:
        wv = np.float64(wt[_row(wr, at), 0]) if has_w else 1.0
        for j in range(xs.size):
            gj = ds[j] * wv
            sg += gj
            sgd += gj * (xs[j] - mu)
    if need_dw:  # (a single slot where chunks share no rows: min)
        _add_weight_sums(dwa[min(k, dwa.shape[0] - 1)], _row(wr, at), a, (xs, ds), coef)
    if need_db:
        _add_bias_sums(dba[min(k, dba.shape[0] - 1)], _row(br, at), a, ds)
    return sg, sgd


@njit(cache=True, inline="always")
def _write_dx(io, par, at, a, e, coef, flags):
    """`dx = r (g - mean_g) + beta (x - mu)` on `[a, e)` of a run, `coef = (mu, r, mean_g,
    beta)`; `stream` as in `_write_y`."""
    x, dy, dx = io
    wt, _, wr, _ = par
    mu, r, mg, bt = coef
    has_w, _, _, stream = flags
    k0, r0, k1 = at
    xs, ds, dxs = x[k0, r0, k1, a:e], dy[k0, r0, k1, a:e], dx[k0, r0, k1, a:e]
    n = xs.size
    if has_w and wt.shape[1] > 1:
        ws = wt[_row(wr, at), a:e]
        for j in range(n):
            dxs[j] = gradient(np.float64(ds[j]) * np.float64(ws[j]), xs[j] - mu, r, mg, bt)
        return
    if has_w:
        wv = np.float64(wt[_row(wr, at), 0])
        for j in range(n):
            dxs[j] = gradient(ds[j] * wv, xs[j] - mu, r, mg, bt)
        return
    j0, j1 = stream_span(n, dxs, xs, ds) if stream else (n, n)
    if j1 > j0:
        stream_backward(xs, ds, dxs, j0, j1, coef)
    for j in range(j0):  # everything when not streaming
        dxs[j] = gradient(ds[j], xs[j] - mu, r, mg, bt)
    for j in range(j1, n):
        dxs[j] = gradient(ds[j], xs[j] - mu, r, mg, bt)


# --- spans: flat ranges `(lo, hi)` of one group `kk = (k0, k1)`, walked run by run ---------------


@njit(cache=True, inline="always")
def _span_stats(x, kk, span, shift, center):
    """`(count, mean, M2)` of `x - shift` over the span, block by block (RMS: `center`)."""
    k0, k1 = kk
    lo, hi = span
    rb = x.shape[3]
    acc = (0.0, 0.0, 0.0)
    pos = lo
    while pos < hi:
        r0, a, e = _piece(pos, hi, rb)
        s = a
        while s < e:
            t = min(e, s + BLOCK)
            acc = _add_block(x, (k0, r0, k1), s, t, shift, acc, center)
            s = t
        pos += e - a
    return acc


@njit(cache=True, inline="always")
def _span_y(io, par, kk, span, coef, flags):
    k0, k1 = kk
    lo, hi = span
    rb = io[0].shape[3]
    pos = lo
    while pos < hi:
        r0, a, e = _piece(pos, hi, rb)
        _write_y(io, par, (k0, r0, k1), a, e, coef, flags)
        pos += e - a


@njit(cache=True, inline="always")
def _span_sums(io, par, acc, kk, span, coef, flags):
    k0, k1 = kk
    lo, hi = span
    rb = io[0].shape[3]
    sg = 0.0
    sgd = 0.0
    pos = lo
    while pos < hi:
        r0, a, e = _piece(pos, hi, rb)
        g1, g2 = _add_sums(io, par, acc, (k0, r0, k1), a, e, coef, flags)
        sg += g1
        sgd += g2
        pos += e - a
    return sg, sgd


@njit(cache=True, inline="always")
def _span_dx(io, par, kk, span, coef, flags):
    k0, k1 = kk
    lo, hi = span
    rb = io[0].shape[3]
    pos = lo
    while pos < hi:
        r0, a, e = _piece(pos, hi, rb)
        _write_dx(io, par, (k0, r0, k1), a, e, coef, flags)
        pos += e - a


# --- whole groups -------------------------------------------------------------------------------


@njit(cache=True, inline="always")
def _finish_stats(x, kk, moments, op):
    """`(mean, var, rstd)` of a group from the moments of `x - shift` (shift: `_origin`)."""
    eps, inside, m, center = op
    mu = _origin(x, kk, center) + moments[1]
    v = moments[2] / m
    return mu, v, rstd(np, v, eps, inside)


@njit(cache=True, inline="always")
def _run_stats(x, at, rb, shift, center):
    """`(count, mean, M2)` of `x - shift` over one whole run, block by block."""
    acc = (0.0, 0.0, 0.0)
    s = 0
    while s < rb:
        e = min(rb, s + BLOCK)
        acc = _add_block(x, at, s, e, shift, acc, center)
        s = e
    return acc


@njit(cache=True, inline="always")
def _forward_run(io, par, g, kk, op, stats, flags):
    """Statistics, `rstd` and `y` of group `g = (k0, k1)` made of one run (rows, instances,
    whole)."""
    x = io[0]
    at = (kk[0], 0, kk[1])
    moments = _run_stats(x, at, x.shape[3], _origin(x, kk, op[3]), op[3])
    stats[0, g], stats[1, g], stats[2, g] = _finish_stats(x, kk, moments, op)
    _write_y(io, par, at, 0, x.shape[3], (stats[0, g], stats[2, g]), flags)


@njit(cache=True, inline="always")
def _forward_span(io, par, g, kk, op, stats, flags):
    """Statistics, `rstd` and `y` of group `g = (k0, k1)` of several runs, walked as a span."""
    x = io[0]
    span = (0, x.shape[1] * x.shape[3])
    moments = _span_stats(x, kk, span, _origin(x, kk, op[3]), op[3])
    stats[0, g], stats[1, g], stats[2, g] = _finish_stats(x, kk, moments, op)
    _span_y(io, par, kk, span, (stats[0, g], stats[2, g]), flags)


@njit(cache=True, inline="always")
def _forward_runs(io, par, groups, op, stats, flags):
    """Groups `[i0, i1)` of one run each, whole (both passes while the group is in cache)."""
    i0, i1 = groups
    kb = io[0].shape[2]
    kk = _group_at(i0, kb)
    for g in range(i0, i1):
        _forward_run(io, par, g, kk, op, stats, flags)
        kk = _next_group(kk, kb)


@njit(cache=True, inline="always")
def _forward_spans(io, par, groups, op, stats, flags):
    """Groups `[i0, i1)` of several runs each, whole."""
    i0, i1 = groups
    kb = io[0].shape[2]
    kk = _group_at(i0, kb)
    for g in range(i0, i1):
        _forward_span(io, par, g, kk, op, stats, flags)
        kk = _next_group(kk, kb)


@njit(cache=True, inline="always")
def _forward_range(io, par, groups, op, stats, flags):
    """Groups `[i0, i1)`, each whole. The layout's branch is taken once, outside the loop
    over groups: inside it, it kept LLVM from optimizing the group's loops
    (docs/performance.md, "Code shape")."""
    if io[0].shape[1] == 1:
        _forward_runs(io, par, groups, op, stats, flags)
    else:
        _forward_spans(io, par, groups, op, stats, flags)


@njit(cache=True, inline="always")
def _backward_run(io, par, acc, g, kk, bst, flags):
    """Sums and `dx` of group `g = (k0, k1)` made of one run; `bst = (mean, rstd, c, m,
    center)`."""
    mean, rs, c, m, center = bst
    rb = io[0].shape[3]
    at = (kk[0], 0, kk[1])
    mu, r = mean[g], rs[g]
    sg, sgd = _add_sums(io, par, acc, at, 0, rb, (mu, r), flags)
    mg, bt = backward_coefficients(sg, sgd, rb, m, r, c[g], center)
    _write_dx(io, par, at, 0, rb, (mu, r, mg, bt), flags)


@njit(cache=True, inline="always")
def _backward_span(io, par, acc, g, kk, bst, flags):
    """Sums and `dx` of group `g = (k0, k1)` of several runs, walked as a span."""
    mean, rs, c, m, center = bst
    span = (0, io[0].shape[1] * io[0].shape[3])
    mu, r = mean[g], rs[g]
    sg, sgd = _span_sums(io, par, acc, kk, span, (mu, r), flags)
    mg, bt = backward_coefficients(sg, sgd, span[1], m, r, c[g], center)
    _span_dx(io, par, kk, span, (mu, r, mg, bt), flags)


@njit(cache=True, inline="always")
def _backward_runs(io, par, acc, groups, bst, flags):
    i0, i1 = groups
    kb = io[0].shape[2]
    kk = _group_at(i0, kb)
    for g in range(i0, i1):
        _backward_run(io, par, acc, g, kk, bst, flags)
        kk = _next_group(kk, kb)


@njit(cache=True, inline="always")
def _backward_spans(io, par, acc, groups, bst, flags):
    i0, i1 = groups
    kb = io[0].shape[2]
    kk = _group_at(i0, kb)
    for g in range(i0, i1):
        _backward_span(io, par, acc, g, kk, bst, flags)
        kk = _next_group(kk, kb)


@njit(cache=True, inline="always")
def _backward_range(io, par, acc, groups, bst, flags):
    """Groups `[i0, i1)`, each whole; the layout's branch outside the loop, as forward."""
    if io[0].shape[1] == 1:
        _backward_runs(io, par, acc, groups, bst, flags)
    else:
        _backward_spans(io, par, acc, groups, bst, flags)


# The small kernels: the whole call of a small C-contiguous input on one thread (`xin`,
# `yin`/`dxin`, `stats_in` of any shape, viewed here as `shape4` and (3, groups)). One kernel
# for groups of one run, one for several, so that a first call compiles only the one it needs
# (both in one kernel compiled twice as long).


@njit(cache=True, nogil=True, error_model="numpy", fastmath=_REASSOC)
def forward_small_runs(xin, yin, stats_in, shape4, op, par, affine):
    stats = stats_in.reshape((3, shape4[0] * shape4[2]))
    io = (xin.reshape(shape4), yin.reshape(shape4))
    _forward_runs(io, par, (0, stats.shape[1]), op, stats, (affine, False))


@njit(cache=True, nogil=True, error_model="numpy", fastmath=_REASSOC)
def forward_small_spans(xin, yin, stats_in, shape4, op, par, affine):
    stats = stats_in.reshape((3, shape4[0] * shape4[2]))
    io = (xin.reshape(shape4), yin.reshape(shape4))
    _forward_spans(io, par, (0, stats.shape[1]), op, stats, (affine, False))


@njit(cache=True, nogil=True, error_model="numpy", fastmath=_REASSOC)
def backward_small_runs(xin, dyin, dxin, shape4, bst, par, sums, flags):
    """`bst = (mean, rstd, c, m, center)` (statistics flat per group), `sums = (dw, db)`."""
    io = (xin.reshape(shape4), dyin.reshape(shape4), dxin.reshape(shape4))
    _backward_runs(io, par, (sums[0], sums[1], 0), (0, bst[0].size), bst, flags)


@njit(cache=True, nogil=True, error_model="numpy", fastmath=_REASSOC)
def backward_small_spans(xin, dyin, dxin, shape4, bst, par, sums, flags):
    io = (xin.reshape(shape4), dyin.reshape(shape4), dxin.reshape(shape4))
    _backward_spans(io, par, (sums[0], sums[1], 0), (0, bst[0].size), bst, flags)


@njit(cache=True, nogil=True, error_model="numpy", fastmath=_REASSOC)
def forward_groups(claim, io, par, op, stats, flags):
    """Groups as items, each whole, on the claimed ranges."""
    while True:
        k, i0, i1 = take(claim)
        if k < 0:
            return
        _forward_range(io, par, (i0, i1), op, stats, flags)


@njit(cache=True, nogil=True, error_model="numpy", fastmath=_REASSOC)
def backward_groups(claim, io, par, acc, bst, flags):
    """Groups as items, each whole; dweight/dbias sums in slot `k` of chunk `k` where chunks
    share parameter rows (one slot otherwise)."""
    dwa, dba, _ = acc
    while True:
        k, i0, i1 = take(claim)
        if k < 0:
            return
        _backward_range(io, par, (dwa, dba, k), (i0, i1), bst, flags)


# --- split groups: chunks of groups, partial sums, a barrier, the merge, the second pass ---------


@njit(cache=True, nogil=True, error_model="numpy", fastmath=_REASSOC)
def _stats_items(claim, x, nc, parts, center):
    pmean, pm2 = parts
    _, ra, kb, rb = x.shape
    while True:
        k, i0, i1 = take(claim)
        if k < 0:
            return
        for i in range(i0, i1):
            k0, k1, lo, hi = _item(i, nc, ra * rb, kb)
            shift = _origin(x, (k0, k1), center)
            _, pmean[i], pm2[i] = _span_stats(x, (k0, k1), (lo, hi), shift, center)


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
def forward_split(claim, phase, split, io, par, op, stats, flags):
    """Groups split into `nc = counts.size` chunks, in one job: partial statistics (claimed
    on `phase`), a barrier, then every thread merges them in the same order and takes `rstd`,
    then `y` (claimed on the job's own state, each thread's last-read chunks first). Slot 0
    writes `stats`. `split = (counts, pmean, pm2)`."""
    counts, pmean, pm2 = split
    x = io[0]
    begin(claim)
    _stats_items(on(claim, phase), x, counts.size, (pmean, pm2), op[3])
    if not wait_done(phase, claim):
        return
    groups = stats.shape[1]
    mean = np.empty(groups)
    m2 = np.empty(groups)
    merge_parts((pmean, pm2), counts, mean, m2)
    mine = np.empty((3, groups))
    kb = x.shape[2]
    for g in range(groups):
        kk = _group_at(g, kb)
        mine[0, g], mine[1, g], mine[2, g] = _finish_stats(x, kk, (0.0, mean[g], m2[g]), op)
        if claim[3] == 0:
            stats[:, g] = mine[:, g]
    _items_y(claim, io, par, counts.size, mine, flags)


@njit(cache=True, nogil=True, error_model="numpy")
def _items_y(claim, io, par, nc, stats, flags):
    _, ra, kb, rb = io[0].shape
    while True:
        k, i0, i1 = take(claim, True)
        if k < 0:
            return
        for i in range(i0, i1):
            k0, k1, lo, hi = _item(i, nc, ra * rb, kb)
            g = k0 * kb + k1
            _span_y(io, par, (k0, k1), (lo, hi), (stats[0, g], stats[2, g]), flags)


@njit(cache=True, nogil=True, error_model="numpy", fastmath=_REASSOC)
def _sums_items(claim, io, par, acc, bst, split):
    mean, rs = bst[0], bst[1]
    nc, psg, psgd, flags = split
    _, ra, kb, rb = io[0].shape
    dwa, dba, _ = acc
    while True:
        k, i0, i1 = take(claim)
        if k < 0:
            return
        for i in range(i0, i1):
            k0, k1, lo, hi = _item(i, nc, ra * rb, kb)
            g = k0 * kb + k1
            coef = (mean[g], rs[g])
            psg[i], psgd[i] = _span_sums(io, par, (dwa, dba, k), (k0, k1), (lo, hi), coef, flags)


@njit(cache=True, nogil=True, error_model="numpy")
def _items_dx(claim, io, par, coefs, nc, flags):
    mean, rs, mg, beta = coefs
    _, ra, kb, rb = io[0].shape
    while True:
        k, i0, i1 = take(claim, True)
        if k < 0:
            return
        for i in range(i0, i1):
            k0, k1, lo, hi = _item(i, nc, ra * rb, kb)
            g = k0 * kb + k1
            coef = (mean[g], rs[g], mg[g], beta[g])
            _span_dx(io, par, (k0, k1), (lo, hi), coef, flags)


@njit(cache=True, nogil=True, error_model="numpy")
def backward_split(claim, phase, split, io, par, acc, bst, flags):
    """The backward of groups split into `nc` chunks, in one job: partial `sum g` and
    `sum g (x - mu)` (claimed on `phase`), a barrier, the sums in chunk order, then `dx`
    (last-read chunks first). `split = (nc, psg, psgd)`."""
    nc, psg, psgd = split
    mean, rs, c, m, center = bst
    begin(claim)
    _sums_items(on(claim, phase), io, par, acc, bst, (nc, psg, psgd, flags))
    if not wait_done(phase, claim):
        return
    n = io[0].shape[1] * io[0].shape[3]
    mg = np.empty(mean.size)
    beta = np.empty(mean.size)
    for g in range(mean.size):
        sg = 0.0
        sgd = 0.0
        for i in range(g * nc, (g + 1) * nc):
            sg += psg[i]
            sgd += psgd[i]
        mg[g], beta[g] = backward_coefficients(sg, sgd, n, m, rs[g], c[g], center)
    _items_dx(claim, io, par, (mean, rs, mg, beta), nc, flags)


# --- sweeps (batch norm): items are row ranges of one Ka block, every group, memory order -------
# Item i = (k0, chunk of the Ra rows) covers rows [lo, hi) of every kb group, so each thread
# streams one contiguous region (and first-touches its own pages of a fresh output). Partial
# results sit at [i * kb + k1]. Affine parameters are constant per group: one value per run.


@njit(cache=True, nogil=True, error_model="numpy", fastmath=_REASSOC)
def stats_sweep(claim, x, nc, parts, center):
    """Partial moments per item and group (RMS without `center`: zero means, sums of x^2)."""
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
                    shift = _origin(x, (k0, k1), center)
                    s = 0
                    while s < rb:
                        e = min(rb, s + BLOCK)
                        acc = _add_block(x, (k0, r0, k1), s, e, shift, acc, center)
                        s = e
                    pmean[i * kb + k1], pm2[i * kb + k1] = acc[1], acc[2]
                cnt += rb


@njit(cache=True, nogil=True, error_model="numpy")
def forward_sweep(claim, io, par, stats, nc, flags):
    """`y` of the swept rows; `stats = (mean, rstd)` per group."""
    mean, rs = stats
    _, ra, kb, rb = io[0].shape
    while True:
        k, i0, i1 = take(claim)
        if k < 0:
            return
        for i in range(i0, i1):
            k0, lo, hi = _rows(i, nc, ra)
            for r0 in range(lo, hi):
                for k1 in range(kb):
                    g = k0 * kb + k1
                    _write_y(io, par, (k0, r0, k1), 0, rb, (mean[g], rs[g]), flags)


@njit(cache=True, nogil=True, error_model="numpy", fastmath=_REASSOC)
def sums_sweep(claim, io, mean, nc, parts):
    """Partial `sum dy` and `sum dy (x - mu)` per item and group (a per-group weight
    multiplies them later)."""
    psdy, psdyd = parts
    _, ra, kb, rb = io[0].shape
    none = psdy.reshape((1, 1, -1))  # stands in for the parameters and their sums (unused)
    par = (none[0], none[0], (0, 0, 0), (0, 0, 0))
    flags = (False, False, False, False)
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
                    coef = (mean[k0 * kb + k1], 1.0)
                    sg, sgd = _add_sums(io, par, (none, none, 0), (k0, r0, k1), 0, rb, coef, flags)
                    psdy[i * kb + k1] += sg
                    psdyd[i * kb + k1] += sgd


@njit(cache=True, nogil=True, error_model="numpy")
def backward_sweep(claim, io, par, coefs, nc, flags):
    """`dx` of the swept rows; `coefs = (mean, rstd, mean_g, beta)` per group."""
    mean, rs, mg, beta = coefs
    _, ra, kb, rb = io[0].shape
    while True:
        k, i0, i1 = take(claim)
        if k < 0:
            return
        for i in range(i0, i1):
            k0, lo, hi = _rows(i, nc, ra)
            for r0 in range(lo, hi):
                for k1 in range(kb):
                    g = k0 * kb + k1
                    coef = (mean[g], rs[g], mg[g], beta[g])
                    _write_dx(io, par, (k0, r0, k1), 0, rb, coef, flags)


# --- columns: sweep layouts whose innermost block is kept (Rb = 1) ------------------------------
# Batch norm over (N, F), or over (N, H, W) of an NHWC array: a row of `Kb` groups is one run
# of memory, so these loops go along rows (every group of block `k0` at once) rather than down
# a group, `_column_rows` rows at a time. They take `(Ka, Ra, Kb)` views (the blocks without
# Rb): a C-contiguous one gives C-contiguous rows, whose loops LLVM vectorizes. The sweep's
# passes and formulas: moments of in-cache blocks of rows (as `_add_block`: float64 two-pass,
# float32 one shifted pass) relative to each group's first element, Chan-merged with the
# ratios once per block (`_merge_rows`: a division per group per block cost as much as the
# pass); partials per item. The claim kernels run on the pool from the sweep (`_run`), or
# inside one native job (`forward_split_columns`, `backward_split_columns`). Their speed is
# their loads and stores per element, not arithmetic: the sums take four rows a step (each
# column's accumulators are loaded and stored once per step), and `y` folds the weight
# into the rstd.


COLUMN_BLOCK = 32768  # elements per block of rows (128-256 KiB: the second pass reads L2)


@njit(cache=True, inline="always")
def _column_rows(kb):
    """Rows per in-cache block: about `COLUMN_BLOCK` elements (each block is a merge), and
    at most `BLOCK` (the float32 pass's `shifted_moments` bound)."""
    return min(BLOCK, max(1, COLUMN_BLOCK // kb))


@njit(cache=True, inline="always")
def _per_column(t, rule, k0, kb):
    """A per-group table's value for each group of block `k0`, in float64."""
    out = np.empty(kb)
    for k1 in range(kb):
        out[k1] = np.float64(t[k0 * rule[0] + k1 * rule[2], 0])
    return out


@njit(cache=True, inline="always")
def _column_block(x, k0, rows, shift, sums, center):
    """Block moments of each column over `rows = (a, e)`, into `sums = (s, q)`: `s` the mean
    of `x - shift`, `q` its M2 (RMS: mean 0, `q = sum x^2`). As `_add_block`: float64
    two-pass, float32 one pass of float64 sums shifted by the block's first row."""
    s, q = sums
    a, e = rows
    s[:] = 0.0
    q[:] = 0.0
    if center and x.itemsize == 4:
        _column_block_shifted(x, k0, rows, shift, sums)
        return
    t = np.zeros(s.size)
    if not center:
        for r0 in range(a, e):
            xs = x[k0, r0]
            for k1 in range(xs.size):
                v = np.float64(xs[k1])
                t[k1] += v * v
            _flush_rows(r0 - a, q, t)
        _flush_rows(-1, q, t)
        return
    for r0 in range(a, e):
        xs = x[k0, r0]
        for k1 in range(xs.size):
            t[k1] += xs[k1] - shift[k1]
        _flush_rows(r0 - a, s, t)
    _flush_rows(-1, s, t)
    s /= e - a
    for r0 in range(a, e):
        xs = x[k0, r0]
        for k1 in range(xs.size):
            d = (xs[k1] - shift[k1]) - s[k1]
            t[k1] += d * d
        _flush_rows(r0 - a, q, t)
    _flush_rows(-1, q, t)


@njit(cache=True, inline="always")
def _column_block_shifted(x, k0, rows, shift, sums):
    """`_column_block` of float32 `x` in one pass: float64 sums of `d = x - x[a]` and of
    `d^2` (`shifted_moments`: at most `BLOCK` rows, the bound its docstring gives)."""
    s, q = sums
    a, e = rows
    first = x[k0, a]
    four = a + (e - a) // 4 * 4
    for r0 in range(a, four, 4):  # (four rows a step: `s` and `q` load and store once)
        x0, x1, x2, x3 = x[k0, r0], x[k0, r0 + 1], x[k0, r0 + 2], x[k0, r0 + 3]
        for k1 in range(s.size):
            f = np.float64(first[k1])
            d0, d1 = np.float64(x0[k1]) - f, np.float64(x1[k1]) - f
            d2, d3 = np.float64(x2[k1]) - f, np.float64(x3[k1]) - f
            s[k1] += (d0 + d1) + (d2 + d3)
            q[k1] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
    for r0 in range(four, e):
        xs = x[k0, r0]
        for k1 in range(xs.size):
            d = np.float64(xs[k1]) - np.float64(first[k1])
            s[k1] += d
            q[k1] += d * d
    for k1 in range(s.size):
        mb, m2 = shifted_moments(e - a, s[k1], q[k1])
        s[k1], q[k1] = (np.float64(first[k1]) - shift[k1]) + mb, m2


@njit(cache=True, inline="always")
def _merge_rows(cnt, nb, moments, block):
    """`chan_merge` of a block of `nb` rows' `(mean, M2)` of every column into `moments`,
    the columns' `(mean, M2)` over `cnt` rows (the ratios once for all columns)."""
    mean, m2 = moments
    mb, qb = block
    if cnt == 0.0:
        mean[:] = mb
        m2[:] = qb
        return
    _, f, g = chan_weights(cnt, nb)
    for k1 in range(mean.size):
        mean[k1], m2[k1] = chan_step(mean[k1], m2[k1], mb[k1], qb[k1], f, g)


_SUM_ROWS = 8  # rows summed apart before they join a column's sum (rounding: n/8 + 8 adds)


@njit(cache=True, inline="always")
def _flush_rows(i, total, part):
    """After every `_SUM_ROWS`-th row (`i` counted from 0; -1: the last), add `part` into
    `total` and clear it: two-level sums, whose rounding grows far slower than a row's."""
    if i >= 0 and i % _SUM_ROWS != _SUM_ROWS - 1:
        return
    for k1 in range(total.size):
        total[k1] += part[k1]
        part[k1] = 0.0


@njit(cache=True, inline="always")
def _column_stats(x, k0, rows, parts, scratch, center):
    """Moments of `x - shift` of each group of block `k0` over `rows = (lo, hi)`, into
    `parts = (mean, M2)` (`kb` each); the shift, each group's first element, is
    `scratch[2]` (zeros for RMS)."""
    pmean, pm2 = parts
    s, q, shift = scratch
    kb = x.shape[2]
    lo, hi = rows
    if center:
        for k1 in range(kb):
            shift[k1] = x[k0, 0, k1]
    step = _column_rows(kb)
    cnt = 0.0
    for a in range(lo, hi, step):
        e = min(hi, a + step)
        _column_block(x, k0, (a, e), shift, (s, q), center)
        _merge_rows(cnt, e - a, (pmean, pm2), (s, q))
        cnt += e - a


@njit(cache=True, inline="always")
def _column_y(io, par, k0, rows, coef, affine):
    """`y` of rows `[lo, hi)` of block `k0`, `coef = (mean, rstd)` of its groups (plain
    stores, whatever `stream` says: these loops are bound by their coefficient loads per
    element, not by write bandwidth; docs/performance.md). The weight is folded into the
    rstd once per column, `xhat(x, mu, r w) + b`: three loads per element, not four."""
    x, y = io
    wt, bt, wr, br = par
    mu, r = coef
    kb = x.shape[2]
    if not affine:
        for r0 in range(rows[0], rows[1]):
            xs, ys = x[k0, r0], y[k0, r0]
            for k1 in range(kb):
                ys[k1] = xhat(xs[k1], mu[k1], r[k1])
        return
    scale, bv = _per_column(wt, wr, k0, kb), _per_column(bt, br, k0, kb)
    scale *= r
    for r0 in range(rows[0], rows[1]):
        xs, ys = x[k0, r0], y[k0, r0]
        for k1 in range(kb):
            ys[k1] = xhat(xs[k1], mu[k1], scale[k1]) + bv[k1]


@njit(cache=True, inline="always")
def _column_sums(io, k0, rows, mu, sums):
    """`sum dy` and `sum dy (x - mu)` of each group of block `k0` over rows `[lo, hi)`."""
    x, dy = io[0], io[1]
    sdy, sdyd = sums
    sdy[:] = 0.0
    sdyd[:] = 0.0
    t, td = np.zeros(sdy.size), np.zeros(sdy.size)
    lo, hi = rows
    four = lo + (hi - lo) // 4 * 4
    for r0 in range(lo, four, 4):  # (four rows a step: `t` and `td` load and store once)
        x0, x1, x2, x3 = x[k0, r0], x[k0, r0 + 1], x[k0, r0 + 2], x[k0, r0 + 3]
        g0, g1, g2, g3 = dy[k0, r0], dy[k0, r0 + 1], dy[k0, r0 + 2], dy[k0, r0 + 3]
        for k1 in range(x.shape[2]):
            m = mu[k1]
            a0, a1 = np.float64(g0[k1]), np.float64(g1[k1])
            a2, a3 = np.float64(g2[k1]), np.float64(g3[k1])
            t[k1] += (a0 + a1) + (a2 + a3)
            td[k1] += (a0 * (x0[k1] - m) + a1 * (x1[k1] - m)) + (
                a2 * (x2[k1] - m) + a3 * (x3[k1] - m)
            )
        _flush_rows(r0 + 3 - lo, sdy, t)
        _flush_rows(r0 + 3 - lo, sdyd, td)
    for r0 in range(four, hi):
        xs, ds = x[k0, r0], dy[k0, r0]
        for k1 in range(x.shape[2]):
            dj = np.float64(ds[k1])
            t[k1] += dj
            td[k1] += dj * (xs[k1] - mu[k1])
    _flush_rows(-1, sdy, t)
    _flush_rows(-1, sdyd, td)


@njit(cache=True, inline="always")
def _column_dx(io, wv, k0, rows, coef):
    """`dx` of rows `[lo, hi)` of block `k0`; `wv` each group's weight (ones: none),
    `coef = (mean, rstd, mean_g, beta)` of its groups."""
    x, dy, dx = io
    mu, r, mg, beta = coef
    for r0 in range(rows[0], rows[1]):
        xs, ds, dxs = x[k0, r0], dy[k0, r0], dx[k0, r0]
        for k1 in range(x.shape[2]):
            dxs[k1] = gradient(ds[k1] * wv[k1], xs[k1] - mu[k1], r[k1], mg[k1], beta[k1])


@njit(cache=True, inline="always")
def _weights(par, k0, kb, has_w):
    return _per_column(par[0], par[2], k0, kb) if has_w else np.ones(kb)


@njit(cache=True, inline="always")
def _column_coefficients(k0, sums, ra, wv, bst, coef, grads):
    """The dx coefficients `coef = (mg, beta)` of block `k0`'s columns from their sums
    `(sum dy, sum dy (x - mu))` over `ra` rows, and their dweight and dbias added into
    `grads = (dw sums, db sums, weight rules, bias rules, need dw, need db)`."""
    sdy, sdyd = sums
    _, rs, c, m, center = bst
    mg, beta = coef
    dws, dbs, wr, br, need_dw, need_db = grads
    kb = sdy.size
    for k1 in range(kb):
        g = k0 * kb + k1
        mg[k1], beta[k1] = backward_coefficients(
            wv[k1] * sdy[k1], wv[k1] * sdyd[k1], ra, m, rs[g], c[g], center
        )
        if need_dw:
            dws[0, k0 * wr[0] + k1 * wr[2], 0] += rs[g] * sdyd[k1]
        if need_db:
            dbs[0, k0 * br[0] + k1 * br[2], 0] += sdy[k1]


@njit(cache=True, nogil=True, error_model="numpy", fastmath=_REASSOC)
def stats_columns(claim, x, nc, parts, center):
    """`stats_sweep` where Rb = 1."""
    pmean, pm2 = parts
    _, ra, kb = x.shape
    scratch = (np.empty(kb), np.empty(kb), np.zeros(kb))
    while True:
        k, i0, i1 = take(claim)
        if k < 0:
            return
        for i in range(i0, i1):
            k0, lo, hi = _rows(i, nc, ra)
            part = (pmean[i * kb : (i + 1) * kb], pm2[i * kb : (i + 1) * kb])
            _column_stats(x, k0, (lo, hi), part, scratch, center)


@njit(cache=True, nogil=True, error_model="numpy")
def forward_columns(claim, io, par, stats, nc, flags):
    """`forward_sweep` where Rb = 1."""
    mean, rs = stats
    _, ra, kb = io[0].shape
    while True:
        k, i0, i1 = take(claim)
        if k < 0:
            return
        for i in range(i0, i1):
            k0, lo, hi = _rows(i, nc, ra)
            g = slice(k0 * kb, (k0 + 1) * kb)
            _column_y(io, par, k0, (lo, hi), (mean[g], rs[g]), flags[0])


@njit(cache=True, nogil=True, error_model="numpy", fastmath=_REASSOC)
def sums_columns(claim, io, mean, nc, parts):
    """`sums_sweep` where Rb = 1."""
    psdy, psdyd = parts
    _, ra, kb = io[0].shape
    while True:
        k, i0, i1 = take(claim)
        if k < 0:
            return
        for i in range(i0, i1):
            k0, lo, hi = _rows(i, nc, ra)
            sums = (psdy[i * kb : (i + 1) * kb], psdyd[i * kb : (i + 1) * kb])
            _column_sums(io, k0, (lo, hi), mean[k0 * kb : (k0 + 1) * kb], sums)


@njit(cache=True, nogil=True, error_model="numpy")
def backward_columns(claim, io, par, coefs, nc, flags):
    """`backward_sweep` where Rb = 1."""
    mean, rs, mg, beta = coefs
    _, ra, kb = io[0].shape
    while True:
        k, i0, i1 = take(claim)
        if k < 0:
            return
        for i in range(i0, i1):
            k0, lo, hi = _rows(i, nc, ra)
            g = slice(k0 * kb, (k0 + 1) * kb)
            coef = (mean[g], rs[g], mg[g], beta[g])
            _column_dx(io, _weights(par, k0, kb, flags[0]), k0, (lo, hi), coef)


@njit(cache=True, inline="always")
def _columns(a):
    """A native job's `(Ka, Ra, Kb, 1)` block array as the column loops' `(Ka, Ra, Kb)`."""
    return a.reshape((a.shape[0], a.shape[1], a.shape[2]))


@njit(cache=True, inline="always")
def _finish_columns(stats, shift, op):
    """A Ka block's column statistics `stats = (mean, var, rstd)` from the moments of `x -
    shift` (`mean`, `M2` in the first two): the shift added back, `M2 / m`, `rstd`."""
    mu, v, r = stats
    eps, inside, m, center = op
    for k1 in range(mu.size):
        if center:
            mu[k1] += np.float64(shift[k1])
        v[k1] /= m
        r[k1] = rstd(np, v[k1], eps, inside)


@njit(cache=True, inline="always")
def _merge_columns(x, parts, counts, op, stats):
    """`stats = (mean, var, rstd)` of every group from the items' partial moments of `x -
    shift` (`stats_columns`), Chan-merged in chunk order as `merge_parts` (the same
    arithmetic; here every group of a block at once, one division per chunk)."""
    pmean, pm2 = parts
    ka, _, kb = x.shape
    nc = counts.size
    for k0 in range(ka):
        g = slice(k0 * kb, (k0 + 1) * kb)
        mu, m2 = stats[0, g], stats[1, g]
        cnt = 0.0
        for c in range(nc):
            at = (k0 * nc + c) * kb
            _merge_rows(cnt, counts[c], (mu, m2), (pmean[at : at + kb], pm2[at : at + kb]))
            cnt += counts[c]
        _finish_columns((mu, m2, stats[2, g]), x[k0, 0], op)


@njit(cache=True, nogil=True, error_model="numpy")
def forward_split_columns(claim, phase, split, io, par, op, stats, flags):
    """`forward_split` where Rb = 1, in one job: the column kernels' partial moments per
    item (rows of a Ka block, claimed on `phase`), a barrier, every thread merges them in
    chunk order, then `y`. Slot 0 writes `stats`. `split = (counts, pmean, pm2)`: counts
    of rows per chunk, partials at `[item kb + k1]`."""
    counts, pmean, pm2 = split
    x, y = _columns(io[0]), _columns(io[1])
    begin(claim)
    stats_columns(on(claim, phase), x, counts.size, (pmean, pm2), op[3])
    if not wait_done(phase, claim):
        return
    mine = np.empty(stats.shape)
    _merge_columns(x, (pmean, pm2), counts, op, mine)
    if claim[3] == 0:
        stats[:, :] = mine
    forward_columns(claim, (x, y), par, (mine[0], mine[2]), counts.size, flags)


@njit(cache=True, nogil=True, error_model="numpy")
def backward_split_columns(claim, phase, split, io, par, acc, bst, flags):
    """`backward_split` where Rb = 1, in one job: partial `sum dy` and `sum dy (x - mu)`
    per item (claimed on `phase`), a barrier, their sums in chunk order, dweight and dbias
    (slot 0, into slot 0 of `acc`), then `dx`. `split = (nc, psdy, psdyd)`."""
    nc, psdy, psdyd = split
    mean, rs = bst[0], bst[1]
    x, dy, dx = _columns(io[0]), _columns(io[1]), _columns(io[2])
    ka, ra, kb = x.shape
    begin(claim)
    sums_columns(on(claim, phase), (x, dy, x), mean, nc, (psdy, psdyd))
    if not wait_done(phase, claim):
        return
    mg, beta = np.empty(mean.size), np.empty(mean.size)
    sdy, sdyd = np.empty(kb), np.empty(kb)
    first = claim[3] == 0  # (slot 0 writes dweight and dbias)
    grads = (acc[0], acc[1], par[2], par[3], first and flags[1], first and flags[2])
    for k0 in range(ka):
        sdy[:], sdyd[:] = 0.0, 0.0
        for i in range(k0 * nc, (k0 + 1) * nc):  # (the partials' sums in chunk order)
            sdy += psdy[i * kb : (i + 1) * kb]
            sdyd += psdyd[i * kb : (i + 1) * kb]
        g = slice(k0 * kb, (k0 + 1) * kb)
        wv = _weights(par, k0, kb, flags[0])
        _column_coefficients(k0, (sdy, sdyd), ra, wv, bst, (mg[g], beta[g]), grads)
    backward_columns(claim, (x, dy, dx), par, (mean, rs, mg, beta), nc, flags)


@njit(cache=True, nogil=True, error_model="numpy", fastmath=_REASSOC)
def forward_small_columns(xin, yin, stats_in, shape4, op, par, affine):
    """The small path's forward where Rb = 1: the column loops over every row, one call."""
    ka, ra, kb, _ = shape4
    stats = stats_in.reshape((3, ka * kb))
    io = (xin.reshape((ka, ra, kb)), yin.reshape((ka, ra, kb)))
    scratch = (np.empty(kb), np.empty(kb), np.zeros(kb))
    for k0 in range(ka):
        g = slice(k0 * kb, (k0 + 1) * kb)
        mu, v, r = stats[0, g], stats[1, g], stats[2, g]
        _column_stats(io[0], k0, (0, ra), (mu, v), scratch, op[3])
        _finish_columns((mu, v, r), scratch[2], op)
        _column_y(io, par, k0, (0, ra), (mu, r), affine)


@njit(cache=True, nogil=True, error_model="numpy", fastmath=_REASSOC)
def backward_small_columns(xin, dyin, dxin, shape4, bst, par, sums, flags):
    """The small path's backward where Rb = 1 (`backward_small_runs`' arguments)."""
    ka, ra, kb, _ = shape4
    io = (xin.reshape((ka, ra, kb)), dyin.reshape((ka, ra, kb)), dxin.reshape((ka, ra, kb)))
    mean, rs = bst[0], bst[1]
    grads = (sums[0], sums[1], par[2], par[3], flags[1], flags[2])
    sdy, sdyd, mg, beta = np.empty(kb), np.empty(kb), np.empty(kb), np.empty(kb)
    for k0 in range(ka):
        g = slice(k0 * kb, (k0 + 1) * kb)
        _column_sums(io, k0, (0, ra), mean[g], (sdy, sdyd))
        wv = _weights(par, k0, kb, flags[0])
        _column_coefficients(k0, (sdy, sdyd), ra, wv, bst, (mg, beta), grads)
        _column_dx(io, wv, k0, (0, ra), (mean[g], rs[g], mg, beta))


# --- masks (mask=, nan_policy="omit"): `mk`, a bool block view of x's shape, True counts ------
# The element loops of a masked call: statistics over the counted elements (their count per
# group replaces the fixed n), `y` as `_write_y`, the backward's sums as the generic path
# takes them (`sum g` over every element; `sum g (x - mu)` and dweight over the counted ones
# and the uncounted ones with a finite x, whose terms are finite; dbias over every element),
# and `dx = r g` at an uncounted element (the statistics' part goes to counted ones only).
# Groups are walked whole, as spans; `op = (eps, inside, ddof, center)`.


@njit(cache=True, inline="always")
def _masked_origin(x, mk, kk, center):
    """The shift of group `kk`'s masked moments: its first counted element (0 for RMS or a
    group without one)."""
    if center:
        k0, k1 = kk
        for r0 in range(x.shape[1]):
            for j in range(x.shape[3]):
                if mk[k0, r0, k1, j]:
                    return np.float64(x[k0, r0, k1, j])
    return 0.0


@njit(cache=True, inline="always")
def _add_block_masked(x, mk, at, a, e, shift, acc, center):
    """`_add_block` over the counted elements of `x[at][a:e]` only. (Each loop keeps its
    branches out: selects, not loads under a condition, let LLVM vectorize them.)"""
    k0, r0, k1 = at
    xs, ms = x[k0, r0, k1, a:e], mk[k0, r0, k1, a:e]
    nb = 0.0
    s = 0.0
    if not center:
        for j in range(xs.size):
            v = np.float64(xs[j]) if ms[j] else 0.0
            nb += 1.0 if ms[j] else 0.0
            s += v * v
        return chan_merge(acc[0], 0.0, acc[2], nb, 0.0, s)
    for j in range(xs.size):
        nb += 1.0 if ms[j] else 0.0
        s += np.float64(xs[j]) - shift if ms[j] else 0.0
    mb = s / nb if nb > 0.0 else 0.0
    q = 0.0
    for j in range(xs.size):
        d = (np.float64(xs[j]) - shift) - mb if ms[j] else 0.0
        q += d * d
    return chan_merge(acc[0], acc[1], acc[2], nb, mb, q)


@njit(cache=True, inline="always")
def _live(x, m, mu):
    """`x - mu` where an element enters the backward's sums (counted, or a finite x), else
    0 (`_generic.live`)."""
    return x - mu if m or abs(x) < np.inf else 0.0


@njit(cache=True, fastmath=_REASSOC)
def _masked_param_sums(pieces, sums, coef, need):
    """Add `dy xhat` (live elements) and `dy` (every element) of a piece into its rows of
    the dweight and dbias sums (`sums = (dws, dbs)`, each per element or one for the run,
    from element `a`); `pieces = (x, dy, mk, a)`."""
    xs, ds, ms, a = pieces
    dws, dbs = sums
    mu, r = coef
    n = xs.size
    if need[0] and dws.size > 1:
        out = dws[a : a + n]
        for j in range(n):
            out[j] += ds[j] * (_live(xs[j], ms[j], mu) * r)
    elif need[0]:
        total = 0.0
        for j in range(n):
            total += ds[j] * (_live(xs[j], ms[j], mu) * r)
        dws[0] += total
    if need[1] and dbs.size > 1:
        out = dbs[a : a + n]
        for j in range(n):
            out[j] += ds[j]
    elif need[1]:
        total = 0.0
        for j in range(n):
            total += ds[j]
        dbs[0] += total


@njit(cache=True, inline="always")
def _masked_sums(io, mk, par, acc, at, a, e, coef, flags):
    """`_add_sums` of a masked call on `[a, e)` of a run: `(sum g, sum g (x - mu))`, and
    `dy xhat`, `dy` into slot `k` of the dweight and dbias sums where needed."""
    x, dy = io[0], io[1]
    wt, wr, br = par[0], par[2], par[3]
    dwa, dba, k = acc
    has_w, need_dw, need_db = flags[0], flags[1], flags[2]
    k0, r0, k1 = at
    xs, ds, ms = x[k0, r0, k1, a:e], dy[k0, r0, k1, a:e], mk[k0, r0, k1, a:e]
    mu = coef[0]
    wi = _row(wr, at)
    sg = 0.0
    sgd = 0.0
    if has_w and wt.shape[1] > 1:
        ws = wt[wi, a:e]
        for j in range(xs.size):
            gj = np.float64(ds[j]) * np.float64(ws[j])
            sg += gj
            sgd += gj * _live(xs[j], ms[j], mu)
    else:
        wv = np.float64(wt[wi, 0]) if has_w else 1.0
        for j in range(xs.size):
            gj = np.float64(ds[j]) * wv
            sg += gj
            sgd += gj * _live(xs[j], ms[j], mu)
    if need_dw or need_db:
        dws = dwa[min(k, dwa.shape[0] - 1), _row(wr, at)]
        dbs = dba[min(k, dba.shape[0] - 1), _row(br, at)]
        _masked_param_sums((xs, ds, ms, a), (dws, dbs), coef, (need_dw, need_db))
    return sg, sgd


@njit(cache=True, inline="always")
def _masked_dx(io, mk, par, at, a, e, coef, flags):
    """`_write_dx` of a masked call: `r g` alone at an uncounted element."""
    x, dy, dx = io
    wt, _, wr, _ = par
    mu, r, mg, bt = coef
    has_w = flags[0]
    k0, r0, k1 = at
    xs, ds, ms = x[k0, r0, k1, a:e], dy[k0, r0, k1, a:e], mk[k0, r0, k1, a:e]
    dxs = dx[k0, r0, k1, a:e]
    wi = _row(wr, at)
    if has_w and wt.shape[1] > 1:
        ws = wt[wi, a:e]
        for j in range(xs.size):
            gj = np.float64(ds[j]) * np.float64(ws[j])
            dxs[j] = gradient(gj, xs[j] - mu, r, mg, bt) if ms[j] else r * gj
        return
    wv = np.float64(wt[wi, 0]) if has_w else 1.0
    for j in range(xs.size):
        gj = ds[j] * wv
        dxs[j] = gradient(gj, xs[j] - mu, r, mg, bt) if ms[j] else r * gj


@njit(cache=True, inline="always")
def _masked_group_forward(io, mk, par, g, kk, op, stats, flags):
    """Statistics over the counted elements, `rstd` and `y` of group `g = (k0, k1)`: NaN
    mean without a counted element, NaN variance with no more than ddof of them."""
    x = io[0]
    eps, inside, ddof, center = op
    ra, rb = x.shape[1], x.shape[3]
    shift = _masked_origin(x, mk, kk, center)
    acc = (0.0, 0.0, 0.0)
    for r0 in range(ra):
        s = 0
        while s < rb:
            t = min(rb, s + BLOCK)
            acc = _add_block_masked(x, mk, (kk[0], r0, kk[1]), s, t, shift, acc, center)
            s = t
    n = acc[0]
    mu = shift + acc[1] if n > 0.0 or not center else np.nan
    v = acc[2] / (n - ddof) if n - ddof > 0.0 else np.nan
    r = rstd(np, v, eps, inside)
    stats[0, g], stats[1, g], stats[2, g], stats[3, g] = mu, v, r, n
    for r0 in range(ra):
        _write_y(io, par, (kk[0], r0, kk[1]), 0, rb, (mu, r), flags)


@njit(cache=True, inline="always")
def _masked_group_backward(io, mk, par, acc, g, kk, bst, flags):
    """Sums and `dx` of group `g` of a masked call; `bst = (mean, rstd, c, count, ddof,
    center)` (a count of 0 or below ddof enters as 1: its results are NaN anyway)."""
    mean, rs, c, count, ddof, center = bst
    ra, rb = io[0].shape[1], io[0].shape[3]
    mu, r = mean[g], rs[g]
    sg = 0.0
    sgd = 0.0
    for r0 in range(ra):
        g1, g2 = _masked_sums(io, mk, par, acc, (kk[0], r0, kk[1]), 0, rb, (mu, r), flags)
        sg += g1
        sgd += g2
    n, m = count[g], count[g] - ddof
    n, m = (n if n > 0.0 else 1.0), (m if m > 0.0 else 1.0)
    mg, bt = backward_coefficients(sg, sgd, n, m, r, c[g], center)
    for r0 in range(ra):
        _masked_dx(io, mk, par, (kk[0], r0, kk[1]), 0, rb, (mu, r, mg, bt), flags)


@njit(cache=True, nogil=True, error_model="numpy", fastmath=_REASSOC)
def forward_masked(claim, io, mk, par, op, stats, flags):
    """Masked groups as items, each whole (`stats`: (4, groups), the count last)."""
    kb = io[0].shape[2]
    while True:
        k, i0, i1 = take(claim)
        if k < 0:
            return
        kk = _group_at(i0, kb)
        for g in range(i0, i1):
            _masked_group_forward(io, mk, par, g, kk, op, stats, flags)
            kk = _next_group(kk, kb)


@njit(cache=True, nogil=True, error_model="numpy", fastmath=_REASSOC)
def backward_masked(claim, io, mk, par, acc, bst, flags):
    """Masked groups as items, each whole; dweight/dbias sums as `backward_groups`."""
    dwa, dba, _ = acc
    kb = io[0].shape[2]
    while True:
        k, i0, i1 = take(claim)
        if k < 0:
            return
        kk = _group_at(i0, kb)
        for g in range(i0, i1):
            _masked_group_backward(io, mk, par, (dwa, dba, k), g, kk, bst, flags)
            kk = _next_group(kk, kb)


# --- masked split groups: a few large masked groups (a whole tensor) in chunks, as
# `forward_split` / `backward_split`; each chunk's partial moments carry their own count.
# `split = (nc, pcount, pmean, pm2)` forward, `(nc, psg, psgd)` backward.


@njit(cache=True, inline="always")
def _masked_span_stats(x, mk, kk, span, shift, center):
    """`(count, mean, M2)` of the counted elements of `x - shift` over the span."""
    k0, k1 = kk
    lo, hi = span
    rb = x.shape[3]
    acc = (0.0, 0.0, 0.0)
    pos = lo
    while pos < hi:
        r0, a, e = _piece(pos, hi, rb)
        s = a
        while s < e:
            t = min(e, s + BLOCK)
            acc = _add_block_masked(x, mk, (k0, r0, k1), s, t, shift, acc, center)
            s = t
        pos += e - a
    return acc


@njit(cache=True, inline="always")
def _masked_finish(shift, moments, op):
    """`(mean, var, rstd, count)` of a masked group from its moments of `x - shift`: NaN
    mean without a counted element, NaN variance with no more than ddof of them."""
    eps, inside, ddof, center = op
    n = moments[0]
    mu = shift + moments[1] if n > 0.0 or not center else np.nan
    v = moments[2] / (n - ddof) if n - ddof > 0.0 else np.nan
    return mu, v, rstd(np, v, eps, inside), n


@njit(cache=True, nogil=True, error_model="numpy", fastmath=_REASSOC)
def _masked_stats_items(claim, x, mk, nc, parts, center):
    pcount, pmean, pm2 = parts
    _, ra, kb, rb = x.shape
    while True:
        k, i0, i1 = take(claim)
        if k < 0:
            return
        for i in range(i0, i1):
            k0, k1, lo, hi = _item(i, nc, ra * rb, kb)
            shift = _masked_origin(x, mk, (k0, k1), center)
            acc = _masked_span_stats(x, mk, (k0, k1), (lo, hi), shift, center)
            pcount[i], pmean[i], pm2[i] = acc


@njit(cache=True, nogil=True, error_model="numpy")
def forward_split_masked(claim, phase, split, io, mk, par, op, stats, flags):
    """`forward_split` of a masked call: partial moments over each chunk's counted elements
    (claimed on `phase`), a barrier, every thread merges them in chunk order (Chan, with
    each chunk's own count), then `y`. Slot 0 writes `stats` (4, groups)."""
    nc, pcount, pmean, pm2 = split
    x = io[0]
    begin(claim)
    _masked_stats_items(on(claim, phase), x, mk, nc, (pcount, pmean, pm2), op[3])
    if not wait_done(phase, claim):
        return
    groups = stats.shape[1]
    mine = np.empty((4, groups))
    kb = x.shape[2]
    for g in range(groups):
        acc = (0.0, 0.0, 0.0)
        for i in range(g * nc, (g + 1) * nc):
            acc = chan_merge(acc[0], acc[1], acc[2], pcount[i], pmean[i], pm2[i])
        shift = _masked_origin(x, mk, _group_at(g, kb), op[3])
        mine[0, g], mine[1, g], mine[2, g], mine[3, g] = _masked_finish(shift, acc, op)
        if claim[3] == 0:
            stats[:, g] = mine[:, g]
    _items_y(claim, io, par, nc, mine, flags)


@njit(cache=True, inline="always")
def _masked_span_sums(io, mk, par, acc, kk, span, coef, flags):
    k0, k1 = kk
    lo, hi = span
    rb = io[0].shape[3]
    sg = 0.0
    sgd = 0.0
    pos = lo
    while pos < hi:
        r0, a, e = _piece(pos, hi, rb)
        g1, g2 = _masked_sums(io, mk, par, acc, (k0, r0, k1), a, e, coef, flags)
        sg += g1
        sgd += g2
        pos += e - a
    return sg, sgd


@njit(cache=True, inline="always")
def _masked_span_dx(io, mk, par, kk, span, coef, flags):
    k0, k1 = kk
    lo, hi = span
    rb = io[0].shape[3]
    pos = lo
    while pos < hi:
        r0, a, e = _piece(pos, hi, rb)
        _masked_dx(io, mk, par, (k0, r0, k1), a, e, coef, flags)
        pos += e - a


@njit(cache=True, nogil=True, error_model="numpy", fastmath=_REASSOC)
def _masked_sums_items(claim, io, mk, par, acc, bst, split):
    mean, rs = bst[0], bst[1]
    nc, psg, psgd, flags = split
    _, ra, kb, rb = io[0].shape
    dwa, dba, _ = acc
    while True:
        k, i0, i1 = take(claim)
        if k < 0:
            return
        for i in range(i0, i1):
            k0, k1, lo, hi = _item(i, nc, ra * rb, kb)
            g = k0 * kb + k1
            coef = (mean[g], rs[g])
            span = (lo, hi)
            psg[i], psgd[i] = _masked_span_sums(
                io, mk, par, (dwa, dba, k), (k0, k1), span, coef, flags
            )


@njit(cache=True, nogil=True, error_model="numpy")
def _masked_items_dx(claim, io, mk, par, coefs, nc, flags):
    mean, rs, mg, beta = coefs
    _, ra, kb, rb = io[0].shape
    while True:
        k, i0, i1 = take(claim, True)
        if k < 0:
            return
        for i in range(i0, i1):
            k0, k1, lo, hi = _item(i, nc, ra * rb, kb)
            g = k0 * kb + k1
            coef = (mean[g], rs[g], mg[g], beta[g])
            _masked_span_dx(io, mk, par, (k0, k1), (lo, hi), coef, flags)


@njit(cache=True, nogil=True, error_model="numpy")
def backward_split_masked(claim, phase, split, io, mk, par, acc, bst, flags):
    """`backward_split` of a masked call: partial sums (claimed on `phase`), a barrier, the
    sums in chunk order and each group's coefficients from its count (as
    `_masked_group_backward`), then `dx`. `bst = (mean, rstd, c, count, ddof, center)`."""
    nc, psg, psgd = split
    mean, rs, c, count, ddof, center = bst
    begin(claim)
    _masked_sums_items(on(claim, phase), io, mk, par, acc, bst, (nc, psg, psgd, flags))
    if not wait_done(phase, claim):
        return
    mg = np.empty(mean.size)
    beta = np.empty(mean.size)
    for g in range(mean.size):
        sg = 0.0
        sgd = 0.0
        for i in range(g * nc, (g + 1) * nc):
            sg += psg[i]
            sgd += psgd[i]
        n, m = count[g], count[g] - ddof
        n, m = (n if n > 0.0 else 1.0), (m if m > 0.0 else 1.0)
        mg[g], beta[g] = backward_coefficients(sg, sgd, n, m, rs[g], c[g], center)
    _masked_items_dx(claim, io, mk, par, (mean, rs, mg, beta), nc, flags)
