"""Mean-variance normalization and its exact derivatives, written once for any Array-API array.

Notation (see docs/derivation.md): within one group of `n` elements,

    mu = mean(x)          d = x - mu           var = sum(d**2) / m,   m = n - ddof
    inside:  rstd = 1 / sqrt(var + eps)        c = rstd
    outside: rstd = 1 / (sqrt(var) + eps)      c = 1 / sqrt(var)     (0 where var == 0)
    xhat = d * rstd                            y = xhat * weight + bias

The Jacobian of xhat inside a group is symmetric,

    J = rstd * (I - 1 1^T / n) - (c / m) * xhat xhat^T,

so the VJP and the JVP are the same operator: `_apply_jacobian` below, used by both.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, NamedTuple

import array_api_compat as aac
import numpy as np

from . import _recycle
from ._axes import Axes, normalize_axes
from ._errors import NormgradError

Array = Any

EPS_MODES = ("inside", "outside")
JACOBIAN_MAX_SIZE = 4096


@dataclass(frozen=True, eq=False)
class NormContext:
    """What `normalize_backward` needs: references to the inputs and per-group statistics.

    `mean`, `var` and `rstd` have keepdims shape (size 1 along the reduced axes) and the
    compute dtype (float64 for float16/float32 input on CPU libraries). Nothing N-sized is
    stored besides the reference to `x`.
    """

    x: Array
    axes: tuple[int, ...]
    mean: Array
    var: Array
    rstd: Array
    eps: float
    eps_mode: str
    ddof: float
    weight: Array | None
    bias: Array | None
    group_size: int
    dtype: Any  # dtype of y (and of dx)

    @property
    def xp(self) -> Any:
        return _namespace(self.x)


def _numpy_context(
    x: Array,
    axes: tuple[int, ...],
    mean: Array,
    var: Array,
    rstd: Array,
    eps: float,
    eps_mode: str,
    ddof: float,
    n: int,
) -> NormContext:
    """`NormContext(x, axes, mean, var, rstd, eps, eps_mode, ddof, None, None, n, x.dtype)`
    for a NumPy float input, at a third of the frozen dataclass `__init__`'s cost (about
    1 us, which matters for small inputs). tests/test_kernels.py checks the fields match."""
    ctx = object.__new__(NormContext)
    object.__setattr__(ctx, "__dict__", {
        "x": x, "axes": axes, "mean": mean, "var": var, "rstd": rstd, "eps": eps,
        "eps_mode": eps_mode, "ddof": ddof, "weight": None, "bias": None, "group_size": n,
        "dtype": x.dtype,
    })  # fmt: skip
    return ctx


class Gradients(NamedTuple):
    """Result of `normalize_backward`: gradients w.r.t. `x`, `weight`, `bias` (None if absent)."""

    x: Array
    weight: Array | None
    bias: Array | None


class BackwardTangents(NamedTuple):
    """Result of `normalize_backward_jvp`: the backward's outputs and their tangents."""

    x: Array
    weight: Array | None
    bias: Array | None
    tx: Array
    tweight: Array | None
    tbias: Array | None


# ---------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------


def normalize(
    x: Array,
    axes: Axes = None,
    *,
    eps: float = 1e-5,
    eps_mode: str = "inside",
    ddof: float = 0,
    weight: Array | None = None,
    bias: Array | None = None,
    out: Array | None = None,
) -> Array:
    r"""Normalize `x` by the mean and variance of each group of elements along `axes`.

    $$ y = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} \cdot w + b $$

    with $\mu$ and $\sigma^2 = \frac{1}{n - \mathrm{ddof}}\sum (x-\mu)^2$ taken over `axes`
    (all axes when `axes=None`, as the whole-matrix normalization of the original problem).
    `eps_mode="outside"` uses $(x-\mu)/(\sigma + \epsilon)$ instead.

    `weight` and `bias` broadcast against `y` (shape of the kept axes, of the reduced axes, or
    any shape that broadcasts to `x.shape`). The result has the input's array type and dtype
    (integers become float64). NaN or Inf in `x` make only the groups that hold them NaN.
    Deviations whose squares overflow float64 (|x - mean| above about 1e154) give an
    infinite variance and so y = 0 (or `bias`) in that group: rescale such data first.

    `out`: optional preallocated result (same library, shape and result dtype as `y`, not
    overlapping `x`); it is filled and returned, which saves an allocation per call.
    NumPy float32/float64 inputs run on fused multi-threaded kernels (see `use_kernels`).
    """
    return normalize_forward(
        x, axes, eps=eps, eps_mode=eps_mode, ddof=ddof, weight=weight, bias=bias, out=out
    )[0]


