"""The fused kernels agree with the generic Array-API path for every layout and option, on
every kernel path."""

from __future__ import annotations

import numpy as np
import pytest
from _kernel_checks import both, check, close, dx_scale, kernel_path, y_scale
from hypothesis import given
from hypothesis import strategies as st

import normgrad as ng
from normgrad import testing
from normgrad._errors import NormgradError

pytest.importorskip("numba")
from normgrad.kernels import _layout, _loops, _pool

# Each agreement test runs on the small single-call kernels (where the layout allows), on the
# planned native jobs and on the blocked kernels.
PATHS = pytest.mark.parametrize("path", ["small", "planned", "blocked"])


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
    check(x, axes, dy, path=path)


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
    check(x, axes, dy)
    check(x, axes, dy, path="blocked")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("eps_mode", ["inside", "outside"])
@pytest.mark.parametrize("ddof", [0, 1, 2.5])
@PATHS
def test_options_agree(rng, dtype, eps_mode, ddof, path):
    x = rng.normal(size=(8, 3, 16)).astype(dtype)
    dy = rng.normal(size=x.shape).astype(dtype)
    check(x, (0, 2), dy, eps=0.1, eps_mode=eps_mode, ddof=ddof, path=path)
    check(x, -1, dy, eps=0.1, eps_mode=eps_mode, ddof=ddof, path=path)


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
        pytest.param((4, 3, 2, 5, 6), (2, 3, 4), (3, 2, 1, 1), id="groupnorm-channels"),
        pytest.param((4, 3, 2, 5, 6), (2, 3, 4), (4, 3, 1, 1, 1), id="groupnorm-groups"),
        pytest.param((3, 4, 5, 6), (1, 2), (4, 1, 6), id="inner-kept-and-reduced"),
        pytest.param((40, 6), 0, (6,), id="columns-batchnorm1d"),
        pytest.param((4, 5, 6, 7), (0, 1, 2), (7,), id="columns-nhwc"),
        pytest.param((4, 10, 6), 1, (4, 1, 6), id="columns-per-instance"),
    ],
)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@PATHS
def test_affine_agrees(rng, shape, axes, wshape, dtype, path):
    """Every parameter layout (per position, per channel, per group, scalar, full-shaped)
    on every kernel path: the generic path's results, dweight and dbias included."""
    x = rng.normal(size=shape).astype(dtype)
    dy = rng.normal(size=shape).astype(dtype)
    w = (rng.normal(size=wshape) + 1).astype(dtype)
    b = rng.normal(size=wshape).astype(dtype)
    check(x, axes, dy, path=path, weight=w, bias=b)
    check(x, axes, dy, path=path, weight=w)
    check(x, axes, dy, path=path, bias=b)


@pytest.mark.parametrize(
    ("shape", "axes", "wshape", "in_place"),
    [
        pytest.param((32, 128), -1, (128,), True, id="rows"),
        pytest.param((6, 5, 4, 30), (1, 3), (6, 1, 4, 1), True, id="two-kept-blocks"),
        pytest.param((4, 3, 2, 5, 6), (2, 3, 4), (3, 2, 1, 1), False, id="groupnorm-gathered"),
        pytest.param((16, 30), None, (16, 30), True, id="whole-full-shaped"),
        pytest.param((4, 5, 6, 7), (0, 2, 3), (4, 5, 6, 7), True, id="batchnorm-full"),
        pytest.param((4, 16, 30, 30), (1, 2, 3), (16, 30, 30), True, id="shared-large-table"),
        pytest.param((300, 700), None, (300, 700), True, id="whole-full-shaped-split"),
    ],
)
@pytest.mark.parametrize("path", ["small", "planned"])
def test_float32_parameters_are_read_in_place(
    rng, monkeypatch, shape, axes, wshape, in_place, path
):
    """The planned kernels read float32 parameters of float32 x where they lie (no float64
    table), converting each value as they read it, and keep per-element gradients in
    float32: the same bits as float64 copies of the same parameters give (those take
    float64 tables and sums), for y, dx, dweight and dbias, with weight and bias, or
    either."""
    x = (rng.normal(size=shape) * 3 + 40).astype(np.float32)
    dy = rng.normal(size=shape).astype(np.float32)
    w = (rng.normal(size=wshape) + 1).astype(np.float32)
    b = rng.normal(size=wshape).astype(np.float32)
    tables = []
    real_table = _layout.table
    monkeypatch.setattr(_layout, "table", lambda *a: tables.append(real_table(*a)) or tables[-1])
    for params in ((w, b), (w, None), (None, b)):
        tables.clear()
        as64 = tuple(None if p is None else p.astype(np.float64) for p in params)
        with kernel_path(path), testing.record_paths() as seen:
            y32, c32 = ng.normalize_forward(x, axes, weight=params[0], bias=params[1])
            g32 = ng.normalize_backward(c32, dy)
            y64, c64 = ng.normalize_forward(x, axes, weight=as64[0], bias=as64[1])
            g64 = ng.normalize_backward(c64, dy)
        assert {p for _, p in seen} <= {"small", "native"}, seen
        read = [t for t in tables if t.values.dtype == np.float32 and t.values.size > 1]
        assert read, "no float32 table"
        for p in params:
            if p is not None:
                assert any(np.shares_memory(t.values, p) for t in read) == in_place
        np.testing.assert_array_equal(y32, y64)
        np.testing.assert_array_equal(g32.x, g64.x)
        for got, ref, p in zip(g32[1:], g64[1:], params, strict=True):
            assert (got is None) == (p is None)
            if p is not None:
                assert got.dtype == np.float32 and got.shape == p.shape
                np.testing.assert_array_equal(got, ref.astype(np.float32))


