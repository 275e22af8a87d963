"""normgrad.torch with `center=False` (RMS normalization): the eager Functions, the custom
ops under torch.compile, torch.func and other devices, against `F.rms_norm` /
`nn.RMSNorm` and the plain formula in torch ops."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional
func = torch.func

import normgrad as ng  # noqa: E402
from normgrad import NormgradError, testing, use_kernels  # noqa: E402
from normgrad import _torch_ops as ops  # noqa: E402
from normgrad.torch import MeanVarNorm, normalize  # noqa: E402

TOL = dict(rtol=1e-10, atol=1e-10)
# layout name -> (x shape, axes, weight/bias shape)
LAYOUTS = {
    "whole": ((3, 4, 5), None, (3, 4, 5)),
    "rows": ((3, 4, 5), -1, (5,)),
    "trailing": ((3, 4, 5), (1, 2), (4, 5)),
    "channels": ((4, 3, 2, 3), (0, 2, 3), (3, 1, 1)),
    "instance": ((2, 3, 2, 3), (2, 3), (3, 1, 1)),
}


def _inputs(layout, dtype=torch.float64, seed=0):
    shape, axes, pshape = LAYOUTS[layout]
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=dtype) * 2 + 0.5).requires_grad_(True)
    w = (torch.rand(pshape, generator=g, dtype=dtype) + 0.5).requires_grad_(True)
    b = torch.randn(pshape, generator=g, dtype=dtype).requires_grad_(True)
    return x, axes, w, b


def _rms(x, axes, eps=1e-5, eps_mode="inside", w=None, b=None):
    """RMS normalization written out in torch ops, differentiated by autograd."""
    dims = tuple(range(x.ndim)) if axes is None else axes
    ms = (x * x).mean(dim=dims, keepdim=True)
    y = x * torch.rsqrt(ms + eps) if eps_mode == "inside" else x / (ms.sqrt() + eps)
    return y if w is None else y * w + (0 if b is None else b)


def _close(a, r, **tol):
    for p, q in zip(torch.utils._pytree.tree_leaves(a), torch.utils._pytree.tree_leaves(r),
                    strict=True):  # fmt: skip
        torch.testing.assert_close(p, q, **(tol or TOL))


def _grads(y, inputs, dy):
    return torch.autograd.grad(y, inputs, dy)


@pytest.mark.parametrize("layout", ["rows", "trailing", "whole"])
def test_values_and_gradients_equal_rms_norm(layout):
    """Over trailing axes, where `F.rms_norm` applies: y, dx and dweight to 1e-10."""
    x, axes, w, _ = _inputs(layout, seed=1)
    shape = x.shape[1:] if layout == "trailing" else x.shape[-1:] if axes == -1 else x.shape
    y = normalize(x, axes, center=False, eps=1e-6, weight=w)
    ref = F.rms_norm(x, shape, w, eps=1e-6)
    _close(y, ref, rtol=0, atol=1e-12)
    dy = torch.randn_like(y)
    _close(_grads(y, (x, w), dy), _grads(ref, (x, w), dy))
    # with a bias: rms_norm's result plus the bias, whose gradient is the sum of dy
    b = torch.randn(w.shape, dtype=w.dtype, requires_grad=True)
    y = normalize(x, axes, center=False, eps=1e-6, weight=w, bias=b)
    ref = F.rms_norm(x, shape, w, eps=1e-6) + b
    _close(_grads(y, (x, w, b), dy), _grads(ref, (x, w, b), dy))


@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("eps_mode", ["inside", "outside"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_gradcheck_and_gradgradcheck(layout, eps_mode, affine):
    x, axes, w, b = _inputs(layout)
    inputs = (x, w, b) if affine else (x,)

    def f(x, w=None, b=None):
        return normalize(x, axes, eps=1e-3, eps_mode=eps_mode, center=False, weight=w, bias=b)

    with testing.record_paths() as seen, use_kernels(True):  # (small calls too)
        f(*inputs)
    assert ("forward", "generic") not in seen  # the kernels' RMS loops, not torch ops
    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)
    _close(f(*inputs), _rms(x, axes, 1e-3, eps_mode, *inputs[1:]), rtol=0, atol=1e-12)
    # double backward equals autograd's of the formula
    dy = torch.randn_like(x)

    def double_backward(y):
        (gx,) = torch.autograd.grad(y, x, dy, create_graph=True)
        return torch.autograd.grad((gx**2).sum(), inputs, materialize_grads=True)

    hv_ref = double_backward(_rms(x, axes, 1e-3, eps_mode, *inputs[1:]))
    _close(double_backward(f(*inputs)), hv_ref, rtol=1e-9, atol=1e-9)


def test_custom_ops_take_center():
    x, axes, w, b = _inputs("channels")
    ax = list(ops.check_call(x, axes, (1e-3, "outside", 0), (w, b), center=False).axes)

    def via_op(x, w, b):
        return torch.ops.normgrad.forward(x, w, b, ax, 1e-3, "outside", 0.0, False)[0]

    _close(via_op(x, w, b), _rms(x, axes, 1e-3, "outside", w, b), rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(via_op, (x, w, b))
    # center=True and False of one signature are two calls (the checked-call cache too)
    y_true = torch.ops.normgrad.forward(x, w, b, ax, 1e-3, "outside", 0.0, True)[0]
    assert not torch.allclose(y_true, via_op(x, w, b))


def test_eager_calls_tell_center_apart():
    """The eager paths (grad or no grad) reuse checked calls per signature: center is part
    of it."""
    x, axes, w, _ = _inputs("rows")
    for _ in range(2):
        with torch.no_grad():
            _close(normalize(x, axes, weight=w), F.layer_norm(x, (5,), w))
            _close(normalize(x, axes, weight=w, center=False), F.rms_norm(x, (5,), w, 1e-5))
        _close(normalize(x, axes, weight=w), F.layer_norm(x, (5,), w))
        _close(normalize(x, axes, weight=w, center=False), F.rms_norm(x, (5,), w, 1e-5))


@pytest.mark.filterwarnings("ignore:Dynamo detected")
def test_torch_compile_fullgraph_without_graph_breaks():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    x, _, w, _ = _inputs("rows", seed=2)
    m = MeanVarNorm(5, center=False, bias=False, eps=1e-6, dtype=torch.float64)
    with torch.no_grad():
        m.weight.copy_(w)
    y = torch.compile(m, backend=backend, fullgraph=True)(x)
    assert sum(counters["graph_break"].values()) == 0
    assert any("normgrad.forward" in g for g in graphs)
    ref = F.rms_norm(x, (5,), m.weight, eps=1e-6)
    _close(y, ref, rtol=0, atol=1e-12)
    dy = torch.randn_like(y)
    _close(_grads(y, (x, m.weight), dy), _grads(ref, (x, m.weight), dy))


@pytest.mark.filterwarnings("ignore:Dynamo detected")
def test_torch_compile_aot_autograd_traces_both_ops():
    """aot_eager: AOTAutograd traces the forward and backward ops (their fakes) with center."""
    torch._dynamo.reset()
    x, axes, w, b = _inputs("channels", seed=4)
    f = lambda x, w, b: normalize(x, axes, center=False, eps_mode="outside", weight=w, bias=b)  # noqa: E731
    cf = torch.compile(f, backend="aot_eager", fullgraph=True)
    y, ref = cf(x, w, b), _rms(x, axes, 1e-5, "outside", w, b)
    _close(y, ref, rtol=0, atol=1e-12)
    dy = torch.randn_like(y)
    _close(_grads(y, (x, w, b), dy), _grads(ref, (x, w, b), dy))


G = torch.Generator().manual_seed(3)
X = torch.randn(4, 3, 5, generator=G, dtype=torch.float64) * 2 + 1
W = torch.rand(5, generator=G, dtype=torch.float64) + 0.5


def ours(x, w=W):
    return normalize(x, -1, center=False, eps=1e-6, weight=w)


def rms_norm(x, w=W):
    return F.rms_norm(x, (5,), w, eps=1e-6)


def _loss(f):
    return lambda x, *p: (f(x, *p) ** 3 * torch.linspace(-1, 1, 5, dtype=x.dtype)).sum()


TRANSFORMS = {
    "vmap": lambda f: func.vmap(f)(X),
    "grad": lambda f: func.grad(_loss(f), argnums=(0, 1))(X, W),
    "jvp": lambda f: func.jvp(f, (X, W), (X.cos(), W.sin())),
    "jacrev": lambda f: func.jacrev(f, argnums=(0, 1))(X[0], W),
    "jacfwd": lambda f: func.jacfwd(f, argnums=(0, 1))(X[0], W),
    "vmap(grad)": lambda f: func.vmap(func.grad(_loss(f)))(X),
    "hessian": lambda f: func.hessian(_loss(f))(X[0, :2]),
    "vmap(jvp)": lambda f: func.vmap(lambda x, t: func.jvp(f, (x,), (t,)))(X, X.sin()),
    "ensemble": lambda f: func.vmap(f, in_dims=(None, 0))(X[0], W * X[:, 0]),
}


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_torch_func_transforms_equal_those_of_rms_norm(name):
    _close(TRANSFORMS[name](ours), TRANSFORMS[name](rms_norm))


def test_vmap_runs_the_rms_kernels_once():
    with testing.record_paths() as seen, use_kernels(True):
        func.vmap(ours)(X)
    assert [p for _, p in seen if p != "generic"] and ("forward", "generic") not in seen


def test_module_equals_nn_rmsnorm_and_loads_its_state():
    ref = torch.nn.RMSNorm((3, 5), eps=1e-6, dtype=torch.float64)
    with torch.no_grad():
        ref.weight.copy_(torch.rand(3, 5, dtype=torch.float64) + 0.5)
    m = MeanVarNorm((3, 5), axes=(1, 2), center=False, bias=False, eps=1e-6,
                    dtype=torch.float64)  # fmt: skip
    assert [n for n, _ in m.named_parameters()] == ["weight"]
    m.load_state_dict(ref.state_dict())
    x = X.clone().requires_grad_(True)
    y, y_ref = m(x), ref(x)
    _close(y, y_ref, rtol=0, atol=1e-12)
    dy = torch.randn_like(y)
    _close(_grads(y, (x, m.weight), dy), _grads(y_ref, (x, ref.weight), dy))
    assert "center=False" in repr(m)
    # with the default bias=True: a zero-initialized bias, so the same values
    mb = MeanVarNorm(5, center=False, eps=1e-6, dtype=torch.float64)
    assert mb.bias is not None
    _close(mb(X), F.rms_norm(X, (5,), None, 1e-6), rtol=0, atol=1e-12)


def test_with_a_mask_equals_the_numpy_op(rng):
    x = rng.normal(size=(4, 6)) + 1
    mask = rng.random((4, 6)) < 0.7
    mask[:, 0] = True
    dy = rng.normal(size=(4, 6))
    y_np, ctx = ng.normalize_forward(x, -1, center=False, mask=mask)
    g_np = ng.normalize_backward(ctx, dy)
    xt = torch.tensor(x, requires_grad=True)
    y = normalize(xt, -1, center=False, mask=torch.tensor(mask))
    _close(y, torch.tensor(y_np), rtol=0, atol=1e-13)
    _close(_grads(y, xt, torch.tensor(dy)), torch.tensor(g_np.x), rtol=0, atol=1e-12)
    f = lambda t: normalize(t, -1, center=False, mask=torch.tensor(mask), eps=1e-3)  # noqa: E731
    assert torch.autograd.gradgradcheck(f, (xt,))
    _close(func.jacfwd(f)(xt.detach()), func.jacrev(f)(xt.detach()))
    # vmap with a batched mask: one example at a time is the same call
    xb, mb = torch.tensor(x).reshape(2, 2, 6), torch.tensor(mask).reshape(2, 2, 6)
    yb = func.vmap(lambda a, m: normalize(a, -1, center=False, mask=m))(xb, mb)
    _close(yb.reshape(4, 6), torch.tensor(y_np), rtol=0, atol=1e-13)


def test_float32_keeps_dtype():
    x, axes, w, _ = _inputs("rows", dtype=torch.float32)
    y = normalize(x, axes, center=False, weight=w)
    assert y.dtype == torch.float32
    xd, wd = x.detach().double(), w.detach().double()
    _close(y, F.rms_norm(xd, (5,), wd, 1e-5).float(), rtol=0, atol=2e-6)


@pytest.mark.parametrize(("dtype", "precision"), [(torch.float16, 11), (torch.bfloat16, 8)])
def test_half_precision_is_rounded_once_from_float64(dtype, precision):
    x, axes, w, _ = _inputs("rows", dtype=dtype)
    y = normalize(x, axes, center=False, weight=w)
    assert y.dtype == dtype
    xd, wd = (t.detach().double().requires_grad_(True) for t in (x, w))
    ref = F.rms_norm(xd, (5,), wd, 1e-5)
    assert _ulps(y, ref, precision) <= 0.5 + 1e-9
    dy = torch.randn(y.shape, dtype=torch.float64).to(dtype)
    for a, r in zip(_grads(y, (x, w), dy), _grads(ref, (xd, wd), dy.double()), strict=True):
        assert a.dtype == dtype and _ulps(a, r, precision) <= 0.5 + 1e-9


def _ulps(got, ref, precision):
    """|got - ref| in units of the spacing of `precision`-bit floats in ref's binade."""
    ref = ref.double()
    tiny = 2.0 ** (-14 if precision == 11 else -126)
    exponent = torch.floor(torch.log2(ref.abs().clamp_min(tiny)))
    return ((got.double() - ref).abs() / 2.0 ** (exponent - precision + 1)).max().item()


