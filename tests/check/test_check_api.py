"""The checker's contract: the problem's backward, probe mode at scale, report, errors."""

import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import normgrad
from normgrad import NormgradError
from normgrad._problem import problem_backward, problem_forward, problem_input
from normgrad.check import (
    FULL_MAX,
    LOCALIZE_BUDGET,
    Finding,
    GradReport,
    assert_gradients,
    check_gradients,
)


def norm_vjp(axes=None):
    def vjp(x, dy):
        return normgrad.normalize_backward(normgrad.normalize_forward(x, axes)[1], dy).x

    return vjp


def norm_f(axes=None):
    return lambda x: normgrad.normalize(x, axes)


# --- the problem -----------------------------------------------------------------------------


@pytest.mark.parametrize("f", [problem_forward, normgrad.normalize], ids=["problem", "normgrad"])
def test_problem_backward_is_diagnosed_diagonal(f) -> None:
    x = problem_input()
    report = check_gradients(f, x, problem_backward, dy=np.ones_like(x))
    assert not report.ok
    assert report.kinds[0] == "diagonal"
    assert "missing_term" in report.kinds
    text = str(report)
    assert "cross terms" in text and "mean path" in text and "variance path" in text
    # The question's "max diff around 3.18": dy = ones, whose true gradient is exactly 0.
    assert report.max_abs_error == pytest.approx(3.17, abs=0.01)
    assert np.max(np.abs(report.numerical)) < 1e-6
    # The extra dy term is the mean path's own diagonal part, rstd / n.
    ctx = normgrad.normalize_forward(x)[1]
    coef = report.diagnosis[0].evidence["extra_dy_coefficient"]
    assert coef == pytest.approx(float(ctx.rstd.ravel()[0]) / x.size, rel=1e-5)


def test_problem_backward_with_random_dy() -> None:
    report = check_gradients(problem_forward, problem_input(10, 10), problem_backward)
    assert report.kinds[:2] == ["diagonal", "missing_term"]


# --- probe mode ------------------------------------------------------------------------------


def test_probe_mode_million_elements_catches_scale() -> None:
    x = np.random.default_rng(1).standard_normal((1000, 1000))
    vjp = norm_vjp(-1)
    report = check_gradients(norm_f(-1), x, lambda x, dy: 0.5 * vjp(x, dy))
    assert report.mode == "probe" and not report.ok
    assert report.diagnosis[0].kind == "scale"
    assert report.diagnosis[0].evidence["factor"] == pytest.approx(0.5, rel=1e-6)
    assert report.n_evals < 60


def test_probe_mode_passes_correct_and_localizes_partial() -> None:
    x = np.random.default_rng(2).standard_normal((100, 100))
    vjp = norm_vjp(0)
    assert check_gradients(norm_f(0), x, vjp, mode="probe").kinds == ["ok"]

    def wrong(x, dy):
        dx = vjp(x, dy)
        dx[7, 3] *= 3.0
        dx[90, 99] = 0.0
        return dx

    report = check_gradients(norm_f(0), x, wrong, mode="probe")
    assert report.diagnosis[0].kind == "partial", str(report)
    assert report.diagnosis[0].evidence["indices"] == [(7, 3), (90, 99)]
    assert report.diagnosis[0].evidence["evaluations"] <= LOCALIZE_BUDGET
    assert report.worst_index == (7, 3)


@pytest.mark.parametrize(
    ("make", "kind"),
    [
        (lambda v: lambda x, dy: -v(x, dy), "sign"),
        (lambda v: lambda x, dy: np.zeros_like(x), "zero"),
        (lambda v: lambda x, dy: v(x, x), "ignores_dy"),
        (lambda v: lambda x, dy: v(x, dy**2), "not_linear"),
        (lambda v: lambda x, dy: v(x, dy) + 0.1 * dy[::-1], "unknown"),
    ],
)
def test_probe_mode_kinds(make, kind) -> None:
    x = np.random.default_rng(3).standard_normal((40, 50))
    report = check_gradients(norm_f(1), x, make(norm_vjp(1)), mode="probe")
    assert report.diagnosis[0].kind == kind, str(report)


