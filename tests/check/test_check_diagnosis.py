"""The diagnosis names the mistake: checks that need no finite differences (linearity in dy,
repeated calls, mutation, dtype), and per-input findings for tuple inputs."""

from typing import Any

import numpy as np
import pytest
from grad_corpus import norm_coefficients, norm_f
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import normgrad
from normgrad.check import check_gradients
from normgrad.check._target import Target


def _tanh_vjp(x: Any, dy: Any) -> Any:
    return (1 - np.tanh(x) ** 2) * dy


@pytest.fixture
def x() -> Any:
    return np.random.default_rng(1).standard_normal((30, 40))


@pytest.mark.parametrize("mode", ["full", "probe"])
def test_one_offset_element_is_offset_not_ignores_dy(mode: str) -> None:
    x = np.random.default_rng(2).standard_normal((4, 5))

    def vjp(z: Any, dy: Any) -> Any:
        dx = _tanh_vjp(z, dy)
        dx[2, 3] += 0.25
        return dx

    report = check_gradients(np.tanh, x, vjp, mode=mode)
    assert report.kinds == ["offset"], str(report)
    ev = report.diagnosis[0].evidence
    assert ev["indices"] == [(2, 3)] and ev["max_offset"] == pytest.approx(0.25)


@pytest.mark.parametrize("mode", ["full", "probe"])
def test_constant_in_dy_is_ignores_dy(mode: str) -> None:
    x = np.random.default_rng(3).standard_normal(6)
    report = check_gradients(np.tanh, x, lambda z, dy: 1 - np.tanh(z) ** 2, mode=mode)
    assert report.kinds == ["ignores_dy"], str(report)


def test_nonlinear_in_dy(x: Any) -> None:
    report = check_gradients(np.tanh, x[:3], lambda z, dy: _tanh_vjp(z, dy * np.abs(dy)))
    assert report.kinds == ["not_linear"], str(report)


@pytest.mark.parametrize("mode", ["full", "probe"])
def test_stale_memory_is_nondeterministic_with_its_spread(mode: str) -> None:
    x = np.random.default_rng(4).standard_normal((3, 4))
    calls = [0]

    def vjp(z: Any, dy: Any) -> Any:
        calls[0] += 1
        dx = _tanh_vjp(z, dy)
        dx[0, 1] += 1e-3 * calls[0]  # a value left over from the previous call
        return dx

    report = check_gradients(np.tanh, x, vjp, mode=mode)
    assert report.kinds == ["nondeterministic"], str(report)
    ev = report.diagnosis[0].evidence
    # The repeat of the first call is the third call (the second cotangent's came between).
    assert ev["indices"] == [(0, 1)] and ev["spread"] == pytest.approx(2e-3, rel=1e-6)


def test_rounding_level_differences_are_not_nondeterminism(x: Any) -> None:
    rng = np.random.default_rng(5)

    def vjp(z: Any, dy: Any) -> Any:  # a sum in a different order each call
        p = rng.permutation(z.shape[1])
        return (_tanh_vjp(z, dy)[:, p] * 1.0)[:, np.argsort(p)] * (1 + 1e-16 * rng.random())

    assert check_gradients(np.tanh, x[:2, :5], vjp).ok


@pytest.mark.parametrize("where", ["x", "dy"])
def test_writing_into_arguments_is_named(where: str) -> None:
    x = np.random.default_rng(6).standard_normal(5)
    x0 = x.copy()

    def vjp(z: Any, dy: Any) -> Any:
        dx = _tanh_vjp(z, dy)
        (z if where == "x" else dy)[0] = 7.0
        return dx

    report = check_gradients(np.tanh, x, vjp)
    assert not report.ok and report.kinds == ["mutates_input"], str(report)
    assert report.diagnosis[0].evidence["arguments"] == [f"{where} (1)"]
    np.testing.assert_array_equal(x, x0)


def test_wrong_dtype_is_named_correct_dtype_passes() -> None:
    x = np.random.default_rng(7).standard_normal(5)
    bad = check_gradients(np.tanh, x, lambda z, dy: _tanh_vjp(z, dy).astype(np.float32))
    assert bad.kinds == ["dtype"] and bad.diagnosis[0].evidence["got"] == "float32"
    assert check_gradients(np.tanh, x.astype(np.float32), _tanh_vjp).ok


