"""The fused numba kernels agree with the generic Array-API path for every layout and option."""

from __future__ import annotations

import json
import subprocess
import sys
from contextlib import contextmanager

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import normgrad as ng
from normgrad import _ops
from normgrad._errors import NormgradError

pytest.importorskip("numba")
import numba

from normgrad import _kernels


def _close(a, b, ulps: float, scale: float = 0.0) -> None:
    """max|a - b| <= ulps * ulp(max(|b|, scale)), in b's dtype: "a few ulp" of the result's
    scale (or of its terms' scale, when they cancel)."""
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape and a.dtype == b.dtype
    scale = np.spacing(b.dtype.type(max(np.max(np.abs(b)), scale)))
    err = np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))
    assert err <= ulps * scale, f"max error {err} > {ulps} ulp ({ulps * scale})"


def _y_scale(ctx) -> float:
    """Bound on the terms of y = (x - mu) rstd w + b: `x - mu` rounds relative to |mu|."""
    w = 1.0 if ctx.weight is None else np.asarray(ctx.weight, dtype=np.float64)
    return float(np.max(np.abs(ctx.mean * ctx.rstd * w)))


def _dx_scale(ctx, dy) -> float:
    """Bound on the terms of dx = r (g - mean g) - (c/m) xhat sum(g xhat): what its rounding
    is relative to (|xhat| <= sqrt(m), so the second term is at most r max|g| max xhat^2)."""
    w = 1.0 if ctx.weight is None else np.asarray(ctx.weight, dtype=np.float64)
    rg = np.max(np.abs(ctx.rstd * w * np.asarray(dy, dtype=np.float64)))
    xhat = (np.asarray(ctx.x, dtype=np.float64) - ctx.mean) * ctx.rstd
    return float(rg * (1 + np.max(xhat**2)))


@contextmanager
def _path(path):
    """Send the kernel calls inside a block down one path: "small" (the default: the
    single-call kernels up to SMALL_MAX_SIZE), "planned" (SMALL_MAX_SIZE = 0: C-contiguous
    inputs without affine parameters go to the cached whole-group call, others to the blocked
    kernels) or "blocked" (the blocked kernels' `forward`/`backward` for every input)."""
    old = _ops.SMALL_MAX_SIZE, _ops._planned_forward, _kernels.backward_planned
    if path != "small":
        _ops.SMALL_MAX_SIZE = 0
    if path == "blocked":
        _ops._planned_forward = lambda *a: None
        _kernels.backward_planned = lambda *a: None
    try:
        yield
    finally:
        _ops.SMALL_MAX_SIZE, _ops._planned_forward, _kernels.backward_planned = old


# Each agreement test runs on the small single-call kernels (where the layout allows), on the
# planned whole-group calls and on the blocked kernels.
PATHS = pytest.mark.parametrize("path", ["small", "planned", "blocked"])


def _forward_calls():
    return _kernels.calls["forward"] + _kernels.calls["forward_small"]


def _both(x, axes, dy=None, path="small", **kw):
    """(kernel results, generic results) for forward and backward, checking the kernels ran."""
    before = dict(_kernels.calls)
    with _ops.use_kernels(True), _path(path):
        yk, ck = ng.normalize_forward(x, axes, **kw)
        gk = ng.normalize_backward(ck, dy) if dy is not None else None
    assert _forward_calls() == before["forward"] + before["forward_small"] + 1, "no kernel ran"
    if path != "small":
        assert _kernels.calls["forward_small"] == before["forward_small"]
    with _ops.use_kernels(False):
        yr, cr = ng.normalize_forward(x, axes, **kw)
        gr = ng.normalize_backward(cr, dy) if dy is not None else None
    return (yk, ck, gk), (yr, cr, gr)


def _check(x, axes, dy, ulps=4, path="small", **kw):
    (yk, ck, gk), (yr, cr, gr) = _both(x, axes, dy, path, **kw)
    _close(yk, yr, ulps, _y_scale(cr))
    for name in ("mean", "var", "rstd"):
        k, r = getattr(ck, name), getattr(cr, name)
        assert k.shape == r.shape and k.dtype == r.dtype == np.float64, name
        np.testing.assert_allclose(k, r, rtol=1e-12, atol=1e-14 * np.max(np.abs(r)))
    assert ck.axes == cr.axes and ck.group_size == cr.group_size and ck.dtype == cr.dtype
    _close(gk.x, gr.x, 4 * ulps, _dx_scale(cr, dy))
    for k, r in ((gk.weight, gr.weight), (gk.bias, gr.bias)):
        assert (k is None) == (r is None)
        if r is not None:
            assert k.shape == r.shape and k.dtype == r.dtype
            _close(k, r, 64)  # sums over many elements, in a different order


LAYOUTS = [
    pytest.param((37, 53), None, id="whole"),
    pytest.param((6, 40), -1, id="rows"),
    pytest.param((40, 6), 0, id="leading"),
    pytest.param((4, 5, 6, 7), (0, 2, 3), id="channels"),
    pytest.param((4, 5, 6, 7), (2, 3), id="instance"),
    pytest.param((4, 5, 6), 1, id="middle"),
    pytest.param((4, 5, 6, 7), (0, 2), id="alternating"),
    pytest.param((3, 1, 8, 1), (1, 2), id="size-one-axes"),
    pytest.param((5, 7), (0, 1), id="whole-explicit"),
    pytest.param((9, 1), 1, id="groups-of-one"),
]


