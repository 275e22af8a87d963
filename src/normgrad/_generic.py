"""The generic path: the op and its derivatives in Array-API calls, for any array library.

Notation (docs/derivation.md): within one group of `n` elements, `m = n - ddof`,

    mu = mean(x)      d = x - mu      var = sum(d**2) / m      xhat = d * rstd
    y = xhat * weight + bias          rstd, c: `_formulas.rstd`, `variance_coefficient`

The Jacobian of xhat inside a group is symmetric, `J = rstd (I - 1 1^T / n) - (c / m) xhat
xhat^T`, so the VJP and the JVP are the same operator, `apply_jacobian`, whose formula is
`_formulas.gradient` with `_formulas.backward_coefficients`, as in the kernels.

RMS normalization (`center=False`): mu = 0 (saved as zeros), var = sum(x**2) / n, and the
mean path drops out: `J = rstd I - (c / n) xhat xhat^T`.

A mask `M` (`mask=`, `nan_policy="omit"`): the statistics are taken over the counted
elements (`n = sum(M)` per group, saved as `ctx.count`), every element is normalized by them,
and `J = rstd (I - 1 M^T / n) - (c / m) xhat (M xhat)^T` is no longer symmetric: the VJP
(`apply_jacobian(..., vjp=True)`) and the JVP differ (docs/derivation.md, "Masks").
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import array_api_compat as aac
import numpy as np

from ._formulas import backward_coefficients, gradient, masked_gradient, rstd, xhat
from ._validate import Spec

Array = Any


def compute_dtype(xp: Any, x: Array) -> Any:
    """float64 where it is cheap and available (CPU libraries), else the input's float dtype."""
    if x.dtype == xp.float64:
        return xp.float64
    if aac.is_jax_namespace(xp):
        import jax

        if not jax.config.read("jax_enable_x64"):
            return xp.float32
    elif aac.is_torch_namespace(xp):
        if x.device.type != "cpu":  # not str(device): torch.compile cannot trace it
            return xp.float32 if x.dtype.itemsize < 4 else x.dtype  # (float16, bfloat16)
    elif aac.is_cupy_namespace(xp):
        return xp.float32 if x.dtype == xp.float16 else x.dtype
    return xp.float64


def statistics(x: Array, spec: Spec) -> tuple[Array, Array, Array, Array]:
    """`(x in the compute dtype, mean, var, rstd)`, keepdims."""
    xp, ax = spec.xp, spec.axes
    xc = xp.astype(x, compute_dtype(xp, x))
    # The mean of x - shift, shift = each group's first element: a constant group gets its
    # constant back exactly (mean(0.1, 0.1, 0.1) is not 0.1), hence exactly zero variance.
    # The fused kernels do the same. Then the second pass: stable two-pass variance.
    if spec.center:
        shift = xc[tuple(slice(0, 1) if i in ax else slice(None) for i in range(x.ndim))]
        mean = shift + xp.mean(xc - shift, axis=ax, keepdims=True)
        d = xc - mean
        var = xp.sum(d * d, axis=ax, keepdims=True) / spec.m
    else:  # RMS: no mean (a saved zero, so that d = x - mean = x everywhere below)
        var = xp.sum(xc * xc, axis=ax, keepdims=True) / spec.m
        mean = xp.zeros_like(var)
    with _quiet(spec):
        r = rstd(xp, var, spec.eps, spec.inside)
    return xc, mean, var, r


def masked_moments(xp: Any, xc: Array, mask: Array, ax: tuple[int, ...]) -> tuple[Array, ...]:
    """`(count, mean, M2)` of the counted elements (`mask`, x's shape) of each group,
    keepdims: two passes (the mean, then the mean of what is left: its rounding), then the
    squared deviations; a group without any has NaN mean."""
    zero = xp.zeros_like(xc)
    count = xp.sum(xp.astype(mask, xc.dtype), axis=ax, keepdims=True)
    some = count > 0
    per = xp.where(some, count, xp.ones_like(count))
    mean = xp.sum(xp.where(mask, xc, zero), axis=ax, keepdims=True) / per
    mean = mean + xp.sum(xp.where(mask, xc - mean, zero), axis=ax, keepdims=True) / per
    mean = xp.where(some, mean, xp.full_like(mean, float("nan")))
    d = xc - mean
    return count, mean, xp.sum(xp.where(mask, d * d, zero), axis=ax, keepdims=True)