def test_probe_mode_transpose() -> None:
    x = np.random.default_rng(4).standard_normal((30, 60))
    report = check_gradients(
        lambda x: np.cumsum(x, axis=1), x, lambda x, dy: np.cumsum(dy, axis=1), mode="probe"
    )
    assert report.diagnosis[0].kind == "transpose", str(report)


# --- numerical side --------------------------------------------------------------------------


def test_complex_step_used_only_where_f_accepts_complex() -> None:
    x = np.random.default_rng(5).standard_normal((4, 5))
    tanh = check_gradients(np.tanh, x, lambda x, dy: (1 - np.tanh(x) ** 2) * dy)
    assert tanh.complex_step and tanh.ok
    norm = check_gradients(norm_f(), x, norm_vjp())
    assert not norm.complex_step and norm.ok
    # x * |x| returns complex numbers for complex input, but its complex step is wrong:
    # detection must refuse it.
    xa = check_gradients(lambda x: x * np.abs(x), x, lambda x, dy: 2 * np.abs(x) * dy)
    assert not xa.complex_step and xa.kinds == ["ok"]


def test_f_refusing_float64_falls_back_and_says_so() -> None:
    def f32_only(x):
        if x.dtype != np.float32:
            raise TypeError("float32 only")
        return np.tanh(x)

    x = np.random.default_rng(6).standard_normal(20).astype(np.float32)
    report = check_gradients(f32_only, x, lambda x, dy: (1 - np.tanh(x) ** 2) * dy)
    assert report.ok and report.kinds == ["ok"], str(report)
    assert report.eval_dtype == "float32"
    assert any("refused float64" in n for n in report.notes)
    assert "refused float64" in str(report)
    wrong = check_gradients(f32_only, x, lambda x, dy: 2 * (1 - np.tanh(x) ** 2) * dy)
    assert wrong.kinds[0] == "scale"


def test_float32_analytic_uses_float32_tolerance() -> None:
    x = (3 + 2 * np.random.default_rng(7).standard_normal((8, 16))).astype(np.float32)
    report = check_gradients(norm_f(-1), x, norm_vjp(-1))
    assert report.ok and report.analytic_dtype == "float32"
    assert report.rtol == pytest.approx(np.sqrt(np.finfo(np.float32).eps))
    assert not check_gradients(norm_f(-1), x, lambda x, dy: 1.01 * norm_vjp(-1)(x, dy)).ok


def test_fd_error_estimate_bounds_true_error() -> None:
    x = np.random.default_rng(8).standard_normal((5, 6))
    report = check_gradients(norm_f(1), x, norm_vjp(1))
    exact = report.analytic  # the exact backward, float64
    assert np.all(np.abs(report.numerical - exact) <= report.fd_error_estimate)


def test_user_step_and_tolerances_are_used() -> None:
    x = np.random.default_rng(9).standard_normal(10)
    sp = lambda x: np.logaddexp(0, x)  # noqa: E731
    vjp = lambda x, dy: dy / (1 + np.exp(-x))  # noqa: E731
    assert check_gradients(sp, x, vjp, step=0.5).kinds == ["fd_noise"]
    assert check_gradients(sp, x, vjp, step=0.5, rtol=0.05).kinds == ["ok"]
    assert check_gradients(sp, x, vjp, rtol=0, atol=0).kinds[0] in ("ok", "fd_noise")


