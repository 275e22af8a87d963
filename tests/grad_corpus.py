"""A corpus of backwards for the gradient checker: deliberately wrong ones, each labelled with
the finding it must produce first, and correct ones that must pass with no alarm.

Every function is written here in plain NumPy (or is normgrad's own op); every correct backward
is the textbook formula, itself checked against float64 finite differences by the tests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import normgrad
from normgrad._problem import problem_backward, problem_forward, problem_input

EPS = 1e-5


@dataclass
class Case:
    name: str
    f: Callable[..., Any]
    x: Any
    vjp: Callable[..., Any]
    kind: str = "ok"  # the expected first finding
    kwargs: dict[str, Any] = field(default_factory=dict)


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


# --- normalization (normgrad's op) -----------------------------------------------------------


def norm_f(axes: Any) -> Callable[..., Any]:
    return lambda x: normgrad.normalize(x, axes)


def norm_vjp(axes: Any) -> Callable[..., Any]:
    def vjp(x: Any, dy: Any) -> Any:
        return normgrad.normalize_backward(normgrad.normalize_forward(x, axes)[1], dy).x

    return vjp


def _stats(x: Any, axes: Any) -> tuple[Any, Any]:
    x64 = np.asarray(x, dtype=np.float64)
    d = x64 - x64.mean(axis=axes, keepdims=True)
    r = 1 / np.sqrt((d * d).mean(axis=axes, keepdims=True) + EPS)
    return d * r, r


def norm_no_mean_path(axes: Any) -> Callable[..., Any]:
    """Forgets that every x_j moves the mean: drops the -mean(g) term."""

    def vjp(x: Any, g: Any) -> Any:
        xhat, r = _stats(x, axes)
        return r * (g - xhat * (g * xhat).mean(axis=axes, keepdims=True))

    return vjp


def norm_no_var_path(axes: Any) -> Callable[..., Any]:
    """Forgets that every x_j moves the variance: drops the -xhat mean(g xhat) term."""

    def vjp(x: Any, g: Any) -> Any:
        _, r = _stats(x, axes)
        return r * (g - g.mean(axis=axes, keepdims=True))

    return vjp


def norm_coefficients(axes: Any, c_mean: float, c_var: float) -> Callable[..., Any]:
    """Every path, with the mean-path and variance-path terms times c_mean and c_var (e.g. the
    batch count where the group size belongs)."""

    def vjp(x: Any, g: Any) -> Any:
        xh, r = _stats(x, axes)
        mean_g = g.mean(axis=axes, keepdims=True)
        var_g = xh * (g * xh).mean(axis=axes, keepdims=True)
        return r * (g - c_mean * mean_g - c_var * var_g)

    return vjp


def norm_scaled(axes: Any, c: float) -> Callable[..., Any]:
    base = norm_vjp(axes)
    return lambda x, dy: c * base(x, dy)


def norm_affine_f(axes: Any) -> Callable[..., Any]:
    return lambda x, w, b: normgrad.normalize(x, axes, weight=w, bias=b)


def norm_affine_vjp(axes: Any) -> Callable[..., Any]:
    def vjp(x: Any, w: Any, b: Any, dy: Any) -> Any:
        g = normgrad.normalize_backward(
            normgrad.normalize_forward(x, axes, weight=w, bias=b)[1], dy
        )
        return g.x, g.weight, g.bias

    return vjp


# --- softmax, log-sum-exp --------------------------------------------------------------------


def softmax(x: Any) -> Any:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def softmax_vjp(x: Any, dy: Any) -> Any:
    s = softmax(x)
    return s * (dy - (dy * s).sum(axis=-1, keepdims=True))


def softmax_diag_vjp(x: Any, dy: Any) -> Any:
    s = softmax(x)
    return s * (1 - s) * dy  # only ds_i/dx_i


def lse(x: Any) -> Any:
    m = x.max(axis=-1, keepdims=True)
    return (m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True)))[..., 0]


def lse_vjp(x: Any, dy: Any) -> Any:
    return softmax(x) * dy[..., None]


def lse_ignores_dy(x: Any, dy: Any) -> Any:
    return softmax(x)  # the gradient of sum(lse), whatever dy


# --- matrix product (two inputs) -------------------------------------------------------------


def matmul(a: Any, b: Any) -> Any:
    return a @ b


def matmul_vjp(a: Any, b: Any, dy: Any) -> Any:
    return dy @ b.T, a.T @ dy


def matmul_double(a: Any, b: Any, dy: Any) -> Any:
    return 2 * (dy @ b.T), 2 * (a.T @ dy)


_R = _rng(99).standard_normal((5, 4))


def matmul_confused(a: Any, b: Any, dy: Any) -> Any:
    return dy @ _R.astype(dy.dtype), a.T @ dy  # the wrong matrix for da


# --- elementwise -----------------------------------------------------------------------------


def tanh_vjp(x: Any, dy: Any) -> Any:
    return (1 - np.tanh(x) ** 2) * dy


def tanh_sign(x: Any, dy: Any) -> Any:
    return (np.tanh(x) ** 2 - 1) * dy


def relu(x: Any) -> Any:
    return np.maximum(x, 0)


def relu_vjp(x: Any, dy: Any) -> Any:
    return (x > 0) * dy


def relu_outside_vjp(x: Any, dy: Any) -> Any:
    """relu'(0) = 2: outside [0, 1], no subgradient."""
    return np.where(x > 0, 1.0, np.where(x < 0, 0.0, 2.0)) * dy


