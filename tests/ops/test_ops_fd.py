"""The op's analytic derivatives against float64 central finite differences, for every layout."""

import numpy as np
import pytest
from _fd import fd_directional, fd_jacobian

import normgrad as ng

LAYOUTS = [
    ((7,), None),
    ((7,), 0),
    ((7,), -1),
    ((3, 5), None),
    ((3, 5), 0),
    ((3, 5), 1),
    ((3, 5), -1),
    ((3, 5), (0, 1)),
    ((2, 3, 4), None),
    ((2, 3, 4), 0),  # leading
    ((2, 3, 4), 2),  # trailing
    ((2, 3, 4), 1),  # middle
    ((2, 3, 4), (1, 2)),  # trailing pair (layer norm)
    ((2, 3, 4), (0, 2)),  # outer pair
    ((2, 3, 4), -2),  # negative
    ((2, 3, 4), (-1, 0)),  # negative, unsorted
    ((2, 3, 2, 3), None),
    ((2, 3, 2, 3), (0, 2, 3)),  # batch norm
    ((2, 3, 2, 3), (2, 3)),  # instance norm
    ((2, 3, 2, 3), (1, 2, 3)),  # layer norm
    ((2, 3, 2, 3), 1),  # single middle
    ((2, 3, 2, 3), (-3, -1)),
    ((2, 3, 2, 3), 0),
]


def _param_shape(shape, axes, kind):
    red = ng._axes.normalize_axes(axes, len(shape))
    if kind == "kept":  # one parameter per group, as BatchNorm's (C, 1, 1)
        full = tuple(1 if i in red else s for i, s in enumerate(shape))
    else:  # one parameter per position inside a group, as LayerNorm's (D,)
        full = tuple(s if i in red else 1 for i, s in enumerate(shape))
    while len(full) > 1 and full[0] == 1:
        full = full[1:]
    return full


def _case(shape, axes, affine, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(1.5, 2.0, size=shape)
    w = b = None
    if affine:
        pshape = _param_shape(shape, axes, affine)
        w = rng.normal(1.0, 0.5, size=pshape)
        b = rng.normal(0.0, 0.5, size=pshape)
    return rng, x, w, b


@pytest.mark.parametrize("shape,axes", LAYOUTS)
@pytest.mark.parametrize("eps_mode", ["inside", "outside"])
@pytest.mark.parametrize("ddof", [0, 1])
@pytest.mark.parametrize("affine", [None, "kept", "reduced"])
def test_derivatives_match_finite_differences(shape, axes, eps_mode, ddof, affine):
    rng, x, w, b = _case(shape, axes, affine, seed=len(shape) * 100 + ddof)
    opts = dict(axes=axes, eps=1e-3, eps_mode=eps_mode, ddof=ddof)
    x0 = x.copy()

    def f(z, w=w, b=b):
        return ng.normalize(z, weight=w, bias=b, **opts)

    # Jacobian
    jac_fd = fd_jacobian(f, x)
    jac = ng.normalize_jacobian(x, weight=w, bias=b, **opts)
    assert jac.shape == x.shape + x.shape
    np.testing.assert_allclose(jac, jac_fd, rtol=1e-7, atol=1e-8)

    # VJP
    dy = rng.normal(size=shape)
    y, ctx = ng.normalize_forward(x, weight=w, bias=b, **opts)
    grads = ng.normalize_backward(ctx, dy)
    np.testing.assert_allclose(grads.x, np.tensordot(dy, jac_fd, axes=x.ndim), atol=1e-8)

    # JVP, with affine tangents
    tx = rng.normal(size=shape)
    tw = None if w is None else rng.normal(size=w.shape)
    tb = None if b is None else rng.normal(size=b.shape)
    y2, ty = ng.normalize_jvp(x, tx, weight=w, bias=b, tweight=tw, tbias=tb, **opts)
    np.testing.assert_array_equal(y2, y)
    if w is None:
        ty_fd = fd_directional(f, x, tx)
    else:
        ty_fd = fd_directional(lambda t: f(x + t * tx, w + t * tw, b + t * tb), 0.0, 1.0)
    np.testing.assert_allclose(ty, ty_fd, atol=1e-8)

    if w is not None:  # dweight, dbias as directional derivatives of <dy, y>
        dw_fd = fd_directional(lambda t: np.sum(dy * f(x, w + t * tw, b)), 0.0, 1.0)
        db_fd = fd_directional(lambda t: np.sum(dy * f(x, w, b + t * tb)), 0.0, 1.0)
        assert grads.weight.shape == w.shape and grads.bias.shape == b.shape
        np.testing.assert_allclose(np.sum(grads.weight * tw), dw_fd, atol=1e-8)
        np.testing.assert_allclose(np.sum(grads.bias * tb), db_fd, atol=1e-8)
    else:
        assert grads.weight is None and grads.bias is None

    # Second derivative: the tangent of the backward pass itself
    tdy = rng.normal(size=shape)

    def backward(t):
        ww = None if w is None else w + t * tw
        _, c = ng.normalize_forward(x + t * tx, weight=ww, bias=b, **opts)
        g = ng.normalize_backward(c, dy + t * tdy)
        return g.x if w is None else np.concatenate([g.x.ravel(), g.weight.ravel()])

    sec = ng.normalize_backward_jvp(ctx, dy, tx=tx, tdy=tdy, tweight=tw)
    got = sec.tx if w is None else np.concatenate([sec.tx.ravel(), sec.tweight.ravel()])
    np.testing.assert_allclose(got, fd_directional(backward, 0.0, 1.0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(sec.x, grads.x, rtol=1e-13, atol=1e-14)

    np.testing.assert_array_equal(x, x0)  # never mutated


def test_hessian_vector_product_is_symmetric(rng):
    # Second derivative of <dy, y(x)>: u . H v == v . H u.
    x = rng.normal(size=(4, 6))
    dy, u, v = (rng.normal(size=x.shape) for _ in range(3))
    _, ctx = ng.normalize_forward(x, axes=1, eps=1e-2)
    hu = ng.normalize_backward_jvp(ctx, dy, tx=u).tx
    hv = ng.normalize_backward_jvp(ctx, dy, tx=v).tx
    assert np.isclose(np.sum(v * hu), np.sum(u * hv), rtol=1e-12)