def test_other_devices_take_torch_ops_without_looking_at_values():
    x = torch.randn(4, 3, 5, device="meta", dtype=torch.bfloat16, requires_grad=True)
    w = torch.ones(3, 1, device="meta", dtype=torch.bfloat16, requires_grad=True)
    y = normalize(x, (0, 2), weight=w, bias=w, center=False)
    assert y.shape == x.shape and y.dtype == torch.bfloat16 and y.device.type == "meta"
    gx, gw = torch.autograd.grad(y, (x, w), torch.ones_like(y))
    assert gx.shape == x.shape and gw.shape == w.shape


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_equals_rms_norm_without_synchronisation():
    x, axes, w, b = _inputs("trailing")
    xc, wc, bc = (t.detach().cuda().requires_grad_(True) for t in (x, w, b))
    torch.cuda.set_sync_debug_mode("error")
    try:
        yc = normalize(xc, axes, center=False, weight=wc, bias=bc)
        dy = torch.ones_like(yc)
        grads = torch.autograd.grad(yc, (xc, wc, bc), dy)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    ref = F.rms_norm(xc, (4, 5), wc, 1e-5) + bc
    _close(yc, ref)
    _close(grads, torch.autograd.grad(ref, (xc, wc, bc), dy))
    assert torch.autograd.gradgradcheck(
        lambda t: normalize(t, (2,), center=False, eps=1e-3), (xc.detach().requires_grad_(True),)
    )


