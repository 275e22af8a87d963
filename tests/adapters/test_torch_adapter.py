"""normgrad.torch: autograd.Function and nn.Module against torch's own autograd and norms."""

import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from _fd import fd_jacobian  # noqa: E402

import normgrad  # noqa: E402
from normgrad import NormgradError  # noqa: E402
from normgrad.torch import MeanVarNorm, normalize  # noqa: E402

SHAPE = (2, 3, 3, 4)
# axes -> shape of weight/bias that broadcasts against SHAPE
AXES_PARAM = {None: SHAPE, -1: (4,), (0, 2, 3): (3, 1, 1), (2, 3): (3, 1, 1)}


def _reference(x, axes, eps, eps_mode, ddof, w, b):
    """Plain torch ops, differentiated by torch autograd: the independent reference."""
    dims = tuple(range(x.ndim)) if axes is None else axes
    mu = x.mean(dim=dims, keepdim=True)
    var = ((x - mu) ** 2).sum(dim=dims, keepdim=True) / (
        np.prod([x.shape[d] for d in np.atleast_1d(dims)]) - ddof
    )
    den = (var + eps).sqrt() if eps_mode == "inside" else var.sqrt() + eps
    y = (x - mu) / den
    return y if w is None else y * w + b


def _inputs(axes, affine, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=g, dtype=dtype) * 2 + 0.5
    x.requires_grad_(True)
    if not affine:
        return x, None, None
    pshape = AXES_PARAM[axes]
    w = (torch.rand(pshape, generator=g, dtype=dtype) + 0.5).requires_grad_(True)
    b = torch.randn(pshape, generator=g, dtype=dtype).requires_grad_(True)
    return x, w, b


@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("ddof", [0, 1])
@pytest.mark.parametrize("eps_mode", ["inside", "outside"])
@pytest.mark.parametrize("axes", list(AXES_PARAM))
def test_gradcheck_and_gradgradcheck(axes, eps_mode, ddof, affine):
    x, w, b = _inputs(axes, affine)
    inputs = (x,) if w is None else (x, w, b)

    def f(x, w=None, b=None):
        return normalize(x, axes, eps=1e-3, eps_mode=eps_mode, ddof=ddof, weight=w, bias=b)

    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)
    # values and first and second derivatives agree with torch autograd of plain torch ops
    y = f(*inputs)
    ref = _reference(x, axes, 1e-3, eps_mode, ddof, w, b)
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-12)
    dy = torch.randn_like(y)
    g1 = torch.autograd.grad((y * dy).sum(), inputs, create_graph=True)
    r1 = torch.autograd.grad((ref * dy).sum(), inputs, create_graph=True)
    v = torch.randn_like(x)
    g2 = torch.autograd.grad((g1[0] * v).sum(), inputs, materialize_grads=True)
    r2 = torch.autograd.grad((r1[0] * v).sum(), inputs, materialize_grads=True)
    for a, r in zip(g1 + g2, r1 + r2, strict=True):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-10)


def test_gradient_matches_finite_differences_on_the_problem_input():
    from normgrad._problem import problem_input

    x0 = np.asarray(problem_input(), dtype=np.float64)
    x = torch.tensor(x0, requires_grad=True)
    (g,) = torch.autograd.grad(normalize(x).sum() + (normalize(x) * x).sum(), x)

    def f(a):
        y = normgrad.normalize(a)
        return np.array(y.sum() + (y * a).sum())

    np.testing.assert_allclose(g.numpy(), fd_jacobian(f, x0), atol=1e-6)


def _grads(y, inputs, dy):
    return torch.autograd.grad(y, inputs, dy)