@PATHS
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("shape", "axes"), LAYOUTS)
def test_layouts_agree(rng, shape, axes, dtype, path):
    x = (rng.normal(size=shape) * 3 + 1).astype(dtype)
    dy = rng.normal(size=shape).astype(dtype)
    _check(x, axes, dy, path=path)


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda a: a.T, id="transposed"),
        pytest.param(lambda a: a[::2, 1::3], id="sliced"),
        pytest.param(lambda a: a[::-1], id="reversed"),
        pytest.param(np.asfortranarray, id="fortran"),
        pytest.param(lambda a: a.reshape(12, 10, 4).transpose(1, 0, 2)[:, ::2], id="3d-view"),
    ],
)
@pytest.mark.parametrize("axes", [None, 0, -1])
def test_strided_inputs_agree(rng, make, axes):
    x = make(rng.normal(size=(24, 20)) + 2)
    dy = rng.normal(size=x.shape)
    _check(x, axes, dy)
    _check(x, axes, dy, path="blocked")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("eps_mode", ["inside", "outside"])
@pytest.mark.parametrize("ddof", [0, 1, 2.5])
@PATHS
def test_options_agree(rng, dtype, eps_mode, ddof, path):
    x = rng.normal(size=(8, 3, 16)).astype(dtype)
    dy = rng.normal(size=x.shape).astype(dtype)
    _check(x, (0, 2), dy, eps=0.1, eps_mode=eps_mode, ddof=ddof, path=path)
    _check(x, -1, dy, eps=0.1, eps_mode=eps_mode, ddof=ddof, path=path)


@pytest.mark.parametrize(
    ("shape", "axes", "wshape"),
    [
        pytest.param((4, 5, 6, 7), (0, 2, 3), (5, 1, 1), id="batchnorm-C11"),
        pytest.param((6, 5, 8), -1, (8,), id="layernorm-D"),
        pytest.param((6, 5, 8), (1, 2), (5, 8), id="layernorm-2d"),
        pytest.param((4, 5, 6, 7), (2, 3), (5, 1, 1), id="instance-C11"),
        pytest.param((30, 40), None, (), id="scalar"),
        pytest.param((30, 40), None, (30, 40), id="full"),
        pytest.param((6, 5, 8), -1, (6, 5, 8), id="full-rows"),
        pytest.param((6, 5, 8), 0, (5, 8), id="leading-kept"),
        pytest.param((4, 5, 6, 7), (0, 2, 3), (4, 5, 6, 7), id="batchnorm-full"),
        pytest.param((6, 5, 4, 30), (1, 3), (6, 1, 4, 1), id="two-kept-blocks"),
        pytest.param((6, 5, 4, 30), (1, 3), (4, 1), id="two-kept-blocks-inner"),
    ],
)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_affine_agrees(rng, shape, axes, wshape, dtype):
    x = rng.normal(size=shape).astype(dtype)
    dy = rng.normal(size=shape).astype(dtype)
    w = (rng.normal(size=wshape) + 1).astype(dtype)
    b = rng.normal(size=wshape).astype(dtype)
    _check(x, axes, dy, weight=w, bias=b)
    _check(x, axes, dy, weight=w)
    _check(x, axes, dy, bias=b)


def test_partial_affine_broadcast_falls_back(rng):
    """A weight that cuts the reduced axes into more than two blocks: generic path, correct."""
    x = rng.normal(size=(4, 6, 8, 5))
    w = rng.normal(size=(6, 1, 5)) + 1
    before = dict(_kernels.calls)
    with _ops.use_kernels(True):
        y = ng.normalize(x, weight=w)
    assert _kernels.calls == before
    with _ops.use_kernels(False):
        y2, _ = ng.normalize_forward(x, weight=w)
    np.testing.assert_array_equal(y, y2)


def test_int_weight_and_mixed_dy_dtype(rng):
    x = rng.normal(size=(8, 40))
    w = np.arange(1, 41)
    dy = rng.normal(size=x.shape).astype(np.float32)
    _check(x, -1, dy, weight=w, bias=w)


@pytest.mark.parametrize(
    ("shape", "axes"), [((1, 200_000), None), ((3, 70_001), -1), ((200_000, 3), 0)]
)
def test_threaded_chunks_are_exact(rng, shape, axes):
    """Groups split into chunks that threads merge (Chan): statistics within 2 ulp of exact
    sums (NumPy's own strided sums are less accurate), backward equal to the generic one."""
    import math

    x = rng.normal(size=shape) * 5 + 100
    dy = rng.normal(size=shape)
    with _ops.use_kernels(True):
        _, ctx = ng.normalize_forward(x, axes)
        gk = ng.normalize_backward(ctx, dy)
    ax = ctx.axes
    groups = np.moveaxis(x, ax, range(-len(ax), 0)).reshape(-1, ctx.group_size)
    mean = np.array([math.fsum(g) / g.size for g in groups])
    var = np.array([math.fsum((g - m) ** 2) / g.size for g, m in zip(groups, mean, strict=True)])
    _close(ctx.mean.ravel(), mean, 2)
    np.testing.assert_allclose(ctx.var.ravel(), var, rtol=1e-13)
    with _ops.use_kernels(False):
        gr = ng.normalize_backward(ctx, dy)
    _close(gk.x, gr.x, 16, _dx_scale(ctx, dy))


