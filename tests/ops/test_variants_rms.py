"""RMS normalization (`center=False`): against F.rms_norm, an own loop, and float64 finite
differences of every derivative, on NumPy, torch and Dask arrays."""

import numpy as np
import pytest
from _fd import fd_directional, fd_jacobian

import normgrad as ng
from normgrad import NormgradError

LAYOUTS = [((7,), None), ((3, 5), 1), ((3, 5), 0), ((2, 3, 4), (0, 2)), ((2, 3, 4), (1, 2))]
MODES = ["inside", "outside"]


def _loop_rms(x, axes, eps, eps_mode, w=None, b=None):
    """Own reference: one group at a time, the formula written out."""
    red = ng._axes.normalize_axes(axes, x.ndim)
    kept = [i for i in range(x.ndim) if i not in red]
    xt = np.moveaxis(x, kept + list(red), range(x.ndim))
    y = np.empty_like(xt)
    for idx in np.ndindex(*xt.shape[: len(kept)]):
        g = xt[idx]
        ms = sum(float(v) ** 2 for v in g.ravel()) / g.size
        den = np.sqrt(ms + eps) if eps_mode == "inside" else np.sqrt(ms) + eps
        y[idx] = g / den
    y = np.moveaxis(y, range(x.ndim), kept + list(red))
    if w is not None:
        y = y * w
    if b is not None:
        y = y + b
    return y


def _params(rng, shape, axes):
    red = ng._axes.normalize_axes(axes, len(shape))
    pshape = tuple(s if i in red else 1 for i, s in enumerate(shape))
    return rng.normal(size=pshape), rng.normal(size=pshape)


@pytest.mark.parametrize(("shape", "axes"), LAYOUTS)
@pytest.mark.parametrize("eps_mode", MODES)
def test_forward_matches_own_loop(rng, shape, axes, eps_mode):
    x = rng.normal(size=shape) + 0.5
    w, b = _params(rng, shape, axes)
    y = ng.normalize(x, axes, center=False, eps=1e-3, eps_mode=eps_mode, weight=w, bias=b)
    np.testing.assert_allclose(y, _loop_rms(x, axes, 1e-3, eps_mode, w, b), rtol=1e-13)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_matches_torch_rms_norm(rng, dtype):
    torch = pytest.importorskip("torch")
    x = rng.normal(size=(4, 3, 6)).astype(dtype)
    w = rng.normal(size=(3, 6)).astype(dtype)
    dy = rng.normal(size=x.shape).astype(dtype)
    xt = torch.tensor(x, requires_grad=True)
    wt = torch.tensor(w, requires_grad=True)
    yt = torch.nn.functional.rms_norm(xt.double(), (3, 6), wt.double(), eps=1e-5)
    yt.backward(torch.tensor(dy).double())
    y, ctx = ng.normalize_forward(x, (1, 2), center=False, eps=1e-5, weight=w)
    grads = ng.normalize_backward(ctx, dy)
    assert y.dtype == x.dtype and grads.x.dtype == x.dtype
    tol = 1e-13 if dtype == "float64" else 2e-6
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=tol, atol=tol)
    np.testing.assert_allclose(grads.x, xt.grad.numpy(), rtol=tol, atol=tol)
    np.testing.assert_allclose(grads.weight, wt.grad.numpy(), rtol=tol, atol=tol)


def test_float32_within_an_ulp_of_float64(rng):
    x = (rng.normal(size=(64, 33)) * 3).astype(np.float32)
    y32 = ng.normalize(x, 1, center=False)
    y64 = ng.normalize(x.astype(np.float64), 1, center=False)
    ulp = np.spacing(np.abs(y64).astype(np.float32))
    assert np.max(np.abs(y32 - y64) / ulp) <= 0.5 + 1e-9


@pytest.mark.parametrize(("shape", "axes"), LAYOUTS)
@pytest.mark.parametrize("eps_mode", MODES)
def test_every_derivative_against_finite_differences(rng, shape, axes, eps_mode):
    x = rng.normal(size=shape) + 0.3
    w, b = _params(rng, shape, axes)
    kw = {"center": False, "eps": 1e-3, "eps_mode": eps_mode, "weight": w, "bias": b}
    dy, tx = rng.normal(size=shape), rng.normal(size=shape)

    def f(v):
        return ng.normalize(v, axes, **kw)

    jac = fd_jacobian(f, x)
    np.testing.assert_allclose(ng.normalize_jacobian(x, axes, **kw), jac, atol=1e-8)
    _, ctx = ng.normalize_forward(x, axes, **kw)
    flat = jac.reshape(x.size, x.size)
    np.testing.assert_allclose(ng.normalize_backward(ctx, dy).x.ravel(), dy.ravel() @ flat,
                               atol=1e-8)  # fmt: skip
    _, ty = ng.normalize_jvp(x, tx, axes, **kw)
    np.testing.assert_allclose(ty, fd_directional(f, x, tx), atol=1e-8)

    def dx_of(v):
        return ng.normalize_backward(ng.normalize_forward(v, axes, **kw)[1], dy).x

    second = ng.normalize_backward_jvp(ctx, dy, tx=tx)
    np.testing.assert_allclose(second.tx, fd_directional(dx_of, x, tx), atol=1e-7)
    tdy = rng.normal(size=shape)
    np.testing.assert_allclose(ng.normalize_backward_jvp(ctx, dy, tdy=tdy).tx,
                               ng.normalize_backward(ctx, tdy).x, atol=1e-12)  # fmt: skip