@pytest.mark.parametrize(
    ("shape", "axes", "make"),
    [
        pytest.param((4, 3, 2, 5, 6), (2, 3, 4), lambda r: r[:6:2, :4:2, :1, :1], id="gn-strided"),
        pytest.param(
            (4, 3, 2, 5, 6),
            (2, 3, 4),
            lambda r: np.broadcast_to(r[:1, :2, :1, :1], (3, 2, 1, 1)),
            id="gn-stride-0",
        ),
        pytest.param((3, 4, 5, 6), (1, 2), lambda r: r[:4, :1, :6, 0], id="inner-kept"),
        pytest.param((6, 5, 8), -1, lambda r: r[0, 0, 0, :16:2], id="ln-strided"),
    ],
)
@PATHS
def test_strided_and_broadcast_parameters_agree(rng, shape, axes, make, path):
    """Parameters that are strided or stride-0 views (their tables are gathered from the
    parameter's own positions, their gradients scattered back to them) match the generic
    path, and the parameters are not written to."""
    x = rng.normal(size=shape)
    dy = rng.normal(size=shape)
    w = make(rng.normal(size=(8, 6, 6, 16)) + 1)
    b = make(rng.normal(size=(8, 6, 6, 16)))
    w0, b0 = w.copy(), b.copy()
    check(x, axes, dy, path=path, weight=w, bias=b)
    np.testing.assert_array_equal(w, w0)
    np.testing.assert_array_equal(b, b0)


@pytest.mark.parametrize(
    ("shape", "wshape", "path"),
    [((64, 768), (768,), "small"), ((512, 768), (768,), "native"), ((8, 16, 20), (20,), "small"),
     ((8, 32, 2, 28, 28), (32, 2, 1, 1), "native"), ((2, 4, 2, 5, 5), (4, 2, 1, 1), "small")],
)  # fmt: skip
def test_affine_calls_take_the_planned_kernels(rng, shape, wshape, path):
    """C-contiguous inputs with a weight and bias that fit the blocks take the small and
    native kernels as calls without them do (in auto mode), and the planned calls' cache
    tells calls apart by their parameters' shapes. Group norm's per-channel parameters vary
    over part of the kept axes (batch, group): they take them too."""
    x = rng.normal(size=shape)
    w, b = rng.normal(size=wshape), rng.normal(size=wshape)
    axes = -1 if len(shape) < 5 else (2, 3, 4)
    with testing.record_paths() as seen:
        _, ctx = ng.normalize_forward(x, axes, weight=w, bias=b)
        ng.normalize_backward(ctx, x)
        ng.normalize_forward(x, axes, weight=w[None])  # another shape of the same values
    assert seen == [("forward", path), ("backward", path), ("forward", path)]
    with pytest.raises(NormgradError, match="broadcast"):
        ng.normalize(x, -1, weight=w[:-1])