def test_large_offset_float32_is_accurate(rng):
    """float32 with mean 1e6: statistics in float64 from the float32 values, y within 1 ulp."""
    x = (rng.normal(size=300_000) + 1e6).astype(np.float32)
    with _ops.use_kernels(True):
        y, ctx = ng.normalize_forward(x, eps=0.0)
    xd = x.astype(np.float64)
    mu = xd.mean()
    var = ((xd - mu) ** 2).mean()
    np.testing.assert_allclose(ctx.mean.item(), mu, rtol=1e-15)
    np.testing.assert_allclose(ctx.var.item(), var, rtol=1e-12)
    _close(y, ((xd - mu) / np.sqrt(var)).astype(np.float32), 1)


def test_nan_stays_in_its_group(rng):
    x = rng.normal(size=(4, 50))
    x[2, 7] = np.nan
    with _ops.use_kernels(True):
        y = ng.normalize(x, -1)
    assert np.isnan(y[2]).all() and np.isfinite(np.delete(y, 2, axis=0)).all()


def test_zero_variance_with_eps_zero_is_refused():
    with _ops.use_kernels(True), pytest.raises(NormgradError, match="zero variance"):
        ng.normalize(np.ones((3, 4)), -1, eps=0)


def test_inputs_are_not_mutated(rng):
    x = rng.normal(size=(5, 60))
    x.flags.writeable = False  # read-only input works too
    dy = rng.normal(size=x.shape)
    xs, dys = x.copy(), dy.copy()
    _check(x, -1, dy)
    np.testing.assert_array_equal(x, xs)
    np.testing.assert_array_equal(dy, dys)


def test_dy_in_another_memory_order(rng):
    x = rng.normal(size=(30, 20))
    dy = np.asfortranarray(rng.normal(size=x.shape))
    _check(x, None, dy)


def test_output_keeps_memory_order(rng):
    x = np.asfortranarray(rng.normal(size=(30, 20)))
    with _ops.use_kernels(True):
        y = ng.normalize(x, 0)
    assert y.flags.f_contiguous


# --- small inputs: one kernel call per pass ---------------------------------------------------

SIMPLE_LAYOUTS = [
    pytest.param((10, 100), None, id="whole"),
    pytest.param((10, 100), -1, id="rows"),
    pytest.param((4, 5, 6, 7), (0, 2, 3), id="channels"),
    pytest.param((4, 5, 6, 7), (2, 3), id="instance"),
    pytest.param((3, 1, 8, 1), (1, 2), id="size-one-axes"),
    pytest.param((7,), 0, id="1d"),
]


@pytest.mark.parametrize("eps_mode", ["inside", "outside"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("shape", "axes"), SIMPLE_LAYOUTS)
def test_small_kernels_run_by_default(rng, shape, axes, dtype, eps_mode):
    """C-contiguous inputs without affine parameters take the small kernels in auto mode:
    generic results within a few ulp, the context's statistics keepdims float64, rstd
    exactly `_ops._rstd` of the variance, and normalize_jvp's y the forward's y."""
    x = (rng.normal(size=shape) * 3 + 1).astype(dtype)
    dy = rng.normal(size=shape).astype(dtype)
    before = dict(_kernels.calls)
    with _ops.use_kernels("auto"):
        y, ctx = ng.normalize_forward(x, axes, eps=0.01, eps_mode=eps_mode)
        dx = ng.normalize_backward(ctx, dy).x
        y_jvp, _ = ng.normalize_jvp(x, dy, axes, eps=0.01, eps_mode=eps_mode)
    assert _kernels.calls["forward_small"] == before["forward_small"] + 2
    assert _kernels.calls["backward_small"] == before["backward_small"] + 1
    assert _kernels.calls["forward"] == before["forward"]
    np.testing.assert_array_equal(y_jvp, y)
    np.testing.assert_array_equal(ctx.rstd, _ops._rstd(np, ctx.var, 0.01, eps_mode))
    with _ops.use_kernels(False):
        yr, cr = ng.normalize_forward(x, axes, eps=0.01, eps_mode=eps_mode)
        dxr = ng.normalize_backward(cr, dy).x
    _close(y, yr, 4)
    _close(dx, dxr, 16, _dx_scale(cr, dy))
    assert y.dtype == dx.dtype == dtype and y.shape == dx.shape == shape
    for name in ("mean", "var", "rstd"):
        k, r = getattr(ctx, name), getattr(cr, name)
        assert k.shape == r.shape and k.dtype == r.dtype == np.float64, name
        np.testing.assert_allclose(k, r, rtol=1e-12)
    assert vars(ctx).keys() == vars(cr).keys()
    assert ctx.x is x and ctx.weight is None and ctx.bias is None
    for name in ("axes", "eps", "eps_mode", "ddof", "group_size", "dtype"):
        assert getattr(ctx, name) == getattr(cr, name), name


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda x: (x, 0), id="leading-axis"),
        pytest.param(lambda x: (x.T, -1), id="transposed"),
        pytest.param(lambda x: (x[:, ::2], -1), id="sliced"),
    ],
)
def test_small_kernels_decline_other_layouts(rng, make):
    """Layouts that a plain reshape cannot view go to the generic path below
    KERNEL_MIN_SIZE (auto mode), with the same results."""
    x, axes = make(rng.normal(size=(12, 10)))
    before = dict(_kernels.calls)
    with _ops.use_kernels("auto"):
        y, ctx = ng.normalize_forward(x, axes)
        dx = ng.normalize_backward(ctx, np.ones_like(x)).x
    assert _kernels.calls == before
    with _ops.use_kernels(True):
        y2, ctx2 = ng.normalize_forward(x, axes)
        dx2 = ng.normalize_backward(ctx2, np.ones_like(x)).x
    _close(y2, y, 4)
    _close(dx2, dx, 16, _dx_scale(ctx, np.ones_like(x)))


