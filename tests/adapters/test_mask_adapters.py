"""mask= and nan_policy= through normgrad.torch and normgrad.jax (against the NumPy op and
the frameworks' own autodiff checks), and the functional JAX batch norm against
torch.nn.BatchNorm2d over training steps, then in evaluation."""

import numpy as np
import pytest

import normgrad as ng
from normgrad import NormgradError

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

import normgrad.jax as ngj  # noqa: E402
import normgrad.torch as ngt  # noqa: E402


def _case(rng, shape=(4, 7)):
    x = rng.normal(size=shape) * 2 + 1
    mask = rng.random(shape) < 0.7
    mask[:, :2] = True
    return x, mask, rng.normal(size=shape[-1]), rng.normal(size=shape[-1])


def test_torch_masked_matches_numpy_and_gradchecks(rng):
    x, mask, w, b = _case(rng)
    dy = rng.normal(size=x.shape)
    xt, wt, bt = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    y = ngt.normalize(xt, 1, ddof=1, weight=wt, bias=bt, mask=torch.tensor(mask))
    y.backward(torch.tensor(dy))
    y0, ctx = ng.normalize_forward(x, 1, ddof=1, weight=w, bias=b, mask=mask)
    g = ng.normalize_backward(ctx, dy)
    np.testing.assert_allclose(y.detach().numpy(), y0, rtol=1e-14, atol=1e-14)
    for got, want in ((xt.grad, g.x), (wt.grad, g.weight), (bt.grad, g.bias)):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-14)
    mt = torch.tensor(mask)

    def f(a, ww):
        return ngt.normalize(a, 1, eps_mode="outside", weight=ww, mask=mt)

    args = (torch.tensor(x, requires_grad=True), torch.tensor(w, requires_grad=True))
    assert torch.autograd.gradcheck(f, args)
    assert torch.autograd.gradgradcheck(f, args)


def test_torch_float32_and_nan_policy(rng):
    x = rng.normal(size=(3, 8)).astype(np.float32)
    x[1, 3] = np.nan
    y = ngt.normalize(torch.tensor(x), 1, nan_policy="omit")
    assert y.dtype == torch.float32
    np.testing.assert_allclose(y.numpy(), ng.normalize(x, 1, nan_policy="omit"), equal_nan=True)
    with pytest.raises(NormgradError, match=r"index \(1, 3\)"):
        ngt.normalize(torch.tensor(x), 1, nan_policy="raise")
    with pytest.raises(NormgradError, match="nan_policy must be"):
        ngt.normalize(torch.tensor(x), 1, nan_policy="drop")
    with pytest.raises(NormgradError, match="boolean"):
        ngt.normalize(torch.tensor(x), 1, mask=torch.ones(3, 8))


def test_meanvarnorm_with_a_mask_and_running_stats(rng):
    x, mask, _, _ = _case(rng, (6, 5))
    mv = ngt.MeanVarNorm((1, 5), axes=0, track_running_stats=True, momentum=None).double()
    y = mv(torch.tensor(x), torch.tensor(mask))
    np.testing.assert_allclose(y.detach().numpy(), ng.normalize(x, 0, mask=mask), rtol=1e-13)
    ref = ng.moments(x, 0, mask=mask)
    np.testing.assert_allclose(mv.running_mean.numpy(), ref.mean, rtol=1e-13)
    np.testing.assert_allclose(mv.running_var.numpy(), ref.var(1), rtol=1e-13)