def test_matches_layer_norm():
    x, w, b = _inputs(-1, True)
    y = normalize(x, -1, weight=w, bias=b)
    ref = F.layer_norm(x, (4,), w, b, eps=1e-5)
    dy = torch.randn_like(y)
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-10)
    for a, r in zip(_grads(y, (x, w, b), dy), _grads(ref, (x, w, b), dy), strict=True):
        torch.testing.assert_close(a, r, rtol=0, atol=1e-10)
    # layer norm over the two trailing axes, weight of the reduced axes' shape
    w2 = torch.rand(3, 4, dtype=torch.float64, requires_grad=True)
    y = normalize(x, (-2, -1), weight=w2)
    ref = F.layer_norm(x, (3, 4), w2, eps=1e-5)
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-10)
    for a, r in zip(_grads(y, (x, w2), dy), _grads(ref, (x, w2), dy), strict=True):
        torch.testing.assert_close(a, r, rtol=0, atol=1e-10)


def test_matches_batch_norm_training():
    x, w, b = _inputs((0, 2, 3), True)
    y = normalize(x, (0, 2, 3), weight=w, bias=b)
    ref = F.batch_norm(x, None, None, w.view(3), b.view(3), training=True, eps=1e-5)
    dy = torch.randn_like(y)
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-10)
    for a, r in zip(_grads(y, (x, w, b), dy), _grads(ref, (x, w, b), dy), strict=True):
        torch.testing.assert_close(a, r, rtol=0, atol=1e-10)


def test_matches_instance_norm():
    x, w, b = _inputs((2, 3), True)
    y = normalize(x, (2, 3), weight=w, bias=b)
    ref = F.instance_norm(x, weight=w.view(3), bias=b.view(3), use_input_stats=True, eps=1e-5)
    dy = torch.randn_like(y)
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-10)
    for a, r in zip(_grads(y, (x, w, b), dy), _grads(ref, (x, w, b), dy), strict=True):
        torch.testing.assert_close(a, r, rtol=0, atol=1e-10)


def test_float32_keeps_dtype_and_is_close_to_layer_norm():
    x, w, b = _inputs(-1, True, dtype=torch.float32)
    y = normalize(x, -1, weight=w, bias=b)
    assert y.dtype == torch.float32
    ref = F.layer_norm(x, (4,), w, b)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    gx, gw, gb = _grads(y, (x, w, b), torch.ones_like(y) * 0.3)
    rx, rw, rb = _grads(ref, (x, w, b), torch.ones_like(y) * 0.3)
    assert gx.dtype == gw.dtype == gb.dtype == torch.float32
    for a, r in zip((gx, gw, gb), (rx, rw, rb), strict=True):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5)


def test_does_not_mutate_inputs():
    x, w, b = _inputs(None, True)
    copies = [t.detach().clone() for t in (x, w, b)]
    y = normalize(x, weight=w, bias=b)
    y.sum().backward()
    for t, c in zip((x, w, b), copies, strict=True):
        assert torch.equal(t.detach(), c)


def test_errors_are_normgrad_errors():
    with pytest.raises(NormgradError, match=r"torch\.Tensor"):
        normalize(np.ones((2, 3)))  # type: ignore[arg-type]
    x = torch.randn(2, 3)
    with pytest.raises(NormgradError, match="axis"):
        normalize(x, axes=5)
    with pytest.raises(NormgradError, match="eps_mode"):
        normalize(x, eps_mode="middle")
    with pytest.raises(NormgradError, match=r"broadcast.*give it \(3,\) for one value per"):
        normalize(x, -1, weight=torch.ones(4))
    with pytest.raises(NormgradError, match="param_shape"):
        MeanVarNorm(0)
    for bad in (True, (3, False)):  # a bool is an int to Python, but never a size
        with pytest.raises(NormgradError, match="param_shape"):
            MeanVarNorm(bad)  # type: ignore[arg-type]
    with pytest.raises(NormgradError, match="eps_mode"):
        MeanVarNorm(3, eps_mode="bad")


