r"""The public functions of the op: each validates, chooses a path (`_dispatch`), runs it.

Within one group of `n` elements (notation of docs/derivation.md, formulas in
`_formulas.py`):

$$ \mu = \bar x,\quad \sigma^2 = \tfrac{1}{n - \mathrm{ddof}} \sum (x-\mu)^2,\quad
   \hat x = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}},\quad y = \hat x\,w + b $$

(`eps_mode="outside"`: $\hat x = (x-\mu)/(\sigma + \epsilon)$). The paths: the fused kernels
(`kernels/`) for NumPy float32/float64 arrays, the Array-API formulas (`_generic.py`) for
everything else; `_dispatch.py` says which runs and why.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

from . import _dispatch, _generic, _runtime
from ._axes import Axes, merge_axis
from ._errors import NormgradError
from ._validate import (
    Spec,
    check_nan_policy,
    check_out,
    check_stats,
    cotangent,
    namespace,
    param,
    refuse_nan,
    refuse_zero_variance,
    size_of,
    validate,
)

Array = Any
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
    center: bool = True  # False: RMS normalization (`mean` is then 0)
    fixed: bool = False  # statistics given (`stats=`): constants for every derivative
    mask: Array | None = None  # the counted elements (x's shape; mask=, nan_policy="omit")
    count: Array | None = None  # with a mask: the counted elements per group (keepdims)
    planned: Any = field(default=None, repr=False)  # masked kernels: (mode, forward Plan)
    tables: Any = field(default=None, repr=False)  # planned kernels: the forward's tables

    @property
    def xp(self) -> Any:
        return namespace(self.x)


def _context(
    x: Array, spec: Spec, stats: tuple[Array, ...], w: Any, b: Any, tables: Any = None
) -> NormContext:
    """`NormContext(...)` at a third of the frozen dataclass `__init__`'s cost (which small
    calls feel); a test checks that the fields match. `tables`: a planned kernel forward's
    parameter tables (its fifth result), which that backward reuses."""
    ctx = object.__new__(NormContext)
    object.__setattr__(ctx, "__dict__", {
        "x": x, "axes": spec.axes, "mean": stats[0], "var": stats[1], "rstd": stats[2],
        "eps": spec.eps, "eps_mode": spec.eps_mode, "ddof": spec.ddof, "weight": w, "bias": b,
        "group_size": spec.n, "dtype": spec.dtype, "center": spec.center,
        "fixed": False, "mask": None, "count": None, "planned": None, "tables": tables,
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


_GENERIC = {("forward", "generic"): _generic.forward, ("backward", "generic"): _generic.backward}


def _runner(direction: str, path: str) -> Any:
    """The function that runs `path` (the kernels' runners load with the kernels)."""
    try:
        return _GENERIC[direction, path]
    except KeyError:
        return _runtime.kernels().RUNNERS[direction, path]


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
    axis: Axes = None,
    center: bool = True,
    stats: Any = None,
    mask: Array | None = None,
    nan_policy: str = "propagate",
) -> Array:
    r"""Normalize `x` by the mean and variance of each group of elements along `axes`.

    $$ y = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} \cdot w + b $$

    with $\mu$ and $\sigma^2 = \frac{1}{n - \mathrm{ddof}}\sum (x-\mu)^2$ taken over `axes`
    (all axes when `axes=None`, as the whole-matrix normalization of the original problem;
    `axis=` is the same argument, spelled as NumPy and the Array API spell it).
    `eps_mode="outside"` uses $(x-\mu)/(\sigma + \epsilon)$ instead.
    `center=False` is RMS normalization: $\mu = 0$ and $\sigma^2 = \frac{1}{n}\sum x^2$,
    so $y = x / \sqrt{\overline{x^2} + \epsilon}\cdot w + b$ (`F.rms_norm` over any axes;
    `ddof` must then be 0). It takes the kernel paths center=True takes.

    `stats`: a `Moments` (`normgrad.moments` of the training data, keepdims shape of the
    groups) to normalize with instead of the statistics of `x` (inference), with
    $\sigma^2$ = `stats.var(ddof)`. Every derivative treats them as constants.

    `mask`: a boolean array broadcastable to `x`; True marks an element that counts. The
    statistics are taken over the counted elements of each group ($n$ = their number,
    $\sigma^2$ divides by $n - \mathrm{ddof}$), and every element is normalized by them
    (as Flax's `mask=`). Uncounted elements do not move the statistics, so their
    gradient is that of their own y only. A group with no more than `ddof` counted
    elements (none, with ddof=0) gives NaN for its outputs and statistics, without raising.
    `nan_policy`: `"propagate"` (NaN makes its group NaN), `"omit"` (NaN elements do not
    count: the mask `~isnan(x)`, y NaN at those places, as `scipy.stats.zscore(...,
    nan_policy="omit")`) or `"raise"` (a `NormgradError` naming the first NaN's index).
    Masked NumPy float32/float64 calls run on masked fused kernels (`plan_forward` tells).

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
        x, axes, eps=eps, eps_mode=eps_mode, ddof=ddof, weight=weight, bias=bias, out=out,
        axis=axis, center=center, stats=stats, mask=mask, nan_policy=nan_policy,
    )[0]  # fmt: skip


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
    axis: Axes = None,
    center: bool = True,
    stats: Any = None,
    mask: Array | None = None,
    nan_policy: str = "propagate",
) -> tuple[Array, NormContext]:
    """Like `normalize`, and also return the context that `normalize_backward` needs."""
    if axis is not None:
        axes = merge_axis(axes, axis)
    if check_nan_policy(nan_policy) == "raise":
        refuse_nan(x)
    masked = mask is not None or nan_policy == "omit"
    variant = (center, stats is not None, (mask, nan_policy == "omit") if masked else None)
    spec, w, b, plan = _dispatch.forward(x, axes, eps, eps_mode, ddof, weight, bias, out, variant)
    if masked:
        if stats is not None:
            raise NormgradError(
                "stats with mask= or nan_policy='omit': given statistics are used as they are, "
                "so a mask would change nothing; mask the data given to normgrad.moments "
                "instead (moments(x_train, axes, mask=...)), or drop stats."
            )
        return _masked(x, spec, plan, (w, b), out)
    if stats is not None:
        return _with_statistics(x, spec, check_stats(spec, x, stats, center), (w, b), out)
    res = _runner("forward", plan.path)(x, spec, w, b, plan, out)  # (y, mean, var, rstd, ...)
    if spec.eps == 0:
        refuse_zero_variance(spec.xp, res[2], x, spec.axes)
    return res[0], _context(x, spec, res[1:4], w, b, res[4] if len(res) > 4 else None)


def _masked(
    x: Array, spec: Spec, plan: Any, params: tuple[Any, Any], out: Any
) -> tuple[Array, NormContext]:
    """The forward over the counted elements (`plan.mask`, x's shape), on the plan's path:
    the context keeps the mask and the counts for every derivative."""
    mask = plan.mask
    if plan.path == "generic":
        y, *stats, count = _generic.masked_forward(x, spec, mask, params, out)
    else:
        y, *stats, count = _runner("forward", plan.path)(x, spec, *params, plan, out)
    if spec.eps == 0:
        refuse_zero_variance(spec.xp, stats[1], x, spec.axes)
    ctx = _context(x, spec, tuple(stats), *params)
    object.__setattr__(ctx, "mask", mask)
    object.__setattr__(ctx, "count", count)
    if plan.path != "generic":  # the backward reuses the layout and views (`_dispatch`)
        object.__setattr__(ctx, "planned", (_runtime.kernel_mode(), plan))
    return y, ctx


def _with_statistics(
    x: Array, spec: Spec, stats: Any, params: tuple[Any, Any], out: Any
) -> tuple[Array, NormContext]:
    """The forward with given `Moments` (inference): their mean and `var(ddof)`, taken as
    constants by every derivative of the context (`ctx.fixed`)."""
    mean, var = stats.mean, stats.var(spec.ddof)
    with _generic._quiet(spec):
        r = _generic.rstd(spec.xp, var, spec.eps, spec.inside)
    if spec.eps == 0:
        refuse_zero_variance(spec.xp, var, x, spec.axes)
    ctx = _context(x, spec, (mean, var, r), *params)
    object.__setattr__(ctx, "fixed", True)
    xc = _generic.cast(spec.xp, x, ctx)
    y = _generic.affine(spec.xp, (xc - mean) * r, params[0], params[1], mean.dtype)
    return _generic.fill(_generic.to_dtype(spec.xp, y, spec.dtype), out), ctx


def normalize_backward(ctx: NormContext, dy: Array, *, out: Array | None = None) -> Gradients:
    r"""Exact vector-Jacobian product of `normalize`: gradients of $\sum dy \cdot y$.

    $$ dx = r\,(g - \bar g) - \frac{c}{m}\,\hat x \sum g\,\hat x, \qquad g = dy \cdot w $$

    with $r$ = `ctx.rstd`, $c = r$ (eps inside) or $1/\sigma$ (eps outside), $m = n - ddof$,
    sums and means over each group. `dweight` and `dbias` are $\sum dy\,\hat x$ and
    $\sum dy$ over the axes that `weight` and `bias` broadcast along. With `center=False`
    (RMS) the mean term $\bar g$ is absent and $m = n$. A context from `stats=` (given
    statistics) treats them as constants: $dx = r\,g$, with no mean or variance path.

    `out`: optional preallocated `dx` (same rules as `normalize`'s `out`, not overlapping
    `x` or `dy`).
    """
    xp = ctx.xp
    dy = cotangent(xp, ctx.x, dy, "dy")
    check_out(xp, out, ctx.x, ctx.dtype, ctx.x, dy)
    plan = _dispatch.backward(ctx, dy, out)
    c = _generic.variance_coefficient(xp, ctx)
    return Gradients(*_runner("backward", plan.path)(ctx, dy, c, plan, out))


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
    axis: Axes = None,
    center: bool = True,
    mask: Array | None = None,
    nan_policy: str = "propagate",
) -> tuple[Array, Array]:
    r"""Forward-mode derivative: return `(y, ty)` with $ty = J_x\,tx + \hat x\,tw + tb$.

    $$ t\hat x = r\,(tx - \overline{tx}) - \frac{c}{m}\,\hat x \sum \hat x\,tx $$

    (`center=False`: without the mean $\overline{tx}$. With a mask $M$, the sums and the
    mean run over the counted elements: $\overline{tx} = \sum M tx / n$, $\sum M \hat x tx$.)
    """
    # y from normalize_forward itself: the same path (kernels or not), so the same bits
    y, ctx = normalize_forward(
        x, axes, eps=eps, eps_mode=eps_mode, ddof=ddof, weight=weight, bias=bias, axis=axis,
        center=center, mask=mask, nan_policy=nan_policy,
    )  # fmt: skip
    xp = ctx.xp
    txc = _generic.cast(xp, cotangent(xp, x, tx, "tx"), ctx)
    d = _generic.centered(xp, ctx)
    c = _generic.variance_coefficient(xp, ctx)
    ty = _generic.apply_jacobian(xp, ctx, d, c, txc)  # (J tx: the forward derivative)
    tw = param(xp, tweight, "tweight", x, d, ctx.axes)
    tb = param(xp, tbias, "tbias", x, d, ctx.axes)
    ty = _generic.tangent_affine(xp, ctx, ty, d * ctx.rstd, (tw, tb))
    return y, _generic.to_dtype(xp, ty, ctx.dtype)


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
    axis: Axes = None,
    center: bool = True,
    mask: Array | None = None,
    nan_policy: str = "propagate",
) -> Array:
    r"""Dense Jacobian $\partial y / \partial x$ with shape `y.shape + x.shape`.

    Within a group, $J_{ij} = w_i\,[\,r(\delta_{ij} - 1/n) - \frac{c}{m}\hat x_i \hat x_j\,]$;
    elements of different groups do not interact (zero blocks); `center=False` drops the
    $-1/n$. With a mask $M$: $J_{ij} = w_i\,[\,r(\delta_{ij} - M_j/n) -
    \frac{c}{m}\hat x_i \hat x_j M_j\,]$ (not symmetric). It holds `x.size**2`
    numbers, so inputs above `max_size` elements are refused.
    """
    size = size_of(x)
    if size is not None and size > max_size:
        raise NormgradError(
            f"normalize_jacobian builds a dense {size}x{size} matrix for x of shape "
            f"{tuple(x.shape)} ({size} elements > max_size={max_size}); use normalize_backward "
            "or normalize_jvp for products with the Jacobian, or pass a larger max_size."
        )
    if axis is not None:
        axes = merge_axis(axes, axis)
    if mask is not None or nan_policy != "propagate":
        ctx = normalize_forward(
            x, axes, eps=eps, eps_mode=eps_mode, ddof=ddof, weight=weight, bias=bias,
            center=center, mask=mask, nan_policy=nan_policy,
        )[1]  # fmt: skip
        return _generic.dense_jacobian(ctx.xp, ctx, _generic.variance_coefficient(ctx.xp, ctx))
    spec, w, b = validate(x, axes, eps, eps_mode, ddof, weight, bias, center)
    stats = _generic.statistics(x, spec)[1:]
    if spec.eps == 0:
        refuse_zero_variance(spec.xp, stats[1], x, spec.axes)
    ctx = _context(x, spec, stats, w, b)
    return _generic.dense_jacobian(spec.xp, ctx, _generic.variance_coefficient(spec.xp, ctx))


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
    dyc = _generic.cast(xp, cotangent(xp, ctx.x, dy, "dy"), ctx)

    def tangent(v: Array | None, name: str) -> Array:
        if v is None:
            return xp.zeros_like(dyc)
        return _generic.cast(xp, cotangent(xp, ctx.x, v, name), ctx)

    tw = None
    if tweight is not None:
        if ctx.weight is None:
            raise NormgradError("tweight was given but the context has no weight; drop tweight.")
        tw = _generic.cast(xp, param(xp, tweight, "tweight", ctx.x, ctx.x, ctx.axes), ctx)
    seeds = (dyc, tangent(tx, "tx"), tangent(tdy, "tdy"), tw)
    return BackwardTangents(*_generic.backward_jvp(xp, ctx, seeds))


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
    center: bool = True,
) -> NormContext:
    """The context `normalize_forward` would return, rebuilt from saved statistics (for
    framework adapters that store tensors, not Python objects, between forward and backward)."""
    spec, w, b = validate(x, axes, eps, eps_mode, ddof, weight, bias, center)
    return _context(x, spec, (mean, var, rstd), w, b)
