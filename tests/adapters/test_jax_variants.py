"""normgrad.jax with `center=False` (RMS normalization) and `stats=` (given statistics):
against JAX autodiff of the plain formulas, the NumPy op and finite differences."""

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
from jax.test_util import check_grads  # noqa: E402

import normgrad as ng  # noqa: E402
from normgrad import NormgradError  # noqa: E402
from normgrad.jax import apply, normalize  # noqa: E402

SHAPE = (2, 3, 4)
AXES_PARAM = {None: SHAPE, -1: (4,), (0, 2): (3, 1), (1, 2): (3, 4)}

pytestmark = pytest.mark.usefixtures("jax_x64")  # float64 for every test here


def _ax(x, axes):
    if axes is None:
        return tuple(range(x.ndim))
    return tuple(a % x.ndim for a in np.atleast_1d(axes))


def _rms(x, axes, eps=1e-5, eps_mode="inside", w=None, b=None):
    """RMS normalization written out in jax.numpy, differentiated by JAX: the reference."""
    ms = jnp.mean(x * x, axis=_ax(x, axes), keepdims=True)
    s = jnp.sqrt(ms + eps) if eps_mode == "inside" else jnp.sqrt(ms) + eps
    y = x / s
    return y if w is None else y * w + (0 if b is None else b)


def _inputs(axes, seed=0):
    r = np.random.default_rng(seed)
    x = jnp.asarray(r.normal(size=SHAPE) * 2 + 0.5)
    pshape = AXES_PARAM[axes]
    return x, jnp.asarray(r.uniform(0.5, 1.5, pshape)), jnp.asarray(r.normal(size=pshape))


def _close(a, b, tol=1e-10):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("eps_mode", ["inside", "outside"])
@pytest.mark.parametrize("axes", list(AXES_PARAM))
def test_rms_check_grads_order_2(axes, eps_mode, affine):
    x, w, b = _inputs(axes)
    kw = {"eps": 1e-3, "eps_mode": eps_mode, "center": False}
    if affine:
        f = lambda x, w, b: normalize(x, axes, weight=w, bias=b, **kw)  # noqa: E731
        check_grads(f, (x, w, b), order=2, modes=("fwd", "rev"))
    else:
        check_grads(lambda x: normalize(x, axes, **kw), (x,), order=2, modes=("fwd", "rev"))


@pytest.mark.parametrize("eps_mode", ["inside", "outside"])
@pytest.mark.parametrize("axes", list(AXES_PARAM))
def test_rms_equals_jax_autodiff_of_the_formula(axes, eps_mode):
    x, w, b = _inputs(axes, seed=1)
    ours = lambda x, w, b: normalize(x, axes, eps_mode=eps_mode, center=False, weight=w, bias=b)  # noqa: E731
    ref = lambda x, w, b: _rms(x, axes, 1e-5, eps_mode, w, b)  # noqa: E731
    _close(ours(x, w, b), ref(x, w, b), 1e-12)
    dy = jnp.asarray(np.random.default_rng(2).normal(size=SHAPE))

    def loss(f):
        return lambda x, w, b: jnp.sum(f(x, w, b) * dy) + jnp.sum(f(x, w, b) ** 3)

    args = (x, w, b)
    for a, r in zip(
        jax.grad(loss(ours), argnums=(0, 1, 2))(*args),
        jax.grad(loss(ref), argnums=(0, 1, 2))(*args),
        strict=True,
    ):
        _close(a, r)
    for transform in (jax.jacfwd, jax.jacrev):
        for a, r in zip(
            transform(ours, argnums=(0, 1, 2))(*args),
            transform(ref, argnums=(0, 1, 2))(*args),
            strict=True,
        ):
            _close(a, r)
    # second order: the full Hessian of a scalar loss w.r.t. x (forward over reverse)
    h = jax.hessian(lambda x: jnp.sum(ours(x, w, b) * dy))(x)
    _close(h, jax.hessian(lambda x: jnp.sum(ref(x, w, b) * dy))(x), 1e-9)