def normalize_forward(
    x: Array,
    axes: Axes = None,
    *,
    eps: float = 1e-5,
    eps_mode: str = "inside",
    ddof: float = 0,
    weight: Array | None = None,
    bias: Array | None = None,
    out: Array | None = None,
) -> tuple[Array, NormContext]:
    """Like `normalize`, and also return the context that `normalize_backward` needs."""
    if type(x) is np.ndarray and weight is None and bias is None:
        res = _planned_forward(x, axes, eps, eps_mode, ddof, out)
        if res is not None:
            return res
    xp, ax, n, w, b, out_dtype = _validate(x, axes, eps, eps_mode, ddof, weight, bias)
    _check_out(xp, out, x, out_dtype, "out", x)
    kernels, _, blocked = _kernels_for(x, False)
    if blocked:

        def finish(var: Array) -> Array:
            if eps == 0:
                _refuse_zero_variance(xp, var, x, ax)
            return _rstd(xp, var, eps, eps_mode)

        inside = eps_mode == "inside"
        res = kernels.forward(x, ax, ddof, float(eps), inside, finish, w, b, out_dtype, out)
        if res is not None:
            y, mean, var, rstd = res
            ctx = NormContext(
                x, ax, mean, var, rstd, float(eps), eps_mode, ddof, w, b, n, out_dtype
            )
            return y, ctx
    xc, ctx = _statistics(xp, x, ax, n, eps, eps_mode, ddof, w, b, out_dtype)
    xhat = (xc - ctx.mean) * ctx.rstd
    return _fill(_to_out(xp, _affine(xp, ctx, xhat), ctx), out), ctx


def normalize_backward(ctx: NormContext, dy: Array, *, out: Array | None = None) -> Gradients:
    r"""Exact vector-Jacobian product of `normalize`: gradients of $\sum dy \cdot y$.

    $$ dx = r\,(g - \bar g) - \frac{c}{m}\,\hat x \sum g\,\hat x, \qquad g = dy \cdot w $$

    with $r$ = `ctx.rstd`, $c = r$ (eps inside) or $1/\sigma$ (eps outside), $m = n - ddof$,
    sums and means over each group. `dweight` and `dbias` are $\sum dy\,\hat x$ and
    $\sum dy$ over the axes that `weight` and `bias` broadcast along.

    `out`: optional preallocated `dx` (same rules as `normalize`'s `out`, not overlapping
    `x` or `dy`).
    """
    xp = ctx.xp
    dy = _check_cotangent_shape(xp, ctx, dy, "dy")
    _check_out(xp, out, ctx.x, ctx.dtype, "out", ctx.x, dy)
    no_affine = ctx.weight is None and ctx.bias is None
    kernels, small, blocked = _kernels_for(ctx.x, no_affine)
    if kernels is not None and _is_numpy(dy):
        c = _coef(xp, ctx)
        if no_affine:  # (`kernels` is set only where small or blocked holds)
            dx = kernels.backward_planned(ctx, dy, c, small, out)
            if dx is not None:
                return Gradients(dx, None, None)
        if blocked:
            res = kernels.backward(ctx, dy, c, ctx.dtype, out)
            if res is not None:
                return Gradients(*res)
    dyc = _cast(xp, dy, ctx)
    xhat, c = _xhat_and_c(xp, ctx)
    g = dyc if ctx.weight is None else dyc * _cast(xp, ctx.weight, ctx)
    dx = _apply_jacobian(xp, ctx, xhat, c, g)
    dw = None if ctx.weight is None else _unbroadcast(xp, dyc * xhat, ctx.weight)
    db = None if ctx.bias is None else _unbroadcast(xp, dyc, ctx.bias)
    return Gradients(_fill(_to_out(xp, dx, ctx), out), dw, db)


def normalize_jvp(
    x: Array,
    tx: Array,
    axes: Axes = None,
    *,
    eps: float = 1e-5,
    eps_mode: str = "inside",
    ddof: float = 0,
    weight: Array | None = None,
    bias: Array | None = None,
    tweight: Array | None = None,
    tbias: Array | None = None,
) -> tuple[Array, Array]:
    r"""Forward-mode derivative: return `(y, ty)` with $ty = J_x\,tx + \hat x\,tw + tb$.

    $$ t\hat x = r\,(tx - \overline{tx}) - \frac{c}{m}\,\hat x \sum \hat x\,tx $$
    """
    # y from normalize_forward itself: the same path (kernels or not), so the same bits
    y, ctx = normalize_forward(
        x, axes, eps=eps, eps_mode=eps_mode, ddof=ddof, weight=weight, bias=bias
    )
    xp = ctx.xp
    txc = _check_cotangent(xp, ctx, tx, "tx")
    xhat, c = _xhat_and_c(xp, ctx)
    ty = _apply_jacobian(xp, ctx, xhat, c, txc)
    if ctx.weight is not None:
        ty = ty * _cast(xp, ctx.weight, ctx)
    if tweight is not None:
        ty = ty + xhat * _cast(xp, _param(xp, tweight, "tweight", x, xhat), ctx)
    if tbias is not None:
        ty = ty + _cast(xp, _param(xp, tbias, "tbias", x, xhat), ctx)
    return y, _to_out(xp, ty, ctx)


