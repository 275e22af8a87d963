"""normgrad.jax: custom_jvp against JAX autodiff of the plain formula and finite differences."""

import subprocess
import sys

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
from jax.test_util import check_grads  # noqa: E402

from normgrad import NormgradError  # noqa: E402
from normgrad.jax import apply, init_params, normalize  # noqa: E402

SHAPE = (2, 3, 4)
AXES_PARAM = {None: SHAPE, -1: (4,), (0, 2): (3, 1), (1, 2): (3, 4)}


pytestmark = pytest.mark.usefixtures("jax_x64")  # float64 for every test here


def _formula(x, axes, eps, eps_mode, ddof, w=None, b=None):
    """The plain formula in jax.numpy, differentiated by JAX: the independent reference."""
    ax = tuple(range(x.ndim)) if axes is None else axes
    mu = jnp.mean(x, axis=ax, keepdims=True)
    n = np.prod([x.shape[a] for a in np.atleast_1d(ax)])
    var = jnp.sum((x - mu) ** 2, axis=ax, keepdims=True) / (n - ddof)
    s = jnp.sqrt(var + eps) if eps_mode == "inside" else jnp.sqrt(var) + eps
    y = (x - mu) / s
    return y if w is None else y * w + b


def _inputs(axes, seed=0):
    r = np.random.default_rng(seed)
    x = jnp.asarray(r.normal(size=SHAPE) * 2 + 0.5)
    pshape = AXES_PARAM[axes]
    return x, jnp.asarray(r.uniform(0.5, 1.5, pshape)), jnp.asarray(r.normal(size=pshape))


@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("ddof", [0, 1])
@pytest.mark.parametrize("eps_mode", ["inside", "outside"])
@pytest.mark.parametrize("axes", list(AXES_PARAM))
def test_check_grads_order_2(axes, eps_mode, ddof, affine):
    x, w, b = _inputs(axes)
    kw = {"eps": 1e-3, "eps_mode": eps_mode, "ddof": ddof}
    if affine:
        check_grads(
            lambda x, w, b: normalize(x, axes, weight=w, bias=b, **kw),
            (x, w, b),
            order=2,
            modes=("fwd", "rev"),
        )
    else:
        check_grads(lambda x: normalize(x, axes, **kw), (x,), order=2, modes=("fwd", "rev"))


@pytest.mark.parametrize(
    ("axes", "eps_mode"),
    [(None, "inside"), (-1, "outside"), ((0, 2), "inside"), ((1, 2), "outside")],
)
def test_values_and_derivatives_equal_jax_autodiff_of_the_formula(axes, eps_mode):
    x, w, b = _inputs(axes, seed=1)
    ours = lambda x, w, b: normalize(x, axes, eps_mode=eps_mode, ddof=1, weight=w, bias=b)  # noqa: E731
    ref = lambda x, w, b: _formula(x, axes, 1e-5, eps_mode, 1, w, b)  # noqa: E731
    np.testing.assert_allclose(ours(x, w, b), ref(x, w, b), rtol=0, atol=1e-12)
    dy = jnp.asarray(np.random.default_rng(2).normal(size=SHAPE))

    def loss(f):
        return lambda x, w, b: jnp.sum(f(x, w, b) * dy) + jnp.sum(f(x, w, b) ** 3)

    for a, r in zip(
        jax.grad(loss(ours), argnums=(0, 1, 2))(x, w, b),
        jax.grad(loss(ref), argnums=(0, 1, 2))(x, w, b),
        strict=True,
    ):
        np.testing.assert_allclose(a, r, rtol=1e-10, atol=1e-10)
    # the full Hessian (forward-over-reverse)
    h = jax.hessian(lambda x: jnp.sum(ours(x, w, b) * dy))(x)
    h_ref = jax.hessian(lambda x: jnp.sum(ref(x, w, b) * dy))(x)
    np.testing.assert_allclose(h, h_ref, rtol=1e-9, atol=1e-9)