def test_nondifferentiable_abs_at_zero() -> None:
    x = np.array([-1.0, 0.0, 2.0, 0.0, 3.0])
    # sign(0) = 0 is the central difference's own value there: accepted.
    assert check_gradients(np.abs, x, lambda x, dy: np.sign(x) * dy).kinds == ["ok"]
    # A one-sided derivative at the kinks: a valid subgradient, not confirmed (INCONCLUSIVE).
    report = check_gradients(np.abs, x, lambda x, dy: np.where(x >= 0, 1.0, -1.0) * dy)
    assert report.kinds == ["kink"] and report.ok and report.verdict == "INCONCLUSIVE"
    assert report.diagnosis[0].evidence["indices"] == [(1,), (3,)]
    assert report.diagnosis[0].evidence["seen"]["the right-hand derivative"] == 2
    left = check_gradients(np.abs, x, lambda x, dy: np.where(x > 0, 1.0, -1.0) * dy)
    assert left.diagnosis[0].evidence["seen"]["the left-hand derivative"] == 2
    half = check_gradients(
        np.abs, x, lambda x, dy: np.where(x > 0, 1.0, np.where(x < 0, -1, 0.5)) * dy
    )
    assert half.kinds == ["kink"] and half.diagnosis[0].evidence["seen"]["a value between"] == 2
    # Outside [-1, 1]: no subgradient, a failure.
    out = check_gradients(
        np.abs, x, lambda x, dy: np.where(x > 0, 1.0, np.where(x < 0, -1, 3)) * dy
    )
    assert out.kinds[0] == "nondifferentiable" and out.verdict == "FAIL"
    assert out.diagnosis[0].evidence["first"] in [(1,), (3,)]


# --- tuple inputs, jvp -----------------------------------------------------------------------


def test_tuple_inputs_and_jvp() -> None:
    rng = np.random.default_rng(10)
    a, b = rng.standard_normal((3, 4)), rng.standard_normal((4, 2))
    vjp = lambda a, b, dy: (dy @ b.T, a.T @ dy)  # noqa: E731
    jvp = lambda a, b, ta, tb: ta @ b + a @ tb  # noqa: E731
    report = check_gradients(lambda a, b: a @ b, (a, b), vjp, jvp=jvp)
    assert report.ok and isinstance(report.analytic, tuple) and len(report.analytic) == 2
    assert report.analytic[1].shape == (4, 2)
    bad = check_gradients(
        lambda a, b: a @ b, (a, b), vjp, jvp=lambda a, b, ta, tb: -jvp(a, b, ta, tb)
    )
    assert not bad.ok and bad.kinds == ["sign"] and bad.diagnosis[0].message.startswith("jvp:")
    big = np.random.default_rng(11).standard_normal((50, 40))
    probe = check_gradients(
        norm_f(1),
        big,
        norm_vjp(1),
        jvp=lambda x, tx: 3 * normgrad.normalize_jvp(x, tx, 1)[1],
        mode="probe",
    )
    assert probe.kinds == ["scale"] and probe.diagnosis[0].evidence["factor"] == pytest.approx(3)


def test_inputs_are_not_mutated_and_report_is_deterministic() -> None:
    x = np.random.default_rng(12).standard_normal((4, 5))
    before = x.copy()

    def rude_vjp(x, dy):
        g = norm_vjp()(x, dy)
        x[...] = 0  # must not reach the caller's array
        return g

    r1 = check_gradients(norm_f(), x, rude_vjp, seed=3)
    r2 = check_gradients(norm_f(), x, rude_vjp, seed=3)
    np.testing.assert_array_equal(x, before)
    np.testing.assert_array_equal(r1.numerical, r2.numerical)


# --- regressions: non-finite values, mutation, exact zeros ----------------------------------


def _cube(z):
    return z**3


def _cube_vjp(z, g):
    return 3 * z**2 * g


