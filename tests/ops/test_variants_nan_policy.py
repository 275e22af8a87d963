"""`nan_policy=`: "omit" against scipy.stats.zscore(..., nan_policy="omit") and a mask of
~isnan(x); "raise" names the first NaN; unknown values are refused."""

import numpy as np
import pytest

import normgrad as ng
from normgrad import NormgradError


def _with_nans(rng, shape, frac=0.25):
    x = rng.normal(size=shape) * 3 + 2
    x[rng.random(shape) < frac] = np.nan
    return x


@pytest.mark.parametrize(("shape", "axis"), [((9,), 0), ((4, 7), 1), ((6, 5), 0), ((3, 4, 5), 2)])
@pytest.mark.parametrize("ddof", [0, 1])
def test_omit_equals_scipy_zscore(rng, shape, axis, ddof):
    stats = pytest.importorskip("scipy.stats")
    x = _with_nans(rng, shape)
    y = ng.normalize(x, axis, eps=0, ddof=ddof, nan_policy="omit")
    ref = stats.zscore(x, axis=axis, ddof=ddof, nan_policy="omit")
    assert np.array_equal(np.isnan(y), np.isnan(x))
    np.testing.assert_allclose(y, ref, rtol=1e-12, atol=1e-13, equal_nan=True)


def test_omit_is_the_mask_of_present_values(rng):
    x = _with_nans(rng, (5, 8))
    w, b = rng.normal(size=8), rng.normal(size=8)
    y, ctx = ng.normalize_forward(x, 1, weight=w, bias=b, nan_policy="omit")
    filled = np.where(np.isnan(x), 0.0, x)
    y0, ctx0 = ng.normalize_forward(filled, 1, weight=w, bias=b, mask=~np.isnan(x))
    np.testing.assert_array_equal(y[~np.isnan(x)], y0[~np.isnan(x)])
    # a cotangent that leaves out the NaN outputs (a masked loss): finite gradients, those of
    # the same data with the NaN places filled and masked
    dy = np.where(np.isnan(x), 0.0, rng.normal(size=x.shape))
    g, g0 = ng.normalize_backward(ctx, dy), ng.normalize_backward(ctx0, dy)
    assert np.isfinite(g.x).all() and np.isfinite(g.weight).all()
    np.testing.assert_allclose(g.x, g0.x, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(g.weight, g0.weight, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(g.bias, g0.bias, rtol=1e-13)


def test_omit_with_a_mask_combines_both(rng):
    x = _with_nans(rng, (4, 10))
    mask = rng.random(x.shape) < 0.7
    both = np.logical_and(mask, ~np.isnan(x))
    y = ng.normalize(x, 1, mask=mask, nan_policy="omit")
    y0 = ng.normalize(np.where(np.isnan(x), 0.0, x), 1, mask=both)
    np.testing.assert_array_equal(y[~np.isnan(x)], y0[~np.isnan(x)])


def test_propagate_is_unchanged(rng):
    x = rng.normal(size=(3, 6))
    x[1, 2] = np.nan
    y = ng.normalize(x, 1, nan_policy="propagate")
    assert np.isnan(y[1]).all() and np.isfinite(y[[0, 2]]).all()
    np.testing.assert_array_equal(y, ng.normalize(x, 1))


def test_raise_names_the_first_nan(rng):
    x = rng.normal(size=(3, 4, 5))
    x[1, 2, 3] = x[2, 0, 0] = np.nan
    with pytest.raises(NormgradError, match=r"index \(1, 2, 3\)"):
        ng.normalize(x, 2, nan_policy="raise")
    clean = rng.normal(size=(3, 4))
    np.testing.assert_array_equal(
        ng.normalize(clean, 1, nan_policy="raise"), ng.normalize(clean, 1)
    )


@pytest.mark.parametrize("policy", ["ignore", "OMIT", None, 1])
def test_unknown_policy_is_refused(policy):
    with pytest.raises(NormgradError, match="nan_policy must be"):
        ng.normalize(np.ones((2, 3)), 1, nan_policy=policy)


def test_raise_on_dask_and_torch(rng):
    da = pytest.importorskip("dask.array")
    torch = pytest.importorskip("torch")
    x = rng.normal(size=(6, 8))
    x[4, 5] = np.nan
    with pytest.raises(NormgradError, match=r"index \(4, 5\)"):
        ng.normalize(da.from_array(x, chunks=(3, 3)), 1, nan_policy="raise")
    with pytest.raises(NormgradError, match=r"index \(4, 5\)"):
        ng.moments(torch.tensor(x), 1, nan_policy="raise")
    clean = np.nan_to_num(x)
    y = ng.normalize(da.from_array(clean, chunks=(3, 3)), 1, nan_policy="raise")
    np.testing.assert_allclose(np.asarray(y), ng.normalize(clean, 1), rtol=1e-13)
