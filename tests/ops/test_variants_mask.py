"""Masks (`mask=`): against an own loop over groups with NumPy masked arrays, and float64
finite differences of every derivative; NaN groups; bad masks."""

import importlib.util

import numpy as np
import pytest
from _fd import fd_directional, fd_jacobian
from hypothesis import given, settings
from hypothesis import strategies as st

import normgrad as ng
from normgrad import NormgradError

LAYOUTS = [((7,), None), ((3, 5), 1), ((3, 5), 0), ((2, 3, 4), (0, 2)), ((2, 3, 4), (1, 2))]
MODES = ["inside", "outside"]


def _loop_masked(x, mask, axes, eps, eps_mode, ddof=0, center=True, w=None, b=None):
    """Own reference: one group at a time, statistics of the counted elements (masked
    arrays), every element normalized by them."""
    red = ng._axes.normalize_axes(axes, x.ndim)
    kept = [i for i in range(x.ndim) if i not in red]
    order = kept + list(red)
    xt = np.moveaxis(x, order, range(x.ndim))
    mt = np.moveaxis(np.broadcast_to(mask, x.shape), order, range(x.ndim))
    y = np.empty_like(xt)
    for idx in np.ndindex(*xt.shape[: len(kept)]):
        g = np.ma.array(xt[idx], mask=~mt[idx])
        if center:
            mu, var = float(g.mean()), float(g.var(ddof=ddof))
        else:
            mu, var = 0.0, float((g * g).mean())
        den = np.sqrt(var + eps) if eps_mode == "inside" else np.sqrt(var) + eps
        y[idx] = (xt[idx] - mu) / den
    y = np.moveaxis(y, range(x.ndim), order)
    if w is not None:
        y = y * w
    if b is not None:
        y = y + b
    return y


def _case(rng, shape, axes, keep=0.6):
    """x, a mask with at least two counted elements per group, weight and bias."""
    red = ng._axes.normalize_axes(axes, len(shape))
    x = rng.normal(size=shape) * 2 + 0.7
    mask = rng.random(shape) < keep
    first = tuple(slice(0, 2) if i == red[-1] else slice(None) for i in range(len(shape)))
    if shape[red[-1]] >= 2:
        mask[first] = True
    else:
        mask[...] = True
    pshape = tuple(s if i in red else 1 for i, s in enumerate(shape))
    return x, mask, rng.normal(size=pshape), rng.normal(size=pshape)


