"""Masked calls (`mask=`, `nan_policy="omit"`) on the fused kernels: the small and blocked
paths (every group whole), forward and backward, against the generic path (the masked
formulas' reference), an own float64 loop, and float64 finite differences."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pytest
from _fd import fd_jacobian

import normgrad as ng
from normgrad import testing

pytest.importorskip("numba")

MODES = ["inside", "outside"]
DTYPES = [np.float32, np.float64]
PATHS = ["small", "blocked"]

# (shape, axes, parameter shape): rows (layer norm), trailing axes, the whole tensor,
# channels and batch norm (several runs per group), instances.
LAYOUTS = [
    pytest.param((16, 96), -1, (96,), id="rows"),
    pytest.param((4, 6, 32), (1, 2), (6, 32), id="trailing-two"),
    pytest.param((40, 50), None, (40, 50), id="whole"),
    pytest.param((4, 5, 6, 7), (0, 2, 3), (5, 1, 1), id="channels"),
    pytest.param((4, 5, 6, 7), (2, 3), (6, 7), id="instance"),
    pytest.param((6, 5, 8, 7), (1, 3), (6, 1, 8, 1), id="two-kept-blocks"),
]
VARIANTS = [  # (affine parameters, center)
    pytest.param("none", True, id="plain"),
    pytest.param("weight+bias", True, id="affine"),
    pytest.param("weight", True, id="weight"),
    pytest.param("none", False, id="rms"),
    pytest.param("weight", False, id="rms-weight"),
    pytest.param("weight+bias", False, id="rms-affine"),
]


@contextmanager
def on_path(path):
    with ng.use_kernels(path):
        yield


def _params(rng, wshape, affine, dtype):
    w = None if affine == "none" else (rng.normal(size=wshape) + 1).astype(dtype)
    b = rng.normal(size=wshape).astype(dtype) if affine == "weight+bias" else None
    return w, b


def _data(rng, shape, dtype):
    x = (rng.normal(size=shape) * 2 + 0.7).astype(dtype)
    return x, rng.normal(size=shape).astype(dtype)


def _run(x, axes, dy, path, **kw):
    """Forward and backward on `path` (asserting that it is the path planned and taken),
    and on the generic path."""
    with on_path(path), testing.record_paths() as seen:
        plan = ng.plan_forward(x, axes, **kw)
        assert plan.path == path, plan.reason
        assert "mask" in plan.reason
        y, ctx = ng.normalize_forward(x, axes, **kw)
        assert ng.plan_backward(ctx, dy).path == path
        g = ng.normalize_backward(ctx, dy)
    assert seen == [("forward", path), ("backward", path)]
    with ng.use_kernels(False):
        plan = ng.plan_forward(x, axes, **kw)
        assert plan.path == "generic" and "mask" in plan.reason
        yr, cr = ng.normalize_forward(x, axes, **kw)
        gr = ng.normalize_backward(cr, dy)
    return (y, ctx, g), (yr, cr, gr)


def _close(a, b, ulps, scale=0.0):
    """`a` within `ulps` ulp (of b's dtype, at the larger of max|b| and `scale`) of `b`,
    NaN and infinities at the same places."""
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape and a.dtype == b.dtype
    off = ~np.isfinite(b)
    np.testing.assert_array_equal(a[off], b[off])
    if off.all():
        return
    a64, b64 = a.astype(np.float64)[~off], b.astype(np.float64)[~off]
    unit = np.spacing(b.dtype.type(max(float(np.max(np.abs(b64))), scale)))
    err = float(np.max(np.abs(a64 - b64)))
    assert err <= ulps * unit, f"max error {err} > {ulps} ulp ({ulps * unit})"


def _scales(ctx, dy):
    """Bounds on the terms of y and dx (as `_kernel_checks`), over finite values."""
    w = 1.0 if ctx.weight is None else np.asarray(ctx.weight, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        xhat = (np.asarray(ctx.x, dtype=np.float64) - ctx.mean) * ctx.rstd
        ys = np.abs(ctx.mean * ctx.rstd * w)
        rg = np.abs(ctx.rstd * w * np.asarray(dy, dtype=np.float64))
    fin = np.isfinite(xhat)
    x2 = float(np.max(xhat[fin] ** 2)) if fin.any() else 0.0
    return float(np.nanmax(ys, initial=0.0)), float(np.nanmax(rg, initial=0.0)) * (1 + x2)


def _agree(x, axes, dy, path, ulps=4, **kw):
    (y, ctx, g), (yr, cr, gr) = _run(x, axes, dy, path, **kw)
    ys, dxs = _scales(cr, dy)
    b = kw.get("bias")
    _close(y, yr, ulps, ys + (0.0 if b is None else float(np.max(np.abs(b)))))
    for name in ("mean", "var", "rstd", "count"):
        k, r = getattr(ctx, name), getattr(cr, name)
        assert k.shape == r.shape and k.dtype == r.dtype == np.float64, name
        np.testing.assert_array_equal(np.isnan(k), np.isnan(r))
        fin = ~np.isnan(r)
        np.testing.assert_allclose(k[fin], r[fin], rtol=1e-12, atol=1e-14 * np.max(np.abs(r[fin])))
    np.testing.assert_array_equal(ctx.mask, cr.mask)
    _close(g.x, gr.x, 4 * ulps, dxs)
    for k, r in ((g.weight, gr.weight), (g.bias, gr.bias)):
        assert (k is None) == (r is None)
        if r is not None:
            assert k.shape == r.shape and k.dtype == r.dtype
            _close(k, r, 64, float(np.nanmax(np.abs(r), initial=0.0)))
    return ctx


@pytest.mark.parametrize(("affine", "center"), VARIANTS)
@pytest.mark.parametrize("eps_mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("shape", "axes", "wshape"), LAYOUTS)
@pytest.mark.parametrize("path", PATHS)
def test_masked_paths_agree_with_generic(rng, path, shape, axes, wshape, dtype, eps_mode,
                                         affine, center):  # fmt: skip
    x, dy = _data(rng, shape, dtype)
    w, b = _params(rng, wshape, affine, dtype)
    mask = rng.random(shape) < 0.7
    kw = {"eps": 1e-3, "eps_mode": eps_mode, "weight": w, "bias": b, "center": center}
    _agree(x, axes, dy, path, mask=mask, **kw)


@pytest.mark.parametrize("center", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("path", PATHS)
def test_omit_nan_agrees_with_generic(rng, path, dtype, center):
    """nan_policy="omit": NaN elements neither count nor move the backward's sums (their y
    is NaN; their dx is r dy w)."""
    x, dy = _data(rng, (12, 80), dtype)
    x[rng.random(x.shape) < 0.2] = np.nan
    w, b = _params(rng, (80,), "weight+bias", dtype)
    ctx = _agree(x, -1, dy, path, nan_policy="omit", weight=w, bias=b, center=center)
    assert np.isnan(ctx.x).any()


@pytest.mark.parametrize("path", PATHS)
def test_padding_values_do_not_reach_the_statistics(rng, path):
    """Uncounted NaN and Inf padding under a user mask: the statistics and every counted
    result are those of the counted elements alone (the gradient too, where the padding's
    cotangent is zero: a nonzero one reaches the counted elements through the statistics
    that the padding's y depends on)."""
    x, dy = _data(rng, (8, 40), np.float64)
    mask = np.ones(x.shape, bool)
    mask[:, 30:] = False
    x[:, 30:35], x[:, 35:] = np.nan, np.inf
    w, b = _params(rng, (40,), "weight+bias", np.float64)
    ctx = _agree(x, -1, dy, path, mask=mask, weight=w, bias=b)
    dz = dy.copy()
    dz[:, 30:] = 0.0
    with on_path(path):
        y0, c0 = ng.normalize_forward(x[:, :30], -1, weight=w[:30], bias=b[:30])
        g0 = ng.normalize_backward(c0, dy[:, :30])
        y, c = ng.normalize_forward(x, -1, mask=mask, weight=w, bias=b)
        g = ng.normalize_backward(c, dz)
    np.testing.assert_allclose(ctx.var, c0.var, rtol=1e-13)
    np.testing.assert_allclose(y[:, :30], y0, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(g.x[:, :30], g0.x, rtol=1e-11, atol=1e-12)
    np.testing.assert_allclose(g.x[:, 30:], 0.0)
    np.testing.assert_allclose(g.bias[:30], g0.bias, rtol=1e-12)
    np.testing.assert_allclose(g.weight[:30], g0.weight, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("center", [True, False])
def test_groups_with_too_few_counted_elements_are_nan(rng, path, center):
    """A group with no counted element (or no more than ddof) gives NaN, without raising."""
    x, dy = _data(rng, (5, 24), np.float64)
    mask = rng.random(x.shape) < 0.8
    mask[1] = False
    ddof = 1 if center else 0
    if center:
        mask[2] = False
        mask[2, 3] = True  # one counted element: no more than ddof
    ctx = _agree(x, -1, dy, path, mask=mask, ddof=ddof, center=center)
    assert np.isnan(ctx.var[1 : 3 if center else 2]).all()
    assert np.isfinite(ctx.var[3:]).all()
    assert ctx.count[1, 0] == 0


@pytest.mark.parametrize(
    ("shape", "axes", "mshape"),
    [
        pytest.param((16, 64), -1, (16, 1), id="rows-of-padding"),
        pytest.param((16, 64), -1, (1, 64), id="columns"),
        pytest.param((16, 64), None, (16, 1), id="whole-rows"),
        pytest.param((4, 5, 6, 7), (0, 2, 3), (4, 1, 6, 1), id="channels"),
        pytest.param((3, 50, 32), (1, 2), (3, 50, 1), id="sequence-padding"),
    ],
)
@pytest.mark.parametrize("path", PATHS)
def test_broadcast_masks(rng, path, shape, axes, mshape):
    x, dy = _data(rng, shape, np.float64)
    mask = rng.random(mshape) < 0.7
    mask.flat[0] = True
    _agree(x, axes, dy, path, mask=mask)


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda a: a.T, id="transposed"),
        pytest.param(lambda a: a[::2, 1::3], id="sliced"),
        pytest.param(np.asfortranarray, id="fortran"),
    ],
)
@pytest.mark.parametrize("axes", [None, 0, -1])
def test_strided_inputs_on_the_blocked_kernels(rng, make, axes):
    x = make(rng.normal(size=(24, 30)) + 0.5)
    dy = rng.normal(size=x.shape)
    mask = make(rng.random((24, 30)) < 0.6)
    _agree(x, axes, dy, "blocked", eps_mode="outside", mask=mask)


