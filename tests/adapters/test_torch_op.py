"""normgrad.torch on the kernels: the custom ops, torch.compile, zero copy, 16-bit floats,
other devices and bad input."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from normgrad import NormgradError, testing, use_kernels  # noqa: E402
from normgrad import _torch_ops as ops  # noqa: E402
from normgrad.torch import MeanVarNorm, normalize  # noqa: E402

# layout name -> (x shape, axes, weight/bias shape)
LAYOUTS = {
    "whole": ((3, 4, 5), None, (3, 4, 5)),
    "rows": ((3, 4, 5), -1, (5,)),
    "channels": ((4, 3, 2, 3), (0, 2, 3), (3, 1, 1)),
    "groups": ((2, 2, 3, 2, 2), (2, 3, 4), (2, 3, 1, 1)),
    "instance": ((2, 3, 2, 3), (2, 3), (3, 1, 1)),
}


def _inputs(layout, dtype=torch.float64, seed=0):
    shape, axes, pshape = LAYOUTS[layout]
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=dtype) * 2 + 0.5).requires_grad_(True)
    w = (torch.rand(pshape, generator=g, dtype=dtype) + 0.5).requires_grad_(True)
    b = torch.randn(pshape, generator=g, dtype=dtype).requires_grad_(True)
    return x, axes, w, b


def _op(x, axes, w, b, eps, eps_mode, ddof):
    ax = list(ops.check_call(x, axes, (eps, eps_mode, ddof), (w, b)).axes)
    return torch.ops.normgrad.forward(x, w, b, ax, eps, eps_mode, ddof)[0]


@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize(("eps_mode", "ddof"), [("inside", 0), ("outside", 1)])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_gradcheck_through_the_custom_op_and_gradgradcheck(layout, eps_mode, ddof, affine):
    x, axes, w, b = _inputs(layout)
    inputs = (x, w, b) if affine else (x,)

    def via_op(x, w=None, b=None):
        return _op(x, axes, w, b, 1e-3, eps_mode, ddof)

    def via_function(x, w=None, b=None):
        return normalize(x, axes, eps=1e-3, eps_mode=eps_mode, ddof=ddof, weight=w, bias=b)

    with testing.record_paths() as seen, use_kernels(True):  # (small ones too)
        via_op(*inputs)
    assert ("forward", "generic") not in seen  # the kernels, not torch ops
    assert torch.autograd.gradcheck(via_op, inputs)
    assert torch.autograd.gradcheck(via_function, inputs)
    assert torch.autograd.gradgradcheck(via_function, inputs)
    torch.testing.assert_close(via_op(*inputs), via_function(*inputs), rtol=0, atol=0)


def test_torch_compile_fullgraph_has_no_graph_break_and_calls_the_op():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    x, _, w, b = _inputs("rows")
    m = MeanVarNorm(5, dtype=torch.float64)
    with torch.no_grad():
        m.weight.copy_(w)
        m.bias.copy_(b)
    cm = torch.compile(m, backend=backend, fullgraph=True)
    y = cm(x)
    assert sum(counters["graph_break"].values()) == 0
    assert any("normgrad.forward" in g for g in graphs)
    ref = F.layer_norm(x, (5,), m.weight, m.bias)
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-12)
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, m.weight, m.bias), dy)
    want = torch.autograd.grad(ref, (x, m.weight, m.bias), dy)
    for a, r in zip(got, want, strict=True):
        torch.testing.assert_close(a, r, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "make",
    [lambda t: t, lambda t: t.t(), lambda t: t[::2, 1:], lambda t: t.t()[:, :40]],
    ids=["contiguous", "transposed", "sliced", "transposed-sliced"],
)
def test_the_kernels_read_the_tensors_memory(make):
    base = torch.randn(96, 80, dtype=torch.float32)
    x = make(base).requires_grad_(True)
    w = torch.rand(x.shape[-1], requires_grad=True)
    with testing.record_paths() as seen, ops.record_host_arrays() as arrays, use_kernels(True):
        y = normalize(x, -1, weight=w)
        dy = torch.randn_like(y)
        gx, gw = torch.autograd.grad(y, (x, w), dy)
    assert all(path != "generic" for _, path in seen), seen
    addresses = dict(arrays[:2])  # the forward's x and weight
    assert addresses == {"x": x.data_ptr(), "weight": w.data_ptr()}
    assert ("dy", dy.data_ptr()) in arrays
    xd, wd = x.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    ref = F.layer_norm(xd, (x.shape[-1],), wd)
    torch.testing.assert_close(y, ref.float(), rtol=0, atol=2e-6)
    rx, rw = torch.autograd.grad(ref, (xd, wd), dy.double())
    torch.testing.assert_close(gx, rx.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw, rw.float(), rtol=1e-5, atol=1e-5)


def _ulps(got, ref, precision):
    """|got - ref| in units of the spacing of `precision`-bit floats in ref's binade."""
    ref = ref.double()
    tiny = 2.0 ** (-14 if precision == 11 else -126)
    exponent = torch.floor(torch.log2(ref.abs().clamp_min(tiny)))
    return ((got.double() - ref).abs() / 2.0 ** (exponent - precision + 1)).max().item()


