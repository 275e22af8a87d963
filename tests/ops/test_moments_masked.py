"""`normgrad.moments` with `mask=` / `nan_policy=`, and on Dask arrays (chunk moments merged
as a tree): against NumPy masked arrays and the NumPy result."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import normgrad as ng
from normgrad import NormgradError


def _masked_ref(x, mask, axes):
    xm = np.ma.array(x, mask=~np.broadcast_to(mask, x.shape))
    count = np.sum(np.broadcast_to(mask, x.shape), axis=axes, keepdims=True).astype(float)
    mean = xm.mean(axis=axes, keepdims=True)
    m2 = ((xm - mean) ** 2).sum(axis=axes, keepdims=True)
    return count, np.ma.filled(mean, np.nan), np.ma.filled(m2, 0.0)


def _close(m, ref, rtol=1e-12, atol=1e-12):
    for a, b in zip(m, ref, strict=True):
        np.testing.assert_allclose(np.asarray(a), b, rtol=rtol, atol=atol, equal_nan=True)


@pytest.mark.parametrize(("shape", "axes"), [((12,), None), ((4, 9), 1), ((5, 3, 4), (0, 2))])
def test_masked_moments_match_masked_arrays(rng, shape, axes):
    x = rng.normal(size=shape) * 4 + 3
    mask = rng.random(shape) < 0.6
    ax = ng._axes.normalize_axes(axes, len(shape))
    m = ng.moments(x, axes, mask=mask)
    _close(m, _masked_ref(x, mask, ax))
    var1 = np.ma.array(x, mask=~mask).var(axis=ax, ddof=1, keepdims=True)
    np.testing.assert_allclose(m.var(1), np.ma.filled(var1, np.nan), rtol=1e-12, equal_nan=True)


def test_omit_equals_nanmean_nanvar(rng):
    x = rng.normal(size=(6, 10))
    x[rng.random(x.shape) < 0.3] = np.nan
    m = ng.moments(x, 1, nan_policy="omit")
    np.testing.assert_allclose(m.mean, np.nanmean(x, axis=1, keepdims=True), rtol=1e-13)
    np.testing.assert_allclose(m.var(1), np.nanvar(x, axis=1, ddof=1, keepdims=True), rtol=1e-12)
    with pytest.raises(NormgradError, match="first at index"):
        ng.moments(x, 1, nan_policy="raise")
    with pytest.raises(NormgradError, match="nan_policy must be"):
        ng.moments(x, 1, nan_policy="skip")


def test_an_empty_group_has_count_zero_and_merges_away(rng):
    x = rng.normal(size=(2, 5))
    mask = np.array([[False] * 5, [True] * 5])
    m = ng.moments(x, 1, mask=mask)
    assert m.count[0, 0] == 0 and np.isnan(m.mean[0, 0]) and np.isnan(m.var()[0, 0])
    other = ng.moments(x, 1, mask=~mask)  # row 0 only
    _close(m.merge(other), ng.moments(x, 1), rtol=1e-15, atol=1e-15)


_rows = st.lists(st.tuples(st.floats(-1e6, 1e6), st.booleans()), min_size=1, max_size=12)


@settings(max_examples=40, deadline=None)
@given(_rows, _rows)
def test_masked_moments_of_a_concatenation_are_the_merged_moments(a, b):
    xa, ma = np.array([v for v, _ in a]), np.array([k for _, k in a])
    xb, mb = np.array([v for v, _ in b]), np.array([k for _, k in b])
    whole = ng.moments(np.concatenate([xa, xb]), mask=np.concatenate([ma, mb]))
    merged = ng.moments(xa, mask=ma).merge(ng.moments(xb, mask=mb))
    n = max(1.0, float(whole.count[0]))
    np.testing.assert_array_equal(merged.count, whole.count)
    if whole.count[0] > 0:
        np.testing.assert_allclose(merged.mean, whole.mean, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(merged.m2, whole.m2, rtol=1e-8, atol=1e-6 * n)


@pytest.mark.parametrize("chunks", [(3, 4), (7, 1), (2, 13)])
@pytest.mark.parametrize("axes", [1, 0, None])
def test_dask_reduces_chunk_by_chunk(rng, chunks, axes):
    da = pytest.importorskip("dask.array")
    x = rng.normal(size=(7, 13)) + 1e7
    mask = rng.random(x.shape) < 0.7
    xd = da.from_array(x, chunks=chunks)
    for mk in (None, mask, da.from_array(mask, chunks=(4, 4))):
        m = ng.moments(xd, axes, mask=mk)
        assert isinstance(m.m2, da.Array)  # lazy: nothing computed yet
        ref = ng.moments(x, axes, mask=None if mk is None else mask)
        _close(m, ref, rtol=1e-9, atol=1e-6)
        np.testing.assert_allclose(np.asarray(m.var(1)), ref.var(1), rtol=1e-7)  # (x ulp 2e-9)


def test_dask_graph_merges_as_a_tree(rng):
    """16 chunks along the reduced axis: each final value depends on the chunks through
    log2(16) = 4 levels of merges, never one task over all chunks."""
    da = pytest.importorskip("dask.array")
    x = da.from_array(rng.normal(size=(2, 64)), chunks=(2, 4))
    m = ng.moments(x, 1)
    graph = dict(m.m2.__dask_graph__())
    blocks = [k for k in graph if isinstance(k, tuple) and k[0].startswith("_block_moments")]
    assert len(blocks) == 16
    np.testing.assert_allclose(np.asarray(m.var()), np.asarray(x).var(axis=1, keepdims=True))