def test_large_rows_on_the_pool(rng):
    """Enough elements for several threads (each group whole on one)."""
    x, dy = _data(rng, (512, 384), np.float32)
    w, b = _params(rng, (384,), "weight+bias", np.float32)
    mask = rng.random((512, 1)) < 0.9
    ctx = _agree(x, -1, dy, "blocked", mask=mask, weight=w, bias=b)
    assert ctx.count.shape == (512, 1)


NATIVE_LAYOUTS = [  # enough elements for the pool (`_layout.threads_for`), groups whole
    pytest.param((512, 96), -1, (96,), id="rows"),
    pytest.param((256, 6, 32), (1, 2), (6, 32), id="trailing-two"),
    pytest.param((64, 16, 8, 8), (0, 2, 3), (16, 1, 1), id="channels"),
    pytest.param((32, 16, 8, 8), (2, 3), (8, 8), id="instance"),
]


@pytest.mark.parametrize("center", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("shape", "axes", "wshape"), NATIVE_LAYOUTS)
def test_masked_groups_run_as_one_native_job_each_way(
    rng, monkeypatch, shape, axes, wshape, dtype, center
):
    """On the pool, whole masked groups of C-contiguous arrays run one native job forward
    and one backward (no Python on the workers), with the same results as the generic
    path; a dy of another dtype takes the Python jobs."""
    from normgrad.kernels import _run

    jobs = []

    def counting(caller, nthreads, args):
        jobs.append((caller.__name__, nthreads))
        return real(caller, nthreads, args)

    real = _run.run_native
    monkeypatch.setattr(_run, "run_native", counting)
    x, dy = _data(rng, shape, dtype)
    w, b = _params(rng, wshape, "weight+bias", dtype)
    mask = rng.random(shape) < 0.7
    with ng.use_kernels("blocked"):
        threads = ng.plan_forward(x, axes, mask=mask).threads
    if threads[1] < 2:
        pytest.skip("one thread on this machine: no pool")
    ddof = 1 if center else 0  # (ddof travels in the job's m slot)
    _agree(x, axes, dy, "blocked", mask=mask, weight=w, bias=b, center=center, ddof=ddof)
    assert [name for name, _ in jobs] == ["post_masked_forward", "post_masked_backward"]
    assert all(n == threads[1] for _, n in jobs)
    jobs.clear()
    other = np.float64 if dtype == np.float32 else np.float32
    _agree(x, axes, dy.astype(other), "blocked", mask=mask, center=center)
    assert [name for name, _ in jobs] == ["post_masked_forward"]