def test_bad_input_raises_normgrad_errors():
    x = X.clone().requires_grad_(True)
    with pytest.raises(NormgradError, match="ddof=1 with center=False"):
        normalize(x, -1, center=False, ddof=1)
    with pytest.raises(NormgradError, match="center must be True"):
        normalize(x, -1, center=0)  # type: ignore[arg-type]
    with pytest.raises(NormgradError, match="ddof=1 with center=False"):
        MeanVarNorm(5, center=False, ddof=1)
    with pytest.raises(NormgradError, match="center must be True"):
        MeanVarNorm(5, center="no")  # type: ignore[arg-type]
    with pytest.raises(NormgradError, match="track_running_stats with center=False"):
        MeanVarNorm(5, center=False, track_running_stats=True)
    with pytest.raises(NormgradError, match="ddof=1 with center=False"):
        normalize(x, -1, center=False, ddof=1, mask=torch.ones(5, dtype=torch.bool))
    np.testing.assert_array_equal(x.detach().numpy(), X.numpy())  # (inputs never mutated)


# --- stats=: given statistics (inference) ---


def _fixed(x, mean, var, eps=1e-5, w=None, b=None):
    """Normalization by constant statistics, written out in torch ops."""
    y = (x - mean) * torch.rsqrt(var + eps)
    return y if w is None else y * w + b