@pytest.mark.parametrize("eps_mode", ["inside", "outside"])
@pytest.mark.parametrize("axes", [None, -1, (0, 2)])
def test_rms_equals_the_numpy_op(axes, eps_mode):
    """Values, VJP and JVP against normgrad on NumPy arrays (the kernels where they apply)."""
    x, w, b = _inputs(axes, seed=3)
    r = np.random.default_rng(4)
    dy, tx = r.normal(size=SHAPE), r.normal(size=SHAPE)
    kw = {"eps_mode": eps_mode, "center": False}
    xn, wn, bn = (np.asarray(a) for a in (x, w, b))
    y_np, ctx = ng.normalize_forward(xn, axes, weight=wn, bias=bn, **kw)
    g_np = ng.normalize_backward(ctx, dy)
    ty_np = ng.normalize_jvp(xn, tx, axes, weight=wn, bias=bn, **kw)[1]
    f = lambda x, w: normalize(x, axes, weight=w, bias=b, **kw)  # noqa: E731
    y, vjp = jax.vjp(f, x, w)
    gx, gw = vjp(jnp.asarray(dy))
    _close(y, y_np, 1e-13)
    _close(gx, g_np.x, 1e-12)
    _close(gw, g_np.weight, 1e-12)
    _close(jax.jvp(lambda x: f(x, w), (x,), (jnp.asarray(tx),))[1], ty_np, 1e-12)


def test_rms_under_jit_and_vmap():
    x, w, _ = _inputs(-1)
    f = jax.jit(lambda x, w: normalize(x, -1, weight=w, center=False))
    _close(f(x, w), _rms(x, -1, w=w), 1e-12)
    per_example = jax.vmap(lambda xi: normalize(xi, None, center=False))(x)
    _close(per_example, _rms(x, (1, 2)), 1e-12)
    loss = jax.jit(lambda x: jnp.sum(jax.vmap(lambda xi: normalize(xi, 0, center=False))(x) ** 3))
    ref = lambda x: jnp.sum(_rms(x, 1) ** 3)  # noqa: E731
    _close(jax.grad(loss)(x), jax.grad(ref)(x))
    _close(
        jax.grad(lambda x: jnp.sum(jax.grad(loss)(x) ** 2))(x),
        jax.grad(lambda x: jnp.sum(jax.grad(ref)(x) ** 2))(x),
        1e-9,
    )
    check_grads(jax.jit(jax.vmap(lambda xi: normalize(xi, -1, center=False))), (x,), order=2)


def test_rms_with_a_mask_equals_the_numpy_op():
    r = np.random.default_rng(5)
    x = r.normal(size=(4, 6)) + 1
    mask = r.random((4, 6)) < 0.7
    mask[:, 0] = True
    dy = r.normal(size=(4, 6))
    y_np, ctx = ng.normalize_forward(x, -1, center=False, mask=mask)
    g_np = ng.normalize_backward(ctx, dy)
    f = jax.jit(lambda a, m: normalize(a, -1, center=False, mask=m))
    _close(f(jnp.asarray(x), jnp.asarray(mask)), y_np, 1e-13)
    gx = jax.grad(lambda a: jnp.sum(f(a, jnp.asarray(mask)) * dy))(jnp.asarray(x))
    _close(gx, g_np.x, 1e-12)
    # and the masked RMS written out: the mean square over the counted elements only
    ms = jnp.sum(jnp.where(mask, x * x, 0), -1, keepdims=True) / mask.sum(-1, keepdims=True)
    _close(y_np, x / np.sqrt(ms + 1e-5), 1e-12)


def test_apply_as_an_rmsnorm_layer_trains():
    r = np.random.default_rng(6)
    x = jnp.asarray(r.normal(size=(8, 16)) * 3 + 1)
    target = jnp.asarray(r.normal(size=(8, 16)))
    params = {"weight": jnp.ones(16)}  # RMSNorm: a weight, no bias

    def loss(p):
        return jnp.mean((apply(p, x, -1, center=False) - target) ** 2)

    def ref(p):
        return jnp.mean((_rms(x, -1, w=p["weight"]) - target) ** 2)

    _close(jax.grad(loss)(params)["weight"], jax.grad(ref)(params)["weight"])
    step = jax.jit(lambda p: jax.tree.map(lambda a, g: a - 0.5 * g, p, jax.grad(loss)(p)))
    l0 = loss(params)
    for _ in range(5):
        params = step(params)
    assert loss(params) < l0


