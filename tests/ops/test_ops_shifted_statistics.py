"""Statistics are taken about each group's first element, on every path: a constant group has
exactly zero variance, and a huge offset neither overflows nor loses the spread."""

import numpy as np
import pytest

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