def test_partial_affine_broadcast_falls_back(rng):
    """A weight that cuts the reduced axes into more than two blocks: generic path, correct."""
    x = rng.normal(size=(4, 6, 8, 5))
    w = rng.normal(size=(6, 1, 5)) + 1
    with ng.use_kernels(True), testing.record_paths() as seen:
        y = ng.normalize(x, weight=w)
    assert seen == [("forward", "generic")]
    with ng.use_kernels(True):
        assert "blocks" in ng.plan_forward(x, weight=w).reason
    with ng.use_kernels(False):
        y2, _ = ng.normalize_forward(x, weight=w)
    np.testing.assert_array_equal(y, y2)


def test_int_weight_and_mixed_dy_dtype(rng):
    x = rng.normal(size=(8, 40))
    w = np.arange(1, 41)
    dy = rng.normal(size=x.shape).astype(np.float32)
    check(x, -1, dy, weight=w, bias=w)


@pytest.mark.parametrize(
    ("shape", "axes"), [((1, 200_000), None), ((3, 70_001), -1), ((200_000, 3), 0)]
)
def test_threaded_chunks_are_exact(rng, shape, axes):
    """Groups split into chunks that threads merge (Chan): statistics within 2 ulp of exact
    sums (NumPy's own strided sums are less accurate), backward equal to the generic one."""
    import math

    x = rng.normal(size=shape) * 5 + 100
    dy = rng.normal(size=shape)
    with ng.use_kernels(True):
        _, ctx = ng.normalize_forward(x, axes)
        gk = ng.normalize_backward(ctx, dy)
    ax = ctx.axes
    groups = np.moveaxis(x, ax, range(-len(ax), 0)).reshape(-1, ctx.group_size)
    mean = np.array([math.fsum(g) / g.size for g in groups])
    var = np.array([math.fsum((g - m) ** 2) / g.size for g, m in zip(groups, mean, strict=True)])
    close(ctx.mean.ravel(), mean, 2)
    np.testing.assert_allclose(ctx.var.ravel(), var, rtol=1e-13)
    with ng.use_kernels(False):
        gr = ng.normalize_backward(ctx, dy)
    close(gk.x, gr.x, 16, dx_scale(ctx, dy))


def test_large_offset_float32_is_accurate(rng):
    """float32 with mean 1e6: statistics in float64 from the float32 values, y within 1 ulp."""
    x = (rng.normal(size=300_000) + 1e6).astype(np.float32)
    with ng.use_kernels(True):
        y, ctx = ng.normalize_forward(x, eps=0.0)
    xd = x.astype(np.float64)
    mu = xd.mean()
    var = ((xd - mu) ** 2).mean()
    np.testing.assert_allclose(ctx.mean.item(), mu, rtol=1e-15)
    np.testing.assert_allclose(ctx.var.item(), var, rtol=1e-12)
    close(y, ((xd - mu) / np.sqrt(var)).astype(np.float32), 1)


def test_nan_stays_in_its_group(rng):
    x = rng.normal(size=(4, 50))
    x[2, 7] = np.nan
    with ng.use_kernels(True):
        y = ng.normalize(x, -1)
    assert np.isnan(y[2]).all() and np.isfinite(np.delete(y, 2, axis=0)).all()


def test_zero_variance_with_eps_zero_is_refused():
    with ng.use_kernels(True), pytest.raises(NormgradError, match="zero variance"):
        ng.normalize(np.ones((3, 4)), -1, eps=0)


def test_inputs_are_not_mutated(rng):
    x = rng.normal(size=(5, 60))
    x.flags.writeable = False  # read-only input works too
    dy = rng.normal(size=x.shape)
    xs, dys = x.copy(), dy.copy()
    check(x, -1, dy)
    np.testing.assert_array_equal(x, xs)
    np.testing.assert_array_equal(dy, dys)


def test_dy_in_another_memory_order(rng):
    x = rng.normal(size=(30, 20))
    dy = np.asfortranarray(rng.normal(size=x.shape))
    check(x, None, dy)


def test_output_keeps_memory_order(rng):
    x = np.asfortranarray(rng.normal(size=(30, 20)))
    with ng.use_kernels(True):
        y = ng.normalize(x, 0)
    assert y.flags.f_contiguous


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
    (yk, _, gk), (yr, cr, gr) = both(x, axes, dy, path)
    close(yk, yr, 4, y_scale(cr))
    # tiny groups can have var ~ eps: x - mu then carries most of the rounding, on both paths
    close(gk.x, gr.x, 64, dx_scale(cr, dy))


