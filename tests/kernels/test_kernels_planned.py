"""The planned calls (C-contiguous inputs without affine parameters): the single-call and
native-job kernels, `out=`, streaming stores, and the same bits as the blocked kernels."""

from __future__ import annotations

import numpy as np
import pytest
from _kernel_checks import check, close, dx_scale, kernel_path, y_scale

import normgrad as ng
from normgrad import _formulas, _ops, _runtime, testing
from normgrad._errors import NormgradError

pytest.importorskip("numba")
import numba

from normgrad.kernels import _loops

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
    exactly `_formulas.rstd` of the variance, and normalize_jvp's y the forward's y."""
    x = (rng.normal(size=shape) * 3 + 1).astype(dtype)
    dy = rng.normal(size=shape).astype(dtype)
    with ng.use_kernels("auto"), testing.record_paths() as seen:
        y, ctx = ng.normalize_forward(x, axes, eps=0.01, eps_mode=eps_mode)
        dx = ng.normalize_backward(ctx, dy).x
        y_jvp, _ = ng.normalize_jvp(x, dy, axes, eps=0.01, eps_mode=eps_mode)
    assert seen == [("forward", "small"), ("backward", "small"), ("forward", "small")]
    np.testing.assert_array_equal(y_jvp, y)
    rstd = _formulas.rstd(np, ctx.var, 0.01, eps_mode == "inside")
    np.testing.assert_array_equal(ctx.rstd, rstd)
    with ng.use_kernels(False):
        yr, cr = ng.normalize_forward(x, axes, eps=0.01, eps_mode=eps_mode)
        dxr = ng.normalize_backward(cr, dy).x
    close(y, yr, 4)
    close(dx, dxr, 16, dx_scale(cr, dy))
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
        pytest.param(lambda x: (x.T, -1), id="transposed"),
        pytest.param(lambda x: (x[:, ::2], -1), id="sliced"),
    ],
)
def test_small_kernels_decline_other_layouts(rng, make):
    """Layouts that a plain reshape cannot view go to the generic path below
    KERNEL_MIN_SIZE (auto mode), with the same results."""
    x, axes = make(rng.normal(size=(12, 10)))
    with ng.use_kernels("auto"), testing.record_paths() as seen:
        y, ctx = ng.normalize_forward(x, axes)
        dx = ng.normalize_backward(ctx, np.ones_like(x)).x
    assert seen == [("forward", "generic"), ("backward", "generic")]
    with ng.use_kernels(True):
        y2, ctx2 = ng.normalize_forward(x, axes)
        dx2 = ng.normalize_backward(ctx2, np.ones_like(x)).x
    close(y2, y, 4)
    close(dx2, dx, 16, dx_scale(ctx, np.ones_like(x)))


def test_small_backward_with_other_dy(rng):
    """dy of another float dtype, or in another memory order, or a generic-path context."""
    x = rng.normal(size=(6, 40))
    _, ctx = ng.normalize_forward(x, -1)
    with ng.use_kernels(False):
        _, cr = ng.normalize_forward(x, -1)
    others = (np.float32, ">f8", int)  # another dtype, non-native byte order, integers
    dys = [rng.normal(size=x.shape).astype(t) for t in others] + [np.asfortranarray(x)]
    for dy in dys:
        ref = ng.normalize_backward(cr, dy.astype(np.float64)).x
        close(ng.normalize_backward(ctx, dy).x, ref, 16, dx_scale(cr, dy))
        close(ng.normalize_backward(cr, dy).x, ref, 16, dx_scale(cr, dy))


@pytest.mark.parametrize("mode", [True, "auto"])
def test_non_native_byte_order_uses_the_generic_path(rng, mode):
    x = rng.normal(size=(6, 40)).astype(">f8")
    with ng.use_kernels(mode), testing.record_paths() as seen:
        y, ctx = ng.normalize_forward(x, -1)
        dx = ng.normalize_backward(ctx, x).x
    assert seen == [("forward", "generic"), ("backward", "generic")]
    with ng.use_kernels(False):
        yr, cr = ng.normalize_forward(x.astype(np.float64), -1)
        dxr = ng.normalize_backward(cr, x.astype(np.float64)).x
    np.testing.assert_array_equal(y, yr)
    np.testing.assert_array_equal(dx, dxr)


def test_numpy_context_matches_the_dataclass(rng):
    """`_ops._context` fills every field that `NormContext(...)` does, and stays frozen."""
    from dataclasses import FrozenInstanceError

    from normgrad._validate import validate

    x = rng.normal(size=(3, 4))
    m = np.zeros((3, 1))
    fast = _ops._context(x, validate(x, 1, 1e-5, "inside", 0, None, None)[0], (m, m, m), None, None)
    slow = _ops.NormContext(x, (1,), m, m, m, 1e-5, "inside", 0, None, None, 4, x.dtype)
    assert vars(fast) == vars(slow)
    with pytest.raises(FrozenInstanceError):
        fast.eps = 1.0  # type: ignore[misc]


@pytest.mark.parametrize("mode", [True, False])
def test_out_is_filled_and_returned(rng, mode):
    x = rng.normal(size=(8, 30)).astype(np.float32)
    dy = rng.normal(size=x.shape).astype(np.float32)
    yo, dxo = np.empty_like(x), np.empty_like(x)
    with ng.use_kernels(mode):
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
    with testing.record_paths() as seen:
        y, ctx = ng.normalize_forward(x, -1, out=yo)
        g = ng.normalize_backward(ctx, dy, out=dxo)
    assert y is yo and g.x is dxo
    small = x.size <= _runtime.STATE.settings.small_max_size
    if contiguous:
        planned = "small" if small else "native"
    else:  # the blocked kernels from kernel_min_size
        planned = "generic" if small else "blocked"
    assert seen == [("forward", planned), ("backward", planned)]
    close(y, y2, 4, y_scale(ctx2))
    close(g.x, g2.x, 16, dx_scale(ctx2, dy))
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
    assert x.size > _runtime.STATE.settings.small_max_size
    got = {}
    for path in ("planned", "blocked"):
        with kernel_path(path), testing.record_paths() as seen:
            y, ctx = ng.normalize_forward(x, axes)
            g = ng.normalize_backward(ctx, dy)
        ran = "native" if path == "planned" else "blocked"  # native jobs: the planned calls
        assert seen == [("forward", ran), ("backward", ran)]
        got[path] = (y, ctx.mean, ctx.var, ctx.rstd, g.x)
    for a, b in zip(got["planned"], got["blocked"], strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    check(x, axes, dy)
    planned = ng.plan_forward(x, axes)
    assert planned.path == "native" and (planned.layout.nc == 1) == (axes is not None)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_planned_batch_norm_sweeps_when_large(rng, dtype):
    """A C-contiguous batch-norm input without affine parameters runs whole-group items on
    the planned calls, and the general path's memory-order sweep from sweep_min_bytes on
    (lowered here): both agree with the generic path, and `out` is filled in place."""
    x = (rng.normal(size=(6, 8, 40, 40)) * 3 - 2).astype(dtype)
    dy = rng.normal(size=x.shape).astype(dtype)
    axes = (0, 2, 3)
    for limit, ran in ((x.nbytes + 1, "native"), (x.nbytes, "sweep")):
        with testing.settings(sweep_min_bytes=limit):
            with testing.record_paths() as seen:
                check(x, axes, dy)
            assert seen[:2] == [("forward", ran), ("backward", ran)]
            yo, dxo = np.empty_like(x), np.empty_like(x)
            y, ctx = ng.normalize_forward(x, axes)
            y2, ctx2 = ng.normalize_forward(x, axes, out=yo)
            g2 = ng.normalize_backward(ctx2, dy, out=dxo)
            assert y2 is yo and g2.x is dxo
            np.testing.assert_array_equal(y, yo)
            np.testing.assert_array_equal(ng.normalize_backward(ctx, dy).x, dxo)


@pytest.mark.parametrize(
    ("xdtype", "dydtype"), [(np.float32, np.float64), (np.float64, np.float32)]
)
def test_planned_backward_with_another_dy_dtype(rng, xdtype, dydtype):
    """A `dy` whose dtype differs from `x`'s leaves the native jobs (compiled for one dtype)
    for the blocked kernels: same results as the generic path."""
    x = (rng.normal(size=(80, 1024)) + 3).astype(xdtype)
    dy = rng.normal(size=x.shape).astype(dydtype)
    with testing.record_paths() as seen:
        check(x, -1, dy)
    assert seen[:2] == [("forward", "native"), ("backward", "blocked")]


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
    with testing.record_paths() as seen:
        check(x, -1, dy)
    assert seen[:2] == [("forward", "blocked"), ("backward", "blocked")]


def test_planned_call_refuses_zero_variance(rng):
    """eps=0 with a constant group: the planned call raises as the generic path does."""
    x = rng.normal(size=(80, 1024))
    x[3] = 7.0
    for mode, ran in ((True, "native"), (False, "generic")):
        with ng.use_kernels(mode), testing.record_paths() as seen:
            with pytest.raises(NormgradError, match="variance"):
                ng.normalize(x, -1, eps=0)
        assert seen == [("forward", ran)]


@numba.njit
def _seg_both(xs, ds, ys, dxs, coef, stream):
    """The element loops on one run: 1-d arrays seen as (1, 1, 1, n) blocks."""
    n = xs.size
    x4, d4 = xs.reshape((1, 1, 1, n)), ds.reshape((1, 1, 1, n))
    y4, dx4 = ys.reshape((1, 1, 1, n)), dxs.reshape((1, 1, 1, n))
    par = (np.ones((1, 1)), np.zeros((1, 1)), (0, 0, 0), (0, 0, 0))
    _loops._write_y((x4, y4), par, (0, 0, 0), 0, n, (coef[0], coef[1]), (False, stream))
    _loops._write_dx((x4, d4, dx4), par, (0, 0, 0), 0, n, coef, (False, False, False, stream))


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
                _seg_both(x, d, ys[seg], dxs[seg], (99.5, 0.37, 0.01, -0.2), stream)
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
def test_streaming_into_out_agrees(rng, shape, axes, dtype):
    """Preallocated outputs above stream_min_bytes (here 0) are written with non-temporal
    stores, also when misaligned: the same bits as without, and the generic path's results
    within a few ulp."""
    x = (rng.normal(size=shape) * 2 + 50).astype(dtype)
    dy = rng.normal(size=shape).astype(dtype)
    results = []
    for limit in (0, 1 << 62):
        ybuf = np.empty(x.size + 1, dtype)[1:].reshape(shape)  # off a 64-byte boundary
        dxbuf = np.empty(x.size + 3, dtype)[3:].reshape(shape)
        with testing.settings(stream_min_bytes=limit), kernel_path("blocked"):
            y, ctx = ng.normalize_forward(x, axes, out=ybuf)
            g = ng.normalize_backward(ctx, dy, out=dxbuf)
        assert y is ybuf and g.x is dxbuf
        results.append((y.copy(), g.x.copy()))
    (ys, dxs), (yp, dxp) = results
    np.testing.assert_array_equal(ys, yp)
    np.testing.assert_array_equal(dxs, dxp)
    with ng.use_kernels(False):
        yr, cr = ng.normalize_forward(x, axes)
        gr = ng.normalize_backward(cr, dy)
    close(ys, yr, 4, y_scale(cr))
    close(dxs, gr.x, 16, dx_scale(cr, dy))


@pytest.mark.parametrize(
    ("shape", "axes", "pshape", "kept"),
    [
        pytest.param((32, 128), -1, (128,), True, id="small-rows"),
        pytest.param((64, 4096), -1, (4096,), True, id="native-rows"),
        pytest.param((8, 6, 5, 7), (0, 2, 3), (6, 1, 1), True, id="small-channels"),
        pytest.param((4, 6, 5), (1, 2), (4, 6, 5), False, id="full-shaped"),
    ],
)
def test_backward_reuses_the_forward_tables(rng, monkeypatch, shape, axes, pshape, kept):
    """A planned forward's parameter tables are kept in the context and the backward uses
    them instead of building them again; a table as large as x is not kept. The gradients
    are the generic path's either way."""
    from normgrad.kernels import _layout

    x, dy = rng.normal(size=shape), rng.normal(size=shape)
    w, b = 1 + rng.normal(size=pshape), rng.normal(size=pshape)
    built = []
    real_table = _layout.table
    monkeypatch.setattr(_layout, "table", lambda *a: built.append(1) or real_table(*a))
    with ng.use_kernels("auto"), testing.record_paths() as seen:
        first = ng.normalize_forward(x, axes, weight=w, bias=b)[1]  # (planning checks the fit)
        ng.normalize_backward(first, dy)
        built.clear()
        _, ctx = ng.normalize_forward(x, axes, weight=w, bias=b)
        got = ng.normalize_backward(ctx, dy)
    assert {p for _, p in seen} <= {"small", "native"}, seen
    assert (ctx.tables is not None) == kept
    assert len(built) == (2 if kept else 4)
    with ng.use_kernels(False):
        _, ref_ctx = ng.normalize_forward(x, axes, weight=w, bias=b)
        ref = ng.normalize_backward(ref_ctx, dy)
    for g, r in zip(got, ref, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-12, atol=1e-12)
