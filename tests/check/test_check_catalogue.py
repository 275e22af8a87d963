"""The catalogue of findings (`normgrad.check._catalogue`): it covers exactly `KINDS`, and the
checker's findings are built from it."""

import numpy as np
import pytest

import normgrad
from normgrad.check import KINDS, Finding, check_gradients
from normgrad.check._catalogue import CATALOGUE, PARTIAL, template_of


def test_catalogue_covers_exactly_kinds() -> None:
    assert {t.kind for t in CATALOGUE} == set(KINDS)
    # The public order of KINDS (documented in docs/checker.md) is the catalogue's order.
    assert KINDS == (
        "ok",
        "fd_noise",
        "nondifferentiable",
        "kink",
        "nonfinite",
        "zero",
        "nondeterministic",
        "mutates_input",
        "dtype",
        "ignores_dy",
        "offset",
        "not_linear",
        "sign",
        "scale",
        "layout",
        "transpose",
        "diagonal",
        "missing_term",
        "coefficient",
        "partial",
        "unknown",
    )
    assert len({t.message for t in CATALOGUE}) == len(CATALOGUE)  # each text written once
    assert all(t.hint for t in CATALOGUE if t.kind != "ok")


def test_template_of_recognizes_only_its_own_findings() -> None:
    built = PARTIAL.finding({"count": 2}, count=2, n=9, indices=[(1,), (4,)], more="")
    assert template_of(built) is PARTIAL
    assert template_of(Finding("partial", built.message + " (edited)", built.hint)) is None
    assert template_of(Finding("partial", built.message, "another hint")) is None
    assert template_of(Finding("unknown", built.message, built.hint)) is None


def _nvjp(axes):
    return lambda x, dy: normgrad.normalize_backward(normgrad.normalize_forward(x, axes)[1], dy).x


def _cube_vjp(z, g):
    return 3 * z**2 * g


@pytest.mark.parametrize(
    ("f", "vjp", "kwargs", "kind"),
    [
        (lambda x: normgrad.normalize(x, 1), lambda x, dy: -_nvjp(1)(x, dy), {}, "sign"),
        (lambda x: normgrad.normalize(x, 1), lambda x, dy: 0 * x, {}, "zero"),
        (lambda x: normgrad.normalize(x, 1), lambda x, dy: _nvjp(1)(x, x), {}, "ignores_dy"),
        (
            lambda x: normgrad.normalize(x, 1),
            # Right in every group plus a term coupling different groups: no path of the
            # groups is missing, so no name fits (it was once misnamed missing_term).
            lambda x, dy: _nvjp(1)(x, dy) + 0.1 * dy[::-1],
            {},
            "unknown",
        ),
        (lambda x: np.cumsum(x, axis=1), lambda x, dy: np.cumsum(dy, axis=1), {}, "transpose"),
        (lambda z: z**3, _cube_vjp, {"jvp": lambda z, t: 0 * z}, "zero"),
        (lambda z: z**3, _cube_vjp, {"jvp": lambda z, t: np.nan * t}, "nonfinite"),
        (lambda z: z**3, _cube_vjp, {"jvp": lambda z, t: z * t}, "unknown"),
        (lambda z: z**3, _cube_vjp, {"jvp": lambda z, t: -3 * z**2 * t}, "sign"),
    ],
)
@pytest.mark.parametrize("mode", ["full", "probe"])
def test_probe_and_jvp_findings_come_from_the_catalogue(f, vjp, kwargs, kind, mode) -> None:
    x = np.random.default_rng(3).standard_normal((6, 8))
    report = check_gradients(f, x, vjp, mode=mode, **kwargs)
    assert report.diagnosis[0].kind == (kind if isinstance(kind, str) else kind[mode]), str(report)
    for finding in report.diagnosis:
        assert template_of(finding) is not None, finding