def test_small_backward_with_other_dy(rng):
    """dy of another float dtype, or in another memory order, or a generic-path context."""
    x = rng.normal(size=(6, 40))
    _, ctx = ng.normalize_forward(x, -1)
    with _ops.use_kernels(False):
        _, cr = ng.normalize_forward(x, -1)
    others = (np.float32, ">f8", int)  # another dtype, non-native byte order, integers
    dys = [rng.normal(size=x.shape).astype(t) for t in others] + [np.asfortranarray(x)]
    for dy in dys:
        ref = ng.normalize_backward(cr, dy.astype(np.float64)).x
        _close(ng.normalize_backward(ctx, dy).x, ref, 16, _dx_scale(cr, dy))
        _close(ng.normalize_backward(cr, dy).x, ref, 16, _dx_scale(cr, dy))


@pytest.mark.parametrize("mode", [True, "auto"])
def test_non_native_byte_order_uses_the_generic_path(rng, mode):
    x = rng.normal(size=(6, 40)).astype(">f8")
    before = dict(_kernels.calls)
    with _ops.use_kernels(mode):
        y, ctx = ng.normalize_forward(x, -1)
        dx = ng.normalize_backward(ctx, x).x
    assert _kernels.calls == before
    with _ops.use_kernels(False):
        yr, cr = ng.normalize_forward(x.astype(np.float64), -1)
        dxr = ng.normalize_backward(cr, x.astype(np.float64)).x
    np.testing.assert_array_equal(y, yr)
    np.testing.assert_array_equal(dx, dxr)


def test_numpy_context_matches_the_dataclass(rng):
    """`_ops._numpy_context` fills every field that `NormContext(...)` does, and stays frozen."""
    from dataclasses import FrozenInstanceError

    x = rng.normal(size=(3, 4))
    m = np.zeros((3, 1))
    fast = _ops._numpy_context(x, (1,), m, m, m, 1e-5, "inside", 0, 4)
    slow = _ops.NormContext(x, (1,), m, m, m, 1e-5, "inside", 0, None, None, 4, x.dtype)
    assert vars(fast) == vars(slow)
    with pytest.raises(FrozenInstanceError):
        fast.eps = 1.0  # type: ignore[misc]


# --- out= -----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [True, False])
def test_out_is_filled_and_returned(rng, mode):
    x = rng.normal(size=(8, 30)).astype(np.float32)
    dy = rng.normal(size=x.shape).astype(np.float32)
    yo, dxo = np.empty_like(x), np.empty_like(x)
    with _ops.use_kernels(mode):
        y, ctx = ng.normalize_forward(x, -1, out=yo)
        g = ng.normalize_backward(ctx, dy, out=dxo)
        y2 = ng.normalize(x, -1)
        g2 = ng.normalize_backward(ctx, dy)
    assert y is yo and g.x is dxo
    np.testing.assert_array_equal(yo, y2)
    np.testing.assert_array_equal(dxo, g2.x)


@pytest.mark.parametrize("shape", [(8, 30), (80, 1024)], ids=["small", "planned"])
@pytest.mark.parametrize("contiguous", [True, False])
def test_out_on_the_planned_calls(rng, shape, contiguous):
    """A C-contiguous `out` keeps a call without affine parameters on the small or planned
    kernels (filled in place); a strided one takes the blocked kernels; same results."""
    x = rng.normal(size=shape).astype(np.float32) + 3
    dy = rng.normal(size=shape).astype(np.float32)
    if contiguous:
        yo, dxo = np.empty_like(x), np.empty_like(x)
    else:
        yo = np.empty((shape[0], 2 * shape[1]), np.float32)[:, ::2]
        dxo = np.empty((shape[0], 2 * shape[1]), np.float32)[:, 1::2]
    y2, ctx2 = ng.normalize_forward(x, -1)
    g2 = ng.normalize_backward(ctx2, dy)
    before = dict(_kernels.calls)
    y, ctx = ng.normalize_forward(x, -1, out=yo)
    g = ng.normalize_backward(ctx, dy, out=dxo)
    assert y is yo and g.x is dxo
    small = x.size <= _ops.SMALL_MAX_SIZE
    planned = 2 if contiguous and small else 0
    assert _kernels.calls["forward_small"] + _kernels.calls["backward_small"] == (
        before["forward_small"] + before["backward_small"] + planned
    )
    _close(y, y2, 4, _y_scale(ctx2))
    _close(g.x, g2.x, 16, _dx_scale(ctx2, dy))
    if contiguous:
        np.testing.assert_array_equal(y, y2)
        np.testing.assert_array_equal(g.x, g2.x)


def test_out_is_checked(rng):
    x = rng.normal(size=(4, 5))
    for bad in (np.empty((5, 4)), np.empty((4, 5), np.float32), [0.0] * 20, x, x[:, :]):
        with pytest.raises(NormgradError, match="out"):
            ng.normalize(x, out=bad)
    _, ctx = ng.normalize_forward(x)
    dy = np.ones_like(x)
    with pytest.raises(NormgradError, match="overlap"):
        ng.normalize_backward(ctx, dy, out=dy)


