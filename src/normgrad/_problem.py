"""The original problem (docs/derivation.md, last section), ported faithfully to NumPy.

`problem_forward` is the question's `NormalizationForward`: mean and biased variance over
every element, eps inside the square root. `problem_backward` is the gradient its author
derived by the chain rule. It is wrong on purpose: normgrad's checker, CLI demo and docs use
it to show what goes wrong and where.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numpy.typing import NDArray

PROBLEM_EPS = 1e-5
# The question reports "max diff around 3.18" without its data. With dy = ones (the gradient
# of sum(output), whose true value is exactly 0) the derived gradient's largest element is
# about 1/sigma, so the author's matrix had a spread of about 1/3.18 = 0.314.
PROBLEM_SIGMA = 0.314


def problem_input(height: int = 28, width: int = 28, seed: int = 0) -> NDArray[np.float64]:
    """A matrix like the question's: positive activations with a spread of about 0.314."""
    rng = np.random.default_rng(seed)
    return 0.5 + PROBLEM_SIGMA * rng.standard_normal((height, width))


def problem_forward(x: NDArray[np.floating], epsilon: float = PROBLEM_EPS) -> NDArray[np.float64]:
    """`NormalizationForward` from the question, loop for loop."""
    h, w = x.shape
    n = h * w
    mean = 0.0
    for i in range(h):
        for j in range(w):
            mean += x[i, j]
    mean /= n
    var = 0.0
    for i in range(h):
        for j in range(w):
            var += (x[i, j] - mean) ** 2
    var /= n
    out = np.array(x, dtype=np.float64, copy=True)
    for i in range(h):
        for j in range(w):
            out[i, j] = (x[i, j] - mean) / np.sqrt(var + epsilon)
    return out


class ProblemTerms(NamedTuple):
    """The question's named quantities, evaluated (arrays have x's shape, scalars are floats).

    `doutput_dmu` and its parts are computed as the question writes them, though its gradient
    never uses them: that the mean path never reaches `x` is one of its mistakes."""

    n: int
    mu: float
    var: float
    y1: NDArray[np.float64]  # x - mu
    dy1_dx: float  # 1
    dy2_dy1: float  # 1/sqrt(var + eps)
    dvar_dx: NDArray[np.float64]  # 2 (x - mu)/N
    dy2_dvar: NDArray[np.float64]  # -1/2 y1/(var + eps)^(3/2)
    dy1_dmu: float  # -1
    dy2_dmu: float  # -1/(N (var + eps)^(3/2))
    dvar_dmu: float  # -2/N sum(x - mu): identically 0
    doutput_dmu: NDArray[np.float64]  # (dy2/dy1)(dy1/dmu) + (dy2/dvar)(dvar/dmu) + dy2/dmu
    doutput_dx: NDArray[np.float64]  # (dy2/dy1)(dy1/dx) + (dy2/dvar)(dvar/dx)


def problem_terms(x: NDArray[np.floating], epsilon: float = PROBLEM_EPS) -> ProblemTerms:
    """The question's chain rule, term by term (each name is the question's quantity)."""
    xf: NDArray[np.float64] = np.asarray(x, dtype=np.float64)
    n = xf.size
    mu = float(xf.mean())
    var = float(((xf - mu) ** 2).mean())
    y1 = xf - mu
    dy1_dx = 1.0
    dy2_dy1 = 1.0 / np.sqrt(var + epsilon)
    dvar_dx = 2.0 * y1 / n
    dy2_dvar = -0.5 * (y1 / (var + epsilon) ** 1.5)
    dy1_dmu = -1.0
    dy2_dmu = -1.0 / (n * (var + epsilon) ** 1.5)
    dvar_dmu = float(-2.0 / n * np.sum(y1))
    doutput_dmu = dy2_dy1 * dy1_dmu + dy2_dvar * dvar_dmu + dy2_dmu
    doutput_dx = dy2_dy1 * dy1_dx + dy2_dvar * dvar_dx
    return ProblemTerms(
        n,
        mu,
        var,
        y1,
        dy1_dx,
        dy2_dy1,
        dvar_dx,
        dy2_dvar,
        dy1_dmu,
        dy2_dmu,
        dvar_dmu,
        doutput_dmu,
        doutput_dx,
    )


def problem_backward(
    x: NDArray[np.floating], dy: NDArray[np.floating], epsilon: float = PROBLEM_EPS
) -> NDArray[np.float64]:
    """The question's gradient: `dy * dOutput/dx` (see `problem_terms`), for any shape.

    Its `dOutput/dmu` is computed as in the question but never reaches `x`: the question
    gives no step that carries it back, which is one of its mistakes.
    """
    return np.asarray(dy, dtype=np.float64) * problem_terms(x, epsilon).doutput_dx
