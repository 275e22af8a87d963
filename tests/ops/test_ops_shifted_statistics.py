"""Statistics are taken about each group's first element, on every path: a constant group has
exactly zero variance, and a huge offset neither overflows nor loses the spread."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import normgrad as ng

PATHS = [pytest.param(False, id="generic"), pytest.param(True, id="kernels")]


@pytest.mark.parametrize("kernels", PATHS)
@pytest.mark.parametrize("n", [3, 100, 70_000])
def test_constant_group_is_zero_variance_even_when_its_mean_rounds(kernels, n):
    x = np.full(n, 0.1)  # mean(0.1, 0.1, 0.1) is not 0.1 in float64
    with ng.use_kernels(kernels):
        with pytest.raises(ng.NormgradError, match="zero variance and eps=0"):
            ng.normalize(x, eps=0.0)
        y, ctx = ng.normalize_forward(x, eps=1e-3, eps_mode="outside")
    assert ctx.var.item() == 0.0 and ctx.mean.item() == 0.1
    assert np.all(y == 0.0)


@pytest.mark.parametrize("kernels", PATHS)
def test_one_constant_row_among_others_is_refused_with_eps_zero(kernels):
    x = np.random.default_rng(0).standard_normal((2, 70_000))
    x[0] = 0.1
    with ng.use_kernels(kernels), pytest.raises(ng.NormgradError, match="zero variance"):
        ng.normalize(x, -1, eps=0.0)


@pytest.mark.parametrize("n", [1000, 70_000])
def test_huge_offset_with_small_spread(n):
    rng = np.random.default_rng(0)
    spread = rng.standard_normal(n)
    x = 1e155 * (1 + 1e-6 * spread)  # squares of x - mean(x) would overflow without the shift
    results = []
    for kernels in (False, True):
        with ng.use_kernels(kernels):
            results.append(ng.normalize(x))
    for y in results:
        assert np.all(np.isfinite(y))
        np.testing.assert_allclose(y, ng.normalize(1e6 * spread, eps=0.0), atol=1e-6)
    np.testing.assert_allclose(results[0], results[1], atol=1e-12)


# float32 on the kernels: one pass of float64 sums shifted by each block's first element
# (`_formulas.shifted_moments`), whose error bound (n^2 eps per 2048-element block) is far
# below float32's ulp, whatever the offset, the spread or an outlier's place.


def test_shifted_moments_formula():
    from normgrad._formulas import shifted_moments

    assert shifted_moments(4.0, 0.0, 0.0) == (0.0, 0.0)  # a constant block
    d = np.array([0.0, 1.0, 3.0, -2.0])
    mean, m2 = shifted_moments(4.0, d.sum(), (d * d).sum())
    assert mean == d.mean() and m2 == pytest.approx(((d - d.mean()) ** 2).sum(), rel=1e-15)
    assert shifted_moments(2.0, 1.0, np.nextafter(0.5, 0.0)) == (0.5, 0.0)  # below 0: clamped
    assert np.isnan(shifted_moments(2.0, np.nan, 1.0)[1])
    assert np.isnan(shifted_moments(2.0, 1.0, np.nan)[1])


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 5000),
    offset=st.sampled_from([0.0, 1e3, -1e5, 1e6]),
    scale=st.sampled_from([1e-3, 1.0, 1e4]),
    outlier=st.tuples(st.floats(0, 1), st.sampled_from([0.0, 1e3, -1e6])),
    seed=st.integers(0, 2**32 - 1),
)
def test_float32_statistics_match_float64_two_pass(n, offset, scale, outlier, seed):
    rng = np.random.default_rng(seed)
    x = (offset + scale * rng.standard_normal((3, n))).astype(np.float32)
    where, size = outlier
    x[1, int(where * (n - 1))] += np.float32(size * scale)
    x[2] = x[2, 0]  # a constant row
    with ng.use_kernels(True):
        _, ctx = ng.normalize_forward(x, -1)
    x64 = x.astype(np.float64)
    mean = x64.mean(-1, keepdims=True)
    var = ((x64 - mean) ** 2).mean(-1, keepdims=True)
    assert ctx.var[2, 0] == 0.0 and ctx.mean[2, 0] == x64[2, 0]
    np.testing.assert_allclose(ctx.mean, mean, rtol=1e-12, atol=1e-12 * np.abs(x64).max())
    np.testing.assert_allclose(ctx.var, var, rtol=1e-9, atol=0)
