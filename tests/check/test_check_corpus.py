"""The checker against a corpus of wrong and correct backwards (tests/grad_corpus.py)."""

import numpy as np
import pytest
from _fd import fd_jacobian
from grad_corpus import Case, correct_cases, wrong_cases

from normgrad.check import KINDS, check_gradients
from normgrad.check._catalogue import PASSING, template_of

WRONG = wrong_cases()
CORRECT = correct_cases()


def test_corpus_covers_every_kind() -> None:
    assert {c.kind for c in WRONG} == set(KINDS)
    assert len(CORRECT) >= 20
    assert any(isinstance(c.x, tuple) for c in CORRECT)
    assert {np.asarray(c.x if not isinstance(c.x, tuple) else c.x[0]).dtype for c in CORRECT} == {
        np.dtype(np.float32),
        np.dtype(np.float64),
    }


@pytest.mark.parametrize("case", WRONG, ids=lambda c: c.name)
def test_wrong_backward_first_finding(case: Case) -> None:
    report = check_gradients(case.f, case.x, case.vjp, **case.kwargs)
    assert report.diagnosis[0].kind == case.kind, str(report)
    assert report.ok == (case.kind in PASSING), str(report)
    for finding in report.diagnosis:
        assert finding.kind in KINDS and finding.message
        if finding.kind != "ok":
            assert finding.hint
        assert template_of(finding) is not None, finding


@pytest.mark.parametrize("case", CORRECT, ids=lambda c: c.name)
def test_correct_backward_no_false_alarm(case: Case) -> None:
    report = check_gradients(case.f, case.x, case.vjp, **case.kwargs)
    assert report.ok, str(report)
    assert report.kinds == ["ok"], str(report)
    assert template_of(report.diagnosis[0]) is not None


def _vjp_by_fd(case: Case, dy: np.ndarray) -> np.ndarray:
    """Independent reference: J^T dy from tests/_fd.py (fourth-order differences, float64)."""
    xs = case.x if isinstance(case.x, tuple) else (case.x,)
    flat = np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in xs])
    offs = np.cumsum([0] + [a.size for a in xs])

    def g(v: np.ndarray) -> np.ndarray:
        parts = [v[offs[i] : offs[i + 1]].reshape(a.shape) for i, a in enumerate(xs)]
        return np.asarray(case.f(*parts), dtype=np.float64).ravel()

    jac = fd_jacobian(g, flat)
    return jac.T @ dy.ravel()


@pytest.mark.parametrize(
    "case", [c for c in CORRECT if "float32" not in c.name][:12], ids=lambda c: c.name
)
def test_corpus_correct_backwards_match_independent_fd(case: Case) -> None:
    xs = case.x if isinstance(case.x, tuple) else (case.x,)
    y = np.asarray(case.f(*xs))
    dy = np.random.default_rng(5).standard_normal(y.shape)
    out = case.vjp(*xs, dy)
    got = np.concatenate([np.ravel(o) for o in (out if isinstance(out, tuple) else (out,))])
    np.testing.assert_allclose(got, _vjp_by_fd(case, dy), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "case", [c for c in WRONG if c.kind not in ("ok", "fd_noise")], ids=lambda c: c.name
)
def test_corpus_wrong_backwards_are_really_wrong(case: Case) -> None:
    xs = case.x if isinstance(case.x, tuple) else (case.x,)
    y = np.asarray(case.f(*xs))
    dy = np.random.default_rng(6).standard_normal(y.shape)
    dy0 = dy.copy()
    out = case.vjp(*xs, dy)
    got = np.concatenate([np.ravel(o) for o in (out if isinstance(out, tuple) else (out,))])
    if case.kind == "mutates_input":  # right values, written over the caller's dy
        assert np.any(dy != dy0)
    elif case.kind == "dtype":  # right values in the wrong dtype
        assert got.dtype != xs[0].dtype
    elif case.kind == "nondeterministic":  # any one call may be right: two calls differ
        again = case.vjp(*xs, dy)
        flat = np.concatenate(
            [np.ravel(o) for o in (again if isinstance(again, tuple) else (again,))]
        )
        assert np.any(flat != got)
    else:
        assert not np.max(np.abs(got - _vjp_by_fd(case, dy))) <= 1e-3  # NaN counts as wrong