def _loop_masked(x, mask, axes, eps, eps_mode, center):
    """Own float64 reference, one group at a time."""
    red = ng._axes.normalize_axes(axes, x.ndim)
    kept = [i for i in range(x.ndim) if i not in red]
    order = kept + list(red)
    xt = np.moveaxis(x.astype(np.float64), order, range(x.ndim))
    mt = np.moveaxis(np.broadcast_to(mask, x.shape), order, range(x.ndim))
    y = np.empty_like(xt)
    for idx in np.ndindex(*xt.shape[: len(kept)]):
        g, counted = xt[idx], xt[idx][mt[idx]]
        mu = counted.mean() if center else 0.0
        var = np.mean((counted - mu) ** 2)
        y[idx] = (g - mu) / (np.sqrt(var + eps) if eps_mode == "inside" else np.sqrt(var) + eps)
    return np.moveaxis(y, range(x.ndim), order)


@pytest.mark.parametrize("center", [True, False])
@pytest.mark.parametrize("eps_mode", MODES)
@pytest.mark.parametrize(
    ("path", "shape", "axes"),
    [("small", (16, 96), -1), ("blocked", (4, 5, 6, 7), (0, 2, 3)), ("blocked", (30, 40), None)],
)
def test_float32_within_an_ulp_of_the_float64_reference(rng, path, shape, axes, eps_mode, center):
    """float32 results are the float64 computation rounded once (within ~1 ulp)."""
    x = (rng.normal(size=shape) * 3 + 1).astype(np.float32)
    mask = rng.random(shape) < 0.7
    with on_path(path):
        y = ng.normalize(x, axes, eps_mode=eps_mode, mask=mask, center=center)
    ref = _loop_masked(x, mask, axes, 1e-5, eps_mode, center)
    ulp = np.spacing(np.abs(ref).astype(np.float32)).astype(np.float64)
    assert np.max(np.abs(y - ref) / ulp) <= 1.0


