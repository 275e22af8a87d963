"""The op against PyTorch's own normalization layers and autograd, in float64."""

import numpy as np
import pytest

import normgrad as ng

torch = pytest.importorskip("torch")
F = torch.nn.functional

TOL = dict(rtol=1e-10, atol=1e-10)


def _torch_reference(fn, x, w, b, dy):
    xt = torch.tensor(x, requires_grad=True)
    wt = torch.tensor(w, requires_grad=True)
    bt = torch.tensor(b, requires_grad=True)
    y = fn(xt, wt, bt)
    y.backward(torch.tensor(dy))
    return y.detach().numpy(), xt.grad.numpy(), wt.grad.numpy(), bt.grad.numpy()


def _ours(x, axes, w, b, dy, eps):
    y, ctx = ng.normalize_forward(x, axes, eps=eps, weight=w, bias=b)
    g = ng.normalize_backward(ctx, dy)
    return y, g.x, g.weight, g.bias


def _compare(ref, ours):
    for r, o in zip(ref, ours, strict=True):
        np.testing.assert_allclose(o.reshape(r.shape), r, **TOL)


@pytest.mark.parametrize("normalized", [(6,), (4, 6), (3, 4, 6)])
def test_layer_norm_trailing_and_whole(rng, normalized):
    x = rng.normal(2.0, 3.0, size=(3, 4, 6))
    eps = 1e-5
    w, b = rng.normal(size=normalized), rng.normal(size=normalized)
    dy = rng.normal(size=x.shape)
    axes = tuple(range(3 - len(normalized), 3))  # (3, 4, 6) itself: the whole tensor
    ref = _torch_reference(lambda t, wt, bt: F.layer_norm(t, normalized, wt, bt, eps), x, w, b, dy)
    _compare(ref, _ours(x, axes, w, b, dy, eps))


def test_batch_norm_training(rng):
    x = rng.normal(-1.0, 2.0, size=(4, 3, 5, 5))
    w, b, dy = rng.normal(size=3), rng.normal(size=3), rng.normal(size=x.shape)
    ref = _torch_reference(
        lambda t, wt, bt: F.batch_norm(t, None, None, wt, bt, training=True, eps=1e-5), x, w, b, dy
    )
    _compare(ref, _ours(x, (0, 2, 3), w.reshape(3, 1, 1), b.reshape(3, 1, 1), dy, 1e-5))


def test_instance_norm(rng):
    x = rng.normal(0.5, 1.5, size=(2, 3, 4, 5))
    w, b, dy = rng.normal(size=3), rng.normal(size=3), rng.normal(size=x.shape)
    ref = _torch_reference(
        lambda t, wt, bt: F.instance_norm(t, weight=wt, bias=bt, eps=1e-5), x, w, b, dy
    )
    _compare(ref, _ours(x, (2, 3), w.reshape(3, 1, 1), b.reshape(3, 1, 1), dy, 1e-5))


def test_group_norm(rng):
    n, c, h, wd, groups = 2, 6, 3, 4, 3
    x = rng.normal(size=(n, c, h, wd))
    w, b, dy = rng.normal(size=c), rng.normal(size=c), rng.normal(size=x.shape)
    ref = _torch_reference(lambda t, wt, bt: F.group_norm(t, groups, wt, bt, 1e-5), x, w, b, dy)
    # Group norm is a normalization over (channels in a group, H, W) of a reshaped view.
    xg = x.reshape(n, groups, c // groups, h, wd)
    wg, bg = w.reshape(groups, c // groups, 1, 1), b.reshape(groups, c // groups, 1, 1)
    y, dx, dw, db = _ours(xg, (2, 3, 4), wg, bg, dy.reshape(xg.shape), 1e-5)
    _compare(ref, (y.reshape(x.shape), dx.reshape(x.shape), dw.reshape(c), db.reshape(c)))


@pytest.mark.parametrize("eps_mode", ["inside", "outside"])
@pytest.mark.parametrize("ddof", [0, 1])
@pytest.mark.parametrize("axes", [None, (1,), (0, 2)])
def test_plain_formula_autograd_with_second_derivatives(rng, eps_mode, ddof, axes):
    """Every option, against torch autograd of the formula, including double backward (HVP)."""
    x = rng.normal(size=(3, 4, 5))
    dy, v = rng.normal(size=x.shape), rng.normal(size=x.shape)
    eps = 1e-2
    dims = tuple(range(3)) if axes is None else axes

    def formula(t):
        mu = t.mean(dim=dims, keepdim=True)
        var = ((t - mu) ** 2).sum(dim=dims, keepdim=True) / (_n(t, dims) - ddof)
        s = torch.sqrt(var + eps) if eps_mode == "inside" else torch.sqrt(var) + eps
        return (t - mu) / s

    xt = torch.tensor(x, requires_grad=True)
    y = formula(xt)
    (gx,) = torch.autograd.grad(y, xt, torch.tensor(dy), create_graph=True)
    (hv,) = torch.autograd.grad(gx, xt, torch.tensor(v))

    yo, ctx = ng.normalize_forward(x, axes, eps=eps, eps_mode=eps_mode, ddof=ddof)
    np.testing.assert_allclose(yo, y.detach().numpy(), **TOL)
    np.testing.assert_allclose(ng.normalize_backward(ctx, dy).x, gx.detach().numpy(), **TOL)
    np.testing.assert_allclose(ng.normalize_backward_jvp(ctx, dy, tx=v).tx, hv.numpy(), **TOL)
    jvp = torch.func.jvp(formula, (torch.tensor(x),), (torch.tensor(v),))[1]
    ty = ng.normalize_jvp(x, v, axes, eps=eps, eps_mode=eps_mode, ddof=ddof)[1]
    np.testing.assert_allclose(ty, jvp.numpy(), **TOL)


def _n(t, dims):
    return int(np.prod([t.shape[d] for d in dims]))


def test_runs_on_torch_tensors_and_returns_them(rng):
    x = torch.tensor(rng.normal(size=(4, 5)), dtype=torch.float32)
    y, ctx = ng.normalize_forward(x, -1)
    assert isinstance(y, torch.Tensor) and y.dtype == torch.float32
    dx = ng.normalize_backward(ctx, torch.ones_like(x)).x
    assert isinstance(dx, torch.Tensor)
    ref = F.layer_norm(x.double(), (5,), eps=1e-5)
    np.testing.assert_allclose(y.numpy(), ref.numpy(), atol=1e-6)