def test_tuple_input_with_one_wrong_sign_names_the_input() -> None:
    r = np.random.default_rng(8)
    a, b = r.standard_normal((3, 4)), r.standard_normal((4, 5))
    report = check_gradients(lambda a, b: a @ b, (a, b), lambda a, b, g: (g @ b.T, -(a.T @ g)))
    assert report.kinds == ["sign"], str(report)
    assert report.diagnosis[0].evidence["input"] == "[1]"


def test_six_parameters_two_scaled_each_factor_named() -> None:
    r = np.random.default_rng(9)
    xs = tuple(r.standard_normal(3) for _ in range(6))
    w = np.arange(1.0, 7.0)

    def f(*p: Any) -> Any:
        return np.concatenate([k * np.sin(q) for k, q in zip(w, p, strict=True)])

    def vjp(*args: Any) -> Any:
        *p, g = args
        parts = np.split(g, 6)
        out = [k * np.cos(q) * gi for k, q, gi in zip(w, p, parts, strict=True)]
        out[2], out[4] = 2 * out[2], 4 * out[4]
        return tuple(out)

    report = check_gradients(f, xs, vjp)
    assert report.kinds == ["scale", "scale"], str(report)
    got = [(d.evidence["input"], d.evidence["factor"]) for d in report.diagnosis]
    assert got[0][0] == "[2]" and got[0][1] == pytest.approx(2)
    assert got[1][0] == "[4]" and got[1][1] == pytest.approx(4)


def test_names_keyword_names_inputs() -> None:
    t = Target(lambda a, b: a * b, (np.ones(2), np.ones(2)), names=["w", "b"])
    assert t.names == ["w", "b"]
    assert Target(lambda a, b: a * b, (np.ones(2), np.ones(2))).names == ["[0]", "[1]"]


@pytest.mark.parametrize("shape", [(4, 4), (3, 5)])
def test_gradient_in_the_wrong_layout_is_layout(shape: tuple[int, int]) -> None:
    r = np.random.default_rng(10)
    a, w = r.standard_normal((2, shape[0])), r.standard_normal(shape)

    def vjp(a: Any, w: Any, g: Any) -> Any:
        dw = a.T @ g
        return g @ w.T, dw.T.reshape(dw.shape)  # dw.T for a square w, wrong order otherwise

    report = check_gradients(lambda a, w: a @ w, (a, w), vjp)
    assert report.kinds == ["layout"], str(report)
    assert report.diagnosis[0].evidence == {"input": "[1]", "axes": (1, 0)}


def test_layout_of_a_three_axis_gradient() -> None:
    x = np.random.default_rng(11).standard_normal((2, 3, 4))
    report = check_gradients(
        np.sin,
        x,
        lambda z, g: np.ascontiguousarray((np.cos(z) * g).transpose(2, 0, 1)).reshape(z.shape),
    )
    assert report.kinds == ["layout"] and report.diagnosis[0].evidence["axes"] == (2, 0, 1)


def test_three_way_verdict() -> None:
    x = np.random.default_rng(9).standard_normal(10)

    def sp(z: Any) -> Any:
        return np.logaddexp(0, z)

    def sp_vjp(z: Any, g: Any) -> Any:
        return g / (1 + np.exp(-z))

    assert check_gradients(sp, x, sp_vjp).verdict == "PASS"
    noisy = check_gradients(sp, x, sp_vjp, step=0.5)
    assert noisy.kinds == ["fd_noise"] and noisy.verdict == "INCONCLUSIVE"
    assert noisy.to_dict()["verdict"] == "INCONCLUSIVE"
    assert check_gradients(sp, x, lambda z, g: -sp_vjp(z, g)).verdict == "FAIL"


