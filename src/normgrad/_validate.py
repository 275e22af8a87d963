"""Every check of the public functions' arguments, and the validated call (`Spec`).

Each check raises `NormgradError` with the rule, what was received and the fix. `validate`
runs them all for a forward call; `_dispatch` runs it once per call signature of small
NumPy calls and caches the result.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import array_api_compat as aac
import numpy as np

from . import _runtime
from ._axes import Axes, normalize_axes
from ._errors import NormgradError

Array = Any
EPS_MODES = ("inside", "outside")
NAN_POLICIES = ("propagate", "omit", "raise")


class Spec(NamedTuple):
    """A validated call, without its arrays: what every path needs besides x, weight, bias."""

    xp: Any  # the array namespace
    axes: tuple[int, ...]  # sorted, non-negative
    n: int  # group size
    eps: float
    eps_mode: str
    ddof: float
    dtype: Any  # dtype of y (and of dx)
    m: float  # n - ddof: the variance divides by it
    inside: bool  # eps_mode == "inside"
    center: bool = True  # False: RMS normalization (no mean; var = mean(x**2))


def validate(
    x: Array,
    axes: Axes,
    eps: float,
    eps_mode: str,
    ddof: float,
    weight: Any,
    bias: Any,
    center: bool = True,
) -> tuple[Spec, Array | None, Array | None]:
    """Check every argument of a forward call: `(spec, weight, bias)`, the parameters as
    arrays of x's namespace."""
    xp = _array_namespace(x)
    dtype = float_dtype(xp, x.dtype, "x")
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
    _check_options(eps, eps_mode, ddof, n)
    _check_center(center, ddof)
    w = param(xp, weight, "weight", x, x, ax)
    b = param(xp, bias, "bias", x, x, ax)
    m, inside = float(n - ddof), eps_mode == "inside"
    spec = Spec(xp, ax, n, float(eps), eps_mode, ddof, dtype, m, inside, center)
    return spec, w, b


def _array_namespace(x: Any) -> Any:
    try:
        return namespace(x)
    except TypeError:
        raise NormgradError(
            f"x must be an array (NumPy, PyTorch, JAX, Dask, CuPy or any Array-API array); "
            f"got {type(x).__name__}. Wrap lists with numpy.asarray(x)."
        ) from None


def _check_options(eps: Any, eps_mode: Any, ddof: Any, n: int) -> None:
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


def _check_center(center: Any, ddof: Any) -> None:
    if type(center) is not bool:
        raise NormgradError(
            f"center must be True (mean-variance normalization) or False (RMS normalization, "
            f"x / sqrt(mean(x**2) + eps)); got {center!r}."
        )
    if not center and ddof != 0:
        raise NormgradError(
            f"ddof={ddof} with center=False: RMS normalization takes no mean, so there is no "
            "degree of freedom to lose and its mean square always divides by n; drop ddof "
            "(or use center=True)."
        )


def check_nan_policy(policy: Any) -> str:
    if not isinstance(policy, str) or policy not in NAN_POLICIES:
        raise NormgradError(
            f"nan_policy must be 'propagate' (NaN makes its group NaN), 'omit' (NaN left out "
            f"of the statistics, y NaN there) or 'raise' (refuse NaN); got {policy!r}."
        )
    return policy


def refuse_nan(x: Array) -> None:
    """nan_policy='raise': a NormgradError naming the first NaN's index (x's values are
    looked at, so a traced JAX array is refused)."""
    xp = namespace_or_none(x)
    if xp is None or not xp.isdtype(x.dtype, "real floating"):
        return  # (not an array: validate says so; integers hold no NaN)
    flags = xp.isnan(x)
    try:  # (a reduction first: Dask computes one boolean, not the whole array)
        found = bool(xp.any(flags))
    except Exception:  # a JAX tracer: no values to look at
        raise NormgradError(
            "nan_policy='raise' looks at the values of x, which a traced JAX array (jit, vmap, "
            "grad) does not have; use nan_policy='propagate' or 'omit' there."
        ) from None
    if found:
        flat = xp.reshape(xp.astype(flags, xp.int8), (-1,))
        first = tuple(int(i) for i in np.unravel_index(int(xp.argmax(flat)), tuple(x.shape)))
        raise NormgradError(
            f"x (shape {tuple(x.shape)}) holds NaN, the first at index {first}, and "
            "nan_policy='raise'; clean the data, or use nan_policy='omit' to leave NaN out of "
            "the statistics."
        )


