"""Fused multi-threaded CPU kernels (numba) for NumPy float32/float64 inputs.

`normalize_forward` and `normalize_backward` in `_ops.py` call `forward` and `backward` here
when kernels are enabled (see `normgrad.use_kernels`); this module imports numba, so `_ops`
imports it lazily. The math is the one in `_ops.py`: the same statistics, the same
`rstd` and `c` (computed by `_ops` helpers), the same backward

    dx = r (g - mean g) + beta (x - mu),     beta = -c r^2 sum(g (x - mu)) / m.

**Layout.** Every axes choice is viewed, without copying, as a 4-d block array
`(Ka, Ra, Kb, Rb)`: kept and reduced axes, each block a run of axes that merge in memory
(axes taken in memory order, so transposed or sliced inputs work as well). A group is a
`(ka, kb)` pair; its `Ra * Rb` elements are `Ra` runs of `Rb` elements. Whole tensor is
`(1, 1, 1, N)`, layer norm `(rows, 1, 1, D)`, batch norm over `(0, 2, 3)` is
`(1, N, C, H*W)`. Layouts that need more than two blocks of either kind return `None`, and
`_ops` takes its generic path.

**Threads.** The `G` groups are cut into `G * nc` items (`nc` chunks per group, so that a
single group still feeds every thread); each item's partial sums land in their own slot and
are merged in a fixed order (statistics with Chan's parallel formula for
`(count, mean, M2)`), so results do not depend on which thread ran what. With `nc == 1`
(many groups, or a small input) an item is a whole group and each direction is one call
(`_forward_groups`, `_backward_groups`): both passes run while the group is in cache. With
`nc > 1` each direction is still one job (`_forward_split`, `_backward_split`): the partial
sums, a barrier (`wait_done`), the merge (every thread the same), the second pass. The
kernels release the GIL and run on the pool in `_pool.py` (`NUMBA_NUM_THREADS` threads, the
caller included): each kernel claims chunks of items itself (`_claim`, which also counts the
previous chunk done); dweight/dbias sums go to one slot per chunk, not per thread. The
planned calls (C-contiguous, no affine parameters) run the same kernels as native jobs:
the workers call them without entering Python (see "Native jobs" below).

**Batch norm (sweep kernels).** Where a group is several runs (`Ra > 1`) and the affine
parameters are constant per group, an item is instead a range of `Ra` rows of one `Ka` block
covering every group, walked in memory order: each thread streams one contiguous region (and
first-touches its own pages of a fresh output) instead of a channel's runs spread over the
whole array. Per-group partials sit in fixed slots per item and merge in item order.

**Passes.** Forward: one pass computes the statistics (two-pass inside in-cache blocks of
`BLOCK` elements, merged with Chan's formula), one pass writes `y`. Backward: one pass
computes `sum g` and `sum g (x - mu)` (and dweight/dbias), one pass writes `dx`. All sums are
float64, and `x - mu` is float64 for float32 input; each output is rounded once.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Any, NamedTuple

import numba
import numpy as np
from numba import carray, cfunc, njit
from numpy.lib.stride_tricks import as_strided

from . import _recycle
from ._pool import (
    CHUNKS_PER_THREAD,
    PART_SIGNATURE,
    address,
    begin,
    board_at,
    board_ctl,
    board_params,
    board_scratch,
    float_bits,
    run_job,
    run_native,
    wait_done,
)
from ._pool import chunks as _chunks
from ._pool import claim as _claim
from ._pool import phase_ctl as _phase_ctl
from ._pool import run as _run
from ._stream import STREAM_MIN_BYTES, stream_backward, stream_forward, stream_span

BLOCK = 2048  # elements per in-cache block for the two-pass statistics (16 KiB of float64)
MIN_CHUNK = 16384  # smallest chunk a group is split into for threading
PARALLEL_MIN_SIZE = 1 << 15  # below this, one thread beats waking the others
SPLIT_MIN_SIZE = 1 << 17  # below this, no group is split: a split costs a merge and a call
# C-contiguous batch-norm layouts without affine parameters (planned calls) are swept in
# memory order from this size on; below, an item is a whole group, whose runs stay in cache
# for the second pass (docs/performance.md: "Batch norm")
SWEEP_MIN_BYTES = 1 << 25
# lets LLVM vectorize the float64 sums; not "contract": FMAs in the scalar loops and none in
# the streaming stores gave streamed and ordinary outputs different last bits
_REASSOC = {"reassoc"}

_NO_PARTS = np.zeros((2, 1))  # split partials where groups are whole (never used)
# how often the kernels ran (tests look at it): blocked kernels, and small single-call ones
calls = {
    "forward": 0, "backward": 0, "forward_small": 0, "backward_small": 0, "sweep": 0, "native": 0
}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# numba kernels: x4, y4, ... are (Ka, Ra, Kb, Rb) views; item i covers flat elements
# [lo, hi) of group g = i // nc, the flat index running over (ra, rb).
# ---------------------------------------------------------------------------------------------


@njit(cache=True, inline="always")
def _item(i: int, nc: int, n: int, kb: int) -> tuple[int, int, int, int]:
    g = i // nc
    c = i - g * nc
    k0 = g // kb
    return k0, g - k0 * kb, (c * n) // nc, ((c + 1) * n) // nc


@njit(cache=True, fastmath=_REASSOC, inline="always")
def _add_block(seg, shift, cnt, mean, m2):  # type: ignore[no-untyped-def]
    """Merge one in-cache block's two-pass moments of `seg - shift` into (cnt, mean, m2)
    (Chan et al.). `shift` (float64) is the group's first element: a constant group gives
    exactly zero deviations, and a large offset cannot overflow the squares."""
    acc = 0.0
    for j in range(seg.size):  # loops from 0 over a slice: LLVM vectorizes them
        acc += seg[j] - shift
    nb = float(seg.size)
    mb = acc / nb
    q = 0.0
    for j in range(seg.size):
        d = (seg[j] - shift) - mb
        q += d * d
    if cnt == 0.0:  # the first block: no merge (and no inf * 0 when delta overflows)
        return nb, mb, q
    tot = cnt + nb
    delta = mb - mean
    return tot, mean + delta * (nb / tot), m2 + q + delta * delta * (cnt * nb / tot)


# Span helpers: elements [lo, hi) of group (k0, k1), flat index over (ra, rb), walked as
# pieces of runs. Inlined into the item kernels (an item is a chunk of a group) and into the
# group kernels (an item is a whole group: both passes while it is still in cache).


@njit(cache=True, fastmath=_REASSOC, inline="always")
def _span_stats(x, k0, k1, lo, hi, shift):  # type: ignore[no-untyped-def]
    """(count, mean, M2) of `x - shift` over the span, block by block."""
    rb = x.shape[3]
    cnt = 0.0
    mean = 0.0
    m2 = 0.0
    pos = lo
    while pos < hi:
        r0 = pos // rb
        a = pos - r0 * rb
        b = min(rb, a + hi - pos)
        s = a
        while s < b:
            e = min(b, s + BLOCK)
            cnt, mean, m2 = _add_block(x[k0, r0, k1, s:e], shift, cnt, mean, m2)
            s = e
        pos += b - a
    return cnt, mean, m2


@njit(cache=True, inline="always")
def _seg_forward(xs, ws, bs, ys, mu, r, affine, stream):  # type: ignore[no-untyped-def]
    """`y = (x - mu) r` (times w plus b if `affine`); with `stream`, the aligned middle part
    without an affine transform goes through non-temporal stores (`_stream`, same bits)."""
    if affine:
        for j in range(xs.size):
            ys[j] = ((xs[j] - mu) * r) * ws[j] + bs[j]
        return
    n = xs.size
    j0, j1 = stream_span(n, ys, xs, xs) if stream else (n, n)
    if j1 > j0:
        stream_forward(xs, ys, j0, j1, mu, r)
    for j in range(j0):  # everything when not streaming
        ys[j] = (xs[j] - mu) * r
    for j in range(j1, n):
        ys[j] = (xs[j] - mu) * r


@njit(cache=True, fastmath=_REASSOC, inline="always")
def _seg_sums(xs, ds, ws, has_w, dws, need_dw, dbs, need_db, mu, r):  # type: ignore[no-untyped-def]
    """`sum g` and `sum g (x - mu)` (g = dy w); adds `dy (x - mu) r` and `dy` into the
    dweight and dbias accumulators."""
    sg = 0.0
    sgd = 0.0
    if has_w:
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
        for j in range(xs.size):
            dws[j] += ds[j] * ((xs[j] - mu) * r)
    if need_db:
        for j in range(xs.size):
            dbs[j] += ds[j]
    return sg, sgd


@njit(cache=True, inline="always")
def _seg_backward(xs, ds, ws, has_w, dxs, mu, r, m, bt, stream):  # type: ignore[no-untyped-def]
    """`dx = r (g - m) + bt (x - mu)`, g = dy (times w if `has_w`); `stream` as in
    `_seg_forward`."""
    if has_w:
        for j in range(xs.size):
            dxs[j] = r * (ds[j] * ws[j] - m) + bt * (xs[j] - mu)
        return
    n = xs.size
    j0, j1 = stream_span(n, dxs, xs, ds) if stream else (n, n)
    if j1 > j0:
        stream_backward(xs, ds, dxs, j0, j1, mu, r, m, bt)
    for j in range(j0):  # everything when not streaming
        dxs[j] = r * (ds[j] - m) + bt * (xs[j] - mu)
    for j in range(j1, n):
        dxs[j] = r * (ds[j] - m) + bt * (xs[j] - mu)


@njit(cache=True, inline="always")
def _span_forward(x, k0, k1, lo, hi, mu, r, w, b, affine, y, stream):  # type: ignore[no-untyped-def]
    rb = x.shape[3]
    pos = lo
    while pos < hi:
        r0 = pos // rb
        a = pos - r0 * rb
        e = min(rb, a + hi - pos)
        _seg_forward(
            x[k0, r0, k1, a:e], w[k0, r0, k1, a:e], b[k0, r0, k1, a:e], y[k0, r0, k1, a:e],
            mu, r, affine, stream,
        )  # fmt: skip
        pos += e - a


@njit(cache=True, fastmath=_REASSOC, inline="always")
def _span_backward_sums(  # type: ignore[no-untyped-def]
    x, dy, k0, k1, lo, hi, mu, r, w, has_w, dwacc, need_dw, dbacc, need_db, k
):
    rb = x.shape[3]
    sg = 0.0
    sgd = 0.0
    pos = lo
    while pos < hi:
        r0 = pos // rb
        a = pos - r0 * rb
        e = min(rb, a + hi - pos)
        g1, g2 = _seg_sums(
            x[k0, r0, k1, a:e], dy[k0, r0, k1, a:e], w[k0, r0, k1, a:e], has_w,
            dwacc[k, k0, r0, k1, a:e], need_dw, dbacc[k, k0, r0, k1, a:e], need_db, mu, r,
        )  # fmt: skip
        sg += g1
        sgd += g2
        pos += e - a
    return sg, sgd


@njit(cache=True, inline="always")
def _span_backward(x, dy, k0, k1, lo, hi, mu, r, w, has_w, m, bt, dx, stream):  # type: ignore[no-untyped-def]
    rb = x.shape[3]
    pos = lo
    while pos < hi:
        r0 = pos // rb
        a = pos - r0 * rb
        e = min(rb, a + hi - pos)
        _seg_backward(
            x[k0, r0, k1, a:e], dy[k0, r0, k1, a:e], w[k0, r0, k1, a:e], has_w,
            dx[k0, r0, k1, a:e], mu, r, m, bt, stream,
        )  # fmt: skip
        pos += e - a


@njit(cache=True, fastmath=_REASSOC, nogil=True)
def _stats_items(ctl, nchunks, items, t, x, nc, pmean, pm2):  # type: ignore[no-untyped-def]
    _, ra, kb, rb = x.shape
    while True:
        k, i0, i1 = _claim(ctl, nchunks, items, t)
        if k < 0:
            return
        for i in range(i0, i1):
            k0, k1, lo, hi = _item(i, nc, ra * rb, kb)
            shift = np.float64(x[k0, 0, k1, 0])  # numba: float(float32) stays float32
            _, pmean[i], pm2[i] = _span_stats(x, k0, k1, lo, hi, shift)


@njit(cache=True, nogil=True)
def _merge_kernel(pmean, pm2, counts, mean, m2):  # type: ignore[no-untyped-def]
    """Chan-merge each group's `nc = counts.size` partials (`pmean[g * nc + c]`, in chunk
    order) into its mean and M2."""
    nc = counts.size
    for g in range(mean.size):
        cnt = 0.0
        mu = 0.0
        q = 0.0
        for c in range(nc):
            nb = counts[c]
            if nb == 0.0:
                continue
            i = g * nc + c
            if cnt == 0.0:  # the first chunk: no merge (and no inf * 0 when delta overflows)
                cnt, mu, q = nb, pmean[i], pm2[i]
                continue
            tot = cnt + nb
            delta = pmean[i] - mu
            mu += delta * (nb / tot)
            q += pm2[i] + delta * delta * (cnt * nb / tot)
            cnt = tot
        mean[g] = mu
        m2[g] = q


@njit(cache=True, nogil=True)
def _forward_items(ctl, nchunks, items, t, x, mean, rstd, w, b, affine, nc, y, stream):  # type: ignore[no-untyped-def]
    _, ra, kb, rb = x.shape
    while True:
        k, i0, i1 = _claim(ctl, nchunks, items, t, True)
        if k < 0:
            return
        for i in range(i0, i1):
            k0, k1, lo, hi = _item(i, nc, ra * rb, kb)
            g = k0 * kb + k1
            _span_forward(x, k0, k1, lo, hi, mean[g], rstd[g], w, b, affine, y, stream)


@njit(cache=True, fastmath=_REASSOC, nogil=True)
def _backward_sums_items(  # type: ignore[no-untyped-def]
    ctl,
    nchunks,
    items,
    t,
    x,
    dy,
    mean,
    rstd,
    w,
    has_w,
    dwacc,
    need_dw,
    dbacc,
    need_db,
    nc,
    psg,
    psgd,
):
    _, ra, kb, rb = x.shape
    while True:
        k, i0, i1 = _claim(ctl, nchunks, items, t)
        if k < 0:
            return
        for i in range(i0, i1):
            k0, k1, lo, hi = _item(i, nc, ra * rb, kb)
            g = k0 * kb + k1
            psg[i], psgd[i] = _span_backward_sums(
                x, dy, k0, k1, lo, hi, mean[g], rstd[g], w, has_w, dwacc, need_dw, dbacc, need_db, k
            )


@njit(cache=True, nogil=True)
def _backward_items(ctl, nchunks, items, t, x, dy, mean, rstd, w, has_w, mg, beta, nc, dx, stream):  # type: ignore[no-untyped-def]
    _, ra, kb, rb = x.shape
    while True:
        k, i0, i1 = _claim(ctl, nchunks, items, t, True)
        if k < 0:
            return
        for i in range(i0, i1):
            k0, k1, lo, hi = _item(i, nc, ra * rb, kb)
            g = k0 * kb + k1
            mu, r, mgg, btg = mean[g], rstd[g], mg[g], beta[g]
            _span_backward(x, dy, k0, k1, lo, hi, mu, r, w, has_w, mgg, btg, dx, stream)


@njit(cache=True, nogil=True, error_model="numpy")  # IEEE: 1/0 is inf
def _forward_split(  # type: ignore[no-untyped-def]
    ctl, nchunks, items, t, phase, counts, pmean, pm2, x, w, b, affine, eps, inside, m, stats, y,
    stream,
):  # fmt: skip
    """Groups split into `nc = counts.size` chunks, in one job: partial statistics
    (`_stats_items`, claiming on `phase`), a barrier, then every thread Chan-merges them in
    the same order and takes `rstd` (`_ops._rstd`'s formulas), and `y` (`_forward_items`,
    claiming on `ctl`, each thread's last-read chunks first). `stats` (3, groups): mean,
    var, rstd (slot 0 writes them). One job instead of two and no Python in between."""
    begin(ctl, t)
    nc = counts.size
    _stats_items(phase, nchunks, items, t, x, nc, pmean, pm2)
    if not wait_done(phase, nchunks, ctl):
        return
    groups = stats.shape[1]
    kb = x.shape[2]
    mean = np.empty(groups)
    m2 = np.empty(groups)
    rstd = np.empty(groups)
    _merge_kernel(pmean, pm2, counts, mean, m2)
    for g in range(groups):
        k0 = g // kb
        mean[g] += x[k0, 0, g - k0 * kb, 0]  # the statistics kernels work on x - shift
        v = m2[g] / m
        rstd[g] = 1.0 / np.sqrt(v + eps) if inside else 1.0 / (np.sqrt(v) + eps)
        if t == 0:
            stats[0, g] = mean[g]
            stats[1, g] = v
            stats[2, g] = rstd[g]
    _forward_items(ctl, nchunks, items, t, x, mean, rstd, w, b, affine, nc, y, stream)


@njit(cache=True, nogil=True)
def _backward_split(  # type: ignore[no-untyped-def]
    ctl, nchunks, items, t, phase, nc, psg, psgd, x, dy, mean, rstd, c, w, has_w, dwacc,
    need_dw, dbacc, need_db, m, dx, stream,
):  # fmt: skip
    """The backward of groups split into `nc` chunks, in one job: partial `sum g` and
    `sum g (x - mu)` (`_backward_sums_items`, claiming on `phase`), a barrier, the sums in
    chunk order, then `dx` (`_backward_items`, claiming on `ctl`, last-read chunks first)."""
    begin(ctl, t)
    args = (x, dy, mean, rstd, w, has_w, dwacc, need_dw, dbacc, need_db, nc, psg, psgd)
    _backward_sums_items(phase, nchunks, items, t, *args)
    if not wait_done(phase, nchunks, ctl):
        return
    groups = mean.size
    n = x.shape[1] * x.shape[3]
    mg = np.empty(groups)
    beta = np.empty(groups)
    for g in range(groups):
        sg = 0.0
        sgd = 0.0
        for i in range(g * nc, (g + 1) * nc):
            sg += psg[i]
            sgd += psgd[i]
        mg[g] = sg / n
        beta[g] = -c[g] * rstd[g] * rstd[g] * sgd / m
    _backward_items(ctl, nchunks, items, t, x, dy, mean, rstd, w, has_w, mg, beta, nc, dx, stream)


@njit(cache=True, fastmath=_REASSOC, nogil=True, error_model="numpy")  # IEEE: 1/0 is inf
def _forward_groups(ctl, nchunks, items, t, x, w, b, affine, eps, inside, m, stats, y, stream):  # type: ignore[no-untyped-def]
    """Groups [i0, i1), each whole: statistics, `rstd` (`_ops._rstd`'s formulas), `y`.
    `stats` is (3, groups): mean, var, rstd."""
    _, ra, kb, rb = x.shape
    n = ra * rb
    while True:
        k, i0, i1 = _claim(ctl, nchunks, items, t)
        if k < 0:
            return
        for g in range(i0, i1):
            k0 = g // kb
            k1 = g - k0 * kb
            xs = x[k0, 0, k1]  # the first run (the whole group when ra == 1)
            shift = np.float64(xs[0])
            if ra == 1 and rb <= BLOCK:  # one short run (rows, instances): no span walking
                _, mean, m2 = _add_block(xs, shift, 0.0, 0.0, 0.0)
            else:
                _, mean, m2 = _span_stats(x, k0, k1, 0, n, shift)
            mu = shift + mean
            v = m2 / m
            r = 1.0 / np.sqrt(v + eps) if inside else 1.0 / (np.sqrt(v) + eps)
            stats[0, g] = mu
            stats[1, g] = v
            stats[2, g] = r
            if ra == 1 and affine:
                _seg_forward(xs, w[k0, 0, k1], b[k0, 0, k1], y[k0, 0, k1], mu, r, True, False)
            elif ra == 1:  # x stands in for the unused parameters: no slices of them to make
                _seg_forward(xs, xs, xs, y[k0, 0, k1], mu, r, False, stream)
            else:
                _span_forward(x, k0, k1, 0, n, mu, r, w, b, affine, y, stream)


@njit(cache=True, fastmath=_REASSOC, nogil=True)
def _backward_groups(  # type: ignore[no-untyped-def]
    ctl, nchunks, items, t, x, dy, mean, rstd, c, w, has_w, dwacc, need_dw, dbacc, need_db, m,
    dx, stream,
):  # fmt: skip
    """Groups [i0, i1), each whole: `sum g`, `sum g (x - mu)`, then `dx` as `backward`."""
    _, ra, kb, rb = x.shape
    n = ra * rb
    while True:
        k, i0, i1 = _claim(ctl, nchunks, items, t)
        if k < 0:
            return
        for g in range(i0, i1):
            k0 = g // kb
            k1 = g - k0 * kb
            mu = mean[g]
            r = rstd[g]
            if ra == 1:  # one run (rows, instances): no span walking
                # x and dx stand in for unused parameters: slices cost, even of unused views
                xs, ds, dxs = x[k0, 0, k1], dy[k0, 0, k1], dx[k0, 0, k1]
                if has_w or need_dw or need_db:
                    ws, dws, dbs = w[k0, 0, k1], dwacc[k, k0, 0, k1], dbacc[k, k0, 0, k1]
                    sg, sgd = _seg_sums(xs, ds, ws, has_w, dws, need_dw, dbs, need_db, mu, r)
                    bt = -c[g] * r * r * sgd / m
                    _seg_backward(xs, ds, ws, has_w, dxs, mu, r, sg / n, bt, stream)
                else:
                    sg, sgd = _seg_sums(xs, ds, xs, False, dxs, False, dxs, False, mu, r)
                    bt = -c[g] * r * r * sgd / m
                    _seg_backward(xs, ds, xs, False, dxs, mu, r, sg / n, bt, stream)
            else:
                sg, sgd = _span_backward_sums(
                    x, dy, k0, k1, 0, n, mu, r, w, has_w, dwacc, need_dw, dbacc, need_db, k
                )
                bt = -c[g] * r * r * sgd / m
                _span_backward(x, dy, k0, k1, 0, n, mu, r, w, has_w, sg / n, bt, dx, stream)


# Sweep kernels (batch norm): item i = (k0, chunk c of the Ra rows) covers, in memory order,
# rows [c * ra // nc, (c + 1) * ra // nc) of every kb group, so each thread streams one
# contiguous region (and first-touches its own pages of a fresh output). Partial results
# sit at [i * kb + k1]. Affine parameters are constant per group (scalars w[g], b[g]).


@njit(cache=True, inline="always")
def _rows(i: int, nc: int, ra: int) -> tuple[int, int, int]:
    k0 = i // nc
    c = i - k0 * nc
    return k0, (c * ra) // nc, ((c + 1) * ra) // nc


@njit(cache=True, fastmath=_REASSOC, nogil=True)
def _stats_sweep(ctl, nchunks, items, t, x, nc, pmean, pm2):  # type: ignore[no-untyped-def]
    _, ra, kb, rb = x.shape
    while True:
        k, i0, i1 = _claim(ctl, nchunks, items, t)
        if k < 0:
            return
        for i in range(i0, i1):
            k0, lo, hi = _rows(i, nc, ra)
            for k1 in range(kb):
                pmean[i * kb + k1] = 0.0
                pm2[i * kb + k1] = 0.0
            cnt0 = 0.0  # every group of the item has seen the same rows
            for r0 in range(lo, hi):
                for k1 in range(kb):
                    cnt = cnt0
                    mean = pmean[i * kb + k1]
                    m2 = pm2[i * kb + k1]
                    shift = np.float64(x[k0, 0, k1, 0])  # numba: float(float32) stays float32
                    s = 0
                    while s < rb:
                        e = min(rb, s + BLOCK)
                        cnt, mean, m2 = _add_block(x[k0, r0, k1, s:e], shift, cnt, mean, m2)
                        s = e
                    pmean[i * kb + k1] = mean
                    pm2[i * kb + k1] = m2
                cnt0 += rb


@njit(cache=True, nogil=True)
def _forward_sweep(ctl, nchunks, items, t, x, mean, rstd, wg, bg, affine, nc, y, stream):  # type: ignore[no-untyped-def]
    _, ra, kb, rb = x.shape
    while True:
        k, i0, i1 = _claim(ctl, nchunks, items, t)
        if k < 0:
            return
        for i in range(i0, i1):
            k0, lo, hi = _rows(i, nc, ra)
            for r0 in range(lo, hi):
                for k1 in range(kb):
                    g = k0 * kb + k1
                    mu = mean[g]
                    r = rstd[g]
                    xs = x[k0, r0, k1]
                    ys = y[k0, r0, k1]
                    if affine:
                        wv = wg[g]
                        bv = bg[g]
                        for j in range(rb):
                            ys[j] = ((xs[j] - mu) * r) * wv + bv
                    else:
                        _seg_forward(xs, xs, xs, ys, mu, r, False, stream)


@njit(cache=True, fastmath=_REASSOC, nogil=True)
def _backward_sums_sweep(ctl, nchunks, items, t, x, dy, mean, nc, psdy, psdyd):  # type: ignore[no-untyped-def]
    """Partial `sum dy` and `sum dy (x - mu)`; a per-group weight multiplies them later."""
    _, ra, kb, _ = x.shape
    while True:
        k, i0, i1 = _claim(ctl, nchunks, items, t)
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
                    xs = x[k0, r0, k1]
                    # no weight, no accumulators: x and psdy stand in (never read or written)
                    sg, sgd = _seg_sums(
                        xs, dy[k0, r0, k1], xs, False, psdy, False, psdy, False, mu, 1.0
                    )
                    psdy[i * kb + k1] += sg
                    psdyd[i * kb + k1] += sgd


@njit(cache=True, nogil=True)
def _backward_sweep(ctl, nchunks, items, t, x, dy, mean, rstd, wg, has_w, mg, beta, nc, dx, stream):  # type: ignore[no-untyped-def]
    _, ra, kb, rb = x.shape
    while True:
        k, i0, i1 = _claim(ctl, nchunks, items, t)
        if k < 0:
            return
        for i in range(i0, i1):
            k0, lo, hi = _rows(i, nc, ra)
            for r0 in range(lo, hi):
                for k1 in range(kb):
                    g = k0 * kb + k1
                    mu = mean[g]
                    r = rstd[g]
                    m = mg[g]
                    bt = beta[g]
                    xs = x[k0, r0, k1]
                    ds = dy[k0, r0, k1]
                    dxs = dx[k0, r0, k1]
                    if has_w:
                        wv = wg[g]
                        for j in range(rb):
                            dxs[j] = r * (ds[j] * wv - m) + bt * (xs[j] - mu)
                    else:
                        _seg_backward(xs, ds, xs, False, dxs, mu, r, m, bt, stream)


@njit(cache=True, fastmath=_REASSOC, nogil=True, error_model="numpy")  # IEEE: 1/0 is inf
def _forward_small(xin, shape4, eps, inside, m, stats_in, yin):  # type: ignore[no-untyped-def]
    """Whole forward of a small input on one thread, in one call (no affine parameters):
    per group the two-pass statistics (float64 sums), `rstd` (`_ops._rstd`'s two formulas,
    a test checks they agree bit for bit), then `y = (x - mu) * rstd`. `xin` and `yin`
    (C-contiguous, any shape) are viewed here as `shape4` blocks, `stats_in` as
    (3, groups): mean, var, rstd (reshapes here cost nothing; in Python 0.1 us each). Plain
    indexing, no slices: no per-slice reference counts (a third faster for groups of 100)."""
    ka, ra, kb, rb = shape4
    x = xin.reshape(shape4)
    y = yin.reshape(shape4)
    stats = stats_in.reshape((3, ka * kb))
    n = float(ra * rb)
    for k0 in range(ka):
        for k1 in range(kb):
            shift = np.float64(x[k0, 0, k1, 0])  # as _add_block (np.float64: float() keeps float32)
            s = 0.0
            for i in range(ra):
                for j in range(rb):
                    s += x[k0, i, k1, j] - shift
            mu_s = s / n
            q = 0.0
            for i in range(ra):
                for j in range(rb):
                    d = (x[k0, i, k1, j] - shift) - mu_s
                    q += d * d
            mu = shift + mu_s
            v = q / m
            r = 1.0 / np.sqrt(v + eps) if inside else 1.0 / (np.sqrt(v) + eps)
            g = k0 * kb + k1
            stats[0, g] = mu
            stats[1, g] = v
            stats[2, g] = r
            for i in range(ra):
                for j in range(rb):
                    y[k0, i, k1, j] = (x[k0, i, k1, j] - mu) * r


@njit(cache=True, fastmath=_REASSOC, nogil=True, error_model="numpy")
def _backward_small(x, dy, mean, rstd, c, m, dx):  # type: ignore[no-untyped-def]
    """Whole backward of a small input on one thread (no affine parameters): per group
    `sum g`, `sum g (x - mu)`, then `dx = r (g - mean g) + beta (x - mu)` as in `backward`."""
    ka, ra, kb, rb = x.shape
    n = float(ra * rb)
    for k0 in range(ka):
        for k1 in range(kb):
            g = k0 * kb + k1
            mu = mean[g]
            r = rstd[g]
            sg = 0.0
            sgd = 0.0
            for i in range(ra):
                for j in range(rb):
                    dj = float(dy[k0, i, k1, j])
                    sg += dj
                    sgd += dj * (x[k0, i, k1, j] - mu)
            mg = sg / n
            bt = -c[g] * r * r * sgd / m
            for i in range(ra):
                for j in range(rb):
                    dx[k0, i, k1, j] = r * (dy[k0, i, k1, j] - mg) + bt * (x[k0, i, k1, j] - mu)


# ---------------------------------------------------------------------------------------------
# Layout: views of any strided array as (Ka, Ra, Kb, Rb) blocks
# ---------------------------------------------------------------------------------------------


class Layout(NamedTuple):
    """Blocks of original axes (each in memory order) for (Ka, Ra, Kb, Rb); `perm`, the
    blocks' axes in that order then the size-1 axes; `order`, every axis in memory order
    (size-1 axes last), which new outputs follow."""

    blocks: tuple[tuple[int, ...], ...]
    shape4: tuple[int, int, int, int]
    order: tuple[int, ...]
    perm: tuple[int, ...]
    # precomputed for the per-call reshapes (small inputs feel every microsecond):
    new_shape: tuple[int, ...]  # x's shape in memory order, for new outputs
    new_perm: tuple[int, ...]  # from memory order back to x's axis order
    kept_shape: tuple[int, ...]  # the group grid: kept axes in block order
    kept_perm: tuple[int, ...]  # group grid -> kept axes in axis order
    keepdims: tuple[int, ...]  # shape of the statistics
    sorted_kept_shape: tuple[int, ...]  # kept axes' sizes in axis order
    groups_perm: tuple[int, ...]  # kept axes in axis order -> group grid


def plan(x: np.ndarray, axes: tuple[int, ...], params: tuple[Any, ...] = ()) -> Layout | None:
    """The block layout of `x` for reducing over `axes`, or None if it needs > 4 blocks.

    Axes merge only where `x` and every affine parameter (broadcast to x) merge, so that a
    parameter either repeats or varies over a whole block."""
    pstrides = tuple(
        np.broadcast_to(np.asarray(p), x.shape).strides for p in params if p is not None
    )
    return _plan(x.shape, x.strides, axes, pstrides)


@functools.lru_cache(maxsize=256)
def _plan(
    shape: tuple[int, ...],
    strides: tuple[int, ...],
    axes: tuple[int, ...],
    pstrides: tuple[tuple[int, ...], ...],
) -> Layout | None:
    views = (strides, *pstrides)
    ndim = len(shape)
    big = [i for i in range(ndim) if shape[i] > 1]
    order = sorted(big, key=lambda i: -abs(strides[i]))  # stable: ties keep axis order
    runs: list[tuple[bool, list[int]]] = []
    for i in order:
        red = i in axes
        if (
            runs
            and runs[-1][0] == red
            and all(_mergeable(shape, v, runs[-1][1][-1], i) for v in views)
        ):
            runs[-1][1].append(i)
        else:
            runs.append((red, [i]))
    kruns = [tuple(r) for red, r in runs if not red]
    rruns = [tuple(r) for red, r in runs if red]
    if len(kruns) > 2 or len(rruns) > 2:
        return None
    rb = rruns[-1] if rruns else ()
    ra = rruns[0] if len(rruns) == 2 else ()
    if len(kruns) == 2:
        ka, kb = kruns
    elif kruns and (not rruns or order.index(kruns[0][0]) < order.index(rruns[0][0])):
        ka, kb = kruns[0], ()
    else:
        ka, kb = (), (kruns[0] if kruns else ())
    blocks = (ka, ra, kb, rb)
    shape4 = tuple(math.prod(shape[i] for i in blk) for blk in blocks)
    rest = tuple(i for i in range(ndim) if shape[i] == 1)
    perm = ka + ra + kb + rb + rest
    full_order = tuple(order) + rest
    kept = ka + kb
    srt = sorted(kept)
    return Layout(
        blocks,  # type: ignore[arg-type]
        shape4,  # type: ignore[arg-type]
        full_order,
        perm,
        tuple(shape[i] for i in full_order),
        tuple(int(i) for i in np.argsort(full_order)),
        tuple(shape[i] for i in kept),
        tuple(int(i) for i in np.argsort(kept)),
        tuple(1 if i in axes else shape[i] for i in range(ndim)),
        tuple(shape[i] for i in srt),
        tuple(srt.index(i) for i in kept),
    )


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


def new_output(shape: tuple[int, ...], dtype: Any) -> tuple[np.ndarray, bool]:
    """A new C-order output (`_recycle.empty`), and whether to write it with streaming
    stores: recycled memory of `STREAM_MIN_BYTES` or more, as an `out=` (`streams`)."""
    y, recycled = _recycle.empty(shape, dtype)
    return y, recycled and streams(y)


def _new_like(x: np.ndarray, lay: Layout, dtype: Any) -> tuple[np.ndarray, bool]:
    """A new array of x's shape whose memory order follows x's (C order for C input), and
    `new_output`'s streaming flag."""
    buf, stream = new_output(lay.new_shape, dtype)
    return buf.transpose(lay.new_perm), stream


def _output(
    x: np.ndarray, lay: Layout, dtype: Any, out: np.ndarray | None
) -> tuple[np.ndarray, bool]:
    """The output array, and whether to write it with streaming stores."""
    if out is not None:
        return out, streams(out)
    return _new_like(x, lay, dtype)


def _stats_to_keepdims(v: np.ndarray, lay: Layout) -> np.ndarray:
    """Per-group values (group order = kept axes of the layout) -> keepdims array."""
    return v.reshape(lay.kept_shape).transpose(lay.kept_perm).reshape(lay.keepdims)


def _keepdims_to_groups(v: np.ndarray, lay: Layout) -> np.ndarray:
    """Inverse of `_stats_to_keepdims`: a flat contiguous float64 array in group order."""
    v = np.asarray(v, dtype=np.float64).reshape(lay.sorted_kept_shape)
    return np.ascontiguousarray(v.transpose(lay.groups_perm)).reshape(-1)


class _Param(NamedTuple):
    view: np.ndarray  # float64 (Ka, Ra, Kb, Rb) view, zero strides where it repeats
    varies: tuple[bool, bool, bool, bool]


_ONE, _ZERO = np.ones(1), np.zeros(1)  # never written: stand-ins for absent parameters


def _repeat(value: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    return np.ndarray(shape, np.float64, buffer=value, strides=(0,) * len(shape))


@functools.lru_cache(maxsize=64)
def _absent(one: bool, shape4: tuple[int, int, int, int]) -> _Param:
    """The stand-in for an absent parameter (kernels never read or write it)."""
    return _Param(_repeat(_ONE if one else _ZERO, shape4), (False,) * 4)


def _param(p: Any, x: np.ndarray, lay: Layout, fill: np.ndarray) -> _Param | None:
    """An affine parameter as a block view; None if it varies over part of a block only."""
    if p is None:
        return _absent(fill is _ONE, lay.shape4)
    compact = np.array(p, dtype=np.float64)  # a contiguous copy: small, and ours to view
    full = np.broadcast_to(compact, x.shape)
    strides4 = []
    for blk in lay.blocks:
        st = [full.strides[i] for i in blk]
        if any(st) and not all(
            _mergeable(full.shape, full.strides, o, i) and full.strides[i]
            for o, i in itertools.pairwise(blk)
        ):
            return None
        strides4.append(st[-1] if st else 0)
    view = np.ndarray(lay.shape4, np.float64, buffer=compact, strides=tuple(strides4))
    return _Param(view, tuple(s != 0 for s in strides4))  # type: ignore[arg-type]


def streams(out: np.ndarray) -> bool:
    """Whether to write a preallocated `out` (or recycled memory) with non-temporal stores:
    where it cannot stay in cache. Not newly mapped outputs: their pages come zeroed from the
    kernel, already in cache, and streaming past it was slower (10^7 float32
    forward+backward 10.0 -> 10.4 ms, while a preallocated `out` went 5.7 -> 4.5 ms)."""
    return out.nbytes >= STREAM_MIN_BYTES


def _plan_threads(groups: int, n: int) -> tuple[int, int]:
    """(chunks per group, threads): enough items to keep every thread busy, chunks not tiny;
    one thread below PARALLEL_MIN_SIZE elements, where starting threads costs more, and
    whole groups only below SPLIT_MIN_SIZE."""
    if groups * n < PARALLEL_MIN_SIZE:
        return 1, 1
    nthreads = max(1, int(numba.config.NUMBA_NUM_THREADS))  # type: ignore[attr-defined]
    if groups * n < SPLIT_MIN_SIZE:
        return 1, min(nthreads, groups)
    want = -(-8 * nthreads // groups)  # ceil
    nc = max(1, min(want, n // MIN_CHUNK))
    return nc, min(nthreads, groups * nc)


# ---------------------------------------------------------------------------------------------
# Native jobs (planned calls): the caller writes the job's arrays (addresses: they are
# C-contiguous) and scalars into the pool's board, and every thread, workers included, calls
# the job's part: a `cfunc` that views them again and runs one group or split kernel for one
# dtype (compiled, or loaded from numba's cache, on first use: `_part`). A worker stays in its
# GIL-free spin from one such job to the next: no Python, none of the caller's objects to
# touch (docs/performance.md: "Native jobs").
# ---------------------------------------------------------------------------------------------

# board parameter slots
_NCHUNKS, _ITEMS, _NC, _GROUPS, _SHAPE = range(5)  # _SHAPE: 4 slots
_X, _DY, _OUT, _MEAN, _RSTD, _C, _COUNTS, _PARTS, _EPS, _INSIDE, _M, _STREAM = range(9, 21)


@njit(cache=True, inline="always")
def _views(board, xdtype):  # type: ignore[no-untyped-def]
    """The job's board, parameters, `x`, `dy` and output (`y` or `dx`): all of `xdtype`."""
    p = board_params(board)
    s4 = (p[_SHAPE], p[_SHAPE + 1], p[_SHAPE + 2], p[_SHAPE + 3])
    x = carray(address(p[_X]), s4, xdtype)
    return p, x, carray(address(p[_DY]), s4, xdtype), carray(address(p[_OUT]), s4, xdtype)


@njit(cache=True, inline="always")
def _claims(board, slot):  # type: ignore[no-untyped-def]
    """The claim arguments every kernel starts with."""
    p = board_params(board)
    return (board_ctl(board, 0), p[_NCHUNKS], p[_ITEMS], slot)


@njit(cache=True, inline="always")
def _split_args(board):  # type: ignore[no-untyped-def]
    """A split kernel's first-phase claim state and its two arrays of partial sums."""
    p = board_params(board)
    parts = carray(address(p[_PARTS]), (2, p[_ITEMS]), np.float64)
    return board_ctl(board, 1), parts[0], parts[1]


@njit(cache=True, inline="always")
def _forward_args(board, xdtype):  # type: ignore[no-untyped-def]
    """`_forward_groups`' arguments after the claims (x stands in for the absent weight and
    bias: never read)."""
    p, x, _, y = _views(board, xdtype)
    stats = carray(address(p[_MEAN]), (3, p[_GROUPS]), np.float64)
    eps, m = float_bits(p[_EPS]), float_bits(p[_M])
    return (x, x, x, False, eps, p[_INSIDE] != 0, m, stats, y, p[_STREAM] != 0)


@njit(cache=True, inline="always")
def _forward_split_args(board, slot, xdtype):  # type: ignore[no-untyped-def]
    p = board_params(board)
    phase, pmean, pm2 = _split_args(board)
    counts = carray(address(p[_COUNTS]), p[_NC], np.float64)
    head = (*_claims(board, slot), phase, counts, pmean, pm2)
    return head + _forward_args(board, xdtype)


@njit(cache=True, inline="always")
def _backward_args(board, xdtype):  # type: ignore[no-untyped-def]
    """`_backward_groups`' arguments after the claims (stand-ins for the absent weight and
    its sums)."""
    p, x, dy, dx = _views(board, xdtype)
    groups = p[_GROUPS]
    mean = carray(address(p[_MEAN]), groups, np.float64)
    rstd = carray(address(p[_RSTD]), groups, np.float64)
    c = carray(address(p[_C]), groups, np.float64)
    zero = board_scratch(board)[:1]  # never written: need_dw, need_db are False
    acc = as_strided(zero, shape=(p[_NCHUNKS], *x.shape), strides=(0, 0, 0, 0, 0))
    m, stream = float_bits(p[_M]), p[_STREAM] != 0
    return (x, dy, mean, rstd, c, x, False, acc, False, acc, False, m, dx, stream)


@njit(cache=True, inline="always")
def _backward_split_args(board, slot, xdtype):  # type: ignore[no-untyped-def]
    phase, psg, psgd = _split_args(board)
    head = (*_claims(board, slot), phase, board_params(board)[_NC], psg, psgd)
    return head + _backward_args(board, xdtype)


# The parts, one kernel and dtype each (`_part` compiles them as cfuncs when first needed).
def _forward_groups_f32(addr, slot):  # type: ignore[no-untyped-def]
    b = board_at(addr)
    _forward_groups(*(_claims(b, slot) + _forward_args(b, np.float32)))


def _forward_groups_f64(addr, slot):  # type: ignore[no-untyped-def]
    b = board_at(addr)
    _forward_groups(*(_claims(b, slot) + _forward_args(b, np.float64)))


def _forward_split_f32(addr, slot):  # type: ignore[no-untyped-def]
    _forward_split(*_forward_split_args(board_at(addr), slot, np.float32))


def _forward_split_f64(addr, slot):  # type: ignore[no-untyped-def]
    _forward_split(*_forward_split_args(board_at(addr), slot, np.float64))


def _backward_groups_f32(addr, slot):  # type: ignore[no-untyped-def]
    b = board_at(addr)
    _backward_groups(*(_claims(b, slot) + _backward_args(b, np.float32)))


def _backward_groups_f64(addr, slot):  # type: ignore[no-untyped-def]
    b = board_at(addr)
    _backward_groups(*(_claims(b, slot) + _backward_args(b, np.float64)))


def _backward_split_f32(addr, slot):  # type: ignore[no-untyped-def]
    _backward_split(*_backward_split_args(board_at(addr), slot, np.float32))


def _backward_split_f64(addr, slot):  # type: ignore[no-untyped-def]
    _backward_split(*_backward_split_args(board_at(addr), slot, np.float64))


_PARTS_BY_NAME = {f.__name__: f for f in (
    _forward_groups_f32, _forward_groups_f64, _forward_split_f32, _forward_split_f64,
    _backward_groups_f32, _backward_groups_f64, _backward_split_f32, _backward_split_f64,
)}  # fmt: skip


_COMPILED_PARTS: list[Any] = []  # kept alive: workers call them by address


@functools.cache
def _part(direction: str, split: bool, itemsize: int) -> int:
    """The address of the part for `direction` ("forward", "backward"), split or whole
    groups, and float32 or float64 (`itemsize` 4 or 8), compiled (or loaded) on first use."""
    name = f"_{direction}_{'split' if split else 'groups'}_f{8 * itemsize}"
    compiled: Any = cfunc(PART_SIGNATURE, cache=True)(_PARTS_BY_NAME[name])
    _COMPILED_PARTS.append(compiled)
    return int(compiled.address)


@njit(cache=True, inline="always")
def _post(board, nchunks, nc, groups, x, dy, out):  # type: ignore[no-untyped-def]
    """Write the parameters every native job has."""
    p = board_params(board)
    p[_NCHUNKS], p[_ITEMS], p[_NC], p[_GROUPS] = nchunks, groups * nc, nc, groups
    for i in range(4):
        p[_SHAPE + i] = x.shape[i]
    p[_X], p[_DY], p[_OUT] = x.ctypes.data, dy.ctypes.data, out.ctypes.data


@njit(cache=True, nogil=True)
def _forward_native(
    board, nthreads, part, nchunks, x, y, stats, counts, pm, eps, inside, m, stream
):  # type: ignore[no-untyped-def]
    """The caller's side of a native forward (`_run_native` calls it)."""
    p = board_params(board)
    _post(board, nchunks, counts.size, stats.shape[1], x, x, y)
    p[_MEAN], p[_COUNTS], p[_PARTS] = stats.ctypes.data, counts.ctypes.data, pm.ctypes.data
    p[_EPS], p[_INSIDE], p[_M], p[_STREAM] = float_bits(eps), inside, float_bits(m), stream
    run_job(board, part, nchunks, nthreads)


@njit(cache=True, nogil=True)
def _backward_native(board, nthreads, part, nchunks, nc, x, dy, dx, mean, rstd, c, ps, m, stream):  # type: ignore[no-untyped-def]
    """The caller's side of a native backward."""
    p = board_params(board)
    _post(board, nchunks, nc, mean.size, x, dy, dx)
    p[_MEAN], p[_RSTD], p[_C], p[_PARTS] = (
        mean.ctypes.data, rstd.ctypes.data, c.ctypes.data, ps.ctypes.data,
    )  # fmt: skip
    p[_M], p[_STREAM] = float_bits(m), stream
    run_job(board, part, nchunks, nthreads)


# ---------------------------------------------------------------------------------------------
# Entry points called by _ops
# ---------------------------------------------------------------------------------------------


def forward(
    x: np.ndarray,
    axes: tuple[int, ...],
    ddof: float,
    eps: float,
    inside: bool,
    finish: Any,
    weight: Any,
    bias: Any,
    out_dtype: Any,
    out: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """Return `(y, mean, var, rstd)` (statistics keepdims float64), or None if the layout or
    the affine parameters do not fit the kernels. `finish(var)` returns `rstd` for a
    keepdims var and raises for zero variance with eps=0 (the `_ops` rules): the sweep
    layouts take `rstd` from it; the others compute it in the kernel (same formulas) and call
    `finish` only with eps=0, for its check."""
    lay = plan(x, axes, (weight, bias))
    if lay is None:
        return None
    w = _param(weight, x, lay, _ONE)
    b = _param(bias, x, lay, _ZERO)
    x4 = view4(x, lay)
    if w is None or b is None or x4 is None:
        return None
    y, stream = _output(x, lay, out_dtype, out)
    y4 = view4(y, lay)
    if y4 is None:
        return None
    ka, ra, kb, rb = lay.shape4
    groups, n = ka * kb, ra * rb
    affine = weight is not None or bias is not None
    sweep = _plan_sweep(lay.shape4, (w, b))
    if sweep is not None:
        return _forward_by_sweep(x4, y, y4, lay, w, b, affine, ddof, finish, sweep, stream)
    nc, nthreads = _plan_threads(groups, n)
    stats = np.empty((3, groups))
    args = (x4, w.view, b.view, affine, eps, inside, n - ddof, stats, y4, stream)
    _forward_job(groups, nc, nthreads, _chunk_counts(n, nc), args)
    mean_k, var_k, rstd_k = (_stats_to_keepdims(v, lay) for v in stats)
    if eps == 0:
        finish(var_k)  # raises for a zero variance (the `_ops` rule)
    return y, mean_k, var_k, rstd_k


def _forward_job(groups: int, nc: int, nthreads: int, counts: np.ndarray, args: tuple) -> None:
    """`forward`'s Python job on the pool: `_forward_groups` (whole groups: each group's
    passes while it is in cache) or `_forward_split` (groups in `nc` chunks of `counts`
    elements)."""
    if nc == 1:
        _run(_forward_groups, groups, nthreads, args)
    else:
        items = groups * nc
        nchunks = _chunks(items, nthreads)
        pm = np.empty((2, items))  # partial means and M2
        sargs = (_phase_ctl(nchunks, nthreads), counts, pm[0], pm[1], *args)
        _run(_forward_split, items, nthreads, sargs, nchunks)
    calls["forward"] += 1


def _backward_job(groups: int, nc: int, nthreads: int, nchunks: int, args: tuple) -> None:
    """`backward`'s Python job on the pool: `_backward_groups` or `_backward_split`."""
    if nc == 1:
        _run(_backward_groups, groups, nthreads, args, nchunks)
    else:
        items = groups * nc
        ps = np.empty((2, items))  # partial sum g and sum g (x - mu)
        sargs = (_phase_ctl(nchunks, nthreads), nc, ps[0], ps[1], *args)
        _run(_backward_split, items, nthreads, sargs, nchunks)
    calls["backward"] += 1


def _chunk_counts(n: int, nc: int) -> np.ndarray:
    """Elements in each of the `nc` chunks of a group of `n` (the merge's weights)."""
    return np.array([((c + 1) * n) // nc - (c * n) // nc for c in range(nc)], float)


def _forward_by_sweep(  # type: ignore[no-untyped-def]
    x4, y, y4, lay, w, b, affine, ddof, finish, sweep, stream
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """`forward` for layouts that `_plan_sweep` accepts: partial statistics per item, their
    merge and `rstd` here, then `y`."""
    ka, ra, kb, rb = lay.shape4
    nc, nthreads = sweep
    pmean = np.empty(ka * nc * kb)
    pm2 = np.empty(ka * nc * kb)
    _run(_stats_sweep, ka * nc, nthreads, (x4, nc, pmean, pm2))
    pmean, pm2 = (_chunks_last(p, ka, nc, kb) for p in (pmean, pm2))
    counts = np.array([((c + 1) * ra // nc - c * ra // nc) * rb for c in range(nc)], float)
    mean, m2 = np.empty(ka * kb), np.empty(ka * kb)
    _merge_kernel(pmean, pm2, counts, mean, m2)
    mean = mean + x4[:, 0, :, 0].ravel()  # the statistics kernels work on x - shift
    mean_k = _stats_to_keepdims(mean, lay)
    var_k = _stats_to_keepdims(m2 / (ra * rb - ddof), lay)
    rstd_k = finish(var_k)
    rstd = _keepdims_to_groups(rstd_k, lay)
    sargs = (x4, mean, rstd, _per_group(w), _per_group(b), affine, nc)
    _run(_forward_sweep, ka * nc, nthreads, (*sargs, y4, stream))
    calls["forward"] += 1
    calls["sweep"] += 1
    return y, mean_k, var_k, rstd_k


def backward(
    ctx: Any, dy: np.ndarray, c_k: np.ndarray, out_dtype: Any, out: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None] | None:
    """Return `(dx, dweight, dbias)` or None if the layout does not fit the kernels.

    `c_k` is the keepdims variance-path coefficient `c` (rstd, or 1/std for eps outside)."""
    x = ctx.x
    lay = plan(x, ctx.axes, (ctx.weight, ctx.bias))
    if lay is None:
        return None
    w = _param(ctx.weight, x, lay, _ONE)
    b = _param(ctx.bias, x, lay, _ZERO)
    x4 = view4(x, lay)
    if w is None or b is None or x4 is None:
        return None
    if dy.dtype not in (np.float32, np.float64):
        dy = dy.astype(np.float64)
    dy4 = view4(dy, lay)
    if dy4 is None:  # dy's memory order differs from x's: copy it into x's order
        dyc, _ = _new_like(x, lay, dy.dtype)
        dyc[...] = dy
        dy4 = view4(dyc, lay)
    dx, stream = _output(x, lay, out_dtype, out)
    dx4 = view4(dx, lay)
    if dx4 is None:
        return None
    ka, ra, kb, rb = lay.shape4
    groups, n = ka * kb, ra * rb
    mean = _keepdims_to_groups(ctx.mean, lay)
    rstd = _keepdims_to_groups(ctx.rstd, lay)
    c = _keepdims_to_groups(c_k, lay)
    sweep = _plan_sweep(lay.shape4, (w, b))
    if sweep is not None:
        return _backward_by_sweep(ctx, x4, dy4, dx, dx4, lay, w, b, mean, rstd, c, sweep, stream)
    nc, nthreads = _plan_threads(groups, n)
    has_w, has_b = ctx.weight is not None, ctx.bias is not None
    items = groups * nc
    # dweight/dbias sums are kept per chunk, so a chunk's adds land in the same slot whichever
    # thread runs it (deterministic); fewer, larger chunks keep those copies few
    nchunks = _chunks(items, nthreads, 4 if has_w or has_b else CHUNKS_PER_THREAD)
    dwacc, dw5 = _accumulator(w, nchunks, lay, has_w)
    dbacc, db5 = _accumulator(b, nchunks, lay, has_b)
    m = float(ctx.group_size - ctx.ddof)
    args = (x4, dy4, mean, rstd, c, w.view, has_w, dw5, has_w, db5, has_b, m, dx4, stream)
    _backward_job(groups, nc, nthreads, nchunks, args)
    dw = _param_grad(dwacc, w, lay, x, ctx.weight)
    db = _param_grad(dbacc, b, lay, x, ctx.bias)
    return dx, dw, db


def _backward_by_sweep(  # type: ignore[no-untyped-def]
    ctx, x4, dy4, dx, dx4, lay, w, b, mean, rstd, c, sweep, stream
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """`backward` for layouts that `_plan_sweep` accepts (per-group affine parameters):
    `sum g = w sum dy`, `sum g (x - mu) = w sum dy (x - mu)`, `dweight = r sum dy (x - mu)`,
    `dbias = sum dy`, all from per-item partials merged in a fixed order."""
    ka, ra, kb, rb = lay.shape4
    nc, nthreads = sweep
    psdy = np.empty(ka * nc * kb)
    psdyd = np.empty(ka * nc * kb)
    _run(_backward_sums_sweep, ka * nc, nthreads, (x4, dy4, mean, nc, psdy, psdyd))
    sdy = psdy.reshape(ka, nc, kb).sum(axis=1).reshape(-1)
    sdyd = psdyd.reshape(ka, nc, kb).sum(axis=1).reshape(-1)
    wg = _per_group(w)
    mg = wg * sdy / (ra * rb)
    beta = -c * rstd * rstd * (wg * sdyd) / (ctx.group_size - ctx.ddof)
    has_w = ctx.weight is not None
    args = (x4, dy4, mean, rstd, wg, has_w, mg, beta, nc)
    _run(_backward_sweep, ka * nc, nthreads, (*args, dx4, stream))
    calls["backward"] += 1
    calls["sweep"] += 1
    dw = _param_grad(_group_acc(rstd * sdyd, w, lay), w, lay, ctx.x, ctx.weight)
    db = _param_grad(_group_acc(sdy, b, lay), b, lay, ctx.x, ctx.bias)
    return dx, dw, db


def _plan_sweep(
    shape4: tuple[int, int, int, int], params: tuple[_Param, ...]
) -> tuple[int, int] | None:
    """(row chunks per ka block, threads) for the sweep kernels, or None where they do not
    apply: one run per group (nothing to gain over `_plan_threads`), or an affine parameter
    that varies inside a group."""
    ka, ra, kb, rb = shape4
    if ra < 2 or any(p.varies[1] or p.varies[3] for p in params):
        return None
    if ka * ra * kb * rb < PARALLEL_MIN_SIZE:
        return 1, 1
    nthreads = max(1, int(numba.config.NUMBA_NUM_THREADS))  # type: ignore[attr-defined]
    nc = max(1, min(-(-8 * nthreads // ka), ra))
    return nc, min(nthreads, ka * nc)


def _chunks_last(p: np.ndarray, ka: int, nc: int, kb: int) -> np.ndarray:
    """Sweep partials from [k0, chunk, k1] order to `_merge_kernel`'s [group, chunk]."""
    return np.ascontiguousarray(p.reshape(ka, nc, kb).transpose(0, 2, 1)).reshape(-1)


def _per_group(p: _Param) -> np.ndarray:
    """A per-group affine parameter as a flat float64 array in group order."""
    return np.ascontiguousarray(p.view[:, 0, :, 0]).reshape(-1)


def _group_acc(v: np.ndarray, p: _Param, lay: Layout) -> np.ndarray:
    """Per-group sums `v` as a `_param_grad` accumulator in `p`'s compact block shape."""
    t = v.reshape(lay.shape4[0], lay.shape4[2])
    if not p.varies[0]:
        t = t.sum(axis=0, keepdims=True)
    if not p.varies[2]:
        t = t.sum(axis=1, keepdims=True)
    return t.reshape(1, t.shape[0], 1, t.shape[1], 1)


class _CallPlan(NamedTuple):
    """How a C-contiguous input is viewed by the planned calls: plain reshapes, no copies."""

    shape4: tuple[int, int, int, int]
    stats: tuple[int, ...]  # (3, *shape of mean/var/rstd), groups in C order
    nc: int  # chunks per group on the pool (`_plan_threads`; 1: whole groups)
    threads: int
    counts: np.ndarray  # elements in each chunk of a group (the merge's weights)
    sweep: bool  # on the pool, `forward`'s and `backward`'s sweep kernels take it instead


@functools.lru_cache(maxsize=256)
def call_plan(shape: tuple[int, ...], axes: tuple[int, ...], itemsize: int) -> _CallPlan | None:
    """The block layout of a C-contiguous array of `shape` if its blocks are in axis order
    (whole tensor, trailing axes, batch-norm axes...), so that `reshape` gives the blocks
    and groups come out in C order of the kept axes; None otherwise. `sweep`: a batch-norm
    layout of `SWEEP_MIN_BYTES` or more, which the general path's sweep kernels run."""
    strides = tuple(math.prod(shape[i + 1 :]) for i in range(len(shape)))  # C order, in items
    lay = _plan(shape, strides, axes, ())
    if lay is None:
        return None
    big = [i for i in lay.perm if shape[i] > 1]
    if big != sorted(big):
        return None
    keepdims = tuple(1 if i in axes else s for i, s in enumerate(shape))
    ka, ra, kb, rb = lay.shape4
    n = ra * rb
    nc, nthreads = _plan_threads(ka * kb, n)
    large = math.prod(shape) * itemsize >= SWEEP_MIN_BYTES
    sweep = large and _plan_sweep(lay.shape4, ()) is not None
    return _CallPlan(lay.shape4, (3, *keepdims), nc, nthreads, _chunk_counts(n, nc), sweep)


def forward_planned(x, sp, eps, inside, m, stats, y, stream) -> None:  # type: ignore[no-untyped-def]
    """`_forward_small`'s job for a larger input, as one native job on the pool running
    `_forward_groups` (whole groups) or `_forward_split`, as `forward` would, without its
    layout work (a tenth of a 10^5-element call). `stream`: write `y` with streaming stores
    (an `out` or recycled memory that cannot stay in cache)."""
    groups = sp.shape4[0] * sp.shape4[2]
    x4, stats2, y4 = x.reshape(sp.shape4), stats.reshape(3, groups), y.reshape(sp.shape4)
    nchunks = _chunks(groups * sp.nc, sp.threads)
    pm = np.empty((2, groups * sp.nc)) if sp.nc > 1 else _NO_PARTS
    part = _part("forward", sp.nc > 1, x.itemsize)
    args = (part, nchunks, x4, y4, stats2, sp.counts, pm, eps, inside, m, stream)
    run_native(_forward_native, sp.threads, args)
    calls["forward"] += 1
    calls["native"] += 1


def backward_planned(
    ctx: Any, dy: np.ndarray, c_k: np.ndarray, single: bool, out: np.ndarray | None
) -> np.ndarray | None:
    """`dx` for a context from a C-contiguous aligned input without affine parameters, a
    C-contiguous aligned float32/float64 `dy` (and a C-contiguous aligned checked `out`, if
    any): one single-threaded `_backward_small` call if `single`, else (with `dy` of `x`'s
    dtype, not a sweep layout) one native job running `_backward_groups` or
    `_backward_split`, as `backward` would; None where they do not apply."""
    x = ctx.x
    sp = call_plan(x.shape, ctx.axes, x.itemsize)
    if sp is None or (sp.sweep and not single):
        return None
    if not (x.flags.c_contiguous and dy.flags.c_contiguous):
        return None
    if not (x.flags.aligned and dy.flags.aligned):  # (native jobs view aligned memory)
        return None
    if out is not None and not (out.flags.c_contiguous and out.flags.aligned):
        return None
    if dy.dtype.char not in "fd" or not dy.dtype.isnative or ctx.mean.shape != sp.stats[1:]:
        return None
    if out is None:
        dx, stream = new_output(sp.shape4, ctx.dtype)
    else:
        dx, stream = out.reshape(sp.shape4), streams(out)
    m = float(ctx.group_size - ctx.ddof)
    x4, dy4 = x.reshape(sp.shape4), dy.reshape(sp.shape4)
    mean, rstd, c = ctx.mean.reshape(-1), ctx.rstd.reshape(-1), c_k.reshape(-1)
    if single:
        _backward_small(x4, dy4, mean, rstd, c, m, dx)
        calls["backward_small"] += 1
        return dx.reshape(x.shape) if out is None else out
    if dy.dtype != x.dtype:
        return None  # the blocked kernels (native jobs are compiled for one dtype)
    nchunks = _chunks(mean.size * sp.nc, sp.threads)
    ps = np.empty((2, mean.size * sp.nc)) if sp.nc > 1 else _NO_PARTS
    mean, rstd, c = (np.ascontiguousarray(v) for v in (mean, rstd, c))  # addresses travel
    part = _part("backward", sp.nc > 1, x.itemsize)
    args = (part, nchunks, sp.nc, x4, dy4, dx, mean, rstd, c, ps, m, stream)
    run_native(_backward_native, sp.threads, args)
    calls["backward"] += 1
    calls["native"] += 1
    return dx.reshape(x.shape) if out is None else out


def _accumulator(p: _Param, nchunks: int, lay: Layout, used: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per-chunk float64 sums in the parameter's compact block shape, and their 5-d view."""
    if not used:  # never written (need_dw / need_db is False)
        return _ZERO, _repeat(_ZERO, (nchunks, *lay.shape4))
    compact = tuple(s if v else 1 for s, v in zip(lay.shape4, p.varies, strict=True))
    acc = np.zeros((nchunks, *compact))
    strides = tuple(st if v else 0 for st, v in zip(acc.strides[1:], p.varies, strict=True))
    view = np.ndarray(
        (nchunks, *lay.shape4), np.float64, buffer=acc, strides=(acc.strides[0], *strides)
    )
    return acc, view


def _param_grad(
    acc: np.ndarray, p: _Param, lay: Layout, x: np.ndarray, like: Any
) -> np.ndarray | None:
    """Sum the per-thread accumulators and give them the parameter's own shape and dtype."""
    if like is None:
        return None
    axes = [i for blk, v in zip(lay.blocks, p.varies, strict=True) if v for i in blk]
    total = acc.sum(axis=0).reshape([x.shape[i] for i in axes]).transpose(np.argsort(axes))
    dtype = like.dtype if np.issubdtype(like.dtype, np.floating) else np.float64
    return total.reshape(like.shape).astype(dtype)