# --- mode selection ---------------------------------------------------------------------------


def test_env_and_context_select_the_path(rng, monkeypatch):
    x = rng.normal(size=(4, 5))
    w = np.ones(5)
    before = dict(_kernels.calls)
    monkeypatch.setenv("NORMGRAD_KERNELS", "0")
    monkeypatch.setattr(_ops, "_env_mode_value", None)  # read at the next call
    ng.normalize(x)
    with _ops.use_kernels(False):
        ng.normalize(x)
    with _ops.use_kernels("auto"):
        ng.normalize(x, -1, weight=w)  # affine, below KERNEL_MIN_SIZE: generic
    assert _kernels.calls == before
    with _ops.use_kernels("auto"):
        ng.normalize(x)  # no affine: the small kernels
    assert _kernels.calls["forward_small"] == before["forward_small"] + 1
    monkeypatch.setenv("NORMGRAD_KERNELS", "1")
    monkeypatch.setattr(_ops, "_env_mode_value", None)  # read at the next call
    ng.normalize(x, -1, weight=w)
    assert _kernels.calls["forward"] == before["forward"] + 1
    monkeypatch.setenv("NORMGRAD_KERNELS", "yes")
    monkeypatch.setattr(_ops, "_env_mode_value", None)  # read at the next call
    with pytest.raises(NormgradError, match="NORMGRAD_KERNELS"):
        ng.normalize(x)
    with pytest.raises(NormgradError, match="mode"), _ops.use_kernels("fast"):
        pass


def test_non_numpy_inputs_use_the_generic_path(rng):
    torch = pytest.importorskip("torch")
    x = torch.tensor(rng.normal(size=(4, 5)))
    before = dict(_kernels.calls)
    with _ops.use_kernels(True):
        ng.normalize(x)
    assert _kernels.calls == before


def test_import_does_not_import_numba():
    code = "import sys, normgrad; print('numba' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "False"


# --- property ---------------------------------------------------------------------------------


@st.composite
def _cases(draw):
    ndim = draw(st.integers(1, 4))
    shape = tuple(draw(st.lists(st.integers(1, 6), min_size=ndim, max_size=ndim)))
    axes = draw(st.lists(st.integers(0, ndim - 1), min_size=1, max_size=ndim, unique=True))
    perm = draw(st.permutations(range(ndim)))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    seed = draw(st.integers(0, 2**31))
    return shape, tuple(axes), tuple(perm), dtype, seed


@PATHS
@given(_cases())
def test_random_layouts_agree(path, case):
    shape, axes, perm, dtype, seed = case
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape).astype(dtype).transpose(perm)  # any memory order
    dy = rng.normal(size=x.shape).astype(dtype)
    if np.prod([x.shape[a] for a in axes]) < 2:
        return  # groups of one element: eps decides everything, covered above
    (yk, _, gk), (yr, cr, gr) = _both(x, axes, dy, path)
    _close(yk, yr, 4, _y_scale(cr))
    # tiny groups can have var ~ eps: x - mu then carries most of the rounding, on both paths
    _close(gk.x, gr.x, 64, _dx_scale(cr, dy))


# --- benchmark runner smoke test --------------------------------------------------------------


def test_bench_runner_smoke(tmp_path):
    """The benchmark runner works end to end on one tiny size (timings are not checked)."""
    from normgrad import _bench

    args = _bench.parse_args(
        ["--sizes", "1000", "--repeat", "1", "--layouts", "whole", "--dtypes", "float64",
         "--impls", "fused,fused_out,fused_mapped,generic,numpy", "--out", str(tmp_path),
         "--no-plot", "--no-accuracy", "--plain"]
    )  # fmt: skip
    assert _bench.run(args) == 0
    data = json.loads((tmp_path / "bench.json").read_text())
    impls = {r["impl"] for r in data["results"]}
    assert impls == {"fused", "fused_out", "fused_mapped", "generic", "numpy"}
    assert data["triad_bytes_per_s"] > 0
    assert all(r["median_s"] > 0 for r in data["results"])
    table = (tmp_path / "bench.md").read_text()
    assert "| fused % roof | out % roof | mapped % roof | fused vs generic |" in table


@pytest.mark.serial  # the two pool threads must run at once: in the parallel pass, sharing
# 2 cores with another test process, no hand-off completed in 4 tries once (None)
def test_bench_records_the_thread_hand_off(tmp_path):
    """Cases from HANDOFF_MIN elements record how long a cache line takes between the two
    pool threads, and the tables show it per row."""
    import numba

    from normgrad import _bench

    h = _bench.measure_handoff(2000)
    if numba.config.NUMBA_NUM_THREADS < 2:
        assert h is None
    else:
        assert h is not None and 0 < h < 1e6
    args = _bench.parse_args(
        ["--sizes", str(_bench.HANDOFF_MIN), "--repeat", "1", "--layouts", "rows",
         "--dtypes", "float32", "--passes", "fwd", "--impls", "fused", "--out", str(tmp_path),
         "--no-plot", "--no-accuracy", "--no-startup", "--plain"]
    )  # fmt: skip
    assert _bench.run(args) == 0
    (row,) = json.loads((tmp_path / "bench.json").read_text())["results"]
    assert (row["handoff_ns"] is None) == (numba.config.NUMBA_NUM_THREADS < 2)
    table = (tmp_path / "bench.md").read_text()
    assert "| hand-off ns |" in table