def count_mask(xp: Any, x: Array, mask: Any, omit_nan: bool) -> Array:
    """The elements that count, a boolean array of x's shape: `mask` (checked: boolean,
    broadcastable to x), and not NaN where `omit_nan` (nan_policy='omit')."""
    counted = None
    if mask is not None:
        if not aac.is_array_api_obj(mask) or namespace(mask) is not xp:
            try:
                mask = xp.asarray(mask, device=aac.device(x))
            except (TypeError, ValueError):
                raise NormgradError(
                    f"mask must be a boolean array broadcastable to x; got {type(mask).__name__}."
                ) from None
        if mask.dtype != xp.bool:
            raise NormgradError(
                f"mask has dtype {mask.dtype}; it must be boolean (True: the element counts in "
                "its group's statistics). Convert it, e.g. mask != 0 or mask.astype(bool)."
            )
        shape, target = tuple(mask.shape), tuple(x.shape)
        if not _broadcasts_to(shape, target):
            raise NormgradError(
                f"mask of shape {shape} does not broadcast to x's shape {target}; give it x's "
                "shape, or keep size-1 axes where it should repeat (e.g. (N, 1) for (N, D))."
            )
        counted = xp.broadcast_to(mask, target)
    if omit_nan and xp.isdtype(x.dtype, "real floating"):
        present = xp.logical_not(xp.isnan(x))
        counted = present if counted is None else xp.logical_and(counted, present)
    if counted is None:
        counted = xp.ones(tuple(x.shape), dtype=xp.bool, device=aac.device(x))
    return counted


def namespace(a: Array) -> Any:
    """`array_namespace(a)`, without its cost for plain NumPy arrays."""
    if type(a) is np.ndarray:
        xp = _runtime.STATE.numpy_xp
        if xp is None:
            xp = _runtime.STATE.numpy_xp = aac.array_namespace(a)
        return xp
    return aac.array_namespace(a)


def namespace_or_none(a: Any) -> Any:
    if type(a) is np.ndarray:
        return namespace(a)
    return aac.array_namespace(a) if aac.is_array_api_obj(a) else None


def float_dtype(xp: Any, dtype: Any, name: str) -> Any:
    """The floating dtype results take: float dtypes stay, integers become float64."""
    if getattr(dtype, "kind", None) == "f":  # NumPy dtypes, without isdtype's cost
        return dtype
    if xp.isdtype(dtype, "real floating"):
        return dtype
    if xp.isdtype(dtype, "integral"):
        return xp.float64
    raise NormgradError(
        f"{name} has dtype {dtype}; normalize needs real numbers (floats or integers). "
        f"Convert it, e.g. {name}.astype(float)."
    )


def param(
    xp: Any, value: Any, name: str, x: Array, like: Array, axes: tuple[int, ...] | None = None
) -> Array | None:
    """Check that an affine parameter (or its tangent) broadcasts to `like.shape` unchanged;
    `axes` (the reduced axes, sorted non-negative) makes the error name the exact shapes."""
    if value is None:
        return None
    if not aac.is_array_api_obj(value) or namespace(value) is not xp:
        value = xp.asarray(value, device=aac.device(x))
    float_dtype(xp, value.dtype, name)
    check_param_shape(tuple(value.shape), name, tuple(like.shape), axes)
    return value


def check_param_shape(
    shape: tuple[int, ...], name: str, target: tuple[int, ...], axes: tuple[int, ...] | None
) -> None:
    """The rule for a weight, bias or their tangents: the shape broadcasts to the output's."""
    if _broadcasts_to(shape, target):
        return
    if axes is None:
        hint = f"e.g. {target[-1:]} for a weight per position of the last axis"
    else:
        per_group, per_position = _parameter_shapes(target, axes)
        hint = (
            f"{per_position} for one value per position of the reduced axes {axes} (as "
            f"LayerNorm's weight), {per_group} for one value per group (as BatchNorm's)"
        )
    raise NormgradError(
        f"{name} of shape {shape} does not broadcast to the output shape {target}; give it "
        f"{hint}, or any shape with size-1 axes where it should repeat."
    )