def test_concurrent_callers_get_the_same_results(rng):
    """Several Python threads on the thread pool at once: same results as one at a time."""
    from concurrent.futures import ThreadPoolExecutor

    xs = [rng.normal(size=(3, 60_000)) + i for i in range(4)]
    dy = rng.normal(size=(3, 60_000))

    def work(x):
        with ng.use_kernels(True):
            y, ctx = ng.normalize_forward(x, -1)
            return y, ng.normalize_backward(ctx, dy).x

    expected = [work(x) for x in xs]
    with ThreadPoolExecutor(4) as ex:
        got = list(ex.map(work, xs * 2))
    for (y, dx), (ye, dxe) in zip(got, expected * 2, strict=True):
        np.testing.assert_array_equal(y, ye)
        np.testing.assert_array_equal(dx, dxe)


@pytest.mark.parametrize(
    ("shape", "axes", "wshape", "path"),
    [
        pytest.param((12, 8, 40, 40), (0, 2, 3), (8, 1, 1), "sweep", id="batchnorm"),
        pytest.param((24, 5, 40, 30), (1, 3), (24, 1, 40, 1), "sweep", id="two-kept-blocks"),
        pytest.param((24, 5, 40, 30), (1, 3), (40, 1), "sweep", id="two-kept-blocks-inner"),
        pytest.param((4000, 48), 0, (48,), "sweep", id="columns-batchnorm1d-sweep"),
        pytest.param((4000, 48), 0, (48,), "native", id="columns-batchnorm1d-native"),
        pytest.param((16, 20, 20, 16), (0, 1, 2), (16,), "sweep", id="columns-nhwc-sweep"),
        pytest.param((16, 20, 20, 16), (0, 1, 2), (16,), "native", id="columns-nhwc-native"),
        pytest.param((6, 600, 24), 1, (24,), "sweep", id="columns-instance-nlc-sweep"),
        pytest.param((6, 600, 24), 1, (24,), "native", id="columns-instance-nlc-native"),
    ],
)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sweep_kernels_threaded(rng, shape, axes, wshape, path, dtype):
    """Batch-norm-like layouts (several runs per group, per-group affine parameters) are swept
    in memory order on several threads, and those whose groups are innermost in memory also
    run as one native job of the same column kernels ("native": partials, a barrier, the
    merge in every thread): statistics within 2 ulp of exact sums, results equal to the
    generic path's within a few ulp, and bit-identical from call to call. dweight and
    dbias: within 32 ulp of exact sums where each group has its own (NumPy's sums down 4000
    rows, the generic path's, are up to 65 ulp off: 128 against them, and its means 5
    ulp)."""
    import math

    x = (rng.normal(size=shape) * 5 + 100).astype(dtype)
    dy = rng.normal(size=shape).astype(dtype)
    w = rng.normal(size=wshape) + 1
    b = rng.normal(size=wshape)
    mode = "sweep" if path == "sweep" else "small"  # (small: as auto, at any size)
    with testing.settings(sweep_min_bytes=0), testing.record_paths() as seen:
        check(x, axes, dy, path=mode, weight=w, bias=b, param_ulps=128)
    assert seen[:2] == [("forward", path), ("backward", path)]
    if path == "native":
        threads = ng.plan_forward(x, axes).threads[1]  # several threads: under test
        assert threads > 1 or _layout.max_threads() == 1
    check(x, axes, dy, path=mode, ulps=8)  # (the generic path's means down 4000 rows: 5 ulp)
    with ng.use_kernels("sweep" if path == "sweep" else True):
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
    close(ctx.mean.reshape([x.shape[i] for i in kept]).ravel(), mean, 2)
    np.testing.assert_allclose(ctx.var.ravel(), var, rtol=1e-13)
    if w.size == len(groups):  # one weight per group: its exact gradients
        dyg = np.moveaxis(dy.astype(np.float64), ctx.axes, range(-len(ctx.axes), 0))
        dyg = dyg.reshape(groups.shape)
        r = ctx.rstd.reshape([x.shape[i] for i in kept]).ravel()
        dw = [math.fsum(d * (v - m)) * ri for d, v, m, ri in zip(dyg, groups, mean, r, strict=True)]
        close(g.weight.ravel(), np.array(dw), 32)
        close(g.bias.ravel(), np.array([math.fsum(d) for d in dyg]), 32)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    ("shape", "axes", "wshape"),
    [((400, 400), None, (400, 400)), ((400, 400), None, (400,)), ((3, 70_001), -1, (70_001,))],
)
def test_split_groups_in_one_job(rng, shape, axes, wshape, dtype):
    """Groups split into chunks run as one two-phase job per direction (`forward_split`,
    `backward_split`: partials, a barrier, the merge in every thread, the second pass), with
    weight and bias: within a few ulp of the generic path, and the same bits on every call."""
    x = (rng.normal(size=shape) * 3 + 20).astype(dtype)
    dy = rng.normal(size=shape).astype(dtype)
    w = rng.normal(size=wshape).astype(dtype)
    b = rng.normal(size=wshape).astype(dtype)
    plan = ng.plan_forward(x, axes, weight=w, bias=b)
    assert plan.path in ("native", "blocked") and plan.threads[0] > 1  # split: under test
    check(x, axes, dy, weight=w, bias=b)
    with ng.use_kernels(True):
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
    x = rng.normal(size=(1, 1, 1, 300_000)) + 4
    nchunks, items, nc = 32, 16, 16
    counts = _layout.chunk_counts(x.size, nc)
    out = []
    for threads in (1, 2):
        stats, y, pm = np.empty((3, 1)), np.empty_like(x), np.empty((2, items))
        phase = _pool.phase_ctl(nchunks, 2)
        io, op, flags = (x, y), (1e-5, True, float(x.size), True), (False, False)
        par = (np.ones((1, 1)), np.zeros((1, 1)), (0, 0, 0), (0, 0, 0))
        args = (phase, (counts, pm[0], pm[1]), io, par, op, stats, flags)
        _pool.run(_loops.forward_split, items, threads, args, nchunks)
        assert phase[_pool.DONE] == nchunks
        out.append((stats, y))
    for a, c in zip(*out, strict=True):
        np.testing.assert_array_equal(a, c)
    np.testing.assert_allclose(out[0][0][0, 0], x.mean(), rtol=1e-14)