def normalize_jacobian(
    x: Array,
    axes: Axes = None,
    *,
    eps: float = 1e-5,
    eps_mode: str = "inside",
    ddof: float = 0,
    weight: Array | None = None,
    bias: Array | None = None,
    max_size: int = JACOBIAN_MAX_SIZE,
) -> Array:
    r"""Dense Jacobian $\partial y / \partial x$ with shape `y.shape + x.shape`.

    Within a group, $J_{ij} = w_i\,[\,r(\delta_{ij} - 1/n) - \frac{c}{m}\hat x_i \hat x_j\,]$;
    elements of different groups do not interact (zero blocks). It holds `x.size**2`
    numbers, so inputs above `max_size` elements are refused.
    """
    size = _size(x)
    if size is not None and size > max_size:
        raise NormgradError(
            f"normalize_jacobian builds a dense {size}x{size} matrix for x of shape "
            f"{tuple(x.shape)} ({size} elements > max_size={max_size}); use normalize_backward "
            "or normalize_jvp for products with the Jacobian, or pass a larger max_size."
        )
    xp, _, ctx = _prepare(x, axes, eps, eps_mode, ddof, weight, bias)
    xhat, c = _xhat_and_c(xp, ctx)
    w = xp.ones_like(xhat) if ctx.weight is None else xhat * 0 + _cast(xp, ctx.weight, ctx)
    shape = tuple(xhat.shape)
    kept = [i for i in range(len(shape)) if i not in ctx.axes]
    perm = kept + list(ctx.axes)
    groups = math.prod(shape[i] for i in kept)
    n = ctx.group_size

    def grouped(a: Array) -> Array:  # (groups, n), groups in kept-axes order
        a = xp.broadcast_to(a, shape)
        return xp.reshape(xp.permute_dims(a, tuple(perm)), (groups, n))

    xh, wg = grouped(xhat), grouped(w)
    r, cg = grouped(ctx.rstd)[:, :1], grouped(c)[:, :1]
    eye_n = xp.eye(n, dtype=xhat.dtype, device=aac.device(xhat))
    blocks = r[:, :, None] * (eye_n - 1.0 / n) - (cg / _m(ctx))[:, :, None] * (
        xh[:, :, None] * xh[:, None, :]
    )
    blocks = wg[:, :, None] * blocks
    eye_g = xp.eye(groups, dtype=xhat.dtype, device=aac.device(xhat))
    full = blocks[:, :, None, :] * eye_g[:, None, :, None]  # (groups, n, groups, n)
    pshape = tuple(shape[i] for i in perm)
    full = xp.reshape(full, pshape + pshape)
    inv = [perm.index(i) for i in range(len(shape))]
    full = xp.permute_dims(full, tuple(inv + [len(shape) + i for i in inv]))
    return _to_out(xp, full, ctx)


