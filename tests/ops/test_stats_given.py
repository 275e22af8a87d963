"""`normalize(x, axes, stats=moments)`: normalization with given statistics (inference),
whose derivatives treat them as constants."""

import numpy as np
import pytest
from _fd import fd_directional, fd_jacobian

import normgrad as ng
from normgrad import NormgradError


@pytest.mark.parametrize("eps_mode", ["inside", "outside"])
@pytest.mark.parametrize("ddof", [0, 1])
def test_forward_uses_the_given_statistics(rng, eps_mode, ddof):
    train = rng.normal(size=(50, 3)) * 2 + 5
    x = rng.normal(size=(4, 3))
    w, b = rng.normal(size=3), rng.normal(size=3)
    st = ng.moments(train, 0)
    y = ng.normalize(x, 0, stats=st, ddof=ddof, eps=1e-3, eps_mode=eps_mode, weight=w, bias=b)
    sd = train.std(axis=0, ddof=ddof)
    den = np.sqrt(sd**2 + 1e-3) if eps_mode == "inside" else sd + 1e-3
    np.testing.assert_allclose(y, (x - train.mean(axis=0)) / den * w + b, rtol=1e-13)


@pytest.mark.parametrize("eps_mode", ["inside", "outside"])
def test_every_derivative_treats_them_as_constants(rng, eps_mode):
    st = ng.moments(rng.normal(size=(20, 2, 3)) + 1, (0, 2))
    x, dy, tx, tdy = (rng.normal(size=(4, 2, 3)) for _ in range(4))
    w = rng.normal(size=(1, 2, 1))
    kw = {"stats": st, "eps_mode": eps_mode, "weight": w}

    def f(v):
        return ng.normalize(v, (0, 2), **kw)

    flat = fd_jacobian(f, x).reshape(x.size, x.size)
    _, ctx = ng.normalize_forward(x, (0, 2), **kw)
    g = ng.normalize_backward(ctx, dy)
    np.testing.assert_allclose(g.x.ravel(), dy.ravel() @ flat, atol=1e-9)
    np.testing.assert_allclose(g.x, dy * w * ctx.rstd, rtol=1e-14)  # diagonal
    fd_w = fd_directional(lambda v: np.sum(dy * ng.normalize(x, (0, 2), **{**kw, "weight": v})),
                          w, np.eye(2)[1].reshape(w.shape))  # fmt: skip
    np.testing.assert_allclose(g.weight.ravel()[1], fd_w, rtol=1e-8)
    second = ng.normalize_backward_jvp(ctx, dy, tx=tx, tdy=tdy)
    np.testing.assert_allclose(second.tx, ng.normalize_backward(ctx, tdy).x, atol=1e-13)
    assert ng.plan_backward(ctx, dy).path == "generic"


def test_stats_of_the_input_itself_give_plain_normalize_forward(rng):
    x = rng.normal(size=(5, 6))
    np.testing.assert_allclose(ng.normalize(x, 1, stats=ng.moments(x, 1)), ng.normalize(x, 1),
                               rtol=1e-13, atol=1e-15)  # fmt: skip


def test_bad_stats_are_refused(rng):
    x = rng.normal(size=(5, 6))
    with pytest.raises(NormgradError, match=r"keepdims shape \(5, 1\).*got shape \(1, 6\)"):
        ng.normalize(x, 1, stats=ng.moments(x, 0))
    with pytest.raises(NormgradError, match="stats must be a Moments"):
        ng.normalize(x, 1, stats=(0.0, 1.0))
    with pytest.raises(NormgradError, match="stats with center=False"):
        ng.normalize(x, 1, stats=ng.moments(x, 1), center=False)