@pytest.mark.parametrize("mode", ["full", "probe"])
@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_nonfinite_backward_fails_with_a_clear_finding(mode, bad) -> None:
    x = np.random.default_rng(20).standard_normal(30)

    def vjp(z, g):
        return np.where(np.arange(z.size) == 3, bad, 3 * z**2 * g)

    report = check_gradients(_cube, x, vjp, mode=mode)
    assert not report.ok and report.kinds == ["nonfinite"], str(report)
    finding = report.diagnosis[0]
    assert finding.evidence["indices"] == [(3,)] and finding.evidence["count"] == 1
    assert "NaN or Inf" in finding.message and "(3,)" in finding.message and finding.hint
    assert json.loads(json.dumps(report.to_dict(), allow_nan=False))["ok"] is False
    with pytest.raises(AssertionError, match="nonfinite"):
        assert_gradients(_cube, x, vjp, mode=mode)


def test_nonfinite_jvp_is_named() -> None:
    x = np.random.default_rng(21).standard_normal(6)
    report = check_gradients(_cube, x, _cube_vjp, jvp=lambda z, t: np.full_like(z, np.nan))
    assert not report.ok and report.kinds == ["nonfinite"]
    assert report.diagnosis[0].message.startswith("jvp:")


def test_nonfinite_f_is_an_error_not_a_crash() -> None:
    # f(x) itself is NaN (log of a negative): nothing can be checked there.
    with pytest.raises(NormgradError, match=r"f\(x\) is NaN or Inf at output index \(1,\)"):
        check_gradients(np.log, np.array([1.0, -1.0, 2.0]), lambda z, g: g / z)
    # f(x) is finite but x is within a step of the domain edge: say so, do not crash.
    with pytest.raises(NormgradError, match="smaller step"):
        check_gradients(np.log, np.array([1e-6, 1.0, 2.0]), lambda z, g: g / z)
    # ... and a smaller step makes the same check possible.
    assert check_gradients(np.log, np.array([1e-6, 1.0, 2.0]), lambda z, g: g / z, step=1e-9).ok


def test_f_that_writes_into_its_argument_is_checked_at_the_right_point() -> None:
    def f(z):
        z **= 3  # in place: must not corrupt the checker's base point
        return z

    x = np.random.default_rng(22).standard_normal(5)
    before = x.copy()
    for mode in ("full", "probe"):
        report = check_gradients(f, x, _cube_vjp, mode=mode)
        assert report.ok and report.kinds == ["ok"], str(report)
    np.testing.assert_array_equal(x, before)


def test_vjp_that_writes_into_dy_does_not_corrupt_it() -> None:
    x = np.random.default_rng(23).standard_normal(5).astype(np.float32)
    dy = np.random.default_rng(24).standard_normal(5)
    dy0 = dy.copy()

    def vjp(z, g):
        out = 3 * z**2 * g
        g *= 0  # in place, on every call (float32 backwards are also run in float64)
        return out

    report = check_gradients(_cube, x, vjp, dy=dy)
    assert not report.ok and report.kinds == ["mutates_input"], str(report)
    assert "dy (5)" in report.diagnosis[0].message
    np.testing.assert_array_equal(dy, dy0)


@pytest.mark.parametrize("mode", ["full", "probe"])
def test_exactly_zero_jacobian_is_no_false_alarm(mode) -> None:
    report = check_gradients(_cube, np.zeros(4), _cube_vjp, mode=mode)
    assert report.ok and report.kinds == ["ok"], str(report)
    assert report.complex_step  # the extrapolated complex step is exact here
    wrong = check_gradients(lambda z: z**3 + z, np.zeros(4), _cube_vjp, mode=mode)
    assert not wrong.ok and wrong.kinds == ["zero"]


def test_summary_follows_the_failing_cotangent() -> None:
    x = np.random.default_rng(25).standard_normal(8)
    report = check_gradients(lambda z: z**2, x, lambda z, g: 3 * z * g, dy=np.zeros(8))
    assert not report.ok and report.kinds == ["scale"]
    # dy = 0 checks nothing; the summary comes from the second, random cotangent.
    assert report.max_abs_error > 0.1 and report.atol > 0
    assert np.any(report.analytic != 0)
    assert any("second" in note for note in report.notes)
    # The user's cotangent is shown whenever it fails.
    dy = np.ones(8)
    shown = check_gradients(lambda z: z**2, x, lambda z, g: 3 * z * g, dy=dy)
    np.testing.assert_allclose(shown.analytic, 3 * x)
    np.testing.assert_allclose(shown.numerical, 2 * x, rtol=1e-9)