@pytest.mark.parametrize("center", [True, False])
@pytest.mark.parametrize("path", PATHS)
def test_masked_gradients_match_finite_differences(rng, path, center):
    x = rng.normal(size=(3, 7)) + 0.3
    mask = rng.random(x.shape) < 0.7
    mask[:, 0] = True
    w, b = rng.normal(size=7) + 1, rng.normal(size=7)
    kw = {"mask": mask, "weight": w, "bias": b, "center": center, "eps_mode": "outside"}
    dy = rng.normal(size=x.shape)
    with on_path(path):
        _, ctx = ng.normalize_forward(x, -1, **kw)
        assert ng.plan_backward(ctx, dy).path == path
        g = ng.normalize_backward(ctx, dy)
    jac = fd_jacobian(lambda v: ng.normalize(v, -1, **{**kw, "mask": mask}), x)
    np.testing.assert_allclose(g.x, np.einsum("ij,ijkl->kl", dy, jac), atol=1e-7)


def test_modes_without_masked_kernels_take_the_generic_path(rng):
    x = rng.normal(size=(8, 16))
    mask = rng.random(x.shape) < 0.5
    for mode in ("native", "sweep", False):
        with ng.use_kernels(mode):
            plan = ng.plan_forward(x, -1, mask=mask)
        assert plan.path == "generic" and "mask" in plan.reason
    with ng.use_kernels("auto"):  # the masked kernels at every size
        assert ng.plan_forward(x, -1, mask=mask).path == "small"
        assert ng.plan_forward(x, -1, nan_policy="omit").path == "small"