# Random compositions of ops, each with its textbook backward (chain rule, last op first).
_OPS: dict[str, tuple[Any, Any]] = {
    "sin": (np.sin, lambda z, g: np.cos(z) * g),
    "tanh": (np.tanh, lambda z, g: (1 - np.tanh(z) ** 2) * g),
    "cube": (lambda z: z**3 / 3, lambda z, g: z**2 * g),
    "cumsum": (
        lambda z: np.cumsum(z, axis=-1),
        lambda z, g: np.cumsum(g[..., ::-1], -1)[..., ::-1],
    ),
    "softplus": (lambda z: np.logaddexp(0, z), lambda z, g: g / (1 + np.exp(-z))),
    "rowmean": (
        lambda z: z - z.mean(-1, keepdims=True),
        lambda z, g: g - g.mean(-1, keepdims=True),
    ),
}


def _composition(names: list[str]) -> tuple[Any, Any]:
    def f(z: Any) -> Any:
        for n in names:
            z = _OPS[n][0](z)
        return z

    def vjp(z: Any, g: Any) -> Any:
        inputs = []
        for n in names:
            inputs.append(z)
            z = _OPS[n][0](z)
        for n, zi in zip(reversed(names), reversed(inputs), strict=True):
            g = _OPS[n][1](zi, g)
        return g

    return f, vjp


_PLANTED: dict[str, Any] = {
    "sign": lambda v: lambda z, g: -v(z, g),
    "scale": lambda v: lambda z, g: 2 * v(z, g),
    "offset": lambda v: (
        lambda z, g: v(z, g) + np.where(np.arange(z.size).reshape(z.shape) == 1, 0.3, 0)
    ),
    "ignores_dy": lambda v: lambda z, g: v(z, np.cos(z)),
    "not_linear": lambda v: lambda z, g: v(z, g * np.abs(g)),
    "zero": lambda v: lambda z, g: np.zeros_like(z),
    "layout": lambda v: lambda z, g: v(z, g).T.copy(),
}

_names = st.lists(st.sampled_from(sorted(_OPS)), min_size=1, max_size=4)


@settings(max_examples=15, deadline=None)
@given(names=_names, seed=st.integers(0, 2**16))
def test_random_correct_compositions_raise_no_alarm(names: list[str], seed: int) -> None:
    x = np.random.default_rng(seed).standard_normal((4, 4))
    f, vjp = _composition(names)
    report = check_gradients(f, x, vjp)
    assert report.ok, str(report)


@settings(max_examples=20, deadline=None)
@given(names=_names, seed=st.integers(0, 2**16), kind=st.sampled_from(sorted(_PLANTED)))
def test_planted_mistake_in_random_composition_is_named(
    names: list[str], seed: int, kind: str
) -> None:
    x = np.random.default_rng(seed).standard_normal((4, 4))
    f, vjp = _composition(names)
    wrong = _PLANTED[kind](vjp)
    if kind == "layout":  # a symmetric Jacobian hides a transposed dx
        dy = np.random.default_rng(seed + 1).standard_normal(x.shape)
        assume(not np.allclose(vjp(x, dy).T, vjp(x, dy)))
    report = check_gradients(f, x, wrong)
    assert report.kinds[0] == kind, str(report)


@pytest.mark.parametrize("axes", [-1, 0, (1, 2), (0, 2), None])
@pytest.mark.parametrize(
    ("c_mean", "c_var", "kind"),
    [
        (1, 0.25, "coefficient"),
        (0.5, 1, "coefficient"),
        (1, 0, "missing_term"),
        (0, 1, "missing_term"),
    ],
)
def test_coefficient_fit_on_every_layout(axes: Any, c_mean: float, c_var: float, kind: str) -> None:
    x = np.random.default_rng(13).standard_normal((3, 4, 5))
    report = check_gradients(norm_f(axes), x, norm_coefficients(axes, c_mean, c_var))
    assert report.kinds[0] == kind, str(report)
    if kind == "coefficient":
        ev = report.diagnosis[0].evidence
        assert ev["ratio_mean"] == pytest.approx(c_mean) and ev["ratio_variance"] == pytest.approx(
            c_var
        )