@pytest.mark.parametrize(("dtype", "precision"), [(torch.float16, 11), (torch.bfloat16, 8)])
def test_half_precision_is_rounded_once_from_float64(dtype, precision):
    x, axes, w, b = _inputs("rows", dtype=dtype)
    y = normalize(x, axes, weight=w, bias=b)
    assert y.dtype == dtype
    xd, wd, bd = (t.detach().double().requires_grad_(True) for t in (x, w, b))
    ref = F.layer_norm(xd, (5,), wd, bd)
    assert _ulps(y, ref, precision) <= 0.5 + 1e-9
    dy = torch.randn(y.shape, dtype=torch.float64).to(dtype)
    got = torch.autograd.grad(y, (x, w, b), dy)
    want = torch.autograd.grad(ref, (xd, wd, bd), dy.double())
    for a, r in zip(got, want, strict=True):
        assert a.dtype == dtype
        assert _ulps(a, r, precision) <= 0.5 + 1e-9


def test_module_runs_on_the_kernels():
    m = MeanVarNorm((3, 1, 1), axes=(0, 2, 3))
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    with testing.record_paths() as seen, use_kernels(True):
        m(x).sum().backward()
    assert [d for d, p in seen if p != "generic"] == ["forward", "backward"]


def test_other_devices_take_torch_ops_without_looking_at_values():
    # meta tensors hold no values: any .item() or branch on a value raises
    x = torch.randn(4, 3, 5, device="meta", dtype=torch.bfloat16, requires_grad=True)
    w = torch.ones(3, 1, device="meta", dtype=torch.bfloat16, requires_grad=True)
    y = normalize(x, (0, 2), weight=w, bias=w)
    assert y.shape == x.shape and y.dtype == torch.bfloat16 and y.device.type == "meta"
    gx, gw = torch.autograd.grad(y, (x, w), torch.ones_like(y))
    assert gx.shape == x.shape and gw.shape == w.shape
    out = ops.forward(x.detach(), None, None, ops.Call((0, 2), 1e-5, "inside", 0.0))
    assert out[3].dtype == torch.float32  # float32 statistics for 16-bit floats


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_generic_path_without_synchronisation():
    x, axes, w, b = _inputs("channels", dtype=torch.float32)
    xc, wc, bc = (t.detach().cuda().requires_grad_(True) for t in (x, w, b))
    torch.cuda.set_sync_debug_mode("error")
    try:
        yc = normalize(xc, axes, weight=wc, bias=bc)
        grads = torch.autograd.grad(yc, (xc, wc, bc), torch.ones_like(yc))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    y = normalize(x, axes, weight=w, bias=b)
    torch.testing.assert_close(yc.cpu(), y, rtol=1e-5, atol=1e-5)
    want = torch.autograd.grad(y, (x, w, b), torch.ones_like(y))
    for a, r in zip(grads, want, strict=True):
        torch.testing.assert_close(a.cpu(), r, rtol=1e-4, atol=1e-4)
    yh = normalize(xc.detach().half(), axes)
    torch.testing.assert_close(yh.float().cpu(), normalize(x.detach(), axes), atol=2e-3, rtol=0)


def test_bad_input_raises_normgrad_errors():
    x = torch.randn(3, 4, dtype=torch.float64)
    with pytest.raises(NormgradError, match="complex"):
        normalize(torch.randn(3, 4, dtype=torch.complex128, requires_grad=True), -1)
    with pytest.raises(NormgradError, match="device meta"):
        normalize(x, -1, weight=torch.ones(4, device="meta"))
    with pytest.raises(NormgradError, match=r"torch\.Tensor"):
        normalize(x, -1, weight=np.ones(4))
    # integers cannot need a gradient in torch; they are normalized in float64, and the
    # float parameters still get theirs
    xi = torch.arange(12).reshape(3, 4)
    w = torch.ones(4, dtype=torch.float64, requires_grad=True)
    yi = normalize(xi, -1, weight=w)
    assert yi.dtype == torch.float64
    torch.testing.assert_close(yi, normalize(xi.double(), -1, weight=w))
    (gw,) = torch.autograd.grad(yi.sum(), w)
    assert gw.shape == (4,)
    y, mean, var, rstd = torch.ops.normgrad.forward(x, None, None, [1], 1e-5, "inside", 0.0)
    with pytest.raises(NormgradError, match=r"dy has dtype torch\.float32"):
        torch.ops.normgrad.backward(x, None, None, mean, var, rstd, y.float(), [1], 1e-5,
                                    "inside", 0.0)  # fmt: skip


