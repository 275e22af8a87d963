"""RMS normalization (`center=False`) on the fused kernels: every path (small, native,
blocked, sweep), forward and backward, with and without affine parameters, float32 and
float64, both eps modes, against the generic path, an own float64 loop, F.rms_norm and
float64 finite differences."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pytest
from _fd import fd_jacobian
from _kernel_checks import close, dx_scale

import normgrad as ng
from normgrad import testing
from normgrad._errors import NormgradError

pytest.importorskip("numba")

MODES = ["inside", "outside"]
DTYPES = [np.float32, np.float64]

# (path, shape, axes, parameter shape): the layouts each path takes. Small and native take
# C-contiguous inputs whose blocks a reshape gives; blocked any strides (`make`); sweep the
# batch-norm layouts (several runs per group, one parameter per group).
C_LAYOUTS = [
    pytest.param((16, 96), -1, (96,), id="rows"),
    pytest.param((4, 6, 32), (1, 2), (6, 32), id="trailing-two"),
    pytest.param((40, 50), None, (40, 50), id="whole"),
    pytest.param((4, 5, 6, 7), (0, 2, 3), (5, 1, 1), id="channels"),
    pytest.param((4, 5, 6, 7), (2, 3), (6, 7), id="instance"),
]
SWEEP_LAYOUTS = [
    pytest.param((8, 4, 5, 6), (0, 2, 3), (4, 1, 1), id="batchnorm"),
    pytest.param((6, 5, 8, 7), (1, 3), (6, 1, 8, 1), id="two-kept-blocks"),
]
AFFINE = ["none", "weight", "weight+bias"]


@contextmanager
def on_path(path):
    """`use_kernels(path)`, with the thresholds that let small calls take it."""
    with ng.use_kernels(path), testing.settings(sweep_min_bytes=0):
        yield


def _params(rng, wshape, affine, dtype):
    w = None if affine == "none" else (rng.normal(size=wshape) + 1).astype(dtype)
    b = rng.normal(size=wshape).astype(dtype) if affine == "weight+bias" else None
    return w, b


def _run(x, axes, dy, path, **kw):
    """Forward and backward on `path` (asserting that it is the path taken, as planned),
    and on the generic path."""
    with on_path(path), testing.record_paths() as seen:
        assert ng.plan_forward(x, axes, center=False, **kw).path == path
        y, ctx = ng.normalize_forward(x, axes, center=False, **kw)
        assert ng.plan_backward(ctx, dy).path == path
        g = ng.normalize_backward(ctx, dy)
    assert seen == [("forward", path), ("backward", path)]
    with ng.use_kernels(False):
        yr, cr = ng.normalize_forward(x, axes, center=False, **kw)
        gr = ng.normalize_backward(cr, dy)
    return (y, ctx, g), (yr, cr, gr)


def _agree(x, axes, dy, path, **kw):
    (y, ctx, g), (yr, cr, gr) = _run(x, axes, dy, path, **kw)
    b = kw.get("bias")
    close(y, yr, 4, 0.0 if b is None else float(np.max(np.abs(b))))
    np.testing.assert_array_equal(ctx.mean, np.zeros_like(cr.mean))  # RMS: no mean
    assert ctx.mean.shape == cr.mean.shape and ctx.mean.dtype == np.float64
    for name in ("var", "rstd"):
        np.testing.assert_allclose(getattr(ctx, name), getattr(cr, name), rtol=1e-13)
    assert ctx.center is False and ctx.axes == cr.axes
    close(g.x, gr.x, 16, dx_scale(cr, dy))
    for k, r in ((g.weight, gr.weight), (g.bias, gr.bias)):
        assert (k is None) == (r is None)
        if r is not None:
            assert k.shape == r.shape and k.dtype == r.dtype
            close(k, r, 64)  # sums over many elements, in another order


def _data(rng, shape, dtype):
    x = (rng.normal(size=shape) * 2 + 0.7).astype(dtype)
    return x, rng.normal(size=shape).astype(dtype)


@pytest.mark.parametrize("affine", AFFINE)
@pytest.mark.parametrize("eps_mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("shape", "axes", "wshape"), C_LAYOUTS)
@pytest.mark.parametrize("path", ["small", "native", "blocked"])
def test_group_paths_agree_with_generic(rng, path, shape, axes, wshape, dtype, eps_mode, affine):
    x, dy = _data(rng, shape, dtype)
    w, b = _params(rng, wshape, affine, dtype)
    _agree(x, axes, dy, path, eps=1e-3, eps_mode=eps_mode, weight=w, bias=b)


@pytest.mark.parametrize("affine", AFFINE)
@pytest.mark.parametrize("eps_mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("shape", "axes", "wshape"), SWEEP_LAYOUTS)
def test_sweep_agrees_with_generic(rng, shape, axes, wshape, dtype, eps_mode, affine):
    x, dy = _data(rng, shape, dtype)
    w, b = _params(rng, wshape, affine, dtype)
    _agree(x, axes, dy, "sweep", eps=1e-3, eps_mode=eps_mode, weight=w, bias=b)


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
    _agree(x, axes, dy, "blocked", eps_mode="outside")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("eps_mode", MODES)
@pytest.mark.parametrize(
    ("path", "shape", "axes", "wshape"),
    [
        ("native", (1, 300_000), None, (300_000,)),
        ("blocked", (1, 300_000), None, (300_000,)),
        ("native", (3, 70_001), -1, (70_001,)),
    ],
)
def test_split_groups_agree(rng, path, shape, axes, wshape, dtype, eps_mode):
    """Groups split into chunks (partial sums of squares merged, then the second pass)."""
    x, dy = _data(rng, shape, dtype)
    w, b = _params(rng, wshape, "weight+bias", dtype)
    kw = {"eps_mode": eps_mode, "weight": w, "bias": b}
    with on_path(path):
        assert ng.plan_forward(x, axes, center=False, **kw).threads[0] > 1  # split
    _agree(x, axes, dy, path, **kw)


@pytest.mark.parametrize("path", ["native", "blocked"])
def test_streamed_outputs_agree(rng, path):
    """Streaming (non-temporal) stores of y and dx: the same bits as ordinary ones."""
    x, dy = _data(rng, (64, 4096), np.float32)
    with on_path(path):
        y, ctx = ng.normalize_forward(x, -1, center=False)
        dx = ng.normalize_backward(ctx, dy).x
        with testing.settings(stream_min_bytes=0, sweep_min_bytes=0):
            ys, cs = ng.normalize_forward(x, -1, center=False, out=np.empty_like(x))
            dxs = ng.normalize_backward(cs, dy, out=np.empty_like(x)).x
    np.testing.assert_array_equal(ys, y)
    np.testing.assert_array_equal(dxs, dx)


def _loop_rms(x, axes, eps, eps_mode, w):
    """Own float64 reference, one group at a time."""
    red = ng._axes.normalize_axes(axes, x.ndim)
    kept = [i for i in range(x.ndim) if i not in red]
    xt = np.moveaxis(x.astype(np.float64), kept + list(red), range(x.ndim))
    y = np.empty_like(xt)
    for idx in np.ndindex(*xt.shape[: len(kept)]):
        g = xt[idx]
        ms = np.sum(g * g) / g.size
        y[idx] = g / (np.sqrt(ms + eps) if eps_mode == "inside" else np.sqrt(ms) + eps)
    return np.moveaxis(y, range(x.ndim), kept + list(red)) * w


@pytest.mark.parametrize("eps_mode", MODES)
@pytest.mark.parametrize(
    ("path", "shape", "axes", "wshape"),
    [
        ("small", (16, 96), -1, (96,)),
        ("native", (4, 6, 32), (1, 2), (6, 32)),
        ("native", (1, 300_000), None, (300_000,)),
        ("blocked", (4, 5, 6, 7), (0, 2, 3), (5, 1, 1)),
        ("sweep", (8, 4, 5, 6), (0, 2, 3), (4, 1, 1)),
    ],
)
def test_float32_within_half_an_ulp_of_the_float64_reference(rng, path, shape, axes, wshape,
                                                             eps_mode):  # fmt: skip
    """float32 results are the float64 computation rounded once."""
    x = (rng.normal(size=shape) * 3).astype(np.float32)
    w = (rng.normal(size=wshape) + 1).astype(np.float32)
    with on_path(path):
        y = ng.normalize(x, axes, center=False, eps_mode=eps_mode, weight=w)
    ref = _loop_rms(x, axes, 1e-5, eps_mode, w.astype(np.float64))
    ulp = np.spacing(np.abs(ref).astype(np.float32)).astype(np.float64)
    assert np.max(np.abs(y - ref) / ulp) <= 0.5 + 1e-3


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("path", "shape", "axes"),
    [
        ("small", (8, 64), -1),
        ("native", (8, 64), -1),
        ("blocked", (8, 64), -1),
        ("small", (4, 6, 32), (1, 2)),
        ("native", (2, 300_000), -1),
        ("blocked", (4, 6, 32), (-2, -1)),
    ],
)
def test_equals_torch_rms_norm(rng, path, shape, axes, dtype):
    """Forward, dx and dweight of F.rms_norm over the trailing axes (float64 reference)."""
    torch = pytest.importorskip("torch")
    x, dy = _data(rng, shape, dtype)
    nd = 1 if axes == -1 else 2
    w = (rng.normal(size=shape[-nd:]) + 1).astype(dtype)
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    wt = torch.tensor(w, dtype=torch.float64, requires_grad=True)
    yt = torch.nn.functional.rms_norm(xt, shape[-nd:], wt, eps=1e-6)
    yt.backward(torch.tensor(dy, dtype=torch.float64))
    with on_path(path), testing.record_paths() as seen:
        y, ctx = ng.normalize_forward(x, axes, center=False, eps=1e-6, weight=w)
        g = ng.normalize_backward(ctx, dy)
    assert seen == [("forward", path), ("backward", path)]
    tol = 1e-13 if dtype == np.float64 else 3e-7
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=tol, atol=tol)
    scale = float(np.max(np.abs(xt.grad.numpy())))
    np.testing.assert_allclose(g.x, xt.grad.numpy(), rtol=tol, atol=4 * tol * scale)
    wscale = float(np.max(np.abs(wt.grad.numpy())))
    np.testing.assert_allclose(g.weight, wt.grad.numpy(), rtol=1e-12 if dtype == np.float64
                               else 1e-5, atol=1e-12 * wscale)  # fmt: skip


@pytest.mark.parametrize("eps_mode", MODES)
@pytest.mark.parametrize(
    ("path", "shape", "axes", "wshape"),
    [
        ("small", (3, 12), -1, (12,)),
        ("native", (2, 3, 7), (1, 2), (3, 7)),
        ("blocked", (4, 3, 5), (0, 2), (3, 1)),
        ("sweep", (4, 3, 2, 3), (0, 2, 3), (3, 1, 1)),
    ],
)
def test_backward_against_float64_finite_differences(rng, path, shape, axes, wshape, eps_mode):
    """dx, dweight and dbias of each path against central differences of the forward (itself
    run on that path), in float64."""
    x = rng.normal(size=shape) + 0.3
    dy = rng.normal(size=shape)
    w, b = rng.normal(size=wshape) + 1, rng.normal(size=wshape)
    kw = {"center": False, "eps": 1e-3, "eps_mode": eps_mode}
    with on_path(path), testing.record_paths() as seen:
        _, ctx = ng.normalize_forward(x, axes, weight=w, bias=b, **kw)
        g = ng.normalize_backward(ctx, dy)
        jac = fd_jacobian(lambda v: ng.normalize(v, axes, weight=w, bias=b, **kw), x)
        dw = fd_jacobian(lambda v: np.sum(dy * ng.normalize(x, axes, weight=v, bias=b, **kw)), w)
        db = fd_jacobian(lambda v: np.sum(dy * ng.normalize(x, axes, weight=w, bias=v, **kw)), b)
    assert set(seen) == {("forward", path), ("backward", path)}
    dx_fd = np.tensordot(dy, jac, axes=x.ndim)
    np.testing.assert_allclose(g.x, dx_fd, atol=1e-8)
    np.testing.assert_allclose(g.weight, dw, atol=1e-8)
    np.testing.assert_allclose(g.bias, db, atol=1e-8)


def test_planned_calls_tell_center_apart(rng):
    """The planned calls' cache keys on `center`: an RMS call after a mean-variance call of
    the same signature (and the reverse) gets its own plan, and center=1 is still refused."""
    x, dy = _data(rng, (16, 64), np.float64)
    with ng.use_kernels(False):
        ref_mv = ng.normalize(x, -1)
        ref_rms = ng.normalize(x, -1, center=False)
    for path in ("small", "native"):
        with ng.use_kernels(path):
            for _ in range(2):
                close(ng.normalize(x, -1), ref_mv, 4)
                close(ng.normalize(x, -1, center=False), ref_rms, 4)
                _, ctx = ng.normalize_forward(x, -1, center=False)
                _, ctx_mv = ng.normalize_forward(x, -1)
                g, g_mv = ng.normalize_backward(ctx, dy), ng.normalize_backward(ctx_mv, dy)
                assert not np.allclose(g.x, g_mv.x)
                with ng.use_kernels(False):
                    close(g.x, ng.normalize_backward(ctx, dy).x, 16, dx_scale(ctx, dy))
            with pytest.raises(NormgradError, match="center must be True"):
                ng.normalize(x, -1, center=1)


@pytest.mark.parametrize("path", ["small", "native", "blocked", "sweep"])
def test_zero_group_with_eps_zero_is_refused_on_every_path(path):
    x = np.ones((4, 3, 2, 5))
    x[:, 1] = 0.0  # channel 1 of the batch-norm layout is all zero
    axes = (0, 2, 3) if path == "sweep" else (1, 2, 3)
    x[0] = 0.0  # (and group 0 of the per-sample layout)
    with on_path(path), pytest.raises(NormgradError, match="zero variance and eps=0"):
        ng.normalize(x, axes, center=False, eps=0.0)
    with on_path(path):  # a constant nonzero group is fine without centering
        np.testing.assert_array_equal(ng.normalize(np.full((4, 3, 2, 5), 2.0), axes,
                                                   center=False, eps=0.0), 1.0)  # fmt: skip


def test_auto_mode_takes_the_kernels_by_the_center_true_rules(rng):
    """center=False is planned as center=True is: the same path for the same call."""
    cases = [((8, 64), -1, None), ((256, 768), -1, (768,)), ((8, 4, 64, 64), (0, 2, 3), None),
             ((4, 300, 100), (1,), (300, 1))]  # fmt: skip
    for shape, axes, wshape in cases:
        x = rng.normal(size=shape)
        w = None if wshape is None else rng.normal(size=wshape)
        mv = ng.plan_forward(x, axes, weight=w)
        rms = ng.plan_forward(x, axes, weight=w, center=False)
        assert rms.path == mv.path != "generic", (shape, mv, rms)
        assert rms.op == (*mv.op[:3], False) and mv.op[3] is True
    stats = ng.moments(x, axes)
    assert ng.plan_forward(x, axes).path != "generic"
    with pytest.raises(NormgradError, match="stats with center=False"):
        ng.normalize(x, axes, stats=stats, center=False)


def test_torch_tensors_agree_with_the_kernels(rng):
    """torch tensors (the generic path through the Array API) and
    `normgrad.torch.normalize(center=False)` against the kernels' NumPy results."""
    torch = pytest.importorskip("torch")
    x, dy = _data(rng, (32, 96), np.float64)
    w = rng.normal(size=(96,)) + 1
    with ng.use_kernels("native"):
        y, ctx = ng.normalize_forward(x, -1, center=False, eps_mode="outside", weight=w)
        g = ng.normalize_backward(ctx, dy)
    yt, ct = ng.normalize_forward(torch.tensor(x), -1, center=False, eps_mode="outside",
                                  weight=torch.tensor(w))  # fmt: skip
    gt = ng.normalize_backward(ct, torch.tensor(dy))
    np.testing.assert_allclose(yt.numpy(), y, rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(gt.x.numpy(), g.x, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(gt.weight.numpy(), g.weight, rtol=1e-12, atol=1e-13)
    import normgrad.torch as ngt

    xt = torch.tensor(x, requires_grad=True)
    wt = torch.tensor(w, requires_grad=True)
    out = ngt.normalize(xt, -1, center=False, eps_mode="outside", weight=wt)
    out.backward(torch.tensor(dy))
    np.testing.assert_allclose(out.detach().numpy(), y, rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(xt.grad.numpy(), g.x, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(wt.grad.numpy(), g.weight, rtol=1e-12, atol=1e-12)
