"""Central finite differences in float64: the independent reference for the op's tests."""

from collections.abc import Callable

import numpy as np


def fd_jacobian(
    f: Callable[[np.ndarray], np.ndarray], x: np.ndarray, h: float = 1e-6
) -> np.ndarray:
    """Dense d f(x) / d x with shape f(x).shape + x.shape (fourth-order central differences)."""
    x = np.asarray(x, dtype=np.float64)
    y0 = f(x)
    jac = np.zeros(y0.shape + x.shape)
    for idx in np.ndindex(x.shape):
        e = np.zeros_like(x)
        e[idx] = h
        jac[(..., *idx)] = (8 * (f(x + e) - f(x - e)) - (f(x + 2 * e) - f(x - 2 * e))) / (12 * h)
    return jac


def fd_directional(
    f: Callable[[np.ndarray], np.ndarray], x: np.ndarray, v: np.ndarray, h: float = 1e-5
) -> np.ndarray:
    """d/dt f(x + t v) at t = 0 (fourth-order central differences)."""
    return (8 * (f(x + h * v) - f(x - h * v)) - (f(x + 2 * h * v) - f(x - 2 * h * v))) / (12 * h)