def test_concurrent_callers_get_the_same_results(rng):
    """Several Python threads on the thread pool at once: same results as one at a time."""
    from concurrent.futures import ThreadPoolExecutor

    xs = [rng.normal(size=(3, 60_000)) + i for i in range(4)]
    dy = rng.normal(size=(3, 60_000))

    def work(x):
        with _ops.use_kernels(True):
            y, ctx = ng.normalize_forward(x, -1)
            return y, ng.normalize_backward(ctx, dy).x

    expected = [work(x) for x in xs]
    with ThreadPoolExecutor(4) as ex:
        got = list(ex.map(work, xs * 2))
    for (y, dx), (ye, dxe) in zip(got, expected * 2, strict=True):
        np.testing.assert_array_equal(y, ye)
        np.testing.assert_array_equal(dx, dxe)


@pytest.mark.parametrize(
    ("shape", "axes", "wshape"),
    [
        pytest.param((12, 8, 40, 40), (0, 2, 3), (8, 1, 1), id="batchnorm"),
        pytest.param((24, 5, 40, 30), (1, 3), (24, 1, 40, 1), id="two-kept-blocks"),
        pytest.param((24, 5, 40, 30), (1, 3), (40, 1), id="two-kept-blocks-inner"),
    ],
)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sweep_kernels_threaded(rng, shape, axes, wshape, dtype):
    """Batch-norm-like layouts (several runs per group, per-group affine parameters) are swept
    in memory order on several threads: statistics within 2 ulp of exact sums, results
    equal to the generic path's within a few ulp, and bit-identical from call to call."""
    import math

    x = (rng.normal(size=shape) * 5 + 100).astype(dtype)
    dy = rng.normal(size=shape).astype(dtype)
    w = rng.normal(size=wshape) + 1
    b = rng.normal(size=wshape)
    before = _kernels.calls["sweep"]
    _check(x, axes, dy, weight=w, bias=b)
    assert _kernels.calls["sweep"] == before + 2
    _check(x, axes, dy)
    with _ops.use_kernels(True):
        y, ctx = ng.normalize_forward(x, axes, weight=w, bias=b)
        g = ng.normalize_backward(ctx, dy)
        for _ in range(3):
            y2, ctx2 = ng.normalize_forward(x, axes, weight=w, bias=b)
            g2 = ng.normalize_backward(ctx2, dy)
            for a, a2 in ((y, y2), (ctx.mean, ctx2.mean), (ctx.var, ctx2.var)):
                np.testing.assert_array_equal(a, a2)
            for a, a2 in ((g.x, g2.x), (g.weight, g2.weight), (g.bias, g2.bias)):
                np.testing.assert_array_equal(a, a2)
    xd = x.astype(np.float64)
    groups = np.moveaxis(xd, ctx.axes, range(-len(ctx.axes), 0)).reshape(-1, ctx.group_size)
    mean = np.array([math.fsum(v) / v.size for v in groups])
    var = np.array([math.fsum((v - m) ** 2) / v.size for v, m in zip(groups, mean, strict=True)])
    kept = [i for i in range(x.ndim) if i not in ctx.axes]
    _close(ctx.mean.reshape([x.shape[i] for i in kept]).ravel(), mean, 2)
    np.testing.assert_allclose(ctx.var.ravel(), var, rtol=1e-13)