TIES = np.array([[1.0, 1.0, 0.5], [0.2, 0.3, 0.1], [2.0, -1.0, 2.0]])


def row_max(x: Any) -> Any:
    return x.max(axis=1)


def row_max_first_vjp(x: Any, dy: Any) -> Any:
    """The gradient to the first maximum of each row (a valid subgradient at a tie)."""
    out = np.zeros_like(x)
    out[np.arange(x.shape[0]), x.argmax(axis=1)] = dy
    return out


def row_max_copied_vjp(x: Any, dy: Any) -> Any:
    """The full gradient to every tied maximum: each value is in range, the sum is not."""
    return (x == x.max(axis=1, keepdims=True)) * dy[:, None]


def sigmoid(x: Any) -> Any:
    return 1 / (1 + np.exp(-x))


def sigmoid_vjp(x: Any, dy: Any) -> Any:
    s = sigmoid(x)
    return s * (1 - s) * dy


def softplus(x: Any) -> Any:
    return np.logaddexp(0, x)  # real input only: no complex step


def softplus_vjp(x: Any, dy: Any) -> Any:
    return sigmoid(x) * dy


def softplus_naive_vjp(x: Any, dy: Any) -> Any:
    with np.errstate(over="ignore", invalid="ignore"):
        return np.exp(x) / (1 + np.exp(x)) * dy  # inf / inf = NaN for large x


def cube(x: Any) -> Any:
    return x**3


def cube_vjp(x: Any, dy: Any) -> Any:
    return 3 * x**2 * dy


def sumsq(x: Any) -> Any:
    return (x * x).sum()


def sumsq_vjp(x: Any, dy: Any) -> Any:
    return 2 * x * dy


def mul(a: Any, b: Any) -> Any:
    return a * b


def mul_vjp(a: Any, b: Any, dy: Any) -> Any:
    return dy * b, dy * a


def matmul_no_db(a: Any, b: Any, dy: Any) -> Any:
    return dy @ b.T, np.zeros_like(b)  # the gradient of the second input forgotten


# --- cumulative sum, convolution -------------------------------------------------------------


def cumsum(x: Any) -> Any:
    return np.cumsum(x, axis=-1)


def cumsum_vjp(x: Any, dy: Any) -> Any:
    return np.flip(np.cumsum(np.flip(dy, -1), axis=-1), -1)


def cumsum_transposed(x: Any, dy: Any) -> Any:
    return np.cumsum(dy, axis=-1)  # J dy instead of J^T dy


KERNEL = np.array([0.25, -1.0, 0.5])