@pytest.mark.parametrize("shape", [(32, 128), (64, 768), (3, 5, 40)])
def test_eager_float32_with_weight_and_bias_reaches_the_kernels(shape):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g).requires_grad_(True)
    w = (torch.rand(shape[-1], generator=g) + 0.5).requires_grad_(True)
    b = torch.randn(shape[-1], generator=g).requires_grad_(True)
    dy = torch.randn(shape, generator=g)
    with testing.record_paths() as seen:  # (the default mode: "auto")
        y = normalize(x, -1, weight=w, bias=b)
        got = torch.autograd.grad(y, (x, w, b), dy)
    assert seen == [("forward", "small"), ("backward", "small")]
    assert y.grad_fn is not None and type(y.grad_fn).__name__ == "EagerBackward"
    ref_in = [t.detach().double().requires_grad_(True) for t in (x, w, b)]
    ref = F.layer_norm(ref_in[0], (shape[-1],), ref_in[1], ref_in[2])
    torch.testing.assert_close(y, ref.float(), rtol=0, atol=2e-6)
    want = torch.autograd.grad(ref, ref_in, dy.double())
    for a, r in zip(got, want, strict=True):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, r.float(), rtol=1e-5, atol=1e-5)


def test_checked_calls_are_cached_and_bad_input_still_raises():
    x = torch.randn(4, 6, requires_grad=True)
    w = torch.ones(6, requires_grad=True)
    first = normalize(x, -1, weight=w)
    torch.testing.assert_close(normalize(x, -1, weight=w), first, rtol=0, atol=0)
    torch.testing.assert_close(normalize(x, [1], weight=w), first, rtol=0, atol=0)  # (a list)
    with pytest.raises(NormgradError, match="device meta"):
        normalize(x, -1, weight=torch.ones(6, device="meta"))
    with pytest.raises(NormgradError):
        normalize(x, -1, weight=torch.ones(5))
    with pytest.raises(NormgradError):
        normalize(x, (True,), weight=w)  # (True == 1: the cache must not mix them)
    with pytest.raises(NormgradError):
        normalize(x, -1, eps=-1.0, weight=w)


def test_in_place_change_of_x_between_forward_and_backward_raises():
    x = torch.randn(4, 6, requires_grad=True).clone()
    y = normalize(x, -1)
    with torch.no_grad():
        x.add_(1.0)
    with pytest.raises(RuntimeError, match="inplace"):
        y.sum().backward()


def test_without_a_graph_the_result_has_no_grad_fn():
    x = torch.randn(4, 6, requires_grad=True)
    with torch.no_grad():
        y = normalize(x, -1)
    assert y.grad_fn is None and not y.requires_grad
    torch.testing.assert_close(y, F.layer_norm(x.detach(), (6,)), rtol=0, atol=2e-6)
    assert normalize(x.detach(), -1).grad_fn is None


def test_forward_mode_dual_tensors_take_the_function_with_a_jvp():
    from torch.autograd import forward_ad

    x, axes, w, b = _inputs("rows")
    tx = torch.randn_like(x)
    with forward_ad.dual_level():
        y = normalize(forward_ad.make_dual(x.detach(), tx), axes, weight=w, bias=b)
        ty = forward_ad.unpack_dual(y).tangent
        ref = F.layer_norm(forward_ad.make_dual(x.detach(), tx), (5,), w, b)
        tref = forward_ad.unpack_dual(ref).tangent
    torch.testing.assert_close(ty, tref, rtol=1e-10, atol=1e-10)


def _generic_reference(x, axes, **kw):
    """The same call on the generic path in torch ops (float64 statistics), with grads."""
    with use_kernels(False):
        return normalize(x, axes, **kw)


