"""check_hvp: a Hessian-vector product checked against finite differences of the gradient
(which is itself checked against f), and a torch/JAX backward's own derivative (double
backward, jvp-of-vjp), with check_gradients' vocabulary."""

import numpy as np
import pytest
from _fd import fd_jacobian

import normgrad
from normgrad import NormgradError
from normgrad.check import check_hvp

X = np.random.default_rng(0).standard_normal(12)


def loss(x):
    """Quartic plus a chain coupling: the Hessian is tridiagonal, not diagonal."""
    return 0.25 * np.sum(x**4) + np.sum(x[:-1] * x[1:])


def loss_grad(x):
    g = x**3
    g[:-1] += x[1:]
    g[1:] += x[:-1]
    return g


def loss_hvp(x, v):
    hv = 3 * x**2 * v
    hv[:-1] += v[1:]
    hv[1:] += v[:-1]
    return hv


def test_the_reference_formulas_match_finite_differences() -> None:
    H = fd_jacobian(loss_grad, X)
    v = np.random.default_rng(1).standard_normal(X.shape)
    np.testing.assert_allclose(loss_hvp(X, v), H @ v, rtol=1e-7, atol=1e-8)
    np.testing.assert_allclose(loss_grad(X), fd_jacobian(lambda z: np.atleast_1d(loss(z)), X)[0])


def test_a_right_hvp_passes() -> None:
    report = check_hvp(loss, X, loss_grad, hvp=loss_hvp)
    assert report.ok and report.kinds == ["ok"], str(report)
    assert "hvp(x, v) is checked as the derivative of grad" in report.notes[0]
    assert normgrad.check_hvp is check_hvp


@pytest.mark.parametrize(
    ("hvp", "kind"),
    [
        (lambda x, v: -loss_hvp(x, v), "sign"),
        (lambda x, v: 2 * loss_hvp(x, v), "scale"),
        (lambda x, v: 3 * x**2 * v, "diagonal"),  # the coupling's second derivative forgotten
        (lambda x, v: loss_hvp(x, v) + 0.1, "offset"),
        (lambda x, v: loss_hvp(x, np.abs(v)), "not_linear"),
    ],
)
def test_a_wrong_hvp_is_named(hvp, kind) -> None:
    report = check_hvp(loss, X, loss_grad, hvp=hvp)
    assert not report.ok and report.kinds[0] == kind, str(report)


def test_a_wrong_grad_is_reported_first() -> None:
    report = check_hvp(loss, X, lambda x: 2 * loss_grad(x), hvp=loss_hvp)
    assert not report.ok and report.kinds[0] == "scale", str(report)
    assert "grad(x) does not match finite differences of f" in report.notes[0]


def test_tuple_inputs() -> None:
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((3, 4)), rng.standard_normal((4, 2))

    def f(a, b):
        return 0.5 * np.sum((a @ b) ** 2)

    def grad(a, b):
        g = a @ b
        return g @ b.T, a.T @ g

    def hvp(a, b, va, vb):
        g, dg = a @ b, va @ b + a @ vb
        return dg @ b.T + g @ vb.T, va.T @ g + a.T @ dg

    assert check_hvp(f, (a, b), grad, hvp).kinds == ["ok"]

    def wrong(a, b, va, vb):  # the cross term g @ vb.T of the a-block is forgotten
        g, dg = a @ b, va @ b + a @ vb
        return dg @ b.T, va.T @ g + a.T @ dg

    report = check_hvp(f, (a, b), grad, wrong)
    assert not report.ok, str(report)


def test_bad_arguments_raise() -> None:
    with pytest.raises(NormgradError, match="scalar f"):
        check_hvp(lambda x: x**2, X, lambda x: 2 * x, lambda x, v: 2 * v)
    with pytest.raises(NormgradError, match="no \\['dy'\\]"):
        check_hvp(loss, X, loss_grad, loss_hvp, dy=1.0)
    with pytest.raises(NormgradError, match="needs grad"):
        check_hvp(loss, X, loss_grad, None)
    with pytest.raises(NormgradError, match="torch or JAX f"):
        check_hvp(loss, X)


# -- the frameworks' double backward ----------------------------------------------------------


def test_torch_double_backward() -> None:
    torch = pytest.importorskip("torch")

    class Cube(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, detach):
            ctx.save_for_backward(x)
            ctx.detach = detach
            return x**3

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            x = x.detach() if ctx.detach else x  # detached: the backward is not differentiable
            return 3 * x**2 * g, None

    x = torch.tensor(np.random.default_rng(3).standard_normal((3, 4)))
    right = check_hvp(lambda t: torch.tanh(Cube.apply(t, False)), x)
    assert right.ok, str(right)
    assert "double backward" in right.notes[0]
    wrong = check_hvp(lambda t: torch.tanh(Cube.apply(t, True)), x)
    assert not wrong.ok, str(wrong)
    scalar = check_hvp(lambda t: (Cube.apply(t, False) * t).sum(), x)
    assert scalar.ok, str(scalar)


def test_jax_jvp_of_vjp() -> None:
    jax = pytest.importorskip("jax")
    jnp = jax.numpy

    def rule(stop):
        @jax.custom_vjp
        def cube(x):
            return x**3

        def fwd(x):
            return x**3, x

        def bwd(x, g):
            x = jax.lax.stop_gradient(x) if stop else x
            return (3 * x**2 * g,)

        cube.defvjp(fwd, bwd)
        return cube

    x = jnp.asarray(np.random.default_rng(4).standard_normal(6))
    right = check_hvp(lambda v: jnp.sin(rule(False)(v)), x)
    assert right.ok, str(right)
    wrong = check_hvp(lambda v: jnp.sin(rule(True)(v)), x)
    assert not wrong.ok, str(wrong)