def normalize_backward_jvp(
    ctx: NormContext,
    dy: Array,
    tx: Array | None = None,
    tdy: Array | None = None,
    tweight: Array | None = None,
) -> BackwardTangents:
    r"""Second derivatives: the forward-mode derivative of `normalize_backward` itself.

    Returns the backward's outputs `(dx, dweight, dbias)` and their tangents when `x`, `dy`
    and `weight` move along `tx`, `tdy`, `tweight` (each optional, zero when omitted):

    $$ t(dx) = t r\,(g-\bar g) + r\,(tg - \overline{tg}) - \frac{1}{m}\Big(
       tc\,\hat x A + c\,t\hat x\,A + c\,\hat x\,tA\Big) $$

    with $A = \sum g\hat x$, $B = \sum \hat x\,tx$, $tr = -r c B/m$, $tc = -c^3 B/(m r)$,
    $t\hat x = r\,(tx-\overline{tx}) - c\hat x B/m$, $tA = \sum (tg\,\hat x + g\,t\hat x)$.

    With `tdy=tweight=None`, `t(dx)` is the Hessian-vector product $H_{dy}\,tx$ of
    $dy\cdot y(x)$; since that Hessian is symmetric, it is also the gradient w.r.t. `x` that a
    double backward needs for a cotangent `tx` on `dx` (its gradient w.r.t. `dy` is
    `normalize_jvp(x, tx)`'s `ty`).
    """
    xp = ctx.xp
    dyc = _check_cotangent(xp, ctx, dy, "dy")
    zeros = xp.zeros_like(dyc)
    txc = zeros if tx is None else _check_cotangent(xp, ctx, tx, "tx")
    tdyc = zeros if tdy is None else _check_cotangent(xp, ctx, tdy, "tdy")
    xhat, c = _xhat_and_c(xp, ctx)
    r, m, axes = ctx.rstd, _m(ctx), ctx.axes
    w = None if ctx.weight is None else _cast(xp, ctx.weight, ctx)
    tw = None
    if tweight is not None:
        if w is None:
            raise NormgradError("tweight was given but the context has no weight; drop tweight.")
        tw = _cast(xp, _param(xp, tweight, "tweight", ctx.x, xhat), ctx)
    g = dyc if w is None else dyc * w
    tg = tdyc if w is None else tdyc * w
    if tw is not None:
        tg = tg + dyc * tw

    mean_g = xp.mean(g, axis=axes, keepdims=True)
    a = xp.sum(g * xhat, axis=axes, keepdims=True)
    b = xp.sum(xhat * (txc - xp.mean(txc, axis=axes, keepdims=True)), axis=axes, keepdims=True)
    tr = -r * c * b / m
    tc = -(c**3) * b / (m * r)
    txhat = _apply_jacobian(xp, ctx, xhat, c, txc)
    ta = xp.sum(tg * xhat + g * txhat, axis=axes, keepdims=True)
    dx = r * (g - mean_g) - c * xhat * a / m
    tdx = (
        tr * (g - mean_g)
        + r * (tg - xp.mean(tg, axis=axes, keepdims=True))
        - (tc * xhat * a + c * txhat * a + c * xhat * ta) / m
    )
    dw = tdw = db = tdb = None
    if w is not None:
        dw = _unbroadcast(xp, dyc * xhat, ctx.weight)
        tdw = _unbroadcast(xp, tdyc * xhat + dyc * txhat, ctx.weight)
    if ctx.bias is not None:
        db = _unbroadcast(xp, dyc, ctx.bias)
        tdb = _unbroadcast(xp, tdyc, ctx.bias)
    return BackwardTangents(_to_out(xp, dx, ctx), dw, db, _to_out(xp, tdx, ctx), tdw, tdb)


# ---------------------------------------------------------------------------------------------
# The shared pieces
# ---------------------------------------------------------------------------------------------


def _apply_jacobian(xp: Any, ctx: NormContext, xhat: Array, c: Array, v: Array) -> Array:
    """`J v` for the symmetric Jacobian of xhat: r (v - mean v) - (c/m) xhat sum(xhat v)."""
    axes = ctx.axes
    centered = v - xp.mean(v, axis=axes, keepdims=True)
    proj = xp.sum(xhat * centered, axis=axes, keepdims=True)
    return ctx.rstd * centered - (c / _m(ctx)) * xhat * proj


def _xhat_and_c(xp: Any, ctx: NormContext) -> tuple[Array, Array]:
    """Recompute xhat from x and the saved statistics; c is the variance path's coefficient."""
    xhat = (_cast(xp, ctx.x, ctx) - ctx.mean) * ctx.rstd
    return xhat, _coef(xp, ctx)


def _coef(xp: Any, ctx: NormContext) -> Array:
    """The variance path's coefficient c (keepdims): rstd (eps inside) or 1/std (outside)."""
    if ctx.eps_mode == "inside":
        return ctx.rstd
    std = xp.sqrt(ctx.var)
    # d(sqrt(var))/dvar is infinite at var == 0, but there xhat == 0 and the term vanishes.
    safe = xp.where(std > 0, std, xp.ones_like(std))
    return xp.where(std > 0, 1.0 / safe, xp.zeros_like(std))


def _rstd(xp: Any, var: Array, eps: float, eps_mode: str) -> Array:
    if eps_mode == "inside":
        return 1.0 / xp.sqrt(var + eps)
    return 1.0 / (xp.sqrt(var) + eps)


def _affine(xp: Any, ctx: NormContext, xhat: Array) -> Array:
    y = xhat
    if ctx.weight is not None:
        y = y * _cast(xp, ctx.weight, ctx)
    if ctx.bias is not None:
        y = y + _cast(xp, ctx.bias, ctx)
    return y


def _m(ctx: NormContext) -> float:
    return ctx.group_size - ctx.ddof


