"""Shared checks of the kernel tests: run a call down one path and compare with the generic
path within a few ulp of the right scale."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np

import normgrad as ng
from normgrad import testing


def close(a, b, ulps: float, scale: float = 0.0) -> None:
    """max|a - b| <= ulps * ulp(max(|b|, scale)), in b's dtype: "a few ulp" of the result's
    scale (or of its terms' scale, when they cancel)."""
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape and a.dtype == b.dtype
    scale = np.spacing(b.dtype.type(max(np.max(np.abs(b)), scale)))
    err = np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))
    assert err <= ulps * scale, f"max error {err} > {ulps} ulp ({ulps * scale})"


def y_scale(ctx) -> float:
    """Bound on the terms of y = (x - mu) rstd w + b: `x - mu` rounds relative to |mu|."""
    w = 1.0 if ctx.weight is None else np.asarray(ctx.weight, dtype=np.float64)
    return float(np.max(np.abs(ctx.mean * ctx.rstd * w)))


def dx_scale(ctx, dy) -> float:
    """Bound on the terms of dx = r (g - mean g) - (c/m) xhat sum(g xhat): what its rounding
    is relative to (|xhat| <= sqrt(m), so the second term is at most r max|g| max xhat^2)."""
    w = 1.0 if ctx.weight is None else np.asarray(ctx.weight, dtype=np.float64)
    rg = np.max(np.abs(ctx.rstd * w * np.asarray(dy, dtype=np.float64)))
    xhat = (np.asarray(ctx.x, dtype=np.float64) - ctx.mean) * ctx.rstd
    return float(rg * (1 + np.max(xhat**2)))


@contextmanager
def kernel_path(path):
    """The kernels at every size, choosing among them as "auto" would ("small": small inputs
    on the single-call kernels), with the single-call kernels off ("planned": C-contiguous
    inputs without affine parameters on native jobs, others blocked), or the blocked
    kernels ("blocked") or the sweep's ("sweep") for every call they take."""
    if path in ("blocked", "sweep"):
        with ng.use_kernels(path):
            yield
    elif path == "planned":
        with ng.use_kernels(True), testing.settings(small_max_size=0):
            yield
    else:
        with ng.use_kernels(True):
            yield


def both(x, axes, dy=None, path="small", **kw):
    """(kernel results, generic results) for forward and backward, checking a kernel ran."""
    with kernel_path(path), testing.record_paths() as seen:
        yk, ck = ng.normalize_forward(x, axes, **kw)
        gk = ng.normalize_backward(ck, dy) if dy is not None else None
    assert seen and seen[0][1] != "generic", f"no kernel ran: {seen}"
    if path != "small":
        assert seen[0][1] != "small", seen
    with ng.use_kernels(False):
        yr, cr = ng.normalize_forward(x, axes, **kw)
        gr = ng.normalize_backward(cr, dy) if dy is not None else None
    return (yk, ck, gk), (yr, cr, gr)


def check(x, axes, dy, ulps=4, path="small", param_ulps=64, **kw):
    (yk, ck, gk), (yr, cr, gr) = both(x, axes, dy, path, **kw)
    close(yk, yr, ulps, y_scale(cr))
    for name in ("mean", "var", "rstd"):
        k, r = getattr(ck, name), getattr(cr, name)
        assert k.shape == r.shape and k.dtype == r.dtype == np.float64, name
        np.testing.assert_allclose(k, r, rtol=1e-12, atol=1e-14 * np.max(np.abs(r)))
    assert ck.axes == cr.axes and ck.group_size == cr.group_size and ck.dtype == cr.dtype
    close(gk.x, gr.x, 4 * ulps, dx_scale(cr, dy))
    for k, r in ((gk.weight, gr.weight), (gk.bias, gr.bias)):
        assert (k is None) == (r is None)
        if r is not None:
            assert k.shape == r.shape and k.dtype == r.dtype
            close(k, r, param_ulps)  # sums over many elements, in a different order
