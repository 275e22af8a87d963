r"""JAX adapter: `normalize` with a `jax.custom_jvp` rule that is normgrad's own derivation.

$$ y = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}}\,w + b, \qquad
   t\hat x = r\,(tx - \overline{tx}) - \frac{c}{m}\,\hat x \sum \hat x\,tx $$

The JVP rule calls `normgrad.normalize_jvp` on jax arrays. It is linear in the tangents and
written in `jax.numpy`, so JAX transposes it for reverse mode and differentiates it again for
higher orders: `jit`, `vmap`, `grad`, `jacfwd`, `jacrev` and `grad` of `grad` all work.
`axes`, `eps`, `eps_mode` and `ddof` are static Python values.

Without `jax_enable_x64` the statistics are computed in float32 (JAX's default precision).
Install with `normgrad[jax]`; `import normgrad` alone never imports jax.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from ._axes import Axes, normalize_axes
from ._errors import NormgradError
from ._ops import normalize_forward, normalize_jvp

__all__ = ["apply", "check_grads", "init_params", "normalize"]

Params = dict[str, jax.Array]


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4, 5, 6))
def _normalize(
    x: jax.Array,
    weight: jax.Array | None,
    bias: jax.Array | None,
    axes: tuple[int, ...],
    eps: float,
    eps_mode: str,
    ddof: float,
) -> jax.Array:
    x = jnp.asarray(x)
    y, _ = normalize_forward(
        x, axes, eps=eps, eps_mode=eps_mode, ddof=ddof, weight=weight, bias=bias
    )
    return y


@_normalize.defjvp
def _normalize_jvp(
    axes: tuple[int, ...],
    eps: float,
    eps_mode: str,
    ddof: float,
    primals: tuple[Any, ...],
    tangents: tuple[Any, ...],
) -> tuple[jax.Array, jax.Array]:
    # JAX may hand constants over as NumPy arrays (e.g. `TypedNdArray` literals), whose
    # namespace would be NumPy's while the tangents are tracers: make them all jax arrays.
    x = jnp.asarray(primals[0])
    weight, bias = (None if p is None else jnp.asarray(p) for p in primals[1:])
    tx, tweight, tbias = (None if _is_float0(t) else t for t in tangents)
    if tx is None:  # x has an integer dtype: it does not move
        tx = jnp.zeros(x.shape, jnp.result_type(float))
    return normalize_jvp(
        x,
        tx,
        axes,
        eps=eps,
        eps_mode=eps_mode,
        ddof=ddof,
        weight=weight,
        bias=bias,
        tweight=tweight,
        tbias=tbias,
    )


def _is_float0(t: Any) -> bool:
    return t is not None and getattr(t, "dtype", None) == jax.dtypes.float0


def _as_jax(a: Any, name: str) -> Any:
    if a is None or isinstance(a, jax.Array):
        return a
    try:
        return jnp.asarray(a)
    except TypeError:
        raise NormgradError(
            f"{name} must be a JAX array or convertible to one (NumPy array, list); "
            f"got {type(a).__name__}."
        ) from None


def normalize(
    x: jax.Array,
    axes: Axes = None,
    *,
    eps: float = 1e-5,
    eps_mode: str = "inside",
    ddof: float = 0,
    weight: jax.Array | None = None,
    bias: jax.Array | None = None,
) -> jax.Array:
    r"""Differentiable `normgrad.normalize` for JAX arrays.

    $$ y = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}}\,w + b $$

    over `axes` (all axes when `None`; under `vmap`, axes of one example). Forward- and
    reverse-mode derivatives of any order w.r.t. `x`, `weight` and `bias` come from
    normgrad's JVP formula.
    """
    x = _as_jax(x, "x")
    weight = _as_jax(weight, "weight")
    bias = _as_jax(bias, "bias")
    ndim = getattr(x, "ndim", None)
    if ndim is None or ndim == 0:
        # let normgrad's shared validation produce the message
        return normalize_forward(x, axes, eps=eps, eps_mode=eps_mode, ddof=ddof)[0]
    return _normalize(x, weight, bias, normalize_axes(axes, ndim), eps, eps_mode, ddof)


def init_params(shape: int | tuple[int, ...], dtype: Any = jnp.float32) -> Params:
    """Affine parameters for `apply`: `{"weight": ones(shape), "bias": zeros(shape)}`.

    `shape` broadcasts against the input: `(D,)` for a layer norm over the last axis,
    `(C, 1, 1)` for per-channel normalization of `(N, C, H, W)` over `(0, 2, 3)`.
    """
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in shape):
        raise NormgradError(
            f"shape must be a positive int or a tuple of positive ints (the shape of weight "
            f"and bias, e.g. (D,) or (C, 1, 1)); got {shape!r}."
        )
    return {"weight": jnp.ones(shape, dtype), "bias": jnp.zeros(shape, dtype)}


def apply(
    params: Params | None,
    x: jax.Array,
    axes: Axes = -1,
    *,
    eps: float = 1e-5,
    eps_mode: str = "inside",
    ddof: float = 0,
) -> jax.Array:
    """Pure functional layer: `normalize(x, axes, weight=params["weight"], bias=params["bias"])`.

    `params` is a plain dict (a pytree), so it fits Flax, Equinox or Optax state as is;
    `None` or `{}` means no affine map.
    """
    params = params or {}
    unknown = set(params) - {"weight", "bias"}
    if unknown:
        raise NormgradError(
            f"params may hold only 'weight' and 'bias'; got extra keys {sorted(unknown)}. "
            "Create them with normgrad.jax.init_params(shape)."
        )
    return normalize(
        x,
        axes,
        eps=eps,
        eps_mode=eps_mode,
        ddof=ddof,
        weight=params.get("weight"),
        bias=params.get("bias"),
    )


# --- check_grads (checker) ---


def check_grads(
    f: Any,
    args: Any,
    order: int = 1,
    modes: Any = ("fwd", "rev"),
    *,
    rtol: float | None = None,
    atol: float | None = None,
    seed: int = 0,
) -> None:
    """`jax.test_util.check_grads`'s drop-in: returns None, or raises `AssertionError` with
    normgrad's diagnosis.

    `f(*args)` returns one array; args may be pytrees. `modes`: "rev" checks `jax.vjp` of f (a
    `custom_vjp` rule), "fwd" also checks `jax.jvp` (a `custom_jvp` rule); the checker always
    needs a backward, so "rev" is checked in either case. `order=2` also checks the derivative
    of the backward: x -> vjp(x, ct) for a fixed random cotangent `ct`, and so on.
    """
    from .check import check_gradients
    from .check._frameworks import convert

    if isinstance(order, bool) or not isinstance(order, int) or order < 1:
        raise NormgradError(f"check_grads: order must be an int >= 1; got {order!r}.")
    modes = (modes,) if isinstance(modes, str) else tuple(modes)
    if not modes or set(modes) - {"fwd", "rev"}:
        raise NormgradError(f"check_grads: modes must be 'fwd' and/or 'rev'; got {modes!r}.")
    args = tuple(args) if isinstance(args, (tuple, list)) else (args,)
    c = convert(f, args if len(args) > 1 else args[0], "jax")
    jvp = c.jvp if "fwd" in modes else None
    if "fwd" in modes and jvp is None and "rev" not in modes:
        raise NormgradError(
            "check_grads: f has no forward mode (a custom_vjp); use modes=('rev',)."
        )
    report = check_gradients(c.f, c.x, c.vjp, jvp=jvp, rtol=rtol, atol=atol, seed=seed)
    if not report.ok:
        raise AssertionError(str(report))
    if order > 1:
        y = jnp.asarray(f(*args))
        ct = jax.random.normal(jax.random.PRNGKey(seed), y.shape, y.dtype)

        def back(*a: Any) -> jax.Array:
            grads = jax.vjp(f, *a)[1](ct)
            return jnp.concatenate([jnp.ravel(g) for g in jax.tree_util.tree_leaves(grads)])

        check_grads(back, args, order - 1, modes, rtol=rtol, atol=atol, seed=seed + 1)
