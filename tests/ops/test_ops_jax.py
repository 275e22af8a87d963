"""The op against JAX autodiff of the plain formula (jax.grad, jax.jvp), in float64."""

import numpy as np
import pytest

import normgrad as ng

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")


pytestmark = pytest.mark.usefixtures("jax_x64")  # float64 for every test here


def _formula(x, axes, eps, eps_mode, ddof):
    mu = jnp.mean(x, axis=axes, keepdims=True)
    n = np.prod([x.shape[a] for a in (range(x.ndim) if axes is None else axes)])
    var = jnp.sum((x - mu) ** 2, axis=axes, keepdims=True) / (n - ddof)
    s = jnp.sqrt(var + eps) if eps_mode == "inside" else jnp.sqrt(var) + eps
    return (x - mu) / s


@pytest.mark.parametrize("axes", [None, (2,), (1, 2)])
@pytest.mark.parametrize("eps_mode", ["inside", "outside"])
@pytest.mark.parametrize("ddof", [0, 1])
def test_matches_jax_grad_and_jvp(rng, axes, eps_mode, ddof):
    x = rng.normal(3.0, 2.0, size=(2, 3, 5))
    dy, tx = rng.normal(size=x.shape), rng.normal(size=x.shape)
    opts = dict(eps=1e-3, eps_mode=eps_mode, ddof=ddof)

    def loss(z):
        return jnp.sum(jnp.asarray(dy) * _formula(z, axes, **opts))

    y, ctx = ng.normalize_forward(x, axes, **opts)
    np.testing.assert_allclose(y, _formula(jnp.asarray(x), axes, **opts), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(
        ng.normalize_backward(ctx, dy).x, jax.grad(loss)(jnp.asarray(x)), rtol=1e-10, atol=1e-12
    )
    _, ty_ref = jax.jvp(lambda z: _formula(z, axes, **opts), (jnp.asarray(x),), (jnp.asarray(tx),))
    np.testing.assert_allclose(ng.normalize_jvp(x, tx, axes, **opts)[1], ty_ref, atol=1e-12)
    # second derivative: Hessian-vector product of <dy, y>
    hvp = jax.jvp(jax.grad(loss), (jnp.asarray(x),), (jnp.asarray(tx),))[1]
    np.testing.assert_allclose(ng.normalize_backward_jvp(ctx, dy, tx=tx).tx, hvp, atol=1e-10)


def test_runs_on_jax_arrays(rng):
    x = jnp.asarray(rng.normal(size=(3, 4)))
    y = ng.normalize(x, -1)
    assert isinstance(y, jax.Array)
    np.testing.assert_allclose(y, _formula(x, (1,), 1e-5, "inside", 0), atol=1e-12)