@pytest.mark.parametrize("ddof", [0, 1])
@pytest.mark.parametrize("library", ["numpy", "torch"])
def test_stats_normalize_with_given_statistics_as_constants(library, ddof):
    rs = np.random.default_rng(11)
    train = rs.normal(size=(50, 5)) * 3 + 2
    m = ng.moments(train if library == "numpy" else torch.tensor(train), 0)
    mean, var = torch.as_tensor(m.mean), torch.as_tensor(m.var(ddof))
    x = X[0].clone().requires_grad_(True)
    w, b = W.clone().requires_grad_(True), X[1, 0].clone().requires_grad_(True)

    def f(x, w, b):
        return normalize(x, 0, ddof=ddof, weight=w, bias=b, stats=m)

    ref = _fixed(x, mean, var, 1e-5, w, b)
    _close(f(x, w, b), ref, rtol=0, atol=1e-13)
    y_np = ng.normalize(x.detach().numpy(), 0, ddof=ddof, weight=W.numpy(), bias=b.detach().numpy(),
                        stats=ng.moments(train, 0))  # fmt: skip
    _close(f(x, w, b), torch.tensor(y_np), rtol=0, atol=1e-13)
    dy = torch.randn_like(ref)
    _close(_grads(f(x, w, b), (x, w, b), dy), _grads(ref, (x, w, b), dy))
    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))
    xd = x.detach()
    _close(func.jacrev(f, argnums=(0, 1))(xd, W, b.detach()),
           func.jacrev(lambda x, w: _fixed(x, mean, var, 1e-5, w, b.detach()), argnums=(0, 1))(
               xd, W))  # fmt: skip