def test_jit_and_vmap():
    x, w, b = _inputs(-1)
    f = jax.jit(lambda x, w, b: normalize(x, -1, weight=w, bias=b))
    np.testing.assert_allclose(f(x, w, b), _formula(x, (2,), 1e-5, "inside", 0, w, b), atol=1e-12)
    # vmap over the leading axis: axes are those of one example
    per_example = jax.vmap(lambda xi: normalize(xi, None))(x)
    np.testing.assert_allclose(per_example, _formula(x, (1, 2), 1e-5, "inside", 0), atol=1e-12)
    # gradients of a jitted, vmapped loss
    loss = jax.jit(lambda x: jnp.sum(jax.vmap(lambda xi: normalize(xi, 0))(x) ** 3))
    ref = lambda x: jnp.sum(_formula(x, (1,), 1e-5, "inside", 0) ** 3)  # noqa: E731
    np.testing.assert_allclose(jax.grad(loss)(x), jax.grad(ref)(x), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(
        jax.grad(lambda x: jnp.sum(jax.grad(loss)(x) ** 2))(x),
        jax.grad(lambda x: jnp.sum(jax.grad(ref)(x) ** 2))(x),
        rtol=1e-9,
        atol=1e-9,
    )
    check_grads(jax.jit(jax.vmap(lambda xi: normalize(xi, -1))), (x,), order=2)


def test_functional_layer_trains():
    r = np.random.default_rng(4)
    x = jnp.asarray(r.normal(size=(8, 3, 5, 5)) * 3 + 1)
    target = jnp.asarray(r.normal(size=(8, 3, 5, 5)))
    params = init_params((3, 1, 1), jnp.float64)
    assert params["weight"].shape == params["bias"].shape == (3, 1, 1)
    np.testing.assert_array_equal(params["weight"], 1.0)
    np.testing.assert_array_equal(params["bias"], 0.0)

    def loss(p):
        return jnp.mean((apply(p, x, (0, 2, 3)) - target) ** 2)

    step = jax.jit(lambda p: jax.tree.map(lambda a, g: a - 0.1 * g, p, jax.grad(loss)(p)))
    l0 = loss(params)
    for _ in range(5):
        params = step(params)
    assert loss(params) < l0
    # apply without params equals the bare normalization
    np.testing.assert_allclose(apply(None, x, (0, 2, 3)), _formula(x, (0, 2, 3), 1e-5, "inside", 0))


def test_float32_without_x64_keeps_dtype():
    jax.config.update("jax_enable_x64", False)
    x = jnp.asarray(np.random.default_rng(5).normal(size=(4, 6)), dtype=jnp.float32)
    y = normalize(x, -1)
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(y, _formula(x, (1,), 1e-5, "inside", 0), atol=1e-5)
    g = jax.grad(lambda x: jnp.sum(normalize(x, -1) ** 3))(x)
    assert g.dtype == jnp.float32


def test_integer_input_and_numpy_input():
    xi = jnp.arange(12).reshape(3, 4)
    w = jnp.ones(4)
    y = normalize(xi, -1, weight=w)
    np.testing.assert_allclose(y, _formula(xi.astype(float), (1,), 1e-5, "inside", 0), atol=1e-12)
    # a derivative w.r.t. weight while x is an integer array (x's tangent is float0)
    jw = jax.jacfwd(lambda w: normalize(xi, -1, weight=w))(w)
    jw_ref = jax.jacfwd(lambda w: _formula(xi.astype(float), (1,), 1e-5, "inside", 0, w, 0))(w)
    np.testing.assert_allclose(jw, jw_ref, atol=1e-12)
    xn = np.random.default_rng(6).normal(size=(3, 4))
    assert isinstance(normalize(xn), jax.Array)


def test_errors_are_normgrad_errors():
    x = jnp.ones((2, 3))
    with pytest.raises(NormgradError, match="axis"):
        normalize(x, axes=2)
    with pytest.raises(NormgradError, match="eps_mode"):
        normalize(x + jnp.arange(3.0), eps_mode="middle")
    with pytest.raises(NormgradError, match="broadcast"):
        normalize(x, -1, weight=jnp.ones(4))
    with pytest.raises(NormgradError, match="scalar"):
        normalize(jnp.float64(1.0))
    with pytest.raises(NormgradError, match="JAX array"):
        normalize(object())  # type: ignore[arg-type]
    with pytest.raises(NormgradError, match="extra keys"):
        apply({"weight": jnp.ones(3), "scale": jnp.ones(3)}, x)
    with pytest.raises(NormgradError, match="positive"):
        init_params((3, 0))
    for bad in (True, (3, False)):  # a bool is an int to Python, but never a size
        with pytest.raises(NormgradError, match="positive"):
            init_params(bad)  # type: ignore[arg-type]


def test_import_normgrad_does_not_import_jax():
    code = "import sys, normgrad; sys.exit('jax' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