def test_small_call_cache_keeps_validation(rng):
    """The small forward caches validated arguments per call signature: a value that
    compares equal to a cached valid one (True == 1) must still be refused, with the same
    message as the generic path."""
    x = rng.normal(size=(4, 5))
    bad = [
        ({"eps": 1}, {"eps": True}),
        ({"axes": 1}, {"axes": True}),
        ({"axes": (1,)}, {"axes": (True,)}),
        ({"ddof": 1}, {"ddof": True}),
    ]
    for good, wrong in bad:
        for mode in (True, False):
            with _ops.use_kernels(mode):
                ng.normalize(x, **good)
                with pytest.raises(NormgradError) as err:
                    ng.normalize(x, **wrong)
            if mode:
                msg = str(err.value)
            else:
                assert str(err.value) == msg
    before = _kernels.calls["forward_small"]
    y1 = ng.normalize(x, (1,))
    y2 = ng.normalize(x, [1])  # unhashable axes: the general path, same numbers
    assert _kernels.calls["forward_small"] == before + 1
    np.testing.assert_allclose(y1, y2, rtol=0, atol=8 * np.finfo(float).eps * np.abs(y2).max())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    ("shape", "axes"),
    [((80, 1024), -1), ((4, 8, 48, 64), (2, 3)), ((400, 400), None)],
    ids=["rows", "instance", "whole"],
)
def test_planned_calls_match_blocked_kernels(rng, shape, axes, dtype):
    """Above SMALL_MAX_SIZE, a C-contiguous input without affine parameters runs one cached
    call per direction on the pool (whole groups, or a whole tensor this size split into
    chunks): the same kernels and chunks as the blocked path, so the same bits."""
    x = (rng.normal(size=shape) * 2 + 5).astype(dtype)
    dy = rng.normal(size=shape).astype(dtype)
    assert x.size > _ops.SMALL_MAX_SIZE
    got = {}
    for path in ("planned", "blocked"):
        before = dict(_kernels.calls)
        with _ops.use_kernels(True), _path(path):
            y, ctx = ng.normalize_forward(x, axes)
            g = ng.normalize_backward(ctx, dy)
        assert _kernels.calls["forward"] == before["forward"] + 1
        assert _kernels.calls["backward"] == before["backward"] + 1
        native = _kernels.calls["native"] - before["native"]
        assert native == (2 if path == "planned" else 0)  # native jobs: the planned calls
        got[path] = (y, ctx.mean, ctx.var, ctx.rstd, g.x)
    for a, b in zip(got["planned"], got["blocked"], strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    _check(x, axes, dy)
    planned = _kernels.call_plan(x.shape, ctx.axes, x.itemsize)
    assert (planned.nc == 1) == (axes is not None)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_planned_batch_norm_sweeps_when_large(rng, monkeypatch, dtype):
    """A C-contiguous batch-norm input without affine parameters runs whole-group items on
    the planned calls, and the general path's memory-order sweep from SWEEP_MIN_BYTES on
    (lowered here): both agree with the generic path, and `out` is filled in place."""
    x = (rng.normal(size=(6, 8, 40, 40)) * 3 - 2).astype(dtype)
    dy = rng.normal(size=x.shape).astype(dtype)
    axes = (0, 2, 3)
    for limit, sweeps in ((x.nbytes + 1, 0), (x.nbytes, 2)):
        monkeypatch.setattr(_kernels, "SWEEP_MIN_BYTES", limit)
        _kernels.call_plan.cache_clear()
        _ops._planned_calls.clear()
        before = dict(_kernels.calls)
        _check(x, axes, dy)
        assert _kernels.calls["sweep"] == before["sweep"] + sweeps
        assert _kernels.calls["forward"] == before["forward"] + 1
        yo, dxo = np.empty_like(x), np.empty_like(x)
        y, ctx = ng.normalize_forward(x, axes)
        y2, ctx2 = ng.normalize_forward(x, axes, out=yo)
        g2 = ng.normalize_backward(ctx2, dy, out=dxo)
        assert y2 is yo and g2.x is dxo
        np.testing.assert_array_equal(y, yo)
        np.testing.assert_array_equal(ng.normalize_backward(ctx, dy).x, dxo)
    _kernels.call_plan.cache_clear()
    _ops._planned_calls.clear()


@pytest.mark.parametrize(
    ("xdtype", "dydtype"), [(np.float32, np.float64), (np.float64, np.float32)]
)
def test_planned_backward_with_another_dy_dtype(rng, xdtype, dydtype):
    """A `dy` whose dtype differs from `x`'s leaves the native jobs (compiled for one dtype)
    for the blocked kernels: same results as the generic path."""
    x = (rng.normal(size=(80, 1024)) + 3).astype(xdtype)
    dy = rng.normal(size=x.shape).astype(dydtype)
    before = dict(_kernels.calls)
    _check(x, -1, dy)
    assert _kernels.calls["native"] == before["native"] + 1  # the forward only
    assert _kernels.calls["backward"] == before["backward"] + 1


@pytest.mark.parametrize("size", [1000, 80 * 1024], ids=["small", "native"])
def test_misaligned_inputs_leave_the_planned_calls(rng, size):
    """float64 data at an odd byte offset (NumPy allows it) is not viewed by the native jobs
    (which assume aligned memory): the general kernels take it, with the same results."""
    buf = bytearray(8 * size + 1)
    x = np.frombuffer(buf, np.float64, count=size, offset=1).reshape(
        -1, 1024 if size > 1024 else 10
    )
    x[...] = rng.normal(size=x.shape) + 2
    dy = np.frombuffer(bytearray(8 * size + 1), np.float64, count=size, offset=1).reshape(x.shape)
    dy[...] = rng.normal(size=x.shape)
    assert not x.flags.aligned and x.flags.c_contiguous
    before = dict(_kernels.calls)
    _check(x, -1, dy)
    assert _kernels.calls["native"] == before["native"]
    assert _kernels.calls["forward_small"] == before["forward_small"]


def test_planned_call_refuses_zero_variance(rng):
    """eps=0 with a constant group: the planned call raises as the generic path does."""
    x = rng.normal(size=(80, 1024))
    x[3] = 7.0
    before = _kernels.calls["forward"]
    for mode in (True, False):
        with _ops.use_kernels(mode), pytest.raises(NormgradError, match="variance"):
            ng.normalize(x, -1, eps=0)
    assert _kernels.calls["forward"] == before + 1


@numba.njit
def _seg_both(xs, ds, ys, dxs, mu, r, m, bt, stream):
    _kernels._seg_forward(xs, xs, xs, ys, mu, r, False, stream)
    _kernels._seg_backward(xs, ds, xs, False, dxs, mu, r, m, bt, stream)


@pytest.mark.parametrize(("xdt", "ddt"), [("f4", "f4"), ("f8", "f8"), ("f4", "f8")])
def test_streaming_stores_give_the_same_bits(rng, xdt, ddt):
    """The non-temporal vector stores compute what the scalar loops compute (no kernel is
    compiled with FMA contraction), for every length and alignment of the output, and leave
    the elements around the segment alone."""
    for n in [0, 1, 15, 16, 17, 40, 257]:
        for shift in range(0, 9, 3):
            x = (rng.normal(size=n) * 3 + 100).astype(xdt)
            d = rng.normal(size=n).astype(ddt)
            out = {}
            for stream in (False, True):
                ys = np.full(n + 16, -1.0, xdt)
                dxs = np.full(n + 16, -1.0, xdt)
                seg = slice(shift, shift + n)
                _seg_both(x, d, ys[seg], dxs[seg], 99.5, 0.37, 0.01, -0.2, stream)
                out[stream] = ys, dxs
            for a, b in zip(out[False], out[True], strict=True):
                np.testing.assert_array_equal(a, b)
                assert np.all(b[:shift] == -1) and np.all(b[shift + n :] == -1)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    ("shape", "axes"),
    [((400, 400), None), ((16, 999), -1), ((4, 3, 17, 19), (0, 2, 3)), ((4, 3, 17, 19), (2, 3))],
    ids=["whole", "rows", "channels", "instance"],
)
def test_streaming_into_out_agrees(monkeypatch, rng, shape, axes, dtype):
    """Preallocated outputs above STREAM_MIN_BYTES (here 0) are written with non-temporal
    stores, also when misaligned: the same bits as without, and the generic path's results
    within a few ulp."""
    monkeypatch.setattr(_kernels, "STREAM_MIN_BYTES", 0)
    x = (rng.normal(size=shape) * 2 + 50).astype(dtype)
    dy = rng.normal(size=shape).astype(dtype)
    results = []
    for limit in (0, 1 << 62):
        monkeypatch.setattr(_kernels, "STREAM_MIN_BYTES", limit)
        ybuf = np.empty(x.size + 1, dtype)[1:].reshape(shape)  # off a 64-byte boundary
        dxbuf = np.empty(x.size + 3, dtype)[3:].reshape(shape)
        with _ops.use_kernels(True), _path("blocked"):
            y, ctx = ng.normalize_forward(x, axes, out=ybuf)
            g = ng.normalize_backward(ctx, dy, out=dxbuf)
        assert y is ybuf and g.x is dxbuf
        results.append((y.copy(), g.x.copy()))
    (ys, dxs), (yp, dxp) = results
    np.testing.assert_array_equal(ys, yp)
    np.testing.assert_array_equal(dxs, dxp)
    with _ops.use_kernels(False):
        yr, cr = ng.normalize_forward(x, axes)
        gr = ng.normalize_backward(cr, dy)
    _close(ys, yr, 4, _y_scale(cr))
    _close(dxs, gr.x, 16, _dx_scale(cr, dy))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    ("shape", "axes", "wshape"),
    [((400, 400), None, (400, 400)), ((400, 400), None, (400,)), ((3, 70_001), -1, (70_001,))],
)
def test_split_groups_in_one_job(rng, shape, axes, wshape, dtype):
    """Groups split into chunks run as one two-phase job per direction (`_forward_split`,
    `_backward_split`: partials, a barrier, the merge in every thread, the second pass), with
    weight and bias: within a few ulp of the generic path, and the same bits on every call."""
    x = (rng.normal(size=shape) * 3 + 20).astype(dtype)
    dy = rng.normal(size=shape).astype(dtype)
    w = rng.normal(size=wshape).astype(dtype)
    b = rng.normal(size=wshape).astype(dtype)
    lay = _kernels.plan(x, tuple(range(x.ndim)) if axes is None else (x.ndim - 1,))
    ka, ra, kb, rb = lay.shape4
    assert _kernels._plan_threads(ka * kb, ra * rb)[0] > 1  # split: the case under test
    _check(x, axes, dy, weight=w, bias=b)
    with _ops.use_kernels(True):
        runs = []
        for _ in range(3):
            y, ctx = ng.normalize_forward(x, axes, weight=w, bias=b)
            g = ng.normalize_backward(ctx, dy)
            runs.append((y, ctx.mean, ctx.rstd, g.x, g.weight, g.bias))
    for other in runs[1:]:
        for a, c in zip(runs[0], other, strict=True):
            np.testing.assert_array_equal(a, c)


