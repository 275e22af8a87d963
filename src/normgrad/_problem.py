"""The original problem (docs/derivation.md, last section), ported faithfully to NumPy.

`problem_forward` is the question's `NormalizationForward`: mean and biased variance over
every element, eps inside the square root. `problem_backward` is the gradient its author
derived by the chain rule. It is wrong on purpose: normgrad's checker, CLI demo and docs use
it to show what goes wrong and where.
"""

from __future__ import annotations

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


def problem_backward(
    x: NDArray[np.floating], dy: NDArray[np.floating], epsilon: float = PROBLEM_EPS
) -> NDArray[np.float64]:
    """The question's chain rule, term by term (each line names the question's quantity).

    Its `dOutput/dmu` is computed as in the question but never reaches `x`: the question
    gives no step that carries it back, which is one of its mistakes.
    """
    x = np.asarray(x, dtype=np.float64)
    n = x.size
    mu = x.mean()
    var = ((x - mu) ** 2).mean()
    y1 = x - mu
    dy1_dx = 1.0
    dy2_dy1 = 1.0 / np.sqrt(var + epsilon)
    dvar_dx = 2.0 * (x - mu) / n
    dy2_dvar = -0.5 * (y1 / (var + epsilon) ** 1.5)
    # The question's mean path (unused below, as in the question):
    dy1_dmu = -1.0
    dy2_dmu = -1.0 / (n * (var + epsilon) ** 1.5)
    dvar_dmu = -2.0 / n * np.sum(x - mu)  # identically 0: sum(x - mu) = 0
    _doutput_dmu = dy2_dy1 * dy1_dmu + dy2_dvar * dvar_dmu + dy2_dmu
    doutput_dx = dy2_dy1 * dy1_dx + dy2_dvar * dvar_dx
    return np.asarray(dy, dtype=np.float64) * doutput_dx