def test_backward_reuses_the_forward_plan_only_under_the_same_mode(rng):
    x, dy = _data(rng, (8, 32), np.float64)
    mask = rng.random(x.shape) < 0.6
    with ng.use_kernels("blocked"):
        y_out = np.empty_like(x)
        y, ctx = ng.normalize_forward(x, -1, mask=mask, out=y_out)
        assert y is y_out
        assert ng.plan_backward(ctx, dy).path == "blocked"
        out = np.empty_like(x)
        assert ng.plan_backward(ctx, dy, out=out).path == "blocked"  # (planned again)
        g_out = ng.normalize_backward(ctx, dy, out=out)
        assert g_out.x is out
    with ng.use_kernels(False):
        assert ng.plan_backward(ctx, dy).path == "generic"
        gr = ng.normalize_backward(ctx, dy)
        yr = ng.normalize(x, -1, mask=mask)
    _close(y, yr, 4, _scales(ctx, dy)[0])
    with ng.use_kernels("small"):
        assert ng.plan_backward(ctx, dy).path == "small"
    _close(out, gr.x, 16, _scales(ctx, dy)[1])


def _masked_entries():
    from normgrad import _runtime

    planned = _runtime.STATE.planned
    return [k for k, v in planned.items() if k[0] == "masked" and v is not None]


@pytest.mark.parametrize("path", PATHS)
def test_masked_plans_are_cached_per_signature_not_per_mask(rng, path):
    """A masked NumPy call is validated and planned once per signature (shapes, strides,
    dtypes, the mask's broadcast pattern): a new mask of the same pattern reuses the entry
    and is read afresh, another pattern plans again."""
    x, dy = _data(rng, (24, 64), np.float32)
    w, b = _params(rng, (64,), "weight+bias", np.float32)
    with testing.settings():  # (a clean cache)
        for _ in range(3):  # new values every time, one entry
            _agree(x, -1, dy, path, mask=rng.random(x.shape) < 0.6, weight=w, bias=b)
        assert len(_masked_entries()) == 1
        _agree(x, -1, dy, path, mask=rng.random((24, 1)) < 0.6, weight=w, bias=b)
        _agree(x, -1, dy, path, mask=(rng.random(x.shape) < 0.6).T.copy().T, weight=w, bias=b)
        _agree(x, -1, dy, path, mask=np.asfortranarray(rng.random(x.shape) < 0.6))
        assert len(_masked_entries()) == 4  # (the Fortran mask: other strides, no params)
        for _ in range(2):  # NaN in new places each time, one entry more
            xn = x.copy()
            xn[rng.random(x.shape) < 0.2] = np.nan
            _agree(xn, -1, dy, path, nan_policy="omit", weight=w, bias=b)
        assert len(_masked_entries()) == 5


def test_cached_masked_signatures_still_refuse_bad_masks(rng):
    """Another mask dtype or shape is another key: validated, and refused."""
    x = rng.normal(size=(6, 16))
    mask = rng.random(x.shape) < 0.5
    with testing.settings():
        ng.normalize(x, -1, mask=mask)
        with pytest.raises(ng.NormgradError, match="boolean"):
            ng.normalize(x, -1, mask=mask.astype(np.int8))
        with pytest.raises(ng.NormgradError, match="broadcast"):
            ng.normalize(x, -1, mask=mask[:, :8])
        with pytest.raises(ng.NormgradError, match="ddof"):
            ng.normalize(x, -1, mask=mask, ddof=1, center=False)
        y = ng.normalize(x, -1, mask=mask)
    with ng.use_kernels(False):
        np.testing.assert_allclose(y, ng.normalize(x, -1, mask=mask), rtol=1e-12, atol=1e-13)


@pytest.fixture
def split_small(monkeypatch):
    """Split groups at test sizes: the pool and chunks from a few elements (chunks then
    start and end inside runs), in a clean plan cache."""
    from normgrad.kernels import _layout

    monkeypatch.setattr(_layout, "PARALLEL_MIN_SIZE", 64)
    monkeypatch.setattr(_layout, "SPLIT_MIN_SIZE", 64)
    monkeypatch.setattr(_layout, "MIN_CHUNK", 16)
    with testing.settings():
        yield