def test_coefficient_never_fires_on_non_normalizations() -> None:
    x = np.random.default_rng(14).standard_normal((3, 6))

    def softmax(z: Any) -> Any:
        e = np.exp(z - z.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    def wrong(z: Any, g: Any) -> Any:  # the coupling term at half its size
        s = softmax(z)
        return s * (g - 0.5 * (g * s).sum(-1, keepdims=True))

    assert "coefficient" not in check_gradients(softmax, x, wrong).kinds


def test_coefficient_message_names_the_wrong_count() -> None:
    x = np.random.default_rng(15).standard_normal((4, 8))
    report = check_gradients(norm_f(-1), x, norm_coefficients(-1, 1.0, 0.25))
    assert report.kinds == ["coefficient"]
    msg = report.diagnosis[0].message
    assert "variance-path term is 1/4× what it should be (1/m with m = 32" in msg
    assert "n = 8 elements" in msg


def _norm_backward(axes: Any, center: bool, mode: str, c_mean: float, c_var: float) -> Any:
    """A normalization's backward (both eps modes, with or without centering), with its mean
    and variance terms times c_mean and c_var (c = 1: the textbook formula)."""

    def vjp(x: Any, g: Any) -> Any:
        kw = {"axis": axes, "keepdims": True}
        u = x - x.mean(**kw) if center else x
        s = np.sqrt((u * u).mean(**kw))
        d = s + 1e-5 if mode == "outside" else np.sqrt(s * s + 1e-5)
        var_den = s * d if mode == "outside" else d * d
        mean = c_mean * g.mean(**kw) if center else 0.0
        return (g - mean - c_var * u * (g * u).mean(**kw) / var_den) / d

    return vjp


def _ng_norm(axes: Any, center: bool, mode: str) -> Any:
    return lambda x: normgrad.normalize(x, axes, center=center, eps_mode=mode)


@pytest.mark.parametrize("axes", [-1, 0, (1, 2), None])
@pytest.mark.parametrize("center", [True, False])
@pytest.mark.parametrize("mode", ["inside", "outside"])
def test_coefficient_fit_both_eps_modes_and_rms(axes: Any, center: bool, mode: str) -> None:
    x = 0.5 + np.random.default_rng(16).standard_normal((3, 4, 5))
    f = _ng_norm(axes, center, mode)
    right = check_gradients(f, x, _norm_backward(axes, center, mode, 1.0, 1.0))
    assert right.kinds == ["ok"], str(right)  # the reference formula, against f's differences
    report = check_gradients(f, x, _norm_backward(axes, center, mode, 1.0, 0.25))
    assert report.kinds[0] == "coefficient", str(report)
    ev = report.diagnosis[0].evidence
    assert ev["ratio_variance"] == pytest.approx(0.25, rel=1e-6)
    assert ev["basis"] == ("mean-variance" if center else "rms")
    assert ("RMS" in report.diagnosis[0].message) == (not center)
    if not center:  # RMS without its variance path keeps only g/σ: a diagonal backward
        absent = check_gradients(f, x, _norm_backward(axes, center, mode, 1.0, 0.0))
        assert absent.kinds[0] == "diagonal", str(absent)


def test_rms_coefficient_never_fires_on_radial_non_normalizations() -> None:
    x = np.random.default_rng(17).standard_normal((3, 6))

    def cubic(z: Any) -> Any:  # z·Σz²: its Jacobian is s·I + b·zzᵀ, with b/s > 0
        return z * (z * z).sum(-1, keepdims=True)

    def wrong(z: Any, g: Any) -> Any:  # the coupling term at half its size
        return g * (z * z).sum(-1, keepdims=True) + 0.5 * 2 * z * (g * z).sum(-1, keepdims=True)

    assert "coefficient" not in check_gradients(cubic, x, wrong).kinds


def test_rms_diagonal_backward_names_only_the_variance_path() -> None:
    x = 0.5 + np.random.default_rng(18).standard_normal((4, 6))
    f = _ng_norm(-1, False, "inside")
    report = check_gradients(f, x, _norm_backward(-1, False, "inside", 1.0, 0.0))
    assert report.kinds == ["diagonal", "missing_term"], str(report)
    paths = report.diagnosis[1]
    assert paths.evidence["rms"] and "variance path" in paths.message
    assert "mean path" not in paths.message