def _parameter_shapes(
    target: tuple[int, ...], axes: tuple[int, ...]
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The per-group and per-position parameter shapes of x (`target`) reduced over `axes`,
    without leading size-1 axes."""
    per_group = [1 if i in axes else s for i, s in enumerate(target)]
    per_position = [s if i in axes else 1 for i, s in enumerate(target)]
    return _trim(per_group), _trim(per_position)


def _trim(shape: list[int]) -> tuple[int, ...]:
    while shape and shape[0] == 1:
        shape = shape[1:]
    return tuple(shape)


def _broadcasts_to(shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
    if len(shape) > len(target):
        return False
    return all(s in (1, t) for s, t in zip(reversed(shape), reversed(target), strict=False))


def cotangent(xp: Any, x: Array, v: Array, name: str) -> Array:
    """`v` as an array of xp with a real dtype and exactly the shape of x (not cast)."""
    if namespace_or_none(v) is not xp:
        v = xp.asarray(v, device=aac.device(x))
    float_dtype(xp, v.dtype, name)
    if tuple(v.shape) != tuple(x.shape):
        raise NormgradError(
            f"{name} has shape {tuple(v.shape)} but must have the shape of x and y, "
            f"{tuple(x.shape)}; pass one value per output element."
        )
    return v


def check_out(xp: Any, out: Any, x: Array, dtype: Any, *inputs: Array) -> None:
    """A preallocated result: same library, shape and dtype, writeable, not overlapping the
    inputs."""
    if out is None:
        return
    if namespace_or_none(out) is not xp:
        raise NormgradError(
            f"out must be an array of the same library as x ({xp.__name__}); got "
            f"{type(out).__name__}. Allocate it with that library, e.g. empty_like(x)."
        )
    if tuple(out.shape) != tuple(x.shape) or out.dtype != dtype:
        raise NormgradError(
            f"out must have the result's shape {tuple(x.shape)} and dtype {dtype}; got "
            f"shape {tuple(out.shape)} and dtype {out.dtype}. Allocate it like the result."
        )
    if aac.is_jax_array(out):
        raise NormgradError("out cannot be a JAX array (JAX arrays are immutable); omit it.")
    if type(out) is np.ndarray and not (
        out.flags.writeable and not any(np.may_share_memory(out, a) for a in inputs)
    ):
        raise NormgradError(
            "out must be a writeable array that does not overlap the inputs (x, dy); "
            "pass a separate buffer, e.g. numpy.empty_like(x)."
        )


def refuse_zero_variance(xp: Any, var: Array, x: Array, axes: tuple[int, ...]) -> None:
    """eps=0 and a group of zero variance: its normalization divides by zero."""
    if aac.is_lazy_array(var):  # Dask, JAX under jit: cannot look without computing
        return
    if bool(xp.any(var == 0)):
        raise NormgradError(
            f"a group of x (shape {tuple(x.shape)}, axes {axes}) has zero variance and eps=0, "
            "so its normalization divides by zero; pass eps > 0 (e.g. 1e-5)."
        )


def check_moments_pair(a: Any, b: Any, what: str, axis: int | None = None) -> None:
    """Two `Moments` that can merge (same shape) or concatenate (same shape off `axis`)."""
    if not all(hasattr(b, f) for f in ("count", "mean", "m2")):
        raise NormgradError(
            f"Moments.{what} takes another Moments (from normgrad.moments); got {type(b).__name__}."
        )
    sa, sb = tuple(a.mean.shape), tuple(b.mean.shape)
    if axis is None:
        if sa != sb:
            raise NormgradError(
                f"Moments.merge needs moments of the same groups: shapes {sa} and {sb} differ. "
                "Compute both with the same axes over chunks split along the reduced axes."
            )
        return
    ax = axis % len(sa) if sa and -len(sa) <= axis < len(sa) else None
    off = [s for i, s in enumerate(sa) if i != ax], [s for i, s in enumerate(sb) if i != ax]
    if ax is None or len(sa) != len(sb) or off[0] != off[1] or (sa[ax] == 1 and sb[ax] == 1):
        raise NormgradError(
            f"Moments.concat joins moments along a kept axis: shapes {sa} and {sb} with "
            f"axis={axis} do not fit (they must match except along that axis, a kept one)."
        )


def check_stats(spec: Spec, x: Array, stats: Any, center: bool) -> Any:
    """Given `Moments` for `normalize(..., stats=)`: one per group of x, same library."""
    if not all(hasattr(stats, f) for f in ("count", "mean", "m2")):
        raise NormgradError(
            f"stats must be a Moments (from normgrad.moments(x_train, axes)); got "
            f"{type(stats).__name__}."
        )
    if not center:
        raise NormgradError(
            "stats with center=False: Moments hold a mean and deviations, not a mean square; "
            "use center=True with stats, or drop stats."
        )
    want = tuple(1 if i in spec.axes else int(s) for i, s in enumerate(x.shape))
    got = tuple(stats.mean.shape)
    if got != want or namespace_or_none(stats.mean) is not spec.xp:
        raise NormgradError(
            f"stats must hold one value per group of x (shape {tuple(x.shape)}, axes "
            f"{spec.axes}): keepdims shape {want} in x's library; got shape {got} "
            f"({type(stats.mean).__name__}). Compute them with normgrad.moments(..., axes)."
        )
    return stats


def size_of(x: Any) -> int | None:
    """The number of elements, or None where the shape is not known."""
    shape = getattr(x, "shape", None)
    if shape is None:
        return None
    try:
        return math.prod(int(s) for s in shape)
    except (TypeError, ValueError):
        return None