def test_split_job_alone_matches_two_threads(rng):
    """A two-phase job run by the caller alone (the pool busy) takes both threads' chunks
    in both phases and gives the same bits as on two threads."""
    from normgrad import _pool

    x = rng.normal(size=(1, 1, 1, 300_000)) + 4
    nchunks, items, nc = 32, 16, 16
    counts = np.array([((c + 1) * x.size) // nc - (c * x.size) // nc for c in range(nc)], float)
    none = _kernels._absent(True, x.shape).view
    out = []
    for threads in (1, 2):
        stats, y, pm = np.empty((3, 1)), np.empty_like(x), np.empty((2, items))
        phase = _pool.phase_ctl(nchunks, 2)
        args = (phase, counts, pm[0], pm[1], x, none, none, False, 1e-5, True, float(x.size))
        _pool.run(_kernels._forward_split, items, threads, (*args, stats, y, False), nchunks)
        assert phase[_pool._DONE] == nchunks
        out.append((stats, y))
    for a, c in zip(*out, strict=True):
        np.testing.assert_array_equal(a, c)
    np.testing.assert_allclose(out[0][0][0, 0], x.mean(), rtol=1e-14)


def test_split_groups_refuse_zero_variance():
    x = np.full((400, 400), 3.0)
    with _ops.use_kernels(True), pytest.raises(NormgradError, match="zero variance"):
        ng.normalize(x, eps=0)