def test_split_groups_refuse_zero_variance():
    x = np.full((400, 400), 3.0)
    with ng.use_kernels(True), pytest.raises(NormgradError, match="zero variance"):
        ng.normalize(x, eps=0)


@pytest.mark.parametrize(
    ("shape", "axes", "shape4"),
    [
        pytest.param((300, 48), 0, (1, 300, 48, 1), id="batchnorm1d"),
        pytest.param((4, 6, 7, 16), (0, 1, 2), (1, 168, 16, 1), id="nhwc"),
        pytest.param((4, 30, 8), 1, (4, 30, 8, 1), id="instance-nlc"),
    ],
)
@pytest.mark.parametrize("center", [True, False])
def test_groups_innermost_in_memory_go_along_rows(rng, shape, axes, shape4, center):
    """Where the kept axes are innermost in memory (batch norm over (N, F), or over
    (N, H, W) of NHWC memory), the layout is `(Ka, R, K, 1)`: the small path's column
    kernel below `small_max_size`, a native job of the column kernels above it (at any
    size: not the sweep from `sweep_min_bytes`), and the sweep's column kernels, each
    agreeing with the generic path (RMS too); the same memory viewed as NCHW (a
    channels-last tensor, not C-contiguous) sweeps with the same layout. A parameter that
    varies over the reduced axes, the blocked kernels and masked calls keep each group one
    strided run, `(Ka, 1, K, R)`."""
    x = (rng.normal(size=shape) * 3 + 20).astype(np.float32)
    dy = rng.normal(size=shape).astype(np.float32)
    w = (rng.normal(size=shape[-1]) + 1).astype(np.float32)
    b = rng.normal(size=shape[-1]).astype(np.float32)
    ax = ng.normalize_forward(x, axes)[1].axes
    assert _layout.plan(x, ax).shape4 == shape4
    strided = (shape4[0], 1, shape4[2], shape4[1])
    assert _layout.plan(x, ax, (x,)).shape4 == strided
    assert _layout.plan(x, ax, columns=False).shape4 == strided
    assert ng.plan_forward(x, axes, mask=x > 20).layout.shape4 == strided
    runs = ((1 << 16, "small", "small"), (0, "small", "native"), (0, "sweep", "sweep"))
    for small_max, mode, path in runs:
        limits = {"small_max_size": small_max, "sweep_min_bytes": 0}
        with testing.settings(**limits), testing.record_paths() as seen:
            check(x, axes, dy, path=mode, weight=w, bias=b, center=center)
            check(x, axes, dy, path=mode, center=center)
        assert {p for _, p in seen if p != "generic"} == {path}
    if len(shape) == 4:  # NHWC memory seen as NCHW: axes (0, 2, 3), channels innermost
        xc, dyc = x.transpose(0, 3, 1, 2), dy.transpose(0, 3, 1, 2)
        assert _layout.plan(xc, (0, 2, 3)).shape4 == shape4
        with testing.record_paths() as seen:
            check(xc, (0, 2, 3), dyc, weight=w[:, None, None], bias=b[:, None, None])
        assert ("forward", "sweep") in seen


