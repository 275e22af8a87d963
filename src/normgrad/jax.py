r"""JAX adapter: `normalize` with a `jax.custom_jvp` rule that is normgrad's own derivation.

$$ y = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}}\,w + b, \qquad
   t\hat x = r\,(tx - \overline{tx}) - \frac{c}{m}\,\hat x \sum \hat x\,tx $$

(`center=False`, RMS normalization: $\mu = 0$, $\sigma^2 = \overline{x^2}$ and no
$\overline{tx}$ term.)

The JVP rule calls `normgrad.normalize_jvp` on jax arrays. It is linear in the tangents and
written in `jax.numpy`, so JAX transposes it for reverse mode and differentiates it again for
higher orders: `jit`, `vmap`, `grad`, `jacfwd`, `jacrev` and `grad` of `grad` all work.
`axes`, `eps`, `eps_mode`, `ddof` and `center` are static Python values. With given
statistics (`stats=`) there is no rule to write: y is affine in x with constant
statistics, and JAX differentiates that map itself.

Without `jax_enable_x64` the statistics are computed in float32 (JAX's default precision).
Install with `normgrad[jax]`; `import normgrad` alone never imports jax.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from ._axes import Axes, normalize_axes
from ._errors import NormgradError
from ._formulas import rstd, xhat
from ._moments import Moments, moments
from ._ops import normalize_forward, normalize_jvp
from ._validate import check_nan_policy, refuse_nan

__all__ = [
    "apply", "batch_norm", "check_grads", "init_params", "init_running_stats", "normalize",
]  # fmt: skip

Params = dict[str, jax.Array]
State = dict[str, jax.Array]


class _Options(NamedTuple):
    """The static options of one call (hashable: the custom_jvp's nondiff argument)."""

    axes: tuple[int, ...]
    eps: float
    eps_mode: str
    ddof: float
    center: bool
    nan_policy: str

    def kwargs(self) -> dict[str, Any]:
        return {
            "eps": self.eps, "eps_mode": self.eps_mode, "ddof": self.ddof,
            "center": self.center, "nan_policy": self.nan_policy,
        }  # fmt: skip


@functools.partial(jax.custom_jvp, nondiff_argnums=(4,))
def _normalize(
    x: jax.Array,
    weight: jax.Array | None,
    bias: jax.Array | None,
    mask: jax.Array | None,
    opts: _Options,
) -> jax.Array:
    x = jnp.asarray(x)
    kw = opts.kwargs()
    return normalize_forward(x, opts.axes, weight=weight, bias=bias, mask=mask, **kw)[0]


@_normalize.defjvp
def _normalize_jvp(
    opts: _Options,
    primals: tuple[Any, ...],
    tangents: tuple[Any, ...],
) -> tuple[jax.Array, jax.Array]:
    # JAX may hand constants over as NumPy arrays (e.g. `TypedNdArray` literals), whose
    # namespace would be NumPy's while the tangents are tracers: make them all jax arrays.
    x = jnp.asarray(primals[0])
    weight, bias, mask = (None if p is None else jnp.asarray(p) for p in primals[1:])
    tx, tweight, tbias = (None if _is_float0(t) else t for t in tangents[:3])
    if tx is None:  # x has an integer dtype: it does not move
        tx = jnp.zeros(x.shape, jnp.result_type(float))
    return normalize_jvp(
        x, tx, opts.axes, weight=weight, bias=bias, tweight=tweight, tbias=tbias, mask=mask,
        **opts.kwargs(),
    )  # fmt: skip


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
    center: bool = True,
    stats: Moments | None = None,
    mask: jax.Array | None = None,
    nan_policy: str = "propagate",
) -> jax.Array:
    r"""Differentiable `normgrad.normalize` for JAX arrays.

    $$ y = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}}\,w + b $$

    over `axes` (all axes when `None`; under `vmap`, axes of one example). Forward- and
    reverse-mode derivatives of any order w.r.t. `x`, `weight` and `bias` come from
    normgrad's JVP formula. `center=False` is RMS normalization,
    $y = x / \sqrt{\overline{x^2} + \epsilon}\,w + b$ (`ddof` must be 0). `stats`: given
    `Moments` (`normgrad.moments` of training data, NumPy or JAX arrays) to normalize with
    (inference); every derivative treats them as constants. `mask` (boolean, broadcastable
    to x; it may be traced) and `nan_policy` as in `normgrad.normalize` ("raise" needs
    concrete values: not under jit).
    """
    x = _as_jax(x, "x")
    weight = _as_jax(weight, "weight")
    bias = _as_jax(bias, "bias")
    mask = _as_jax(mask, "mask")
    if check_nan_policy(nan_policy) == "raise":
        refuse_nan(x)
        nan_policy = "propagate"
    ndim = getattr(x, "ndim", None)
    kw: dict[str, Any] = {"eps": eps, "eps_mode": eps_mode, "ddof": ddof, "center": center}
    if ndim is None or ndim == 0 or stats is not None:
        # given statistics: y is affine in x with constants, which JAX differentiates
        # itself (and a scalar x gets normgrad's shared validation message)
        y, _ = normalize_forward(
            x, axes, weight=weight, bias=bias, stats=_constant(stats), mask=mask,
            nan_policy=nan_policy, **kw,
        )  # fmt: skip
        return y
    opts = _Options(normalize_axes(axes, ndim), eps, eps_mode, ddof, center, nan_policy)
    return _normalize(x, weight, bias, mask, opts)