def _prepare(
    x: Array,
    axes: Axes,
    eps: float,
    eps_mode: str,
    ddof: float,
    weight: Array | None,
    bias: Array | None,
) -> tuple[Any, Array, NormContext]:
    """Validate every argument and compute the statistics: (namespace, x in compute dtype, ctx)."""
    xp, ax, n, w, b, out_dtype = _validate(x, axes, eps, eps_mode, ddof, weight, bias)
    xc, ctx = _statistics(xp, x, ax, n, eps, eps_mode, ddof, w, b, out_dtype)
    return xp, xc, ctx


def context_from_statistics(
    x: Array,
    axes: Axes,
    mean: Array,
    var: Array,
    rstd: Array,
    *,
    eps: float = 1e-5,
    eps_mode: str = "inside",
    ddof: float = 0,
    weight: Array | None = None,
    bias: Array | None = None,
) -> NormContext:
    """The context `normalize_forward` would return, rebuilt from saved statistics (for
    framework adapters that store tensors, not Python objects, between forward and backward)."""
    _, ax, n, w, b, out_dtype = _validate(x, axes, eps, eps_mode, ddof, weight, bias)
    return NormContext(x, ax, mean, var, rstd, float(eps), eps_mode, ddof, w, b, n, out_dtype)


def _statistics(
    xp: Any,
    x: Array,
    ax: tuple[int, ...],
    n: int,
    eps: float,
    eps_mode: str,
    ddof: float,
    w: Array | None,
    b: Array | None,
    out_dtype: Any,
) -> tuple[Array, NormContext]:
    """Mean, variance and rstd of validated arguments: (x in compute dtype, ctx)."""
    xc = xp.astype(x, _compute_dtype(xp, x))
    # The mean of x - shift, shift = each group's first element: a constant group gets its
    # constant back exactly (mean(0.1, 0.1, 0.1) is not 0.1), hence exactly zero variance.
    # The fused kernels do the same. Then the second pass: stable two-pass variance.
    shift = xc[tuple(slice(0, 1) if i in ax else slice(None) for i in range(x.ndim))]
    mean = shift + xp.mean(xc - shift, axis=ax, keepdims=True)
    d = xc - mean
    var = xp.sum(d * d, axis=ax, keepdims=True) / (n - ddof)
    if eps == 0:
        _refuse_zero_variance(xp, var, x, ax)
    rstd = _rstd(xp, var, eps, eps_mode)
    ctx = NormContext(x, ax, mean, var, rstd, float(eps), eps_mode, ddof, w, b, n, out_dtype)
    return xc, ctx


def _validate(
    x: Array,
    axes: Axes,
    eps: float,
    eps_mode: str,
    ddof: float,
    weight: Array | None,
    bias: Array | None,
) -> tuple[Any, tuple[int, ...], int, Array | None, Array | None, Any]:
    """Check every argument: (namespace, axes, group size, weight, bias, result dtype)."""
    try:
        xp = _namespace(x)
    except TypeError:
        raise NormgradError(
            f"x must be an array (NumPy, PyTorch, JAX, Dask, CuPy or any Array-API array); "
            f"got {type(x).__name__}. Wrap lists with numpy.asarray(x)."
        ) from None
    out_dtype = _float_dtype(xp, x.dtype, "x")
    if x.ndim == 0:
        raise NormgradError(
            "x is a 0-d array (a scalar); its normalization is always 0. Pass an array "
            "with at least one dimension."
        )
    if 0 in x.shape:
        raise NormgradError(
            f"x is empty (shape {tuple(x.shape)}); normalization needs at least one element "
            "in every group."
        )
    ax = normalize_axes(axes, x.ndim)
    n = 1
    for i in ax:  # a loop, not a genexpr: torch.compile traces it
        n *= int(x.shape[i])
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not math.isfinite(eps):
        raise NormgradError(f"eps must be a finite real number >= 0; got {eps!r}.")
    if eps < 0:
        raise NormgradError(
            f"eps must be >= 0 (it keeps the denominator away from zero); got eps={eps}."
        )
    if eps_mode not in EPS_MODES:
        raise NormgradError(
            f"eps_mode must be 'inside' ((x-mu)/sqrt(var+eps)) or 'outside' "
            f"((x-mu)/(sqrt(var)+eps)); got {eps_mode!r}."
        )
    if not isinstance(ddof, (int, float)) or isinstance(ddof, bool) or not 0 <= ddof:
        raise NormgradError(f"ddof must be a number >= 0 (0: biased, 1: unbiased); got {ddof!r}.")
    if ddof >= n:
        raise NormgradError(
            f"ddof={ddof} must be smaller than the group size n={n} (the variance divides by "
            f"n - ddof); reduce over more elements or use ddof=0."
        )
    w = _param(xp, weight, "weight", x, x)
    b = _param(xp, bias, "bias", x, x)
    return xp, ax, n, w, b, out_dtype


