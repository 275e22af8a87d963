"""One implementation for every array library; dtypes, memory layouts and input safety."""

import numpy as np
import pytest

import normgrad as ng

xps = pytest.importorskip("array_api_strict")


def _ref(x, axes, **kw):
    return ng.normalize(np.asarray(x, dtype=np.float64), axes, **kw)


@pytest.mark.parametrize("axes", [None, 0, -1, (0, 2)])
@pytest.mark.parametrize("eps_mode", ["inside", "outside"])
def test_array_api_strict_runs_the_same_code(rng, axes, eps_mode):
    x_np = rng.normal(size=(3, 4, 5))
    w_np = rng.normal(size=(5,))
    dy_np, tx_np = rng.normal(size=x_np.shape), rng.normal(size=x_np.shape)
    x, w, dy, tx = (xps.asarray(a) for a in (x_np, w_np, dy_np, tx_np))
    opts = dict(eps=1e-3, eps_mode=eps_mode, ddof=1, weight=w, bias=w)
    opts_np = dict(opts, weight=w_np, bias=w_np)

    y, ctx = ng.normalize_forward(x, axes, **opts)
    assert type(y) is type(x)
    y_np, ctx_np = ng.normalize_forward(x_np, axes, **opts_np)
    np.testing.assert_allclose(np.asarray(y), y_np, rtol=1e-13, atol=1e-13)
    g, g_np = ng.normalize_backward(ctx, dy), ng.normalize_backward(ctx_np, dy_np)
    for a, b in zip(g, g_np, strict=True):
        assert type(a) is type(x)
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-12, atol=1e-12)
    ty = ng.normalize_jvp(x, tx, axes, **opts)[1]
    np.testing.assert_allclose(
        np.asarray(ty), ng.normalize_jvp(x_np, tx_np, axes, **opts_np)[1], atol=1e-12
    )
    sec = ng.normalize_backward_jvp(ctx, dy, tx=tx)
    sec_np = ng.normalize_backward_jvp(ctx_np, dy_np, tx=tx_np)
    np.testing.assert_allclose(np.asarray(sec.tx), sec_np.tx, atol=1e-11)
    small = xps.asarray(x_np[:2, :2, :3])
    np.testing.assert_allclose(
        np.asarray(ng.normalize_jacobian(small, axes, **dict(opts, weight=None, bias=None))),
        ng.normalize_jacobian(x_np[:2, :2, :3], axes, eps=1e-3, eps_mode=eps_mode, ddof=1),
        atol=1e-13,
    )


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_output_dtype_follows_input_and_is_correctly_rounded(rng, dtype):
    x = (rng.normal(size=(50, 40)) * 3 + 100).astype(dtype)
    y = ng.normalize(x, 1)
    assert y.dtype == dtype
    ref = _ref(x, 1)  # float64 reference from the same (rounded) inputs
    ulp = np.spacing(np.abs(ref).astype(dtype)).astype(np.float64)
    # statistics in float64 and one rounding at the end: within half an ulp (+ tie slack)
    assert np.all(np.abs(y.astype(np.float64) - ref) <= 0.5 * ulp * (1 + 1e-6))
    _, ctx = ng.normalize_forward(x, 1)
    dy = rng.normal(size=x.shape).astype(dtype)
    dx = ng.normalize_backward(ctx, dy).x
    assert dx.dtype == dtype
    _, ctx64 = ng.normalize_forward(x.astype(np.float64), 1)
    dx_ref = ng.normalize_backward(ctx64, dy.astype(np.float64)).x
    assert np.all(np.abs(dx - dx_ref) <= 0.5 * np.spacing(np.abs(dx_ref).astype(dtype)) * 1.000001)


def test_integers_promote_to_float64():
    x = np.arange(12).reshape(3, 4)
    y = ng.normalize(x, 1)
    assert y.dtype == np.float64
    np.testing.assert_allclose(y, _ref(x, 1))


def test_large_offset_float32_keeps_precision(rng):
    # E[x^2] - E[x]^2 would lose every digit here; the two-pass float64 statistics do not.
    x = (1e4 + rng.normal(size=100_000)).astype(np.float32)
    y = ng.normalize(x)
    ref = _ref(x, None)
    assert np.max(np.abs(y - ref)) <= 0.5 * np.spacing(np.float32(np.max(np.abs(ref))))


@pytest.mark.parametrize("axes", [None, 0, 1, (1, 2)])
def test_non_contiguous_and_fortran_inputs_give_the_same_result(rng, axes):
    base = rng.normal(size=(6, 8, 10))
    x = np.ascontiguousarray(base[::2, :, ::-1].transpose(1, 0, 2))  # reference copy
    views = [base[::2, :, ::-1].transpose(1, 0, 2), np.asfortranarray(x)]
    dy = rng.normal(size=x.shape)
    y_ref, ctx = ng.normalize_forward(x, axes)
    dx_ref = ng.normalize_backward(ctx, dy).x
    for v in views:
        assert not v.flags.c_contiguous
        y, c = ng.normalize_forward(v, axes)
        np.testing.assert_allclose(y, y_ref, rtol=1e-14, atol=1e-14)
        np.testing.assert_allclose(
            ng.normalize_backward(c, np.asfortranarray(dy)).x, dx_ref, rtol=1e-13, atol=1e-13
        )


def test_inputs_are_never_modified(rng):
    x, w, b, dy, tx = (rng.normal(size=s) for s in [(4, 5), (5,), (5,), (4, 5), (4, 5)])
    copies = [a.copy() for a in (x, w, b, dy, tx)]
    y, ctx = ng.normalize_forward(x, -1, weight=w, bias=b)
    ng.normalize_backward(ctx, dy)
    ng.normalize_jvp(x, tx, -1, weight=w, bias=b)
    ng.normalize_backward_jvp(ctx, dy, tx=tx, tdy=dy, tweight=w)
    ng.normalize_jacobian(x, -1, weight=w, bias=b)
    for a, c in zip((x, w, b, dy, tx), copies, strict=True):
        np.testing.assert_array_equal(a, c)
    y[...] = 0  # the output is not a view of the input
    np.testing.assert_array_equal(x, copies[0])


def test_context_keeps_only_group_sized_statistics(rng):
    x = rng.normal(size=(8, 3, 5))
    _, ctx = ng.normalize_forward(x, (0, 2))
    assert ctx.x is x
    for stat in (ctx.mean, ctx.var, ctx.rstd):
        assert stat.shape == (1, 3, 1) and stat.dtype == np.float64
    np.testing.assert_allclose(ctx.mean.ravel(), x.mean(axis=(0, 2)))
    np.testing.assert_allclose(ctx.var.ravel(), x.var(axis=(0, 2)))
    np.testing.assert_allclose(ctx.rstd.ravel(), 1 / np.sqrt(x.var(axis=(0, 2)) + 1e-5))