def test_stats_get_no_gradient_and_float32_keeps_dtype():
    m = ng.moments(torch.randn(30, 5, dtype=torch.float64).requires_grad_(True) + 1, 0)
    x = X[0].float().requires_grad_(True)
    y = normalize(x, 0, stats=m)
    assert y.dtype == torch.float32
    _close(y, _fixed(X[0], m.mean.detach(), m.var().detach()).float(), rtol=0, atol=2e-6)
    y.sum().backward()
    assert x.grad is not None and m.mean.grad_fn is not None  # (m came from a graph)
    g = torch.autograd.grad(normalize(x, 0, stats=m).sum(), m.mean, allow_unused=True)[0]
    assert g is None  # the statistics are constants


def test_stats_bad_input_raises_normgrad_errors():
    m = ng.moments(X[0], -1)
    with pytest.raises(NormgradError, match="stats with center=False"):
        normalize(X[0], -1, center=False, stats=m)
    with pytest.raises(NormgradError, match="one value per group"):
        normalize(X[0], 0, stats=m)
    with pytest.raises(NormgradError, match="must be a Moments"):
        normalize(X[0], -1, stats=(1, 2))  # type: ignore[arg-type]
    with pytest.raises(NormgradError, match="stats with mask"):
        normalize(X[0], -1, stats=m, mask=torch.ones(3, 5, dtype=torch.bool))
