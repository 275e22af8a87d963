"""Second derivatives of user code: `check_hvp(f, x, grad, hvp)`, and a framework backward's own
derivative (torch double backward, JAX jvp-of-vjp), through `check_gradients` and its
vocabulary.

A Hessian-vector product is the derivative of the gradient: `hvp(x, v) = H v` is the jvp of
`grad`, and since `H` is symmetric also its vjp. So the check is two ordinary checks: `grad`
against finite differences of `f` (a scalar), then `hvp` as the backward (and the jvp) of
`grad`, against finite differences of `grad`. If `grad` is wrong, its report is returned (the
Hessian's reference would be wrong too).

For a torch or JAX `f` with no `grad`/`hvp`, the function checked is the framework's backward
`x -> vjp(x, ct)` for a fixed random cotangent `ct` (`ct = 1` for a scalar f: the gradient),
written in the framework; `check_gradients` then checks ITS backward, which is the framework's
double backward (`torch.autograd.grad` through `create_graph=True`) or, for JAX, `jax.vjp` of
`jax.vjp` and `jax.jvp` of `jax.vjp` (forward-over-reverse).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from .._errors import NormgradError
from ._frameworks import framework_of
from ._report import GradReport

Fn = Callable[..., Any]


def check_hvp(
    f: Fn, x: Any, grad: Fn | None = None, hvp: Fn | None = None, **kw: Any
) -> GradReport:
    """Check a Hessian-vector product `hvp(x, v) -> H v` of a scalar `f`, with its `grad(x)`.

    - `x`: one array or a tuple of arrays (then `f(*xs)`, `grad(*xs)` returns a tuple and
      `hvp(*xs, *vs)` returns a tuple).
    - First `grad` is checked against finite differences of `f`; if it is wrong, that report is
      returned, with a note. Then `hvp` is checked as the backward and the jvp of `grad`
      against finite differences of `grad`: the findings' "backward" is the hvp.
    - With `grad` and `hvp` both None, `f` must be a torch or JAX callable: its framework
      backward's own derivative is checked (double backward; see the module's docstring).
    - `kw`: `check_gradients`' keywords (mode, step, rtol, atol, seed, budgets, ...); not
      `dy` or `jvp`.
    """
    bad = {"dy", "jvp"} & set(kw)
    if bad:
        raise NormgradError(f"check_hvp takes no {sorted(bad)}: the cotangents are chosen for it.")
    if grad is None and hvp is None:
        return _framework_double_backward(f, x, kw)
    if not callable(grad) or not callable(hvp):
        raise NormgradError(
            "check_hvp needs grad(x) -> dx and hvp(x, v) -> H v as functions (or neither, for a "
            f"torch or JAX f); got grad={type(grad).__name__}, hvp={type(hvp).__name__}."
        )
    return _check_hvp(f, x, grad, hvp, kw)


def _check_hvp(f: Fn, x: Any, grad: Fn, hvp: Fn, kw: dict[str, Any]) -> GradReport:
    from ._compare import check_gradients

    multi = isinstance(x, tuple)
    xs = list(x) if multi else [x]
    shapes = [np.shape(a) for a in xs]
    y = np.asarray(f(*xs))
    if y.size != 1:
        raise NormgradError(
            f"check_hvp needs a scalar f (a loss); f(x) has shape {y.shape}. Check "
            "lambda x: np.vdot(ct, f(x)) for a fixed cotangent ct."
        )

    def grads(*a: Any) -> list[Any]:
        out = grad(*a)
        return list(out) if multi else [out]

    def grad_vjp(*args: Any) -> Any:
        *a, dy = args
        scaled = [float(np.asarray(dy).ravel()[0]) * np.asarray(g) for g in grads(*a)]
        return tuple(scaled) if multi else scaled[0]

    first = check_gradients(f, x, grad_vjp, **kw)
    if not first.ok:
        first.notes.insert(
            0,
            "check_hvp: grad(x) does not match finite differences of f (below); fix it first, "
            "since the Hessian-vector product is checked against finite differences of grad.",
        )
        return first

    def flat_grad(*a: Any) -> Any:
        return np.concatenate([np.ravel(g) for g in grads(*a)])

    def split(v: Any) -> list[Any]:
        offs = np.cumsum([0, *[int(np.prod(s)) for s in shapes]])
        flat = np.ravel(v)
        return [flat[offs[i] : offs[i + 1]].reshape(s) for i, s in enumerate(shapes)]

    def hv(*a: Any) -> list[Any]:
        out = hvp(*a)
        return list(out) if multi else [out]

    def hvp_vjp(*args: Any) -> Any:  # H is symmetric: the vjp of grad is H dy
        *a, dy = args
        out = [np.asarray(h) for h in hv(*a, *split(dy))]
        return tuple(out) if multi else out[0]

    def hvp_jvp(*args: Any) -> Any:
        k = len(args) // 2
        return np.concatenate([np.ravel(h) for h in hv(*args[:k], *args[k:])])

    report = check_gradients(flat_grad, x, hvp_vjp, jvp=hvp_jvp, **kw)
    report.notes.insert(
        0,
        "check_hvp: grad matches finite differences of f; below, hvp(x, v) is checked as the "
        "derivative of grad (the 'backward' of the findings is the hvp, J is the Hessian).",
    )
    return report


def _framework_double_backward(f: Fn, x: Any, kw: dict[str, Any]) -> GradReport:
    from ._compare import check_gradients

    framework = framework_of(f, x)
    if framework is None:
        raise NormgradError(
            "check_hvp(f, x) with no grad and hvp needs a torch or JAX f (whose own double "
            "backward is checked); for NumPy code pass grad(x) and hvp(x, v)."
        )
    seed = int(kw.get("seed", 0))
    back = _torch_back(f, x, seed) if framework == "torch" else _jax_back(f, x, seed)
    report = check_gradients(back, x, **kw)
    report.notes.insert(
        0,
        f"check_hvp: the function checked is {framework}'s backward of f, x -> vjp(x, ct) for a "
        "fixed random ct (ct = 1 for a scalar f: the gradient); its own backward is the double "
        "backward"
        + (" (torch.autograd.grad with create_graph=True)." if framework == "torch" else "")
        + (" (jax.vjp of jax.vjp; the jvp is jax.jvp of jax.vjp)." if framework == "jax" else ""),
    )
    return report


def _cotangent(shape: tuple[int, ...], seed: int) -> Any:
    if int(np.prod(shape)) == 1:
        return np.ones(shape)
    return np.random.default_rng((seed, 0x4856)).standard_normal(shape)


def _torch_back(f: Fn, x: Any, seed: int) -> Fn:
    import torch

    args = x if isinstance(x, tuple) else (x,)
    y = f(*(torch.as_tensor(a) for a in args))
    ct0 = _cotangent(tuple(y.shape), seed)

    def back(*ts: Any) -> Any:
        with torch.enable_grad():
            ins = [t if t.requires_grad else t.detach().requires_grad_(True) for t in ts]
            out = f(*ins)
            ct = torch.as_tensor(ct0, dtype=out.dtype).reshape(out.shape)
            gs = torch.autograd.grad(out, ins, ct, create_graph=True, allow_unused=True)
        flat = [torch.zeros_like(t) if g is None else g for g, t in zip(gs, ins, strict=True)]
        return torch.cat([g.reshape(-1) for g in flat])

    return back


def _jax_back(f: Fn, x: Any, seed: int) -> Fn:
    import jax
    import jax.numpy as jnp

    from ._fw_jax import x64

    args = x if isinstance(x, tuple) else (x,)
    with x64():
        y = jnp.asarray(f(*args))
    ct0 = _cotangent(tuple(y.shape), seed)

    def back(*a: Any) -> Any:
        with x64():
            out, pull = jax.vjp(f, *a)
            grads = pull(jnp.asarray(ct0, dtype=out.dtype).reshape(out.shape))
            return jnp.concatenate([jnp.ravel(g) for g in jax.tree_util.tree_leaves(grads)])

    return back
