"""A JAX `custom_vjp` rule checked as it is: the problem's chain-rule backward (wrong) and the
corrected one (right).

    python examples/jax_custom_vjp.py
    normgrad check --forward examples/jax_custom_vjp.py:wrong --shape 6x6   # names the mistake
    normgrad check --forward examples/jax_custom_vjp.py:right --shape 6x6   # passes
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

EPS = 1e-5


def _forward(x: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array]]:
    mean = jnp.mean(x)
    s = jnp.sqrt(jnp.mean((x - mean) ** 2) + EPS)
    y = (x - mean) / s
    return y, (x, y, s)


@jax.custom_vjp
def wrong(x: jax.Array) -> jax.Array:
    """Whole-array normalization whose backward is the problem's diagonal-only chain rule."""
    return _forward(x)[0]


def _wrong_bwd(res: Any, dy: jax.Array) -> tuple[jax.Array]:
    x, _, s = res
    mean, n = jnp.mean(x), x.size
    return (dy * (1 / s - 0.5 * (x - mean) / s**3 * 2 * (x - mean) / n),)


wrong.defvjp(_forward, _wrong_bwd)


@jax.custom_vjp
def right(x: jax.Array) -> jax.Array:
    """The same forward, with dx = (dy - mean(dy) - y mean(dy y)) / s."""
    return _forward(x)[0]


def _right_bwd(res: Any, dy: jax.Array) -> tuple[jax.Array]:
    _, y, s = res
    return ((dy - jnp.mean(dy) - y * jnp.mean(dy * y)) / s,)


right.defvjp(_forward, _right_bwd)

if __name__ == "__main__":
    import numpy as np

    from normgrad.check import check_gradients

    x = np.random.default_rng(0).standard_normal((6, 6))
    for name, fn in (("wrong", wrong), ("right", right)):
        report = check_gradients(fn, x)
        print(f"{name}: ok={report.ok}, findings: {[f.kind for f in report.diagnosis]}")