def test_module_layer_norm_equals_nn_layer_norm():
    torch.manual_seed(0)
    x = torch.randn(5, 7, 6, dtype=torch.float64)
    m = MeanVarNorm(6, dtype=torch.float64)
    assert m.weight is not None and m.bias is not None
    assert m.weight.shape == m.bias.shape == (6,)
    assert torch.equal(m.weight, torch.ones(6, dtype=torch.float64))
    assert torch.equal(m.bias, torch.zeros(6, dtype=torch.float64))
    ln = torch.nn.LayerNorm(6, dtype=torch.float64)
    with torch.no_grad():
        for p, q in ((m.weight, ln.weight), (m.bias, ln.bias)):
            p.uniform_(0.5, 1.5)
            q.copy_(p)
    torch.testing.assert_close(m(x), ln(x), rtol=0, atol=1e-10)
    (m(x) ** 2).sum().backward()
    (ln(x) ** 2).sum().backward()
    torch.testing.assert_close(m.weight.grad, ln.weight.grad, rtol=0, atol=1e-9)
    torch.testing.assert_close(m.bias.grad, ln.bias.grad, rtol=0, atol=1e-9)
    assert set(dict(m.named_parameters())) == {"weight", "bias"}
    assert "axes=-1" in repr(m)


def test_module_per_channel_equals_batch_norm_and_trains():
    torch.manual_seed(1)
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64) * 3 + 1
    m = MeanVarNorm((3, 1, 1), axes=(0, 2, 3), dtype=torch.float64)
    bn = torch.nn.BatchNorm2d(3, track_running_stats=False, dtype=torch.float64)
    torch.testing.assert_close(m(x), bn(x), rtol=0, atol=1e-10)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    target = torch.randn_like(x)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = ((m(x) - target) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_module_without_affine_has_no_parameters():
    m = MeanVarNorm((3, 1, 1), axes=(2, 3), elementwise_affine=False)
    assert list(m.parameters()) == []
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    ref = F.instance_norm(x, eps=1e-5)
    torch.testing.assert_close(m(x), ref, rtol=0, atol=1e-10)


def _compiled_step(fullgraph: bool):
    torch._dynamo.reset()
    torch.manual_seed(2)
    m = MeanVarNorm((3, 1, 1), axes=(0, 2, 3), dtype=torch.float64)
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    cm = torch.compile(m, backend="aot_eager", fullgraph=fullgraph)
    y = cm(x)
    (gx,) = torch.autograd.grad((y**3).sum(), x)
    ref = m(x)
    (rx,) = torch.autograd.grad((ref**3).sum(), x)
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(gx, rx, rtol=0, atol=1e-12)


@pytest.mark.filterwarnings("ignore:Dynamo detected")
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")
def test_torch_compile_with_graph_breaks():
    # aot_eager: Dynamo capture + AOTAutograd (forward and backward graphs) without needing
    # a C++ toolchain; inductor is exercised in the slow test below.
    _compiled_step(fullgraph=False)


@pytest.mark.filterwarnings("ignore:Dynamo detected")
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")
def test_torch_compile_fullgraph():
    _compiled_step(fullgraph=True)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Dynamo detected")
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")
def test_torch_compile_inductor():
    torch._dynamo.reset()
    m = MeanVarNorm(5)
    x = torch.randn(3, 5, requires_grad=True)
    y = torch.compile(m)(x)
    (gx,) = torch.autograd.grad(y.pow(2).sum(), x)
    (rx,) = torch.autograd.grad(m(x).pow(2).sum(), x)
    torch.testing.assert_close(y, m(x))
    torch.testing.assert_close(gx, rx)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    x, w, b = _inputs((0, 2, 3), True, dtype=torch.float32)
    xc, wc, bc = (t.detach().cuda().requires_grad_(True) for t in (x, w, b))
    y = normalize(x, (0, 2, 3), weight=w, bias=b)
    yc = normalize(xc, (0, 2, 3), weight=wc, bias=bc)
    assert yc.device.type == "cuda"
    torch.testing.assert_close(yc.cpu(), y, rtol=1e-5, atol=1e-5)
    dy = torch.randn_like(y)
    for a, r in zip(_grads(yc, (xc, wc, bc), dy.cuda()), _grads(y, (x, w, b), dy), strict=True):
        torch.testing.assert_close(a.cpu(), r, rtol=1e-4, atol=1e-4)
    xd = x.detach().double().cuda().requires_grad_(True)
    assert torch.autograd.gradgradcheck(lambda t: normalize(t, (2, 3), eps=1e-3), (xd,))


def test_import_normgrad_does_not_import_torch():
    code = "import sys, normgrad; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
