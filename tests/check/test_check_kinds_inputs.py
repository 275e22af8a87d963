"""Every kind of finding reached through the other input forms: each single-input wrong case of
tests/grad_corpus.py, made the first of two inputs (a tuple x) or a leaf of a pytree (a JAX
custom_vjp whose backward is the corpus's NumPy vjp), keeps its own first finding, and the
finding and the report name the wrong input (`[0]`, `x['w']`), never the right one."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from grad_corpus import (
    Case,
    cumsum,
    cumsum_transposed,
    cumsum_vjp,
    softmax,
    softmax_diag_vjp,
    softmax_vjp,
    wrong_cases,
)

from normgrad.check import check_gradients
from normgrad.check._catalogue import PASSING, template_of

C = 0.7  # the second input enters as C * b: a right gradient c * dy, distinct from dy

SINGLE = [c for c in wrong_cases() if not isinstance(c.x, tuple)]

# Kinds a JAX custom_vjp cannot express, so not checked through the pytree route (both are
# checked through the tuple route): JAX hands the callback buffers of its own, so a backward
# that writes into them corrupts nothing of the caller's (the check rightly says ok), and
# pure_callback refuses a result whose dtype differs from the one declared (a JaxRuntimeError).
NOT_THROUGH_JAX = {
    "mutates_input": "JAX's callback buffers are its own copies: no caller's array to corrupt",
    "dtype": "pure_callback refuses a result dtype other than the declared one",
}

# The cases named by a pattern of the wrong input's own part (its Jacobian columns in full mode,
# vjp calls and directional derivatives on it in probe mode: `Evidence.for_input`), where the
# whole Jacobian, with a second, right input, shows none (it once said `unknown`, and `offset`
# for ignores_dy), or where the whole's finding (`offset`, `not_linear`) once named no input.
# Their findings are led by the input's name (`_catalogue.for_input`).
PER_INPUT_PATTERN = {
    "lse_ignores_dy",
    "tanh_offset",
    "tanh_abs_dy",
    "cumsum_transposed",
    "cumsum_transposed_probe",
    "problem_backward",
    "softmax_diagonal",
    "norm_no_mean_path",
    "norm_no_var_path",
    "norm_var_path_quarter",
    "whole_norm_diagonal_probe",
    "rms_var_path_half",
    "norm_no_mean_path_probe",
    "norm_var_path_quarter_probe",
}


def _cases(skip: dict[str, str]) -> list[Any]:
    """The single-input cases, but the kinds in `skip`."""
    return [pytest.param(c, id=c.name) for c in SINGLE if c.kind not in skip]


def _y_shape(case: Case) -> tuple[int, ...]:
    return tuple(np.shape(case.f(np.array(case.x))))


def _second(case: Case) -> np.ndarray:
    return np.random.default_rng(7).standard_normal(_y_shape(case))


def _names_in(finding: Any, position: int, name: str) -> list[bool]:
    """For each way the finding's evidence names an input (`input`: its name, `position`: its
    position in the flat inputs): is it the wrong one?"""
    ev = finding.evidence
    return [ev[k] == want for k, want in (("input", name), ("position", position)) if k in ev]


NAMING = {"zero", "sign", "scale", "dtype"}  # kinds whose finding names the one wrong input


def _assert_named(report: Any, wrong: str, right: str, position: int) -> None:
    """The first finding names only the wrong input (by name, and by position in the indices it
    lists); the report leads with the wrong input."""
    first = report.diagnosis[0]
    assert all(_names_in(first, position, wrong)), str(report)
    assert f"input {right} " not in first.message, str(report)
    if first.kind in NAMING:
        assert _names_in(first, position, wrong) and f"input {wrong} " in first.message, str(report)
    indices = first.evidence.get("indices", [])
    assert all(i[0] == position for i in indices), str(report)
    lead = [n for n in report.notes if n.startswith("the errors are in")]
    if lead:  # full mode, not ok: the report leads with the inputs holding the errors
        assert report.notes[0] == lead[0], report.notes
        assert right not in lead[0], report.notes
        if first.kind not in ("mutates_input", "dtype"):  # right values: no input holds errors
            assert lead[0].startswith(f"the errors are in: {wrong} "), report.notes
    if report.worst_index is not None and not report.ok:
        assert report.worst_index[0] == position, str(report)


# --- (a) a tuple x -----------------------------------------------------------------------------


def _tuple_version(case: Case) -> tuple[Any, Any, Any]:
    def f2(a: Any, b: Any) -> Any:
        return case.f(a) + C * b

    def vjp2(a: Any, b: Any, dy: Any) -> Any:
        db = C * dy  # first: a backward that writes into dy must not spoil b's gradient
        return case.vjp(a, dy), db

    return f2, (np.array(case.x), _second(case)), vjp2


@pytest.mark.parametrize("case", _cases({}))
def test_kind_through_a_tuple_input(case: Case) -> None:
    f2, x2, vjp2 = _tuple_version(case)
    report = check_gradients(f2, x2, vjp2, **case.kwargs)
    assert report.diagnosis[0].kind == case.kind, str(report)
    assert report.ok == (case.kind in PASSING), str(report)
    _assert_named(report, "[0]", "[1]", 0)


# --- (b) a pytree x (JAX) ----------------------------------------------------------------------


def _jax_version(case: Case) -> tuple[Any, Any]:
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    y_shape = _y_shape(case)

    def host_f(a: Any) -> Any:
        return np.asarray(case.f(np.array(a)), dtype=np.asarray(a).dtype)

    def host_vjp(a: Any, g: Any) -> Any:
        return np.asarray(case.vjp(np.array(a), np.array(g)))

    @jax.custom_vjp
    def op(a: Any) -> Any:
        out = jax.ShapeDtypeStruct(y_shape, a.dtype)
        return jax.pure_callback(host_f, out, a)

    def fwd(a: Any) -> Any:
        return op(a), a

    def bwd(a: Any, g: Any) -> Any:
        out = jax.ShapeDtypeStruct(a.shape, a.dtype)
        return (jax.pure_callback(host_vjp, out, a, g),)

    op.defvjp(fwd, bwd)

    def fj(x: Any) -> Any:
        return op(x["w"]) + C * x["b"]

    with jax.enable_x64(True):
        params = {"w": jnp.asarray(case.x), "b": jnp.asarray(_second(case))}
    return fj, params


@pytest.mark.parametrize("case", _cases(NOT_THROUGH_JAX))
def test_kind_through_a_jax_pytree_leaf(case: Case) -> None:
    fj, params = _jax_version(case)
    report = check_gradients(fj, params, **case.kwargs)
    assert report.diagnosis[0].kind == case.kind, str(report)
    assert report.ok == (case.kind in PASSING), str(report)
    _assert_named(report, "x['w']", "x['b']", 1)  # leaves in key order: b, w


@pytest.mark.parametrize("route", ["tuple", "pytree"])
def test_a_pattern_of_one_input_is_said_of_that_input(route: str) -> None:
    """Findings made on one input's own part lead with its name, carry its name and position in
    the evidence, and still read as their catalogue template."""
    for case in [c for c in SINGLE if c.name in PER_INPUT_PATTERN]:
        if route == "tuple":
            f2, x2, vjp2 = _tuple_version(case)
            report = check_gradients(f2, x2, vjp2, **case.kwargs)
            name, position = "[0]", 0
        else:
            fj, params = _jax_version(case)
            report = check_gradients(fj, params, **case.kwargs)
            name, position = "x['w']", 1
        assert report.diagnosis[0].kind == case.kind, (case.name, str(report))
        for finding in report.diagnosis:
            assert finding.message.startswith(f"input {name}: "), (case.name, str(report))
            assert finding.evidence["input"] == name, (case.name, finding)
            assert finding.evidence["position"] == position, (case.name, finding)
            assert template_of(finding) is not None, (case.name, finding)


def test_every_kind_of_a_single_input_case_is_tried_on_some_route() -> None:
    assert set(NOT_THROUGH_JAX) <= {c.kind for c in SINGLE}
    assert PER_INPUT_PATTERN <= {c.name for c in SINGLE}
    assert len(SINGLE) >= 25


# --- several wrong inputs, each its own mistake ------------------------------------------------


def _softmax_and_cumsum(da_wrong: Any, db_wrong: Any) -> tuple[Any, Any, Any]:
    """f(a, b) = softmax(a) + cumsum(b), with each input's vjp given."""

    def f(a: Any, b: Any) -> Any:
        return softmax(a) + cumsum(b)

    def vjp(a: Any, b: Any, g: Any) -> Any:
        return da_wrong(a, g), db_wrong(b, g)

    rng = np.random.default_rng(31)
    return f, (rng.standard_normal((2, 6)), rng.standard_normal((2, 6))), vjp