def test_rms_float32_without_x64_keeps_dtype():
    jax.config.update("jax_enable_x64", False)
    x = jnp.asarray(np.random.default_rng(7).normal(size=(4, 6)), dtype=jnp.float32)
    y = normalize(x, -1, center=False)
    assert y.dtype == jnp.float32
    _close(y, _rms(x, -1), 1e-5)
    g = jax.grad(lambda x: jnp.sum(normalize(x, -1, center=False) ** 3))(x)
    assert g.dtype == jnp.float32
    _close(g, jax.grad(lambda x: jnp.sum(_rms(x, -1) ** 3))(x), 1e-4)


# --- stats=: given statistics (inference) ---


def _fixed(x, mean, var, eps=1e-5, w=None, b=None):
    """Normalization by constant statistics, written out: the reference."""
    y = (x - mean) / jnp.sqrt(var + eps)
    return y if w is None else y * w + b


@pytest.mark.parametrize("ddof", [0, 1])
@pytest.mark.parametrize("library", ["numpy", "jax"])
def test_stats_normalize_with_given_statistics_as_constants(library, ddof):
    r = np.random.default_rng(8)
    train = r.normal(size=(50, 4)) * 3 + 2
    m = ng.moments(train if library == "numpy" else jnp.asarray(train), 0)
    mean, var = np.asarray(m.mean), np.asarray(m.var(ddof))
    x, w, b = (jnp.asarray(a) for a in (r.normal(size=(6, 4)), r.uniform(0.5, 1.5, 4),
                                        r.normal(size=4)))  # fmt: skip
    ours = lambda x, w, b: normalize(x, 0, ddof=ddof, weight=w, bias=b, stats=m)  # noqa: E731
    ref = lambda x, w, b: _fixed(x, mean, var, 1e-5, w, b)  # noqa: E731
    _close(ours(x, w, b), ref(x, w, b), 1e-13)
    xn, wn, bn = (np.asarray(a) for a in (x, w, b))
    y_np = ng.normalize(xn, 0, ddof=ddof, weight=wn, bias=bn, stats=ng.moments(train, 0))
    _close(ours(x, w, b), y_np, 1e-13)
    for transform in (jax.jacfwd, jax.jacrev):
        for a, rr in zip(transform(ours, argnums=(0, 1, 2))(x, w, b),
                         transform(ref, argnums=(0, 1, 2))(x, w, b), strict=True):  # fmt: skip
            _close(a, rr)
    check_grads(lambda x, w: ours(x, w, b), (x, w), order=2, modes=("fwd", "rev"))


def test_stats_traced_under_jit_and_constant_for_the_gradient():
    r = np.random.default_rng(9)
    m = ng.moments(jnp.asarray(r.normal(size=(30, 5)) + 1), 0)
    x = jnp.asarray(r.normal(size=(3, 5)))
    f = jax.jit(lambda x, m: normalize(x, 0, stats=m))
    _close(f(x, m), _fixed(x, m.mean, m.var()), 1e-13)
    # the statistics are constants: no gradient flows into them
    gm = jax.grad(lambda m: jnp.sum(f(x, m) ** 2))(m)
    for leaf in jax.tree_util.tree_leaves(gm):
        np.testing.assert_array_equal(np.asarray(leaf), 0.0)


def test_variant_errors_are_normgrad_errors():
    x = jnp.asarray(np.random.default_rng(10).normal(size=(3, 4)))
    with pytest.raises(NormgradError, match="ddof=1 with center=False"):
        normalize(x, -1, center=False, ddof=1)
    with pytest.raises(NormgradError, match="center must be True"):
        normalize(x, -1, center="no")  # type: ignore[arg-type]
    m = ng.moments(x, -1)
    with pytest.raises(NormgradError, match="stats with center=False"):
        normalize(x, -1, center=False, stats=m)
    with pytest.raises(NormgradError, match="one value per group"):
        normalize(x, 0, stats=m)
    with pytest.raises(NormgradError, match="must be a Moments"):
        normalize(x, -1, stats=(1, 2))  # type: ignore[arg-type]
    with pytest.raises(NormgradError, match="stats with mask"):
        normalize(x, -1, stats=m, mask=jnp.ones((3, 4), bool))
