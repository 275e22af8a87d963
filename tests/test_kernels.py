"""The fused numba kernels agree with the generic Array-API path for every layout and option."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import normgrad as ng
from normgrad import _ops
from normgrad._errors import NormgradError

pytest.importorskip("numba")
from normgrad import _kernels


def _close(a, b, ulps: float, scale: float = 0.0) -> None:
    """max|a - b| <= ulps * ulp(max(|b|, scale)), in b's dtype: "a few ulp" of the result's
    scale (or of its terms' scale, when they cancel)."""
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape and a.dtype == b.dtype
    scale = np.spacing(b.dtype.type(max(np.max(np.abs(b)), scale)))
    err = np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))
    assert err <= ulps * scale, f"max error {err} > {ulps} ulp ({ulps * scale})"


def _dx_scale(ctx, dy) -> float:
    """Bound on the terms of dx = r (g - mean g) - (c/m) xhat sum(g xhat): what its rounding
    is relative to (|xhat| <= sqrt(m), so the second term is at most r max|g| max xhat^2)."""
    w = 1.0 if ctx.weight is None else np.asarray(ctx.weight, dtype=np.float64)
    rg = np.max(np.abs(ctx.rstd * w * np.asarray(dy, dtype=np.float64)))
    xhat = (np.asarray(ctx.x, dtype=np.float64) - ctx.mean) * ctx.rstd
    return float(rg * (1 + np.max(xhat**2)))


def _both(x, axes, dy=None, **kw):
    """(kernel results, generic results) for forward and backward, checking the kernels ran."""
    before = dict(_kernels.calls)
    with _ops.use_kernels(True):
        yk, ck = ng.normalize_forward(x, axes, **kw)
        gk = ng.normalize_backward(ck, dy) if dy is not None else None
    assert _kernels.calls["forward"] == before["forward"] + 1, "the kernel path did not run"
    with _ops.use_kernels(False):
        yr, cr = ng.normalize_forward(x, axes, **kw)
        gr = ng.normalize_backward(cr, dy) if dy is not None else None
    return (yk, ck, gk), (yr, cr, gr)


def _check(x, axes, dy, ulps=4, **kw):
    (yk, ck, gk), (yr, cr, gr) = _both(x, axes, dy, **kw)
    _close(yk, yr, ulps)
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


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("shape", "axes"), LAYOUTS)
def test_layouts_agree(rng, shape, axes, dtype):
    x = (rng.normal(size=shape) * 3 + 1).astype(dtype)
    dy = rng.normal(size=shape).astype(dtype)
    _check(x, axes, dy)


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


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("eps_mode", ["inside", "outside"])
@pytest.mark.parametrize("ddof", [0, 1, 2.5])
def test_options_agree(rng, dtype, eps_mode, ddof):
    x = rng.normal(size=(8, 3, 16)).astype(dtype)
    dy = rng.normal(size=x.shape).astype(dtype)
    _check(x, (0, 2), dy, eps=0.1, eps_mode=eps_mode, ddof=ddof)


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
    before = dict(_kernels.calls)
    monkeypatch.setenv("NORMGRAD_KERNELS", "0")
    ng.normalize(x)
    with _ops.use_kernels("auto"):
        ng.normalize(x)  # small: below KERNEL_MIN_SIZE
    assert _kernels.calls == before
    monkeypatch.setenv("NORMGRAD_KERNELS", "1")
    ng.normalize(x)
    assert _kernels.calls["forward"] == before["forward"] + 1
    monkeypatch.setenv("NORMGRAD_KERNELS", "yes")
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


@given(_cases())
def test_random_layouts_agree(case):
    shape, axes, perm, dtype, seed = case
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape).astype(dtype).transpose(perm)  # any memory order
    dy = rng.normal(size=x.shape).astype(dtype)
    if np.prod([x.shape[a] for a in axes]) < 2:
        return  # groups of one element: eps decides everything, covered above
    (yk, _, gk), (yr, cr, gr) = _both(x, axes, dy)
    _close(yk, yr, 4)
    # tiny groups can have var ~ eps: x - mu then carries most of the rounding, on both paths
    _close(gk.x, gr.x, 64, _dx_scale(cr, dy))


# --- benchmark runner smoke test --------------------------------------------------------------


def test_bench_runner_smoke(tmp_path):
    """The benchmark runner works end to end on one tiny size (timings are not checked)."""
    from normgrad import _bench

    args = _bench.parse_args(
        ["--sizes", "1000", "--repeat", "1", "--layouts", "whole", "--dtypes", "float64",
         "--impls", "fused,generic,numpy", "--out", str(tmp_path), "--no-plot",
         "--no-accuracy", "--plain"]
    )  # fmt: skip
    assert _bench.run(args) == 0
    data = json.loads((tmp_path / "bench.json").read_text())
    impls = {r["impl"] for r in data["results"]}
    assert impls == {"fused", "generic", "numpy"}
    assert data["triad_bytes_per_s"] > 0
    assert all(r["median_s"] > 0 for r in data["results"])
    assert os.path.exists(tmp_path / "bench.md")


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