def conv(x: Any) -> Any:
    return np.convolve(x, KERNEL.astype(x.dtype), mode="same")


def conv_vjp(x: Any, dy: Any) -> Any:
    return np.convolve(dy, KERNEL[::-1].astype(dy.dtype), mode="same")


def conv_edges_dropped(x: Any, dy: Any) -> Any:
    dx = conv_vjp(x, dy)
    dx[0] = dx[-1] = 0  # "the edges are padding" (they are not)
    return dx


# --- the problem -----------------------------------------------------------------------------


def problem_exact_vjp(x: Any, dy: Any) -> Any:
    return norm_vjp(None)(x, dy)


def wrong_cases() -> list[Case]:
    r = _rng
    x3 = r(1).standard_normal((3, 4, 5))
    relu_x = r(2).standard_normal(12)
    relu_x[[2, 7]] = 0.0
    return [
        Case("norm_ok", norm_f((1, 2)), x3, norm_vjp((1, 2)), "ok"),
        Case(
            "softplus_huge_step",
            softplus,
            r(3).standard_normal(8),
            softplus_vjp,
            "fd_noise",
            {"step": 0.5},
        ),
        Case("relu_at_zero", relu, relu_x, relu_vjp, "kink"),
        Case("relu_at_zero_probe", relu, relu_x, relu_vjp, "kink", {"mode": "probe"}),
        Case("relu_at_zero_outside", relu, relu_x, relu_outside_vjp, "nondifferentiable"),
        Case("max_ties_copied", row_max, TIES, row_max_copied_vjp, "nondifferentiable"),
        Case("max_ties_first", row_max, TIES, row_max_first_vjp, "kink"),
        Case(
            "softplus_naive_overflow",
            softplus,
            np.array([-1.0, 0.5, 800.0, 2.0]),
            softplus_naive_vjp,
            "nonfinite",
        ),
        Case(
            "softmax_zero",
            softmax,
            r(4).standard_normal((3, 5)),
            lambda x, dy: np.zeros_like(x),
            "zero",
        ),
        Case(
            "matmul_no_db",
            matmul,
            (r(14).standard_normal((3, 4)), r(15).standard_normal((4, 5))),
            matmul_no_db,
            "zero",
        ),
        Case(
            "matmul_no_db_probe",
            matmul,
            (r(16).standard_normal((3, 4)), r(17).standard_normal((4, 5))),
            matmul_no_db,
            "zero",
            {"mode": "probe"},
        ),
        Case("lse_ignores_dy", lse, r(5).standard_normal((4, 6)), lse_ignores_dy, "ignores_dy"),
        Case("tanh_offset", np.tanh, r(40).standard_normal((2, 5)), tanh_offset_one, "offset"),
        Case(
            "tanh_stale",
            np.tanh,
            r(41).standard_normal((2, 5)),
            tanh_stale_buffer,
            "nondeterministic",
        ),
        Case(
            "tanh_in_place",
            np.tanh,
            r(42).standard_normal((2, 5)),
            tanh_in_place,
            "mutates_input",
        ),
        Case("tanh_f32_grad", np.tanh, r(43).standard_normal((2, 5)), tanh_float32_grad, "dtype"),
        Case("tanh_abs_dy", np.tanh, r(44).standard_normal((2, 5)), tanh_abs_dy, "not_linear"),
        Case(
            "matmul_db_sign",
            matmul,
            (r(45).standard_normal((3, 4)), r(46).standard_normal((4, 5))),
            lambda a, b, g: (g @ b.T, -(a.T @ g)),
            "sign",
        ),
        Case(
            "matmul_db_transposed",
            matmul,
            (r(47).standard_normal((3, 4)), r(48).standard_normal((4, 4))),
            lambda a, b, g: (g @ b.T, (a.T @ g).T),
            "layout",
        ),
        Case("tanh_sign", np.tanh, r(6).standard_normal((2, 5)), tanh_sign, "sign"),
        Case(
            "matmul_double",
            matmul,
            (r(7).standard_normal((3, 4)), r(8).standard_normal((4, 5))),
            matmul_double,
            "scale",
        ),
        Case("norm_over_n", norm_f((0, 2)), x3, norm_scaled((0, 2), 1 / 15), "scale"),
        Case(
            "cumsum_transposed",
            cumsum,
            r(9).standard_normal((2, 7)),
            cumsum_transposed,
            "transpose",
        ),
        Case(
            "cumsum_transposed_probe",
            cumsum,
            r(49).standard_normal((2, 7)),
            cumsum_transposed,
            "transpose",
            {"mode": "probe"},
        ),
        Case(
            "problem_backward", problem_forward, problem_input(8, 8), problem_backward, "diagonal"
        ),
        Case(
            "softmax_diagonal", softmax, r(10).standard_normal((2, 6)), softmax_diag_vjp, "diagonal"
        ),
        Case("norm_no_mean_path", norm_f((1, 2)), x3, norm_no_mean_path((1, 2)), "missing_term"),
        Case("norm_no_var_path", norm_f(-1), x3, norm_no_var_path(-1), "missing_term"),
        Case(
            "norm_var_path_quarter",
            norm_f(-1),
            x3,
            norm_coefficients(-1, 1.0, 0.25),
            "coefficient",
        ),
        Case(
            "whole_norm_diagonal_probe",
            whole_norm,
            r(49).standard_normal((40, 50)),
            whole_norm_diagonal,
            "diagonal",
            {"mode": "probe"},
        ),
        Case(
            "tanh_three_wrong_probe",
            np.tanh,
            r(50).standard_normal(4000),
            tanh_three_wrong,
            "partial",
            {"mode": "probe"},
        ),
        Case(
            "rms_var_path_half",
            lambda x: normgrad.normalize(x, -1, center=False),
            0.5 + r(51).standard_normal((3, 6)),
            rms_coefficient(0.5),
            "coefficient",
        ),
        Case(
            "norm_no_mean_path_probe",
            norm_f(-1),
            r(52).standard_normal((200, 8)),
            norm_no_mean_path(-1),
            "missing_term",
            {"mode": "probe"},
        ),
        Case(
            "norm_var_path_quarter_probe",
            norm_f(-1),
            r(53).standard_normal((200, 8)),
            norm_coefficients(-1, 1.0, 0.25),
            "coefficient",
            {"mode": "probe"},
        ),
        Case(
            "matmul_db_sign_probe",
            matmul,
            (r(54).standard_normal((40, 30)), r(55).standard_normal((30, 50))),
            lambda a, b, g: (g @ b.T, -(a.T @ g)),
            "sign",
            {"mode": "probe"},
        ),
        Case("conv_edges", conv, r(11).standard_normal(40), conv_edges_dropped, "partial"),
        Case(
            "matmul_confused",
            matmul,
            (r(12).standard_normal((3, 4)), r(13).standard_normal((4, 5))),
            matmul_confused,
            "unknown",
        ),
    ]