@pytest.mark.parametrize(("shape", "axes"), LAYOUTS)
@pytest.mark.parametrize("eps_mode", MODES)
@pytest.mark.parametrize(("center", "ddof"), [(True, 0), (True, 1), (False, 0)])
def test_forward_matches_masked_array_loop(rng, shape, axes, eps_mode, center, ddof):
    x, mask, w, b = _case(rng, shape, axes)
    kw = {"eps": 1e-3, "eps_mode": eps_mode, "ddof": ddof, "center": center}
    y = ng.normalize(x, axes, mask=mask, weight=w, bias=b, **kw)
    ref = _loop_masked(x, mask, axes, 1e-3, eps_mode, ddof, center, w, b)
    np.testing.assert_allclose(y, ref, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize(("shape", "axes"), LAYOUTS)
@pytest.mark.parametrize("eps_mode", MODES)
@pytest.mark.parametrize(("center", "ddof"), [(True, 0), (True, 1), (False, 0)])
def test_every_derivative_against_finite_differences(rng, shape, axes, eps_mode, center, ddof):
    x, mask, w, b = _case(rng, shape, axes)
    kw = {"eps": 1e-3, "eps_mode": eps_mode, "ddof": ddof, "center": center, "mask": mask}

    def f(v):
        return ng.normalize(v, axes, weight=w, bias=b, **kw)

    jac_fd = fd_jacobian(f, x)
    jac = ng.normalize_jacobian(x, axes, weight=w, bias=b, **kw)
    np.testing.assert_allclose(jac, jac_fd, rtol=1e-6, atol=1e-7)
    dy, tx, tdy = (rng.normal(size=shape) for _ in range(3))
    _y, ctx = ng.normalize_forward(x, axes, weight=w, bias=b, **kw)
    grads = ng.normalize_backward(ctx, dy)
    axes_all = tuple(range(len(shape)))
    np.testing.assert_allclose(grads.x, np.tensordot(dy, jac_fd, (axes_all, axes_all)), atol=1e-7)
    tw, tb = rng.normal(size=w.shape), rng.normal(size=b.shape)
    pw = fd_directional(lambda v: ng.normalize(x, axes, weight=v, bias=b, **kw), w, tw)
    pb = fd_directional(lambda v: ng.normalize(x, axes, weight=w, bias=v, **kw), b, tb)
    np.testing.assert_allclose(np.sum(grads.weight * tw), np.sum(dy * pw), rtol=1e-7)
    np.testing.assert_allclose(np.sum(grads.bias * tb), np.sum(dy * pb), rtol=1e-7)
    _, ty = ng.normalize_jvp(x, tx, axes, weight=w, bias=b, **kw)
    np.testing.assert_allclose(ty, fd_directional(f, x, tx), rtol=1e-6, atol=1e-7)

    # the second derivatives: d/dt of the backward along (tx, tdy)
    def back(t):
        c = ng.normalize_forward(x + t * tx, axes, weight=w, bias=b, **kw)[1]
        return ng.normalize_backward(c, dy + t * tdy).x

    bt = ng.normalize_backward_jvp(ctx, dy, tx, tdy)
    np.testing.assert_allclose(bt.x, grads.x, rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(bt.tx, fd_directional(back, 0.0, 1.0), rtol=1e-6, atol=1e-6)


def test_uncounted_elements_do_not_move_the_statistics(rng):
    x, mask, _, _ = _case(rng, (4, 9), 1)
    y, ctx = ng.normalize_forward(x, 1, mask=mask)
    x2 = np.where(mask, x, 1e6)  # any value at the uncounted places
    y2, ctx2 = ng.normalize_forward(x2, 1, mask=mask)
    np.testing.assert_allclose(y[mask], y2[mask], rtol=1e-14)
    np.testing.assert_allclose(ctx.mean, ctx2.mean, rtol=1e-14)
    dy = rng.normal(size=x.shape)
    dx = ng.normalize_backward(ctx, dy).x
    # an uncounted element's gradient is that of its own y only: r * dy
    np.testing.assert_allclose(dx[~mask], (np.broadcast_to(ctx.rstd, x.shape) * dy)[~mask])


@settings(max_examples=25, deadline=None)
@given(
    st.integers(1, 4), st.integers(2, 6), st.sampled_from([0, 1, (0, 1)]),
    st.sampled_from(MODES), st.booleans(), st.integers(0, 2**31),
)  # fmt: skip
def test_an_all_true_mask_is_no_mask(rows, cols, axes, eps_mode, center, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, cols)) * 3 + 1
    if (axes == 0 and rows < 2) or not center:
        ddof = 0
    else:
        ddof = 1
    kw = {"eps_mode": eps_mode, "center": center, "ddof": ddof}
    y0, c0 = ng.normalize_forward(x, axes, **kw)
    y1, c1 = ng.normalize_forward(x, axes, mask=np.ones(x.shape, bool), **kw)
    np.testing.assert_allclose(y1, y0, rtol=1e-12, atol=1e-12)
    dy, tx = rng.normal(size=x.shape), rng.normal(size=x.shape)
    np.testing.assert_allclose(
        ng.normalize_backward(c1, dy).x, ng.normalize_backward(c0, dy).x, rtol=1e-10, atol=1e-10
    )
    t0 = ng.normalize_backward_jvp(c0, dy, tx).tx
    t1 = ng.normalize_backward_jvp(c1, dy, tx).tx
    np.testing.assert_allclose(t1, t0, rtol=1e-9, atol=1e-9)


def test_a_group_without_enough_counted_elements_is_nan(rng):
    x = rng.normal(size=(3, 4))
    mask = np.array([[True] * 4, [False] * 4, [True, False, False, False]])
    y, ctx = ng.normalize_forward(x, 1, mask=mask, ddof=1)
    assert np.isfinite(y[0]).all() and np.isnan(y[1:]).all()
    assert np.isnan(ctx.var[1:]).all() and np.isfinite(ctx.mean[2]).all()
    assert np.isnan(ctx.mean[1]).all()
    dx = ng.normalize_backward(ctx, np.ones_like(x)).x
    assert np.isfinite(dx[0]).all() and np.isnan(dx[1:]).all()


def test_mask_broadcasts_and_plans_a_path(rng):
    x = rng.normal(size=(4, 6))
    rows = np.array([[True], [False], [True], [True]])  # (4, 1): per-row, across axis 0
    y = ng.normalize(x, 0, mask=rows)
    full = np.broadcast_to(rows, x.shape)
    np.testing.assert_allclose(y, _loop_masked(x, full, 0, 1e-5, "inside"), rtol=1e-12)
    with ng.use_kernels(False):
        plan = ng.plan_forward(x, 0, mask=rows)
        assert plan.path == "generic" and "mask" in plan.reason
        _, ctx = ng.normalize_forward(x, 0, mask=rows)
        assert ng.plan_backward(ctx, np.ones_like(x)).reason == plan.reason
    if importlib.util.find_spec("numba") is not None:
        plan = ng.plan_forward(x, 0, mask=rows)  # the masked kernels (tests/kernels)
        assert plan.path == "small" and "mask" in plan.reason


def test_dask_matches_numpy(rng):
    da = pytest.importorskip("dask.array")
    x, mask, w, b = _case(rng, (6, 8), 1)
    xd, md = da.from_array(x, chunks=(3, 4)), da.from_array(mask, chunks=(3, 4))
    y, ctx = ng.normalize_forward(xd, 1, mask=md, weight=w, bias=b)
    y0, ctx0 = ng.normalize_forward(x, 1, mask=mask, weight=w, bias=b)
    np.testing.assert_allclose(np.asarray(y), y0, rtol=1e-13)
    dy = rng.normal(size=x.shape)
    g = ng.normalize_backward(ctx, da.from_array(dy, chunks=(3, 4)))
    np.testing.assert_allclose(np.asarray(g.x), ng.normalize_backward(ctx0, dy).x, rtol=1e-12)


def test_input_is_not_mutated(rng):
    x, mask, w, _b = _case(rng, (3, 5), 1)
    x0, m0 = x.copy(), mask.copy()
    _y, ctx = ng.normalize_forward(x, 1, mask=mask, weight=w)
    ng.normalize_backward(ctx, np.ones_like(x))
    assert np.array_equal(x, x0) and np.array_equal(mask, m0)


@pytest.mark.parametrize(
    ("mask", "words"),
    [
        (np.ones((3, 5), dtype=np.int64), "boolean"),
        (np.ones((3, 5)), "boolean"),
        (np.ones((5, 3), dtype=bool), "(5, 3)"),
        (np.ones((2, 3, 5), dtype=bool), "(2, 3, 5)"),
        ("yes", "boolean"),
    ],
)
def test_bad_masks_are_refused(mask, words):
    with pytest.raises(NormgradError, match="mask") as err:
        ng.normalize(np.ones((3, 5)), 1, mask=mask)
    assert words in str(err.value)


def test_mask_with_given_statistics_is_refused(rng):
    x = rng.normal(size=(3, 5))
    with pytest.raises(NormgradError, match="stats with mask"):
        ng.normalize(x, 1, stats=ng.moments(x, 1), mask=np.ones(x.shape, bool))


@pytest.mark.parametrize("eps_mode", MODES)
def test_backward_jvp_with_a_moving_weight(rng, eps_mode):
    x, mask, w, b = _case(rng, (3, 6), 1)
    w = rng.normal(size=(1, 6))
    dy, tx, tw = rng.normal(size=x.shape), rng.normal(size=x.shape), rng.normal(size=w.shape)
    kw = {"eps": 1e-3, "eps_mode": eps_mode, "mask": mask, "bias": b}

    def back(t):
        c = ng.normalize_forward(x + t * tx, 1, weight=w + t * tw, **kw)[1]
        g = ng.normalize_backward(c, dy)
        return np.concatenate([g.x.ravel(), g.weight.ravel()])

    ctx = ng.normalize_forward(x, 1, weight=w, **kw)[1]
    bt = ng.normalize_backward_jvp(ctx, dy, tx, tweight=tw)
    fd = fd_directional(back, 0.0, 1.0)
    np.testing.assert_allclose(bt.tx, fd[: x.size].reshape(x.shape), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(bt.tweight, fd[x.size :].reshape(w.shape), rtol=1e-6, atol=1e-7)


def test_float32_within_half_an_ulp_of_float64(rng):
    x = (rng.normal(size=(64, 33)) * 3 + 1).astype(np.float32)
    mask = rng.random(x.shape) < 0.6
    y32 = ng.normalize(x, 1, mask=mask)
    y64 = ng.normalize(x.astype(np.float64), 1, mask=mask)
    assert y32.dtype == np.float32
    ulp = np.spacing(np.abs(y64).astype(np.float32))
    assert np.max(np.abs(y32 - y64) / ulp) <= 0.5 + 1e-9


def test_dask_nan_omit_matches_numpy(rng):
    da = pytest.importorskip("dask.array")
    x = rng.normal(size=(5, 9))
    x[rng.random(x.shape) < 0.2] = np.nan
    xd = da.from_array(x, chunks=(2, 4))
    y = ng.normalize(xd, 1, nan_policy="omit")
    assert isinstance(y, da.Array)
    np.testing.assert_allclose(
        np.asarray(y), ng.normalize(x, 1, nan_policy="omit"), rtol=1e-13, equal_nan=True
    )
    m = ng.moments(xd, 1, nan_policy="omit")
    np.testing.assert_allclose(np.asarray(m.var()), np.nanvar(x, axis=1, keepdims=True), rtol=1e-12)


def test_out_integers_and_lists(rng):
    x, mask, _, _ = _case(rng, (3, 6), 1)
    out = np.empty_like(x)
    y = ng.normalize(x, 1, mask=mask, out=out)
    assert y is out
    np.testing.assert_allclose(out, _loop_masked(x, mask, 1, 1e-5, "inside"), rtol=1e-12)
    xi = np.arange(18).reshape(3, 6) % 5
    yi = ng.normalize(xi, 1, mask=mask.tolist())
    assert yi.dtype == np.float64
    np.testing.assert_allclose(yi, _loop_masked(xi.astype(float), mask, 1, 1e-5, "inside"))
    with pytest.raises(NormgradError, match="zero variance"):
        ng.normalize(np.ones((2, 3)), 1, eps=0, mask=np.ones((2, 3), bool))