def test_planned_eager_calls_do_not_reuse_a_stale_plan():
    """One signature's plan is reused only where it fits: another memory order, dtype,
    option or kernel mode is planned (or taken by the general entry point) afresh, and
    every result equals the generic path's."""
    g = torch.Generator().manual_seed(3)
    base = torch.randn(16, 16, generator=g)
    w = torch.rand(16, generator=g) + 0.5
    b = torch.randn(16, generator=g)
    cases = [
        (base, -1, {}),
        (base.t(), -1, {}),  # the same shape and dtype, another memory order
        (base, None, {}),
        (base.t(), None, {}),  # (no view of the transpose has the whole tensor's blocks)
        (base.double(), -1, {}),
        (base, -1, {"eps": 1e-2}),
        (base, -1, {"eps_mode": "outside", "ddof": 1}),
        (base, -1, {"center": False}),
        (base[:, :8].contiguous(), -1, {}),
    ]
    for x0, axes, kw in cases:
        x = x0.clone().requires_grad_(True)  # (clone keeps the memory order)
        pshape = x.shape[-1:] if axes == -1 else x.shape
        wp = (w[: pshape[-1]] * torch.ones(pshape)).to(x.dtype).requires_grad_(True)
        bp = (b[: pshape[-1]] * torch.ones(pshape)).to(x.dtype).requires_grad_(True)
        with testing.record_paths() as seen, use_kernels(True):  # (small sizes too)
            y = normalize(x, axes, weight=wp, bias=bp, **kw)
            dy = torch.randn(y.shape, generator=g, dtype=y.dtype)
            got = torch.autograd.grad(y, (x, wp, bp), dy)
        assert ("forward", "generic") not in seen, (kw, seen)
        xr, wr, br = (t.detach().requires_grad_(True) for t in (x, wp, bp))
        ref = _generic_reference(xr, axes, weight=wr, bias=br, **kw)
        want = torch.autograd.grad(ref, (xr, wr, br), dy)
        tol = 1e-12 if x.dtype == torch.float64 else 2e-6
        torch.testing.assert_close(y, ref, rtol=tol, atol=tol)
        for a, r in zip(got, want, strict=True):
            assert a.dtype == r.dtype
            torch.testing.assert_close(a, r, rtol=10 * tol, atol=10 * tol)


def test_planned_eager_calls_follow_the_kernel_mode_and_odd_cotangents():
    x = torch.randn(8, 32, requires_grad=True)
    w = torch.rand(32, requires_grad=True)
    normalize(x, -1, weight=w).sum().backward()  # (planned; dy expanded: zero strides)
    want = torch.autograd.grad(_generic_reference(x, -1, weight=w).sum(), (x, w))
    x.grad = w.grad = None
    normalize(x, -1, weight=w).sum().backward()
    torch.testing.assert_close(x.grad, want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad, want[1], rtol=1e-5, atol=1e-5)
    with testing.record_paths() as seen:
        y = normalize(x, -1, weight=w)
        with use_kernels(False):  # (the backward in another mode: its own path choice)
            torch.autograd.grad(y, (x, w), torch.randn(8, 32))
        with use_kernels(False):
            normalize(x, -1, weight=w)
    assert seen == [("forward", "small"), ("backward", "generic"), ("forward", "generic")]


def test_planned_eager_calls_still_refuse_a_zero_variance_group_without_eps():
    x = torch.ones(4, 8, requires_grad=True)
    for _ in range(2):  # (the second call takes the cached plan)
        with pytest.raises(NormgradError, match="zero variance"):
            normalize(x, -1, eps=0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_channels_last_and_batchnorm1d_go_along_rows(dtype):
    """BatchNorm over a channels-last tensor and BatchNorm1d over (N, F) have their groups
    innermost in memory: the column kernels take them (above the small size: a sweep of
    the channels-last tensor, a native job of the C-contiguous (N, F) one), y keeps x's
    memory format, and values and gradients equal F.batch_norm's."""
    g = torch.Generator().manual_seed(3)
    cases = [
        (torch.randn(4, 16, 32, 32, generator=g, dtype=dtype), (0, 2, 3), (1, 16, 1, 1)),
        (torch.randn(4000, 24, generator=g, dtype=dtype), 0, (24,)),
    ]
    for (x0, axes, pshape), path in zip(cases, ("sweep", "native"), strict=True):
        x0 = x0.to(memory_format=torch.channels_last) if x0.ndim == 4 else x0
        x = (x0 * 2 + 3).detach().requires_grad_(True)
        w = (torch.rand(x.shape[1], generator=g, dtype=dtype) + 0.5).requires_grad_(True)
        b = torch.randn(x.shape[1], generator=g, dtype=dtype).requires_grad_(True)
        dy = torch.randn(x.shape, generator=g, dtype=dtype)
        with testing.record_paths() as seen:
            y = normalize(x, axes, weight=w.view(pshape), bias=b.view(pshape))
            got = torch.autograd.grad(y, (x, w, b), dy)
        assert seen == [("forward", path), ("backward", path)]
        assert y.stride() == x.stride()
        ref_in = [t.detach().double().requires_grad_(True) for t in (x, w, b)]
        ref = F.batch_norm(ref_in[0], None, None, ref_in[1], ref_in[2], training=True)
        want = torch.autograd.grad(ref, ref_in, dy.double())
        tol = 1e-5 if dtype == torch.float32 else 1e-12
        torch.testing.assert_close(y.double(), ref, rtol=0, atol=tol)
        for a, r in zip(got, want, strict=True):
            assert a.dtype == dtype
            torch.testing.assert_close(a.double(), r, rtol=tol, atol=tol * 10)