def test_zero_gradient_for_one_input_is_named() -> None:
    rng = np.random.default_rng(26)
    a, v = rng.standard_normal((3, 4)), rng.standard_normal(4)
    report = check_gradients(lambda a, v: a @ v, (a, v), lambda a, v, g: (np.outer(g, v), 0 * v))
    assert report.kinds == ["zero"], str(report)
    first = report.diagnosis[0]
    assert first.evidence["input"] == "[1]" and first.evidence["position"] == 1, first
    assert "input [1]" in first.message


def test_a_list_is_one_input_not_several() -> None:
    x = [[1.0, 2.0], [3.0, 4.0]]
    report = check_gradients(lambda a: a.sum(axis=0), x, lambda a, g: np.broadcast_to(g, (2, 2)))
    assert report.ok and report.input_shapes == [(2, 2)]


def test_report_json_writes_null_for_non_finite() -> None:
    x = np.random.default_rng(27).standard_normal(4)
    report = check_gradients(_cube, x, lambda z, g: np.full_like(z, np.inf))
    doc = report.to_dict()
    assert doc["max_abs_error"] is None
    assert json.loads(json.dumps(doc, allow_nan=False))["analytic"] == [None] * 4


# --- report ----------------------------------------------------------------------------------


def test_report_carries_the_analytic_jacobian_the_diagnosis_built() -> None:
    x = problem_input(4, 5)
    report = check_gradients(problem_forward, x, problem_backward)
    rows = [problem_backward(x, np.eye(1, x.size, i).reshape(x.shape)).ravel() for i in range(20)]
    np.testing.assert_array_equal(report.analytic_jacobian, np.stack(rows))
    assert report.numerical_jacobian.shape == (20, 20)
    # Built only when a failing full-mode check needs it.
    assert check_gradients(norm_f(), x, norm_vjp()).analytic_jacobian is None
    assert (
        check_gradients(problem_forward, x, problem_backward, mode="probe").analytic_jacobian
        is None
    )


def test_report_to_dict_is_json_and_str_readable() -> None:
    x = problem_input(6, 6)
    report = check_gradients(problem_forward, x, problem_backward)
    d = json.loads(json.dumps(report.to_dict()))
    assert d["ok"] is False and d["diagnosis"][0]["kind"] == "diagonal"
    assert len(d["analytic"]) == 6 and d["mode"] == "full"
    assert isinstance(report.diagnosis[0], Finding) and isinstance(report, GradReport)
    text = str(report)
    assert text.startswith("gradient check: MISMATCH") and "diagonal" in text and "fix:" in text
    probe = check_gradients(
        norm_f(1), np.random.default_rng(1).standard_normal((3, 400)), norm_vjp(1)
    )
    json.dumps(probe.to_dict())
    assert probe.to_dict(max_elements=10)["analytic"] is None


def test_assert_gradients_raises_with_report_text() -> None:
    x = problem_input(5, 5)
    with pytest.raises(AssertionError) as info:
        assert_gradients(problem_forward, x, problem_backward)
    assert str(check_gradients(problem_forward, x, problem_backward)) == str(info.value)
    assert assert_gradients(norm_f(), x, norm_vjp()).ok


@pytest.mark.parametrize("mode", ["full", "probe"])
def test_plot_writes_png(tmp_path, mode) -> None:
    pytest.importorskip("matplotlib")
    x = problem_input(6, 6)
    path = tmp_path / "check.png"
    report = check_gradients(problem_forward, x, problem_backward, mode=mode)
    assert report.plot(str(path)) == str(path)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_progress_callback() -> None:
    calls = []
    x = np.random.default_rng(13).standard_normal(6)
    report = check_gradients(
        np.tanh,
        x,
        lambda x, dy: (1 - np.tanh(x) ** 2) * dy,
        progress=lambda d, t: calls.append((d, t)),
    )
    assert calls and all(d <= t for d, t in calls)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    assert calls[-1][0] <= report.n_evals