def test_weight_gradient_and_its_tangent_against_finite_differences(rng):
    x, dy, tx = (rng.normal(size=(3, 5)) for _ in range(3))
    w = rng.normal(size=(5,))
    _, ctx = ng.normalize_forward(x, 1, center=False, weight=w)
    res = ng.normalize_backward_jvp(ctx, dy, tx=tx)

    def dw_of(v):
        return ng.normalize_backward(ng.normalize_forward(v, 1, center=False, weight=w)[1], dy)

    np.testing.assert_allclose(res.tweight, fd_directional(lambda v: dw_of(v).weight, x, tx),
                               atol=1e-8)  # fmt: skip
    fd_dw = fd_directional(lambda v: np.sum(dy * ng.normalize(x, 1, center=False, weight=v)),
                           w, np.eye(5)[2])  # fmt: skip
    np.testing.assert_allclose(ng.normalize_backward(ctx, dy).weight[2], fd_dw, atol=1e-8)


def test_takes_the_kernels_and_agrees_with_the_generic_path(rng):
    """(Every kernel path: tests/kernels/test_rms_kernels.py.)"""
    x = rng.normal(size=(8, 16))
    assert ng.plan_forward(x, 1, center=False).path == "small"
    _, ctx = ng.normalize_forward(x, 1, center=False)
    assert ng.plan_backward(ctx, x).path == "small"
    with ng.use_kernels(False):
        assert ng.plan_forward(x, 1, center=False).path == "generic"
        ref = ng.normalize(x, 1, center=False)
    np.testing.assert_allclose(ng.normalize(x, 1, center=False), ref, rtol=1e-15, atol=1e-15)


def test_torch_and_dask_arrays_agree_with_numpy(rng):
    x = rng.normal(size=(6, 10)) + 1
    dy = rng.normal(size=x.shape)
    y, ctx = ng.normalize_forward(x, 1, center=False, eps_mode="outside")
    dx = ng.normalize_backward(ctx, dy).x
    torch = pytest.importorskip("torch")
    yt, ct = ng.normalize_forward(torch.tensor(x), 1, center=False, eps_mode="outside")
    np.testing.assert_allclose(yt.numpy(), y, rtol=1e-14)
    np.testing.assert_allclose(ng.normalize_backward(ct, torch.tensor(dy)).x.numpy(), dx,
                               rtol=1e-13, atol=1e-15)  # fmt: skip
    da = pytest.importorskip("dask.array")
    yd, cd = ng.normalize_forward(da.from_array(x, chunks=(3, 10)), 1, center=False,
                                  eps_mode="outside")  # fmt: skip
    np.testing.assert_allclose(yd.compute(), y, rtol=1e-14)
    dxd = ng.normalize_backward(cd, da.from_array(dy, chunks=(3, 10))).x
    np.testing.assert_allclose(dxd.compute(), dx, rtol=1e-13, atol=1e-15)


def test_ddof_with_center_false_is_refused():
    x = np.ones((3, 4))
    with pytest.raises(NormgradError, match=r"ddof=1 with center=False.*drop ddof"):
        ng.normalize(x, 1, center=False, ddof=1)


@pytest.mark.parametrize("bad", [0, 1, "no", None])
def test_center_must_be_a_bool(bad):
    with pytest.raises(NormgradError, match="center must be True"):
        ng.normalize(np.ones((3, 4)), 1, center=bad)


def test_eps_zero_and_an_all_zero_group_is_refused():
    x = np.array([[0.0, 0.0], [1.0, 2.0]])
    with pytest.raises(NormgradError, match="zero variance and eps=0"):
        ng.normalize(x, 1, center=False, eps=0.0)
    # a constant nonzero group is fine without centering: its mean square is not zero
    np.testing.assert_allclose(ng.normalize(np.full((1, 3), 2.0), 1, center=False, eps=0), 1.0)


def test_scale_invariance_properties_of_derivation_section_10(rng):
    x, dy = rng.normal(size=(4, 6)), rng.normal(size=(4, 6))
    y, ctx = ng.normalize_forward(x, 1, center=False, eps=0.0)
    np.testing.assert_allclose(ng.normalize(3.5 * x, 1, center=False, eps=0.0), y, rtol=1e-14)
    dx = ng.normalize_backward(ctx, dy).x
    np.testing.assert_allclose(np.sum(dx * y, axis=1), 0.0, atol=1e-13)
    assert np.all(np.abs(np.sum(dx, axis=1)) > 1e-6)  # no mean: constants are not invisible
