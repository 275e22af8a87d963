"""Properties of the op that hold for every input, checked with hypothesis."""

import numpy as np
from hypothesis import assume, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import normgrad as ng


@st.composite
def cases(draw, min_group=2):
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=5))
    ndim = len(shape)
    axes = draw(
        st.one_of(
            st.none(),
            st.lists(st.integers(0, ndim - 1), min_size=1, max_size=ndim, unique=True).map(tuple),
        )
    )
    red = range(ndim) if axes is None else axes
    assume(int(np.prod([shape[a] for a in red])) >= min_group)
    x = draw(
        hnp.arrays(
            np.float64, shape, elements=st.floats(-1e3, 1e3, allow_nan=False, allow_subnormal=False)
        )
    )
    var = np.var(x, axis=axes, keepdims=True)
    # well-conditioned groups: spread not negligible next to the values themselves
    assume(np.all(var > 1e-6 * (1.0 + np.max(np.abs(x)) ** 2)))
    seed = draw(st.integers(0, 2**32 - 1))
    return x, axes, np.random.default_rng(seed)


def _group_mean(a, axes):
    return np.mean(a, axis=axes, keepdims=True)


@given(cases(), st.sampled_from(["inside", "outside"]), st.sampled_from([0, 1]))
def test_each_group_has_zero_mean(case, eps_mode, ddof):
    x, axes, _ = case
    y = ng.normalize(x, axes, eps=1e-5, eps_mode=eps_mode, ddof=ddof)
    assert np.all(np.abs(_group_mean(y, axes)) <= 1e-12 * (1 + np.max(np.abs(y))))


@given(cases(), st.floats(0.0, 10.0))
def test_mean_square_is_var_over_var_plus_eps(case, eps):
    x, axes, _ = case
    y = ng.normalize(x, axes, eps=eps)
    var = np.mean((x - _group_mean(x, axes)) ** 2, axis=axes, keepdims=True)
    np.testing.assert_allclose(_group_mean(y**2, axes), var / (var + eps), rtol=1e-10)


@given(cases(), st.sampled_from(["inside", "outside"]), st.sampled_from([0, 1]))
def test_gradient_sums_to_zero_in_each_group(case, eps_mode, ddof):
    # y does not change when a constant is added to a group, so dx has no component along 1.
    x, axes, rng = case
    dy = rng.normal(size=x.shape)
    _, ctx = ng.normalize_forward(x, axes, eps=1e-3, eps_mode=eps_mode, ddof=ddof)
    dx = ng.normalize_backward(ctx, dy).x
    scale = np.max(np.abs(dx)) + np.max(np.abs(dy * ctx.rstd))
    assert np.all(np.abs(np.sum(dx, axis=axes)) <= 1e-11 * scale * dx.size)


@given(cases(), st.sampled_from(["inside", "outside"]), st.sampled_from([0, 1]))
def test_gradient_is_orthogonal_to_xhat_without_eps(case, eps_mode, ddof):
    # With eps = 0, y is also unchanged when a group is scaled about its mean.
    x, axes, rng = case
    dy = rng.normal(size=x.shape)
    _, ctx = ng.normalize_forward(x, axes, eps=0.0, eps_mode=eps_mode, ddof=ddof)
    xhat = (x - ctx.mean) * ctx.rstd
    dx = ng.normalize_backward(ctx, dy).x
    scale = np.max(np.abs(dx * xhat)) + np.max(np.abs(dy * ctx.rstd * xhat))
    assert np.all(np.abs(np.sum(dx * xhat, axis=axes)) <= 1e-10 * scale * dx.size)


@given(cases(), st.floats(0.01, 100.0), st.floats(-100.0, 100.0), st.sampled_from([0, 1]))
def test_invariant_under_positive_affine_maps_without_eps(case, a, b, ddof):
    x, axes, _ = case
    y = ng.normalize(x, axes, eps=0.0, ddof=ddof)
    np.testing.assert_allclose(ng.normalize(a * x + b, axes, eps=0.0, ddof=ddof), y, atol=1e-7)
