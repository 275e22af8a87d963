"""The numbers printed in docs/derivation.md are recomputed here from normgrad and the
problem's faithful port: if the doc or the code changes, they must still agree."""

from pathlib import Path

import numpy as np
import pytest

import normgrad as ng
from normgrad._problem import problem_backward, problem_forward, problem_input

DOC = (Path(__file__).parents[2] / "docs" / "derivation.md").read_text()
X = np.array([[1.0, 3.0], [5.0, 7.0]])


def _in_doc(value: float) -> None:
    # signs are written as subtractions in the tables, so look for the magnitude
    text = f"{abs(value):.6f}"
    assert text in DOC, f"{value:.6f} is not printed in docs/derivation.md"


def test_statistics_and_output():
    y, ctx = ng.normalize_forward(X, eps=0.0)
    assert ctx.mean.item() == 4.0 and ctx.var.item() == 5.0
    _in_doc(ctx.rstd.item())
    for v in y.ravel():
        _in_doc(v)
    np.testing.assert_allclose(problem_forward(X, 0.0), y, rtol=1e-15)


def test_all_ones_dy_true_gradient_is_zero_and_theirs_is_not():
    _, ctx = ng.normalize_forward(X, eps=0.0)
    dy = np.ones_like(X)
    np.testing.assert_allclose(ng.normalize_backward(ctx, dy).x, 0.0, atol=1e-15)
    theirs = problem_backward(X, dy, 0.0)
    for v in theirs.ravel():
        _in_doc(v)


def test_first_row_of_the_jacobian_term_by_term():
    _, ctx = ng.normalize_forward(X, eps=0.0)
    dy = np.array([[1.0, 0.0], [0.0, 0.0]])
    true = ng.normalize_backward(ctx, dy).x.ravel()
    np.testing.assert_allclose(true, ng.normalize_jacobian(X, eps=0.0)[0, 0].ravel())
    r, n = ctx.rstd.item(), X.size
    xhat = ((X - 4.0) * r).ravel()
    direct = np.array([r, 0, 0, 0])
    mean_path = np.full(4, -r / n)
    variance_path = -(r / n) * xhat[0] * xhat
    np.testing.assert_allclose(direct + mean_path + variance_path, true, atol=1e-15)
    for v in [*true, -r / n, *variance_path]:
        _in_doc(v)
    theirs = problem_backward(X, dy, 0.0).ravel()
    np.testing.assert_allclose(theirs[1:], 0.0)
    _in_doc(theirs[0])
    assert np.isclose(true.sum(), 0.0, atol=1e-15)


@pytest.mark.parametrize("term", ["identically zero", "diagonal", "mean's path is missing"])
def test_the_doc_names_the_mistakes(term):
    assert term in DOC.replace("**", "")


def test_the_reported_max_diff_is_reproduced():
    x = problem_input()
    diff = np.max(np.abs(problem_backward(x, np.ones_like(x))))
    assert 3.1 < diff < 3.25 and "3.17" in DOC
    assert f"{diff:.2f}" == "3.17"