def whole_norm(x: Any) -> Any:
    d = x - x.mean()
    return d / np.sqrt((d * d).mean() + EPS)


def whole_norm_diagonal(x: Any, dy: Any) -> Any:
    """The question's mistake, vectorized: only the direct term dy/σ."""
    d = x - x.mean()
    return dy / np.sqrt((d * d).mean() + EPS)


_THREE = [17, 1234, 3999]


def tanh_three_wrong(x: Any, dy: Any) -> Any:
    """Right except three elements (e.g. a boundary case in a kernel)."""
    dx = tanh_vjp(x, dy)
    dx.flat[_THREE] *= [0.0, 2.0, -1.0]
    return dx


def rms_coefficient(c_var: float) -> Callable[..., Any]:
    """RMS normalization's backward r(g - x̂·mean(g·x̂)), its variance-path term times c_var."""

    def vjp(x: Any, g: Any) -> Any:
        r = 1 / np.sqrt((x * x).mean(-1, keepdims=True) + EPS)
        xhat = x * r
        return r * (g - c_var * xhat * (g * xhat).mean(-1, keepdims=True))

    return vjp


def tanh_offset_one(x: Any, dy: Any) -> Any:
    """Right except one element, offset by a constant (a stale accumulator)."""
    dx = tanh_vjp(x, dy)
    dx.flat[3] += 0.5
    return dx


