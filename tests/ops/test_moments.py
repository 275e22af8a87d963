"""`normgrad.moments` and `Moments.merge` / `concat`: against NumPy's two-pass statistics,
exact merging at large offsets, and hypothesis properties of the merge."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import normgrad as ng
from normgrad import NormgradError


def _close(a, b, rtol=1e-12, atol=1e-12):
    for f in ("count", "mean", "m2"):
        np.testing.assert_allclose(getattr(a, f), getattr(b, f), rtol=rtol, atol=atol)


def test_moments_match_numpy(rng):
    x = rng.normal(size=(3, 4, 5)).astype(np.float32)
    m = ng.moments(x, (0, 2))
    x64 = x.astype(np.float64)
    assert m.mean.dtype == np.float64 and m.mean.shape == (1, 4, 1)
    np.testing.assert_array_equal(m.count, 15.0)
    np.testing.assert_allclose(m.mean, x64.mean(axis=(0, 2), keepdims=True), rtol=1e-14)
    np.testing.assert_allclose(m.var(), x64.var(axis=(0, 2), keepdims=True), rtol=1e-13)
    np.testing.assert_allclose(m.var(1), x64.var(axis=(0, 2), ddof=1, keepdims=True), rtol=1e-13)
    assert ng.moments(x).mean.shape == (1, 1, 1)


def test_var_with_too_few_elements_is_nan():
    m = ng.moments(np.array([[1.0], [2.0]]), 1)
    assert np.all(np.isnan(m.var(1))) and np.all(m.var(0) == 0)


def test_merge_is_exact_at_a_large_offset(rng):
    x = rng.normal(size=(2, 1000)) + 1e9
    parts = [ng.moments(x[:, i : i + 7], 1) for i in range(0, 1000, 7)]
    merged = parts[0]
    for p in parts[1:]:
        merged = merged.merge(p)
    ref = np.var(x - 1e9, axis=1, keepdims=True)  # (x - 1e9 is exact here)
    np.testing.assert_allclose(merged.var(), ref, rtol=1e-6)
    naive = np.mean(x * x, axis=1, keepdims=True) - np.mean(x, axis=1, keepdims=True) ** 2
    assert np.max(np.abs(naive - ref)) > 1.0  # what the one-pass formula would give


def test_merging_an_empty_part_changes_nothing(rng):
    m = ng.moments(rng.normal(size=(3, 4)), 1)
    empty = ng.Moments(np.zeros_like(m.count), np.full_like(m.mean, np.inf), np.zeros_like(m.m2))
    _close(m.merge(empty), m, rtol=0, atol=0)
    _close(empty.merge(m), m, rtol=0, atol=0)


def test_concat_along_a_kept_axis(rng):
    a, b = rng.normal(size=(3, 6)), rng.normal(size=(2, 6))
    _close(ng.moments(a, 1).concat(ng.moments(b, 1), 0), ng.moments(np.concatenate([a, b]), 1))


def test_on_torch_tensors(rng):
    torch = pytest.importorskip("torch")
    x = rng.normal(size=(4, 9))
    m = ng.moments(torch.tensor(x[:, :4]), 1).merge(ng.moments(torch.tensor(x[:, 4:]), 1))
    np.testing.assert_allclose(m.var().numpy(), x.var(axis=1, keepdims=True), rtol=1e-13)


def test_bad_pairs_are_refused(rng):
    a, b = ng.moments(rng.normal(size=(3, 4)), 1), ng.moments(rng.normal(size=(2, 4)), 1)
    with pytest.raises(NormgradError, match=r"same groups: shapes \(3, 1\) and \(2, 1\)"):
        a.merge(b)
    with pytest.raises(NormgradError, match="takes another Moments"):
        a.merge((1, 2))
    with pytest.raises(NormgradError, match="along a kept axis"):
        a.concat(a, 1)


_chunks = st.lists(
    st.lists(st.floats(-1e6, 1e6), min_size=0, max_size=6).map(np.array), min_size=3, max_size=6
)


def _of(values):
    if values.size == 0:
        return ng.Moments(np.zeros((1,)), np.zeros((1,)), np.zeros((1,)))
    return ng.moments(values)


@settings(max_examples=60, deadline=None)
@given(_chunks, st.randoms(use_true_random=False))
def test_merge_is_associative_order_free_and_equals_the_concatenation(chunks, random):
    ms = [_of(c) for c in chunks]
    left = ms[0]
    for m in ms[1:]:
        left = left.merge(m)
    right = ms[-1]
    for m in reversed(ms[:-1]):
        right = m.merge(right)
    order = list(range(len(ms)))
    random.shuffle(order)
    shuffled = ms[order[0]]
    for i in order[1:]:
        shuffled = shuffled.merge(ms[i])
    scale = 1e6 * max(1, sum(c.size for c in chunks))
    for other in (right, shuffled):
        _close(left, other, rtol=1e-9, atol=1e-9 * scale)
    allx = np.concatenate(chunks)
    if allx.size:
        _close(left, ng.moments(allx), rtol=1e-9, atol=1e-9 * scale)