@pytest.mark.usefixtures("jax_x64")
def test_jax_masked_matches_numpy_in_every_mode(rng):
    x, mask, w, b = _case(rng)
    dy, tx = rng.normal(size=x.shape), rng.normal(size=x.shape)
    y0, ctx = ng.normalize_forward(x, 1, weight=w, bias=b, mask=mask)
    g = ng.normalize_backward(ctx, dy)
    _, ty0 = ng.normalize_jvp(x, tx, 1, weight=w, bias=b, mask=mask)

    def f(a, ww, m):
        return ngj.normalize(a, 1, weight=ww, bias=jnp.asarray(b), mask=m)

    args = (jnp.asarray(x), jnp.asarray(w), jnp.asarray(mask))
    y, vjp = jax.vjp(lambda a, ww: f(a, ww, args[2]), *args[:2])
    np.testing.assert_allclose(y, y0, rtol=1e-14, atol=1e-14)
    gx, gw = vjp(jnp.asarray(dy))
    np.testing.assert_allclose(gx, g.x, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(gw, g.weight, rtol=1e-12, atol=1e-14)
    ty = jax.jvp(lambda a: f(a, args[1], args[2]), (args[0],), (jnp.asarray(tx),))[1]
    np.testing.assert_allclose(ty, ty0, rtol=1e-12, atol=1e-14)
    gj = jax.jit(jax.grad(lambda a, m: jnp.sum(f(a, args[1], m) * dy)))(args[0], args[2])
    np.testing.assert_allclose(gj, g.x, rtol=1e-12, atol=1e-14)
    ngj.check_grads(lambda a: f(a, args[1], args[2]), (args[0],), order=2)


@pytest.mark.usefixtures("jax_x64")
def test_jax_nan_policy(rng):
    x = rng.normal(size=(3, 6))
    x[2, 4] = np.nan
    np.testing.assert_allclose(
        ngj.normalize(jnp.asarray(x), 1, nan_policy="omit"), ng.normalize(x, 1, nan_policy="omit"),
        rtol=1e-14, equal_nan=True,
    )  # fmt: skip
    with pytest.raises(NormgradError, match=r"index \(2, 4\)"):
        ngj.normalize(jnp.asarray(x), 1, nan_policy="raise")
    with pytest.raises(NormgradError, match="traced"):
        jax.jit(lambda a: ngj.normalize(a, 1, nan_policy="raise"))(jnp.asarray(x))


@pytest.mark.usefixtures("jax_x64")
@pytest.mark.parametrize("momentum", [0.1, None])
def test_jax_batch_norm_matches_batchnorm2d(momentum):
    torch.manual_seed(0)
    c = 3
    bn = torch.nn.BatchNorm2d(c, momentum=momentum).double()
    with torch.no_grad():
        bn.weight.copy_(torch.randn(c))
        bn.bias.copy_(torch.randn(c))
    params = {
        "weight": jnp.asarray(bn.weight.detach().numpy().reshape(c, 1, 1)),
        "bias": jnp.asarray(bn.bias.detach().numpy().reshape(c, 1, 1)),
    }
    state = ngj.init_running_stats((c, 1, 1), jnp.float64)
    step = jax.jit(lambda p, s, x: ngj.batch_norm(p, s, x, momentum=momentum), static_argnums=())
    gen = np.random.default_rng(1)
    for k in range(4):
        x = gen.normal(size=(4, c, 5, 2)) * (k + 1) + k
        dy = gen.normal(size=x.shape)
        xt = torch.tensor(x, requires_grad=True)
        yt = bn(xt)
        yt.backward(torch.tensor(dy))
        y, state = step(params, state, jnp.asarray(x))
        np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-12, atol=1e-12)
        gx = jax.grad(lambda a, s=state, d=dy: jnp.sum(ngj.batch_norm(params, s, a)[0] * d))(
            jnp.asarray(x)
        )
        np.testing.assert_allclose(gx, xt.grad.numpy(), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(state["running_mean"].ravel(), bn.running_mean, rtol=1e-13)
        np.testing.assert_allclose(state["running_var"].ravel(), bn.running_var, rtol=1e-13)
        assert int(state["num_batches_tracked"]) == int(bn.num_batches_tracked) == k + 1
    bn.eval()
    x = gen.normal(size=(2, c, 5, 2))
    xt = torch.tensor(x, requires_grad=True)
    yt = bn(xt)
    yt.sum().backward()
    y, same = ngj.batch_norm(params, state, jnp.asarray(x), training=False)
    assert same is state
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-12, atol=1e-12)
    gx = jax.grad(lambda a: jnp.sum(ngj.batch_norm(params, state, a, training=False)[0]))(
        jnp.asarray(x)
    )
    np.testing.assert_allclose(gx, xt.grad.numpy(), rtol=1e-12, atol=1e-12)


@pytest.mark.usefixtures("jax_x64")
def test_jax_batch_norm_refuses_a_wrong_state():
    state = ngj.init_running_stats((4, 1, 1))
    with pytest.raises(NormgradError, match="one value per group"):
        ngj.batch_norm(None, state, jnp.ones((2, 3, 2, 2)))
    with pytest.raises(NormgradError, match="more than one element"):
        ngj.batch_norm(None, ngj.init_running_stats((3,)), jnp.ones((1, 3)), axes=0)


def test_torch_func_transforms_with_a_mask(rng):
    x, mask, w, _ = _case(rng, (3, 6))
    xt, mt, wt = torch.tensor(x), torch.tensor(mask), torch.tensor(w)
    tx = rng.normal(size=x.shape)
    jac = ng.normalize_jacobian(x, 1, weight=w, mask=mask)

    def f(a):
        return ngt.normalize(a, 1, weight=wt, mask=mt)

    np.testing.assert_allclose(torch.func.jacrev(f)(xt).numpy(), jac, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(torch.func.jacfwd(f)(xt).numpy(), jac, rtol=1e-12, atol=1e-14)
    ty = torch.func.jvp(f, (xt,), (torch.tensor(tx),))[1]
    np.testing.assert_allclose(ty.numpy(), np.einsum("ijkl,kl->ij", jac, tx), atol=1e-13)
    rows = torch.func.vmap(lambda a, m: ngt.normalize(a, 0, weight=wt, mask=m))(xt, mt)
    np.testing.assert_allclose(rows.numpy(), ng.normalize(x, 1, weight=w, mask=mask), rtol=1e-13)
    shared = torch.func.vmap(lambda a: ngt.normalize(a, 0, mask=mt[0]))(xt)
    full = np.broadcast_to(mask[0], x.shape)
    np.testing.assert_allclose(shared.numpy(), ng.normalize(x, 1, mask=full), rtol=1e-13)


@pytest.mark.usefixtures("jax_x64")
def test_jax_batch_norm_with_a_mask(rng):
    x = rng.normal(size=(5, 3, 2, 2))
    mask = rng.random(x.shape) < 0.7
    mask[:2] = True
    state = ngj.init_running_stats((3, 1, 1), jnp.float64)
    y, new = ngj.batch_norm(None, state, jnp.asarray(x), momentum=0.5, mask=jnp.asarray(mask))
    np.testing.assert_allclose(y, ng.normalize(x, (0, 2, 3), mask=mask), rtol=1e-13)
    ref = ng.moments(x, (0, 2, 3), mask=mask)
    np.testing.assert_allclose(new["running_mean"], 0.5 * ref.mean[0], rtol=1e-13)
    np.testing.assert_allclose(new["running_var"], 0.5 + 0.5 * ref.var(1)[0], rtol=1e-13)