_STALE: list[Any] = []


def tanh_stale_buffer(x: Any, dy: Any) -> Any:
    """Accumulates into a buffer kept across calls (never zeroed): different on each call."""
    if not _STALE or _STALE[0].shape != np.shape(x):
        _STALE[:] = [np.zeros(np.shape(x))]
    _STALE[0] += tanh_vjp(x, dy)
    return _STALE[0].copy()


def tanh_in_place(x: Any, dy: Any) -> Any:
    """Right values, but computed in place in the caller's dy (and returned as dx)."""
    dy *= 1 - np.tanh(x) ** 2
    return dy


def tanh_float32_grad(x: Any, dy: Any) -> Any:
    """Right values, returned in float32 for a float64 x."""
    return tanh_vjp(x, dy).astype(np.float32)


def tanh_abs_dy(x: Any, dy: Any) -> Any:
    """|dy| for dy: not linear in dy."""
    return tanh_vjp(x, np.abs(dy))


def correct_cases() -> list[Case]:
    r = _rng
    cases = []
    for dt in (np.float64, np.float32):
        tag = np.dtype(dt).name
        for shape, axes in (((6, 5), None), ((3, 4, 5), (1, 2)), ((4, 3, 2), 0), ((2, 3, 4), -1)):
            x = (2 + 3 * r(len(shape)).standard_normal(shape)).astype(dt)
            cases.append(Case(f"norm{shape}{axes}_{tag}", norm_f(axes), x, norm_vjp(axes)))
        cases += [
            Case(
                f"norm_affine_{tag}",
                norm_affine_f(-1),
                (
                    r(20).standard_normal((3, 4)).astype(dt),
                    r(21).standard_normal(4).astype(dt),
                    r(22).standard_normal(4).astype(dt),
                ),
                norm_affine_vjp(-1),
            ),
            Case(f"softmax_{tag}", softmax, r(23).standard_normal((3, 5)).astype(dt), softmax_vjp),
            Case(f"lse_{tag}", lse, r(24).standard_normal((4, 6)).astype(dt), lse_vjp),
            Case(
                f"matmul_{tag}",
                matmul,
                (
                    r(25).standard_normal((3, 4)).astype(dt),
                    r(26).standard_normal((4, 5)).astype(dt),
                ),
                matmul_vjp,
            ),
            Case(f"tanh_{tag}", np.tanh, r(27).standard_normal((4, 4)).astype(dt), tanh_vjp),
            Case(
                f"sigmoid_{tag}", sigmoid, (3 * r(28).standard_normal(10)).astype(dt), sigmoid_vjp
            ),
            Case(f"cumsum_{tag}", cumsum, r(29).standard_normal((2, 6)).astype(dt), cumsum_vjp),
            Case(f"conv_{tag}", conv, r(30).standard_normal(25).astype(dt), conv_vjp),
            Case(f"sumsq_{tag}", sumsq, r(31).standard_normal((3, 3)).astype(dt), sumsq_vjp),
            Case(
                f"mul_{tag}",
                mul,
                (r(32).standard_normal(6).astype(dt), r(33).standard_normal(6).astype(dt)),
                mul_vjp,
            ),
        ]
    cases.append(
        Case("problem_exact", problem_forward, problem_input(6, 7, seed=3), problem_exact_vjp)
    )
    cases.append(Case("relu_away_from_zero", relu, np.array([-2.0, -0.5, 0.3, 1.5, 2.5]), relu_vjp))
    # The Jacobian is exactly 0 at 0: the complex step's own truncation must not raise an alarm.
    cases.append(Case("cube_at_zero", cube, np.zeros(4), cube_vjp))
    cases.append(Case("cube_at_zero_probe", cube, np.zeros(4), cube_vjp, kwargs={"mode": "probe"}))
    return cases