_numpy_xp: Any = None  # array_api_compat's NumPy namespace, once seen


def _namespace(a: Array) -> Any:
    """`array_namespace(a)`, without its cost (about 3 us) for plain NumPy arrays."""
    global _numpy_xp
    if type(a) is np.ndarray:
        if _numpy_xp is None:
            _numpy_xp = aac.array_namespace(a)
        return _numpy_xp
    return aac.array_namespace(a)


def _namespace_or_none(a: Any) -> Any:
    if type(a) is np.ndarray:
        return _namespace(a)
    return aac.array_namespace(a) if aac.is_array_api_obj(a) else None


def _refuse_zero_variance(xp: Any, var: Array, x: Array, axes: tuple[int, ...]) -> None:
    if aac.is_lazy_array(var):  # Dask, JAX under jit: cannot look without computing
        return
    if bool(xp.any(var == 0)):
        raise NormgradError(
            f"a group of x (shape {tuple(x.shape)}, axes {axes}) has zero variance and eps=0, "
            "so its normalization divides by zero; pass eps > 0 (e.g. 1e-5)."
        )


def _float_dtype(xp: Any, dtype: Any, name: str) -> Any:
    """The floating dtype results take: float dtypes stay, integers become float64."""
    if xp is _numpy_xp and dtype.kind == "f":  # the common case, without isdtype's cost
        return dtype
    if xp.isdtype(dtype, "real floating"):
        return dtype
    if xp.isdtype(dtype, "integral"):
        return xp.float64
    raise NormgradError(
        f"{name} has dtype {dtype}; normalize needs real numbers (floats or integers). "
        f"Convert it, e.g. {name}.astype(float)."
    )


def _compute_dtype(xp: Any, x: Array) -> Any:
    """float64 where it is cheap and available (CPU libraries), else the input's float dtype."""
    if x.dtype == xp.float64:
        return xp.float64
    if aac.is_jax_namespace(xp):
        import jax

        if not jax.config.read("jax_enable_x64"):
            return xp.float32
    elif aac.is_torch_namespace(xp):
        if x.device.type != "cpu":  # not str(device): torch.compile cannot trace it
            return xp.float32 if x.dtype == xp.float16 else x.dtype
    elif aac.is_cupy_namespace(xp):
        return xp.float32 if x.dtype == xp.float16 else x.dtype
    return xp.float64


def _cast(xp: Any, a: Array, ctx: NormContext) -> Array:
    return xp.astype(a, ctx.mean.dtype)


def _to_out(xp: Any, a: Array, ctx: NormContext) -> Array:
    return a if a.dtype == ctx.dtype else xp.astype(a, ctx.dtype)


def _size(x: Any) -> int | None:
    shape = getattr(x, "shape", None)
    if shape is None:
        return None
    try:
        return math.prod(int(s) for s in shape)
    except (TypeError, ValueError):
        return None


def _param(xp: Any, value: Any, name: str, x: Array, like: Array) -> Array | None:
    """Check that an affine parameter (or its tangent) broadcasts to `like.shape` unchanged."""
    if value is None:
        return None
    if not aac.is_array_api_obj(value) or _namespace(value) is not xp:
        value = xp.asarray(value, device=aac.device(x))
    _float_dtype(xp, value.dtype, name)
    shape, target = tuple(value.shape), tuple(like.shape)
    if not _broadcasts_to(shape, target):
        raise NormgradError(
            f"{name} of shape {shape} does not broadcast to the output shape {target}; give it "
            f"the shape of the kept axes, of the reduced axes (e.g. {target[-1:]} for the last "
            "axis), or keep size-1 axes where it should repeat."
        )
    return value