def masked_statistics(x: Array, spec: Spec, mask: Array) -> tuple[Array, ...]:
    """`(x in the compute dtype, mean, var, rstd, count)` over the counted elements (`mask`,
    x's shape), keepdims; NaN statistics for a group with no more than ddof of them."""
    xp, ax = spec.xp, spec.axes
    xc = xp.astype(x, compute_dtype(xp, x))
    if spec.center:
        count, mean, ss = masked_moments(xp, xc, mask, ax)
    else:  # RMS: the mean square of the counted elements
        count = xp.sum(xp.astype(mask, xc.dtype), axis=ax, keepdims=True)
        ss = xp.sum(xp.where(mask, xc * xc, xp.zeros_like(xc)), axis=ax, keepdims=True)
        mean = xp.zeros_like(ss)
    dof = count - spec.ddof
    enough = dof > 0
    var = xp.where(
        enough, ss / xp.where(enough, dof, xp.ones_like(dof)), xp.full_like(ss, float("nan"))
    )
    with _quiet(spec):
        r = rstd(xp, var, spec.eps, spec.inside)
    return xc, mean, var, r, count


def masked_forward(x: Array, spec: Spec, mask: Array, params: Any, out: Any) -> tuple[Array, ...]:
    """`(y, mean, var, rstd, count)`: every element normalized by its group's statistics
    over the counted elements."""
    xp = spec.xp
    xc, mean, var, r, count = masked_statistics(x, spec, mask)
    with _quiet(spec):
        y = affine(xp, xhat(xc, mean, r), params[0], params[1], mean.dtype)
    return fill(to_dtype(xp, y, spec.dtype), out), mean, var, r, count


def sizes(xp: Any, ctx: Any) -> tuple[Any, Any]:
    """`(n, m)`: the group size and `n - ddof` (per group, keepdims, with a mask; a count
    of zero or below ddof becomes 1: its statistics, hence every result, are NaN anyway)."""
    if ctx.count is None:
        return ctx.group_size, ctx.group_size - ctx.ddof
    m = ctx.count - ctx.ddof
    one = xp.ones_like(m)
    return xp.where(ctx.count > 0, ctx.count, one), xp.where(m > 0, m, one)


def live(xp: Any, ctx: Any, a: Array) -> Array:
    """`a` where an element enters the backward's sums, 0 elsewhere: a counted element, or
    an uncounted one with a finite x (an uncounted NaN or Inf, e.g. padding or
    nan_policy='omit', has a non-finite y whose cotangent reaches only its own dx)."""
    if ctx.mask is None:
        return a
    keep = xp.logical_or(ctx.mask, xp.isfinite(ctx.x))  # (x's dtype: no cast copy)
    return xp.where(keep, a, xp.zeros_like(a))


def _counted(xp: Any, ctx: Any, a: Array) -> Array:
    """`a` at the counted elements, 0 elsewhere (no mask: `a`)."""
    return a if ctx.mask is None else xp.where(ctx.mask, a, xp.zeros_like(a))


def _quiet(spec: Spec) -> Any:
    """eps = 0 with a zero variance is refused right after any path: no NumPy warning about
    its division by zero before that."""
    if spec.eps == 0:
        return np.errstate(divide="ignore", invalid="ignore")
    return contextlib.nullcontext()


def forward(x: Array, spec: Spec, w: Any, b: Any, plan: Any, out: Any) -> tuple[Array, ...]:
    """`(y, mean, var, rstd)` in Array-API calls."""
    xp = spec.xp
    xc, mean, var, r = statistics(x, spec)
    with _quiet(spec):
        y = affine(xp, xhat(xc, mean, r), w, b, mean.dtype)
    return fill(to_dtype(xp, y, spec.dtype), out), mean, var, r


def backward(ctx: Any, dy: Array, c: Array, plan: Any, out: Any) -> tuple[Array, Any, Any]:
    """`(dx, dweight, dbias)` in Array-API calls."""
    xp = ctx.xp
    dyc = cast(xp, dy, ctx)
    d = centered(xp, ctx)
    g = dyc if ctx.weight is None else dyc * cast(xp, ctx.weight, ctx)
    dx = apply_jacobian(xp, ctx, d, c, g, vjp=True)
    dw = (
        None
        if ctx.weight is None
        else unbroadcast(xp, live(xp, ctx, dyc * (d * ctx.rstd)), ctx.weight)
    )
    db = None if ctx.bias is None else unbroadcast(xp, dyc, ctx.bias)
    return fill(to_dtype(xp, dx, ctx.dtype), out), dw, db