@pytest.mark.parametrize(
    "shape", [pytest.param((30_000, 3), id="long-groups"), pytest.param((301, 1100), id="wide")]
)
@pytest.mark.parametrize("path", ["small", "native"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_columns_against_exact_sums(rng, shape, path, dtype):
    """BatchNorm1d over (30000, 3): each chunk of rows is several in-cache blocks (at most
    `BLOCK` rows each, Chan-merged); over (301, 1100): wide rows, and chunks that end in
    rows the four-row steps leave.
    Statistics within 2 ulp of exact sums; y, dx, dweight and dbias against references
    from them (`math.fsum` per column, float64): float32 within 1 ulp, float64 within a
    few ulp of their terms' scale (`x - mu` rounds relative to |mu| = 100)."""
    import math

    x = (rng.normal(size=shape) * 5 + 100).astype(dtype)
    dy = rng.normal(size=x.shape).astype(dtype)
    k = shape[1]
    w, b = (rng.normal(size=k) + 1).astype(dtype), rng.normal(size=k).astype(dtype)
    small = 10**6 if path == "small" else 0
    sizes = testing.settings(small_max_size=small)
    with ng.use_kernels(True), sizes, testing.record_paths() as seen:
        y, ctx = ng.normalize_forward(x, 0, weight=w, bias=b)
        g = ng.normalize_backward(ctx, dy)
        nc = ng.plan_forward(x, 0, weight=w, bias=b).threads[0] if path == "native" else 1
    assert seen == [("forward", path), ("backward", path)]
    if k < 100:  # (what each shape puts under test)
        assert _loops._column_rows(k) < shape[0] // nc  # several blocks in each chunk
    else:
        assert shape[0] % 4 != 0  # rows the four-row steps leave
    xd, dyd, wd, bd = (np.asarray(a, np.float64) for a in (x, dy, w, b))
    mean = np.array([math.fsum(v) / v.size for v in xd.T])
    d = xd - mean  # (exact: x and mean are within a factor 2 of each other)
    var = np.array([math.fsum(v * v) / v.size for v in d.T])
    r = 1 / np.sqrt(var + 1e-5)
    close(ctx.mean.ravel(), mean, 2)
    np.testing.assert_allclose(ctx.var.ravel(), var, rtol=1e-13)
    gd = dyd * wd
    mg = np.array([math.fsum(v) / v.size for v in gd.T])
    mgd = np.array([math.fsum(v) / v.size for v in (gd * d).T])
    y_ref, dx_ref = d * r * wd + bd, r * (gd - mg) - r**3 * d * mgd
    dw_ref = np.array([math.fsum(v) for v in (dyd * d).T]) * r
    db_ref = np.array([math.fsum(v) for v in dyd.T])
    ulps = (1, 1, 1) if dtype == np.float32 else (4, 8, 32)
    close(y, y_ref.astype(dtype), ulps[0], y_scale(ctx) if dtype == np.float64 else 0.0)
    close(g.x, dx_ref.astype(dtype), ulps[1], dx_scale(ctx, dy) if dtype == np.float64 else 0.0)
    close(g.weight, dw_ref.astype(dtype), ulps[2])
    close(g.bias, db_ref.astype(dtype), ulps[2])
    sizes = testing.settings(small_max_size=small)
    with ng.use_kernels(True), sizes, testing.record_paths() as seen:
        y0, ctx0 = ng.normalize_forward(x, 0)  # (no affine parameters: the same row loops)
    assert seen == [("forward", path)]
    close(y0, (d * r).astype(dtype), ulps[0], y_scale(ctx0) if dtype == np.float64 else 0.0)