SPLIT_LAYOUTS = [  # few groups: each splits into chunks
    pytest.param((40, 50), None, (40, 50), id="whole"),
    pytest.param((3, 200), -1, (200,), id="three-rows"),
    pytest.param((4, 6, 32), (1, 2), (6, 32), id="trailing-two"),
    pytest.param((4, 5, 6, 7), (0, 2, 3), (5, 1, 1), id="channels"),
    pytest.param((2, 3, 9, 17), (0, 1, 3), (1, 1, 9, 1), id="two-reduced-blocks"),
]


def _split_plan(x, axes, **kw):
    with ng.use_kernels("blocked"):
        plan = ng.plan_forward(x, axes, **kw)
    assert plan.path == "blocked" and plan.threads[0] > 1, plan
    return plan


@pytest.mark.parametrize(("affine", "center"), VARIANTS)
@pytest.mark.parametrize("eps_mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("shape", "axes", "wshape"), SPLIT_LAYOUTS)
def test_split_masked_groups_agree_with_generic(rng, split_small, shape, axes, wshape, dtype,
                                                eps_mode, affine, center):  # fmt: skip
    x, dy = _data(rng, shape, dtype)
    w, b = _params(rng, wshape, affine, dtype)
    mask = rng.random(shape) < 0.7
    kw = {"eps": 1e-3, "eps_mode": eps_mode, "weight": w, "bias": b, "center": center}
    _split_plan(x, axes, mask=mask, **kw)
    _agree(x, axes, dy, "blocked", ulps=8, mask=mask, **kw)  # (merged in another order)


@pytest.mark.parametrize("center", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_split_masked_groups_omit_nan_and_empty_groups(rng, split_small, dtype, center):
    """nan_policy="omit" on split groups, a broadcast mask, and a group (channel) with no
    counted element (NaN statistics, r g where nothing counts), or whose first chunks have
    none (the shift is the group's first counted element, whichever chunk holds it)."""
    x, dy = _data(rng, (4, 5, 6, 7), dtype)
    x[rng.random(x.shape) < 0.2] = np.nan
    w, b = _params(rng, (5, 1, 1), "weight+bias", dtype)
    mask = rng.random((4, 5, 1, 7)) < 0.8
    mask[:, 1] = False
    mask[:3, 2] = False
    kw = {"weight": w, "bias": b, "center": center, "ddof": 1 if center else 0}
    _split_plan(x, (0, 2, 3), mask=mask, nan_policy="omit", **kw)
    ctx = _agree(x, (0, 2, 3), dy, "blocked", 8, mask=mask, nan_policy="omit", **kw)
    assert ctx.count[0, 1, 0, 0] == 0 and np.isnan(ctx.var[0, 1, 0, 0])
    assert np.isfinite(ctx.var[0, 2, 0, 0])


@pytest.mark.parametrize("center", [True, False])
def test_split_masked_gradients_match_finite_differences(rng, split_small, center):
    x = rng.normal(size=(6, 14)) + 0.3
    mask = rng.random(x.shape) < 0.7
    w, b = rng.normal(size=14) + 1, rng.normal(size=14)
    kw = {"mask": mask, "weight": w, "bias": b, "center": center, "eps_mode": "outside"}
    dy = rng.normal(size=x.shape)
    _split_plan(x, None, **kw)
    with ng.use_kernels("blocked"):
        _, ctx = ng.normalize_forward(x, None, **kw)
        g = ng.normalize_backward(ctx, dy)
        jac = fd_jacobian(lambda v: ng.normalize(v, None, **kw), x)
    np.testing.assert_allclose(g.x, np.einsum("ij,ijkl->kl", dy, jac), atol=1e-7)
    dw = np.sum(dy * (x - ctx.mean) * ctx.rstd, axis=0, where=True)
    np.testing.assert_allclose(g.weight, dw, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(g.bias, dy.sum(axis=0), rtol=1e-12)


def test_a_masked_whole_tensor_splits_by_default(rng):
    """At the default sizes a masked whole tensor of 10^6 elements runs on every thread."""
    from normgrad.kernels import _layout

    x, dy = _data(rng, (1000, 1000), np.float32)
    mask = rng.random(x.shape) < 0.8
    with testing.settings():
        plan = ng.plan_forward(x, None, mask=mask)
        assert plan.path == "blocked"
        if _layout.max_threads() > 1:
            assert plan.threads[0] > 1
        _agree(x, None, dy, "blocked", mask=mask)