def apply_jacobian(xp: Any, ctx: Any, d: Array, c: Array, v: Array, *, vjp: bool = False) -> Array:
    """`J v` (`vjp=False`: the forward derivative along `v`) or `J^T v` (`vjp=True`: the
    backward of `v` as dy) for the Jacobian of xhat (`d = x - mu`), the same operator
    without a mask (it is symmetric); `r v` for given statistics (constants)."""
    if ctx.fixed:
        return ctx.rstd * v
    n, m = sizes(xp, ctx)
    # with a mask, J's columns of uncounted elements hold only r: J v sums counted v only
    vs = v if vjp else _counted(xp, ctx, v)
    sum_vd = xp.sum(live(xp, ctx, vs * d), axis=ctx.axes, keepdims=True)
    # RMS (center=False): no mean path, i.e. sum(v) enters as 0
    sum_v = xp.sum(vs, axis=ctx.axes, keepdims=True) if ctx.center else xp.zeros_like(sum_vd)
    mean_v, beta = backward_coefficients(sum_v, sum_vd, n, m, ctx.rstd, c)
    if vjp and ctx.mask is not None:
        return masked_gradient(xp, v, d, ctx.rstd, mean_v, beta, ctx.mask)
    return gradient(v, d, ctx.rstd, mean_v, beta)


def tangent_affine(xp: Any, ctx: Any, t: Array, xh: Array, tparams: tuple[Any, Any]) -> Array:
    """The affine map's part of a forward derivative: `t w + xhat tw + tb` from `t = J tx`."""
    tw, tb = tparams
    if ctx.weight is not None:
        t = t * cast(xp, ctx.weight, ctx)
    if tw is not None:
        t = t + xh * cast(xp, tw, ctx)
    if tb is not None:
        t = t + cast(xp, tb, ctx)
    return t


def backward_jvp(xp: Any, ctx: Any, seeds: tuple[Array, ...]) -> tuple[Array, ...]:
    """`(dx, dweight, dbias, t dx, t dweight, t dbias)` for `seeds = (dy, tx, tdy, tweight)`
    in the compute dtype (`tweight` may be None); the formulas of
    `normalize_backward_jvp`'s docstring (with a mask: the statistics' part of `t dx` at
    the counted elements only, `B` over them, as docs/derivation.md derives)."""
    dyc, txc, tdyc, tw = seeds
    axes, r = ctx.axes, ctx.rstd
    n, m = sizes(xp, ctx)
    d = centered(xp, ctx)
    xh, c = d * r, variance_coefficient(xp, ctx)
    w = None if ctx.weight is None else cast(xp, ctx.weight, ctx)
    g = dyc if w is None else dyc * w
    tg = tdyc if w is None else tdyc * w
    if tw is not None:
        tg = tg + dyc * tw
    mean_g = _group_mean(xp, ctx, g, n)
    a = xp.sum(live(xp, ctx, g * xh), axis=axes, keepdims=True)
    tx0 = txc - _group_mean(xp, ctx, _counted(xp, ctx, txc), n)
    b = xp.sum(_counted(xp, ctx, xh * tx0), axis=axes, keepdims=True)
    tr = -r * c * b / m
    tc = -(c**3) * b / (m * r)
    if ctx.fixed:  # given statistics: no path through them (nor through A: c is 0)
        tr, tc, c = 0.0 * b, 0.0 * b, 0.0 * c
    txh = apply_jacobian(xp, ctx, d, c, txc)
    ta = xp.sum(live(xp, ctx, tg * xh + g * txh), axis=axes, keepdims=True)
    dx = apply_jacobian(xp, ctx, d, c, g, vjp=True)
    mean_tg = _group_mean(xp, ctx, tg, n)
    if ctx.mask is None:
        tdx = tr * (g - mean_g) + r * (tg - mean_tg) - (tc * xh * a + c * txh * a + c * xh * ta) / m
    else:
        stat = tr * mean_g + r * mean_tg + (tc * xh * a + c * txh * a + c * xh * ta) / m
        tdx = tr * g + r * tg - _counted(xp, ctx, stat)
    dw = tdw = db = tdb = None
    if w is not None:
        dw = unbroadcast(xp, live(xp, ctx, dyc * xh), ctx.weight)
        tdw = unbroadcast(xp, live(xp, ctx, tdyc * xh + dyc * txh), ctx.weight)
    if ctx.bias is not None:
        db = unbroadcast(xp, dyc, ctx.bias)
        tdb = unbroadcast(xp, tdyc, ctx.bias)
    return to_dtype(xp, dx, ctx.dtype), dw, db, to_dtype(xp, tdx, ctx.dtype), tdw, tdb


def _group_mean(xp: Any, ctx: Any, v: Array, n: Any) -> Any:
    """The mean path's `sum(v) / n` per group; 0 for RMS (center=False) and for given
    statistics, which have none."""
    return xp.sum(v, axis=ctx.axes, keepdims=True) / n if ctx.center and not ctx.fixed else 0.0


