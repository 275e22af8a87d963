"""The budgets of check_gradients and assert_gradients (`budgets=Budgets(...)` or a dict):
probes, full_max, auto_full_max, localize_budget (the exported constants are their defaults)."""

import inspect

import numpy as np
import pytest

import normgrad
from normgrad import NormgradError
from normgrad.check import (
    AUTO_FULL_MAX,
    FULL_MAX,
    LOCALIZE_BUDGET,
    PROBES,
    Budgets,
    assert_gradients,
    check_gradients,
)

BUDGETS = {
    "probes": PROBES,
    "full_max": FULL_MAX,
    "auto_full_max": AUTO_FULL_MAX,
    "localize_budget": LOCALIZE_BUDGET,
}


def norm_f(x):
    return normgrad.normalize(x, -1)


def norm_vjp(x, dy):
    return normgrad.normalize_backward(normgrad.normalize_forward(x, -1)[1], dy).x


def two_bad_elements(x, dy):
    dx = norm_vjp(x, dy)
    dx[7, 3] *= 3.0
    dx[90, 99] = 0.0
    return dx


@pytest.mark.parametrize("fn", [check_gradients, assert_gradients])
def test_constants_are_the_defaults(fn) -> None:
    assert inspect.signature(fn).parameters["budgets"].default is None
    assert Budgets()._asdict() == BUDGETS
    assert (PROBES, FULL_MAX, AUTO_FULL_MAX, LOCALIZE_BUDGET) == (8, 2048, 1024, 1000)


def test_probes_sets_the_number_of_directions() -> None:
    x = np.random.default_rng(1).standard_normal((40, 50))
    default = check_gradients(norm_f, x, norm_vjp, mode="probe")
    three = check_gradients(norm_f, x, norm_vjp, mode="probe", budgets=Budgets(probes=3))
    assert default.ok and three.ok
    assert len(default.probe_numerical) == PROBES and len(three.probe_numerical) == 3
    assert three.n_evals < default.n_evals
    assert (
        assert_gradients(norm_f, x, norm_vjp, mode="probe", budgets=Budgets(probes=3)).n_evals
        == three.n_evals
    )


def test_full_max_limits_mode_full() -> None:
    x = np.random.default_rng(2).standard_normal((5, 10))  # 50 inputs and outputs
    assert (
        check_gradients(norm_f, x, norm_vjp, mode="full", budgets=Budgets(full_max=50)).mode
        == "full"
    )
    with pytest.raises(NormgradError, match="limited to 49 inputs and outputs"):
        check_gradients(norm_f, x, norm_vjp, mode="full", budgets=Budgets(full_max=49))
    with pytest.raises(NormgradError, match="limited to 49"):
        assert_gradients(norm_f, x, norm_vjp, mode="full", budgets=Budgets(full_max=49))
    # A large output counts too: 50 inputs, 200 outputs.
    with pytest.raises(NormgradError, match="200x50 Jacobian"):
        check_gradients(
            lambda a: np.tile(a, 4),
            x,
            lambda a, g: 0 * a,
            mode="full",
            budgets=Budgets(full_max=100),
        )


def test_auto_full_max_switches_the_mode() -> None:
    x = np.random.default_rng(3).standard_normal((10, 20))  # 200 inputs
    assert check_gradients(norm_f, x, norm_vjp).mode == "full"
    assert check_gradients(norm_f, x, norm_vjp, budgets=Budgets(auto_full_max=200)).mode == "full"
    assert check_gradients(norm_f, x, norm_vjp, budgets=Budgets(auto_full_max=199)).mode == "probe"
    # `auto` never goes above full_max, whatever auto_full_max says.
    capped = check_gradients(norm_f, x, norm_vjp, budgets={"auto_full_max": 5000, "full_max": 199})
    assert capped.mode == "probe" and capped.ok


def test_localize_budget_bounds_the_localization() -> None:
    x = np.random.default_rng(2).standard_normal((100, 100))
    found = check_gradients(norm_f, x, two_bad_elements, mode="probe")
    evidence = found.diagnosis[0].evidence
    assert found.kinds == ["partial"] and evidence["indices"] == [(7, 3), (90, 99)]
    assert evidence["budget"] == LOCALIZE_BUDGET and 20 < evidence["evaluations"] <= 200
    short = check_gradients(
        norm_f, x, two_bad_elements, mode="probe", budgets=Budgets(localize_budget=20)
    )
    evidence = short.diagnosis[0].evidence
    assert short.kinds == ["partial"] and "budget ran out" in short.diagnosis[0].message
    assert evidence["budget"] == 20 and 0 < evidence["evaluations"] <= 20
    assert short.n_evals < found.n_evals


@pytest.mark.parametrize("name", sorted(BUDGETS))
@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "8", None])
def test_bad_budgets_raise(name, bad) -> None:
    x = np.ones(4)
    with pytest.raises(NormgradError, match=rf"{name} must be an int >= 1 .*got {bad!r}"):
        check_gradients(lambda a: a, x, lambda a, g: g, budgets={name: bad})
    with pytest.raises(NormgradError, match=rf"{name} must be an int >= 1"):
        assert_gradients(lambda a: a, x, lambda a, g: g, budgets=Budgets(**{name: bad}))


@pytest.mark.parametrize("bad", [8, {"probe": 8}, "probes=8"])
def test_bad_budgets_argument_raises(bad) -> None:
    with pytest.raises(NormgradError, match="budgets must be"):
        check_gradients(lambda a: a, np.ones(4), lambda a, g: g, budgets=bad)