# --- bad arguments ---------------------------------------------------------------------------


def _ok_vjp(x, dy):
    return dy


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mode": "dense"}, "mode must be"),
        ({"rtol": -1.0}, "rtol"),
        ({"atol": float("nan")}, "atol"),
        ({"seed": 1.5}, "seed"),
        ({"seed": -1}, "seed must be an int >= 0"),
        ({"dy": np.ones(3)}, "shape of y"),
        ({"step": -1.0}, "step"),
        ({"progress": 3}, "progress"),
        ({"jvp": "no"}, "jvp"),
    ],
)
def test_bad_arguments(kwargs, match) -> None:
    with pytest.raises(NormgradError, match=match):
        check_gradients(lambda x: x, np.ones(4), _ok_vjp, **kwargs)


def test_bad_functions_and_inputs() -> None:
    x = np.ones(4)
    with pytest.raises(NormgradError, match="must be a function"):
        check_gradients(np.ones(3), x, _ok_vjp)
    with pytest.raises(NormgradError, match="real floating"):
        check_gradients(lambda x: x, np.arange(4), _ok_vjp)
    with pytest.raises(NormgradError, match="NaN"):
        check_gradients(lambda x: x, np.array([1.0, np.nan]), _ok_vjp)
    with pytest.raises(NormgradError, match="shape of x"):
        check_gradients(lambda x: x, x, lambda x, dy: dy[:2])
    with pytest.raises(NormgradError, match="tuple of 2"):
        check_gradients(lambda a, b: a * b, (x, x), lambda a, b, dy: dy)
    with pytest.raises(NormgradError, match="numeric array"):
        check_gradients(lambda x: "y", x, _ok_vjp)
    with pytest.raises(NormgradError, match="f raised"):
        check_gradients(lambda x: 1 / 0, x, _ok_vjp)
    with pytest.raises(NormgradError, match="limited to"):
        check_gradients(lambda x: x, np.ones(FULL_MAX + 1), _ok_vjp, mode="full")


# --- properties ------------------------------------------------------------------------------


@given(
    c=st.floats(min_value=-4, max_value=4).filter(lambda c: abs(c - 1) > 1e-3 and abs(c) > 1e-2),
    seed=st.integers(0, 2**16),
)
def test_any_constant_factor_is_found(c, seed) -> None:
    x = np.random.default_rng(seed).standard_normal((3, 4))
    report = check_gradients(norm_f(1), x, lambda x, dy: c * norm_vjp(1)(x, dy), seed=seed)
    assert report.diagnosis[0].kind == ("sign" if abs(c + 1) < 1e-3 else "scale")
    assert report.diagnosis[0].evidence["factor"] == pytest.approx(c, rel=1e-6)


def test_error_estimate_has_a_safety_floor_per_direction() -> None:
    from normgrad.check._fd import FiniteDifferences
    from normgrad.check._target import Target

    # Output 0 is linear (Richardson's truncation estimate is 0 there), output 1 curves.
    t = Target(lambda v: np.array([2 * v[0], np.exp(3 * v[1])]), np.array([0.3, 0.7]))
    d = FiniteDifferences(t).directional(np.array([1e-2, 1e-2]))
    assert d.err[0] >= 1e-2 * d.err.max() > 0


def test_the_report_header_says_inconclusive() -> None:
    x = np.array([-1.0, 0.0, 2.0])
    report = check_gradients(np.abs, x, lambda x, dy: np.where(x >= 0, 1.0, -1.0) * dy)
    assert str(report).startswith("gradient check: OK, INCONCLUSIVE")
    assert report.to_dict()["verdict"] == "INCONCLUSIVE"