def dense_jacobian(xp: Any, ctx: Any, c: Array) -> Array:
    """`dy/dx` with shape `y.shape + x.shape`: per group
    `w_i [r (delta_ij - 1/n) - (c/m) xhat_i xhat_j]`, zero blocks between groups."""
    xh = centered(xp, ctx) * ctx.rstd
    w = xp.ones_like(xh) if ctx.weight is None else xh * 0 + cast(xp, ctx.weight, ctx)
    shape = tuple(xh.shape)
    kept = [i for i in range(len(shape)) if i not in ctx.axes]
    perm = kept + list(ctx.axes)
    groups = math.prod(shape[i] for i in kept)
    n = ctx.group_size

    def grouped(a: Array) -> Array:  # (groups, n), groups in kept-axes order
        a = xp.broadcast_to(a, shape)
        return xp.reshape(xp.permute_dims(a, tuple(perm)), (groups, n))

    xg, wg = grouped(xh), grouped(w)
    r, cg = grouped(ctx.rstd)[:, :1], grouped(c)[:, :1]
    eye_n = xp.eye(n, dtype=xh.dtype, device=aac.device(xh))
    count, m = sizes(xp, ctx)
    if ctx.mask is not None:  # columns of uncounted elements: only r on the diagonal
        count, m = grouped(count)[:, :1], grouped(m)[:, :1]
        mg = xp.astype(grouped(ctx.mask), xh.dtype)
        cols = xp.where(grouped(ctx.mask), xg, xp.zeros_like(xg))
    else:
        mg, cols = xp.ones_like(xg), xg
    centering = mg / count if ctx.center else 0.0 * mg
    blocks = r[:, :, None] * (eye_n - centering[:, None, :]) - (cg / m)[:, :, None] * (
        xg[:, :, None] * cols[:, None, :]
    )
    blocks = wg[:, :, None] * blocks
    eye_g = xp.eye(groups, dtype=xh.dtype, device=aac.device(xh))
    full = blocks[:, :, None, :] * eye_g[:, None, :, None]  # (groups, n, groups, n)
    pshape = tuple(shape[i] for i in perm)
    full = xp.reshape(full, pshape + pshape)
    inv = [perm.index(i) for i in range(len(shape))]
    full = xp.permute_dims(full, tuple(inv + [len(shape) + i for i in inv]))
    return to_dtype(xp, full, ctx.dtype)


def centered(xp: Any, ctx: Any) -> Array:
    """`x - mu` in the compute dtype, from x and the saved mean."""
    return cast(xp, ctx.x, ctx) - ctx.mean


def variance_coefficient(xp: Any, ctx: Any) -> Array:
    """The variance path's coefficient c (keepdims): rstd (eps inside) or 1/std (outside)."""
    if ctx.eps_mode == "inside":
        return ctx.rstd
    std = xp.sqrt(ctx.var)
    # d(sqrt(var))/dvar is infinite at var == 0, but there xhat == 0 and the term vanishes.
    safe = xp.where(std > 0, std, xp.ones_like(std))
    return xp.where(std > 0, 1.0 / safe, xp.zeros_like(std))


def affine(xp: Any, xh: Array, w: Any, b: Any, dtype: Any) -> Array:
    """`xhat * weight + bias` (either may be absent), parameters cast to `dtype`."""
    y = xh
    if w is not None:
        y = y * xp.astype(w, dtype)
    if b is not None:
        y = y + xp.astype(b, dtype)
    return y


def cast(xp: Any, a: Array, ctx: Any) -> Array:
    """`a` in the context's compute dtype (that of its statistics)."""
    return xp.astype(a, ctx.mean.dtype)


def to_dtype(xp: Any, a: Array, dtype: Any) -> Array:
    return a if a.dtype == dtype else xp.astype(a, dtype)


def unbroadcast(xp: Any, a: Array, like: Array) -> Array:
    """Sum `a` over the axes along which `like` was broadcast; return `like`'s shape and dtype."""
    shape = tuple(like.shape)
    lead = a.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(
        lead + i for i, s in enumerate(shape) if s == 1 and a.shape[lead + i] != 1
    )
    if axes:
        a = xp.sum(a, axis=axes, keepdims=True)
    a = xp.reshape(a, shape)
    dtype = like.dtype if xp.isdtype(like.dtype, "real floating") else a.dtype
    return xp.astype(a, dtype)


def fill(result: Array, out: Array | None) -> Array:
    if out is None:
        return result
    out[...] = result
    return out