@pytest.mark.parametrize("mode", ["full", "probe"])
def test_each_wrong_input_is_named_by_its_own_pattern(mode: str) -> None:
    """Input [0] diagonal, input [1] transposed: one finding each, in order, each naming its
    input, with indices (where listed) in the whole x."""
    f, x, vjp = _softmax_and_cumsum(softmax_diag_vjp, cumsum_transposed)
    report = check_gradients(f, x, vjp, mode=mode)
    assert report.kinds[:1] == ["diagonal"] and "transpose" in report.kinds, str(report)
    by_input = {d.evidence["input"]: d.kind for d in report.diagnosis}
    assert by_input == {"[0]": "diagonal", "[1]": "transpose"}, str(report)
    if mode == "full":
        assert report.notes[0].startswith("the errors are in: [0] "), report.notes
        assert "[1] (max error" in report.notes[0], report.notes


@pytest.mark.parametrize("mode", ["full", "probe"])
def test_a_pattern_and_a_factor_are_named_together(mode: str) -> None:
    """Input [0] right but for a factor 2, input [1] transposed: `scale` for [0] (the other
    inputs said wrong), `transpose` for [1]."""
    f, x, vjp = _softmax_and_cumsum(lambda a, g: 2 * softmax_vjp(a, g), cumsum_transposed)
    report = check_gradients(f, x, vjp, mode=mode)
    assert report.kinds == ["scale", "transpose"], str(report)
    first, second = report.diagnosis
    assert first.evidence["input"] == "[0]" and first.evidence["factor"] == pytest.approx(2)
    assert "[1] wrong" in first.message and second.message.startswith("input [1]: ")


def test_a_right_input_is_not_named_when_the_other_has_a_few_wrong_elements() -> None:
    """A few wrong elements of input [1] stay `partial` (the whole Jacobian's rule), their
    indices in the whole x, in both modes."""

    def db(b: Any, g: Any) -> Any:
        out = cumsum_vjp(b, g)
        out[1, 3] *= 3.0
        return out

    f, x, vjp = _softmax_and_cumsum(softmax_vjp, db)
    for mode in ("full", "probe"):
        report = check_gradients(f, x, vjp, mode=mode)
        assert report.kinds == ["partial"], (mode, str(report))
        assert report.diagnosis[0].evidence["indices"] == [(1, 1, 3)], (mode, str(report))