def _broadcasts_to(shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
    if len(shape) > len(target):
        return False
    return all(s in (1, t) for s, t in zip(reversed(shape), reversed(target), strict=False))


def _unbroadcast(xp: Any, a: Array, like: Array) -> Array:
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


def _check_cotangent(xp: Any, ctx: NormContext, v: Array, name: str) -> Array:
    """A tangent or cotangent must have exactly the shape of x (and y); cast to compute dtype."""
    return _cast(xp, _check_cotangent_shape(xp, ctx, v, name), ctx)


def _check_cotangent_shape(xp: Any, ctx: NormContext, v: Array, name: str) -> Array:
    """`v` as an array of xp with a real dtype and exactly the shape of x (not cast)."""
    if _namespace_or_none(v) is not xp:
        v = xp.asarray(v, device=aac.device(ctx.x))
    _float_dtype(xp, v.dtype, name)
    if tuple(v.shape) != tuple(ctx.x.shape):
        raise NormgradError(
            f"{name} has shape {tuple(v.shape)} but must have the shape of x and y, "
            f"{tuple(ctx.x.shape)}; pass one value per output element."
        )
    return v


# ---------------------------------------------------------------------------------------------
# Fused CPU kernels: dispatch and preallocated outputs
# ---------------------------------------------------------------------------------------------

KERNEL_MODES = ("auto", "0", "1")
# Below this many elements the generic path is as fast and never triggers numba (measured
# crossover, see docs/performance.md); NORMGRAD_KERNELS=1 uses the kernels at every size.
KERNEL_MIN_SIZE = 1 << 14
# Up to this many elements, inputs without affine parameters or `out` run on one
# single-threaded kernel call per pass (no layout analysis beyond a cached plan).
SMALL_MAX_SIZE = 1 << 16
_kernel_mode: ContextVar[str | None] = ContextVar("normgrad_kernels", default=None)


@contextmanager
def use_kernels(mode: bool | str = True) -> Iterator[None]:
    """Choose, inside a `with` block, whether NumPy float32/float64 inputs use the fused
    numba kernels: `True`/`"1"` always, `False`/`"0"` never (generic Array-API path),
    `"auto"` (the default): the small single-call kernels up to `SMALL_MAX_SIZE` elements
    (C-contiguous, no affine parameters, a C-contiguous `out` if any), the blocked ones from
    `KERNEL_MIN_SIZE`.

    Without it, the environment variable `NORMGRAD_KERNELS` (`0`, `1` or `auto`), read at
    the first call that needs it, decides.
    Both paths give the same results within a few ulp.
    """
    named = "1" if mode is True else "0" if mode is False else mode
    token = _kernel_mode.set(_check_mode(named, "mode"))
    try:
        yield
    finally:
        _kernel_mode.reset(token)


_planned_calls: dict[tuple[Any, ...], tuple[Any, ...] | None] = {}


def _planned_forward(
    x: np.ndarray, axes: Axes, eps: float, eps_mode: str, ddof: float, out: Any
) -> tuple[Array, NormContext] | None:
    """`normalize_forward` of a C-contiguous NumPy input without affine parameters (and a
    C-contiguous `out`, if any) whose layout reshapes to blocks, in one kernel call:
    single-threaded up to `SMALL_MAX_SIZE` elements (`_kernels._forward_small`), else on
    the pool (`_kernels.forward_planned`); None where the layout does not reshape. The
    arguments are validated once per distinct call signature and the plan cached: a small
    call costs about 2.5 us, a fifth of it the kernel (docs/performance.md); `out` is
    checked on every call."""
    if not (x.flags.c_contiguous and x.flags.aligned):  # (native jobs view aligned memory)
        return None
    if (_kernel_mode.get() or _env_mode()) == "0":
        return None
    if type(axes) is tuple and any(type(a) is not int for a in axes):
        return None  # (True,) == (1,): keys must not mix what validation tells apart
    key = (x.shape, x.dtype, axes, type(axes), eps, type(eps), eps_mode, ddof, type(ddof))
    try:
        call = _planned_calls[key]
    except KeyError:
        call = _plan_call(x, axes, eps, eps_mode, ddof)
        if len(_planned_calls) >= 512:
            _planned_calls.clear()
        _planned_calls[key] = call
    except TypeError:  # unhashable axes (a list): the general path
        return None
    if call is None:
        return None
    ax, n, m, eps_f, inside, plan = call
    single = x.size <= SMALL_MAX_SIZE
    if plan.sweep and not single:
        return None  # the general path's sweep kernels
    if out is None:
        if x.nbytes < _recycle.MIN_BYTES:  # (the small calls' budget is microseconds)
            y, stream = np.empty(x.shape, x.dtype), False
        else:
            y, stream = _kernels_module.new_output(x.shape, x.dtype)
    elif type(out) is np.ndarray and out.flags.c_contiguous and out.flags.aligned:
        _check_out(_namespace(x), out, x, x.dtype, "out", x)
        y, stream = out, _kernels_module.streams(out)
    else:
        return None
    st = np.empty(plan.stats)  # mean, var, rstd, each keepdims
    if single:
        _kernels_module._forward_small(x, plan.shape4, eps_f, inside, m, st, y)
        _kernels_module.calls["forward_small"] += 1
    else:
        _kernels_module.forward_planned(x, plan, eps_f, inside, m, st, y, stream)
    mean, var, rstd = st[0], st[1], st[2]  # (indexing: half the cost of unpacking)
    if eps_f == 0:
        _refuse_zero_variance(np, var, x, ax)
    return y, _numpy_context(x, ax, mean, var, rstd, eps_f, eps_mode, ddof, n)


def _plan_call(
    x: np.ndarray, axes: Axes, eps: float, eps_mode: str, ddof: float
) -> tuple[Any, ...] | None:
    """Validate the arguments (raising as `normalize_forward` would) and plan the kernel
    call; None where the planned calls do not apply."""
    _, ax, n, _, _, _ = _validate(x, axes, eps, eps_mode, ddof, None, None)
    if x.dtype.char not in "fd" or not x.dtype.isnative or _load_kernels() is None:
        return None
    plan = _kernels_module.call_plan(x.shape, ax, x.itemsize)
    if plan is None:
        return None
    return (ax, n, float(n - ddof), float(eps), eps_mode == "inside", plan)


_env_mode_value: str | None = None


def _env_mode() -> str:
    """`NORMGRAD_KERNELS`, read (and checked) at the first call that needs it: reading
    `os.environ` costs 0.5 us, a fifth of a small forward."""
    global _env_mode_value
    if _env_mode_value is None:
        mode = _check_mode(os.environ.get("NORMGRAD_KERNELS", "auto"), "NORMGRAD_KERNELS")
        _env_mode_value = mode
    return _env_mode_value


def _check_mode(mode: Any, source: str) -> str:
    if mode not in KERNEL_MODES:
        raise NormgradError(
            f"{source} must be one of True, False, '1', '0' or 'auto' (fused kernels always, "
            f"never, or for large NumPy inputs); got {mode!r}."
        )
    return str(mode)


def _kernels_for(x: Array, small: bool) -> tuple[Any, bool, bool]:
    """`(_kernels module or None, use the small kernels, use the blocked kernels)`.

    NumPy float32/float64 inputs use the kernels: the small single-call ones (no affine
    parameters, a C-contiguous `out` if any) up to `SMALL_MAX_SIZE` elements, the blocked
    multi-threaded ones from `KERNEL_MIN_SIZE` elements on (or at every size with
    `use_kernels(True)`)."""
    if not _is_numpy(x) or x.dtype.char not in "fd" or not x.dtype.isnative:
        # decided first: torch.compile traces this function, and not ContextVar.get
        return None, False, False
    mode = _kernel_mode.get() or _env_mode()
    if mode == "0":
        return None, False, False
    small = small and x.size <= SMALL_MAX_SIZE
    blocked = mode == "1" or x.size >= KERNEL_MIN_SIZE
    if not (small or blocked):
        return None, False, False
    kernels = _load_kernels()
    if kernels is None:
        return None, False, False
    return kernels, small, blocked


_kernels_module: Any = None


def _load_kernels() -> Any:
    """The `_kernels` module (it imports numba: only here, on first use), or None if numba is
    missing or broken: the generic path still works."""
    global _kernels_module
    if _kernels_module is None:
        try:
            from . import _kernels
        except ImportError:
            return None
        _kernels_module = _kernels
    return _kernels_module


def _is_numpy(a: Any) -> bool:
    return type(a) is np.ndarray


def _check_out(xp: Any, out: Array | None, x: Array, dtype: Any, name: str, *inputs: Array) -> None:
    if out is None:
        return
    if _namespace_or_none(out) is not xp:
        raise NormgradError(
            f"{name} must be an array of the same library as x ({xp.__name__}); got "
            f"{type(out).__name__}. Allocate it with that library, e.g. empty_like(x)."
        )
    arr: Any = out  # the namespace check above narrowed `out` too far for mypy
    if tuple(arr.shape) != tuple(x.shape) or arr.dtype != dtype:
        raise NormgradError(
            f"{name} must have the result's shape {tuple(x.shape)} and dtype {dtype}; got "
            f"shape {tuple(arr.shape)} and dtype {arr.dtype}. Allocate it like the result."
        )
    if aac.is_jax_array(out):
        raise NormgradError(f"{name} cannot be a JAX array (JAX arrays are immutable); omit it.")
    if _is_numpy(out) and not _separate_numpy_buffer(out, inputs):
        raise NormgradError(
            f"{name} must be a writeable array that does not overlap the inputs (x, dy); "
            "pass a separate buffer, e.g. numpy.empty_like(x)."
        )


def _separate_numpy_buffer(out: Any, inputs: tuple[Array, ...]) -> bool:
    import numpy as np

    return bool(out.flags.writeable) and not any(np.may_share_memory(out, a) for a in inputs)


def _fill(result: Array, out: Array | None) -> Array:
    if out is None:
        return result
    out[...] = result
    return out
