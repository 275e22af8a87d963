"""Probe mode localizes and names: wrong elements isolated to single indices among 10^6 by
adaptive group testing (`check/_localize.py`), a diagonal-only backward named `diagonal`."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import normgrad
from normgrad._problem import problem_backward, problem_forward
from normgrad.check import LOCALIZE_BUDGET, check_gradients

N = 10**6


def poly(x):
    return 0.5 * x * x + x


def poly_vjp(x, dy):
    return (x + 1) * dy


def planted(k: int, seed: int, n: int = N) -> np.ndarray:
    return np.sort(np.random.default_rng(seed).choice(n, k, replace=False))


@pytest.mark.parametrize("k", [1, 3, 10])
def test_wrong_elements_isolated_among_a_million(k: int) -> None:
    x = np.random.default_rng(k).standard_normal(N)
    bad = planted(k, 100 + k)
    factors = np.random.default_rng(k).choice([0.0, 3.0, -1.0, 1.5], k)

    def vjp(x, dy):
        dx = poly_vjp(x, dy)
        dx[bad] *= factors
        return dx

    report = check_gradients(poly, x, vjp)
    assert report.mode == "probe" and not report.ok
    first = report.diagnosis[0]
    assert first.kind == "partial", str(report)
    assert first.evidence["indices"] == [(int(j),) for j in bad], str(report)
    assert first.evidence["evaluations"] <= LOCALIZE_BUDGET
    assert report.n_evals <= 1000
    assert report.worst_index == (int(bad[0]),)


def test_wrong_elements_of_a_normalization_with_small_groups() -> None:
    x = np.random.default_rng(7).standard_normal((10**4, 8))
    bad = planted(3, 8, x.size)

    def vjp(v, dy):
        dx = normgrad.normalize_backward(normgrad.normalize_forward(v, -1)[1], dy).x
        dx.flat[bad] *= 3.0
        return dx

    report = check_gradients(lambda v: normgrad.normalize(v, -1), x, vjp, mode="probe")
    want = [tuple(int(i) for i in np.unravel_index(j, x.shape)) for j in bad]
    assert report.kinds == ["partial"] and report.diagnosis[0].evidence["indices"] == want


def test_the_budget_running_out_leaves_index_sets() -> None:
    x = np.random.default_rng(1).standard_normal(N // 10)
    bad = planted(10, 2, x.size)

    def vjp(x, dy):
        dx = poly_vjp(x, dy)
        dx[bad] = 0.0
        return dx

    report = check_gradients(poly, x, vjp, budgets={"localize_budget": 40})
    first = report.diagnosis[0]
    assert first.kind == "partial" and "budget ran out" in first.message
    assert 0 < first.evidence["evaluations"] <= 40
    for lo, hi in first.evidence["ranges"]:  # every set left holds a planted element
        assert np.any((bad >= lo[0]) & (bad <= hi[0]))


def test_a_spread_out_mismatch_is_unknown_not_partial() -> None:
    x = np.random.default_rng(3).standard_normal(10**4)
    report = check_gradients(
        poly, x, lambda x, dy: poly_vjp(x, dy) * (1 + 0.01 * np.sin(x)), mode="probe"
    )
    assert report.kinds == ["unknown"], str(report)


def whole_norm(x):
    d = x - x.mean()
    return d / np.sqrt((d * d).mean() + 1e-5)


def whole_norm_diagonal(x, dy):
    """The question's mistake, vectorized: only ∂y_i/∂x_i, through 1/σ (no mean or variance
    path)."""
    d = x - x.mean()
    return dy / np.sqrt((d * d).mean() + 1e-5)


def test_diagonal_only_backward_named_in_probe_mode() -> None:
    x = np.random.default_rng(4).standard_normal((1000, 1000))
    report = check_gradients(whole_norm, x, whole_norm_diagonal)
    assert report.mode == "probe" and report.kinds == ["diagonal"], str(report)
    assert "probe mode" in report.diagnosis[0].message
    assert report.n_evals < 100
    small = problem_forward, np.random.default_rng(4).standard_normal((40, 40)), problem_backward
    assert check_gradients(*small, mode="probe").kinds == ["diagonal"]


def test_softmax_diagonal_and_elementwise_partial_in_probe_mode() -> None:
    x = np.random.default_rng(5).standard_normal((300, 10))

    def sm(v):
        e = np.exp(v - v.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    def diag_vjp(v, dy):
        s = sm(v)
        return s * (1 - s) * dy

    assert check_gradients(sm, x, diag_vjp, mode="probe").kinds == ["diagonal"]

    # An elementwise f is diagonal itself: a diagonal backward with one wrong element is
    # `partial`, not `diagonal`.
    def one_wrong(v, dy):
        dx = (1 - np.tanh(v) ** 2) * dy
        dx[3, 4] = 0.0
        return dx

    report = check_gradients(np.tanh, x, one_wrong, mode="probe")
    assert report.kinds == ["partial"] and report.diagnosis[0].evidence["indices"] == [(3, 4)]


@pytest.mark.parametrize(
    ("make", "kind", "words"),
    [
        ("no_mean", "missing_term", "the mean path"),
        ("no_var", "missing_term", "the variance path"),
        ("quarter_var", "coefficient", "variance-path term is 1/4×"),
    ],
)
def test_normalization_mistakes_named_in_probe_mode(make: str, kind: str, words: str) -> None:
    from grad_corpus import norm_coefficients, norm_f, norm_no_mean_path, norm_no_var_path

    vjps = {
        "no_mean": norm_no_mean_path(-1),
        "no_var": norm_no_var_path(-1),
        "quarter_var": norm_coefficients(-1, 1.0, 0.25),
    }
    x = np.random.default_rng(9).standard_normal((300, 10))
    report = check_gradients(norm_f(-1), x, vjps[make], mode="probe")
    assert report.kinds == [kind], str(report)
    assert words in report.diagnosis[0].message
    assert any("Jacobian block of one group of 10 elements" in n for n in report.notes)


def test_the_group_block_is_not_used_for_non_normalizations() -> None:
    x = np.random.default_rng(10).standard_normal((200, 6))

    def sm(v):
        e = np.exp(v - v.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    def half_coupling(v, g):
        s = sm(v)
        return s * (g - 0.5 * (g * s).sum(-1, keepdims=True))

    report = check_gradients(sm, x, half_coupling, mode="probe")
    assert "coefficient" not in report.kinds and not report.ok


def test_tuple_inputs_get_per_input_findings_in_probe_mode() -> None:
    rng = np.random.default_rng(11)
    a, b = rng.standard_normal((40, 30)), rng.standard_normal((30, 50))

    def f(a, b):
        return a @ b

    right = check_gradients(f, (a, b), lambda a, b, g: (g @ b.T, a.T @ g), mode="probe")
    assert right.kinds == ["ok"]
    sign = check_gradients(f, (a, b), lambda a, b, g: (g @ b.T, -(a.T @ g)), mode="probe")
    assert sign.kinds == ["sign"] and sign.diagnosis[0].evidence["input"] == "[1]", str(sign)
    assert "[0] right" in sign.diagnosis[0].message
    two = check_gradients(f, (a, b), lambda a, b, g: (2 * g @ b.T, 4 * a.T @ g), mode="probe")
    got = [(d.kind, d.evidence["input"], d.evidence["factor"]) for d in two.diagnosis]
    assert got == [("scale", "[0]", 2.0), ("scale", "[1]", 4.0)], str(two)
    both = check_gradients(f, (a, b), lambda a, b, g: (2 * g @ b.T, 2 * a.T @ g), mode="probe")
    assert both.kinds == ["scale"] and "input" not in both.diagnosis[0].evidence


@settings(max_examples=10, deadline=None)
@given(
    n=st.integers(2000, 30000),
    k=st.integers(1, 10),
    seed=st.integers(0, 2**16),
    factor=st.sampled_from([0.0, -1.0, 2.0, 1.1]),
)
def test_group_testing_isolates_any_few_wrong_elements(n, k, seed, factor) -> None:
    rng = np.random.default_rng(seed)
    x = 0.5 + rng.random(n)  # f' = x + 1 >= 1.5: every planted factor changes dx
    bad = np.sort(rng.choice(n, k, replace=False))

    def vjp(x, dy):
        dx = poly_vjp(x, dy)
        dx[bad] *= factor
        return dx

    report = check_gradients(poly, x, vjp, mode="probe", seed=seed)
    assert report.kinds == ["partial"], str(report)
    assert report.diagnosis[0].evidence["indices"] == [(int(j),) for j in bad]