def _constant(stats: Any) -> Any:
    """`Moments` as JAX arrays outside the gradient (given statistics are constants)."""
    if stats is None or not all(hasattr(stats, f) for f in ("count", "mean", "m2")):
        return stats  # (normgrad's validation names what a stats must be)
    fields = (getattr(stats, f) for f in ("count", "mean", "m2"))
    return Moments(*(jax.lax.stop_gradient(jnp.asarray(a)) for a in fields))


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
    center: bool = True,
    stats: Moments | None = None,
    mask: jax.Array | None = None,
    nan_policy: str = "propagate",
) -> jax.Array:
    """Pure functional layer: `normalize(x, axes, weight=params["weight"], bias=params["bias"])`.

    `params` is a plain dict (a pytree), so it fits Flax, Equinox or Optax state as is;
    `None` or `{}` means no affine map. `center=False` makes it an RMSNorm layer
    (`params` then often holds only a weight); `stats`, `mask`, `nan_policy` as in
    `normalize`.
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
        center=center,
        stats=stats,
        mask=mask,
        nan_policy=nan_policy,
    )


# --- batch norm with running statistics, as a pure function ---


def init_running_stats(shape: int | tuple[int, ...], dtype: Any = jnp.float32) -> State:
    """The state of `batch_norm`: `running_mean` zeros and `running_var` ones of `shape`
    (one value per group, e.g. `(C, 1, 1)`), `num_batches_tracked` 0, as BatchNorm's."""
    shape = init_params(shape, dtype)["weight"].shape  # (the same shape checks)
    return {
        "running_mean": jnp.zeros(shape, dtype),
        "running_var": jnp.ones(shape, dtype),
        "num_batches_tracked": jnp.zeros((), jnp.int32),
    }


def batch_norm(
    params: Params | None,
    state: State,
    x: jax.Array,
    axes: Axes = (0, 2, 3),
    *,
    training: bool = True,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    eps_mode: str = "inside",
    mask: jax.Array | None = None,
    nan_policy: str = "propagate",
) -> tuple[jax.Array, State]:
    r"""Batch norm whose running statistics are passed in and returned: `(y, new_state)`.

    Training: `y = normalize(x, axes, weight, bias)` with the batch's statistics, and the
    state updated exactly as `torch.nn.BatchNorm2d` updates its buffers,
    $s \leftarrow (1-f)\,s + f\,s_{batch}$ with the unbiased batch variance and
    $f$ = `momentum` (None: $1/\text{num\_batches\_tracked}$, a cumulative average).
    Evaluation (`training=False`): $(x - \text{running\_mean}) / \sqrt{\text{running\_var}
    + \epsilon}\,w + b$, the state unchanged and constant for the gradient. `training`,
    `momentum` and the options are static; `mask` and `nan_policy` as in `normalize` (the
    running statistics then come from the counted elements).
    """
    params = params or {}
    w, b = params.get("weight"), params.get("bias")
    if not training:
        mean, var = state["running_mean"], state["running_var"]
        y = xhat(x, mean, rstd(jnp, var, eps, eps_mode == "inside"))
        return (y if w is None else y * w) + (0 if b is None else b), state
    y = normalize(
        x, axes, eps=eps, eps_mode=eps_mode, weight=w, bias=b, mask=mask, nan_policy=nan_policy
    )
    return y, _updated(
        state, jax.lax.stop_gradient(jnp.asarray(x)), axes, momentum, (mask, nan_policy)
    )


def _updated(state: State, x: jax.Array, axes: Axes, momentum: Any, counted: Any) -> State:
    """BatchNorm's update of the running statistics from the batch's `moments`."""
    st = moments(x, axes, mask=counted[0], nan_policy=counted[1])
    old_mean, old_var = state["running_mean"], state["running_var"]
    if st.mean.size != old_mean.size:
        raise NormgradError(
            f"the running statistics hold one value per group, shape {old_mean.shape}; x "
            f"(shape {x.shape}, axes {axes}) has {st.mean.size} groups. Initialize them with "
            "init_running_stats of one entry per group, e.g. (C, 1, 1) for axes (0, 2, 3)."
        )
    if counted[0] is None and counted[1] == "propagate" and x.size // st.mean.size < 2:
        raise NormgradError(
            f"batch_norm needs more than one element per group in training (the running "
            f"variance is unbiased); got x of shape {x.shape} with axes {axes}."
        )
    count = state["num_batches_tracked"] + 1
    f = 1.0 / count if momentum is None else momentum
    mean = st.mean.reshape(old_mean.shape).astype(old_mean.dtype)
    var = st.var(1).reshape(old_var.shape).astype(old_var.dtype)
    return {
        "running_mean": (1 - f) * old_mean + f * mean,
        "running_var": (1 - f) * old_var + f * var,
        "num_batches_tracked": count,
    }


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
