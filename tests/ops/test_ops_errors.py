"""Every bad input raises NormgradError (a ValueError) that names the problem and the fix."""

import ast

import numpy as np
import pytest

import normgrad as ng
from normgrad import NormgradError

X = np.arange(12.0).reshape(3, 4)


def test_error_type_is_a_value_error():
    assert issubclass(NormgradError, ValueError)


@pytest.mark.parametrize(
    "x,kwargs,match",
    [
        (np.zeros((0, 3)), {}, r"x is empty \(shape \(0, 3\)\)"),
        (np.zeros((3, 0)), {"axes": 0}, r"x is empty"),
        (np.float64(3.0), {}, r"0-d array"),
        (X, {"axes": 2}, r"axis 2 is out of range for an array of rank 2; valid axes are -2\.\.1"),
        (X, {"axes": -3}, r"axis -3 is out of range"),
        (X, {"axes": (0, -2)}, r"names the same axis twice"),
        (X, {"axes": ()}, r"axes=\(\) selects no axis.*axes=None"),
        (X, {"axes": 1.0}, r"axes must be None, an int or a tuple of ints; got 1.0"),
        (X, {"axes": "0"}, r"axes must contain ints"),
        (X, {"ddof": 12}, r"ddof=12 must be smaller than the group size n=12"),
        (X, {"ddof": 4, "axes": 1}, r"ddof=4 must be smaller than the group size n=4"),
        (X, {"ddof": -1}, r"ddof must be a number >= 0"),
        (X, {"eps_mode": "middle"}, r"eps_mode must be 'inside'.*got 'middle'"),
        (X, {"eps": -1e-5}, r"eps must be >= 0.*got eps=-1e-05"),
        (X, {"eps": float("nan")}, r"eps must be a finite real number"),
        (X, {"weight": np.ones(3)}, r"weight of shape \(3,\) does not broadcast to .*\(3, 4\)"),
        (X, {"bias": np.ones((2, 3, 4))}, r"bias of shape \(2, 3, 4\) does not broadcast"),
        (X, {"weight": np.array(["a"] * 4)}, r"weight has dtype <U1"),
        (X.astype(complex), {}, r"x has dtype complex128; normalize needs real numbers"),
        (np.array([True, False]), {}, r"x has dtype bool"),
        (np.array(["a", "b"]), {}, r"x has dtype <U1"),
        ([1.0, 2.0], {}, r"x must be an array.*got list.*numpy\.asarray"),
        (np.ones((2, 3)), {"eps": 0.0}, r"zero variance and eps=0.*pass eps > 0"),
        (np.ones((2, 3)), {"eps": 0.0, "eps_mode": "outside"}, r"zero variance and eps=0"),
    ],
)
def test_bad_input_raises_clear_error(x, kwargs, match):
    with pytest.raises(NormgradError, match=match):
        ng.normalize(x, **kwargs)


def test_zero_variance_in_one_group_only_is_refused_with_eps_zero():
    x = np.array([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]])
    with pytest.raises(NormgradError, match="zero variance"):
        ng.normalize(x, axes=1, eps=0.0)
    assert np.all(ng.normalize(x, axes=1, eps=1e-5)[1] == 0)  # eps > 0: well defined


@pytest.mark.parametrize("name", ["dy"])
def test_cotangent_of_wrong_shape(name):
    _, ctx = ng.normalize_forward(X)
    with pytest.raises(
        NormgradError, match=r"dy has shape \(4, 3\) but must have the shape .*\(3, 4\)"
    ):
        ng.normalize_backward(ctx, np.ones((4, 3)))
    with pytest.raises(NormgradError, match=r"dy has shape \(12,\)"):
        ng.normalize_backward(ctx, np.ones(12))


def test_tangent_of_wrong_shape():
    with pytest.raises(NormgradError, match=r"tx has shape \(3,\)"):
        ng.normalize_jvp(X, np.ones(3))
    _, ctx = ng.normalize_forward(X)
    with pytest.raises(NormgradError, match=r"tdy has shape"):
        ng.normalize_backward_jvp(ctx, np.ones_like(X), tdy=np.ones(2))
    with pytest.raises(NormgradError, match=r"tweight was given but the context has no weight"):
        ng.normalize_backward_jvp(ctx, np.ones_like(X), tweight=np.ones(4))


def test_jacobian_refuses_large_inputs():
    with pytest.raises(NormgradError, match=r"dense 5000x5000 matrix.*normalize_backward"):
        ng.normalize_jacobian(np.zeros(5000))
    assert ng.normalize_jacobian(np.arange(6.0), max_size=6).shape == (6, 6)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
def test_nan_and_inf_stay_in_their_group():
    x = np.arange(12.0).reshape(3, 4)
    x[1, 2] = np.nan
    x[2, 0] = np.inf
    y = ng.normalize(x, axes=1)
    assert np.all(np.isnan(y[1])) and np.all(np.isnan(y[2]))
    np.testing.assert_allclose(y[0], ng.normalize(x[0]))
    assert np.all(np.isnan(ng.normalize(x)))  # one group: everything is affected


@pytest.mark.parametrize(
    "shape,axes,per_position,per_group",
    [
        ((8, 6), -1, "(6,)", "(8, 1)"),
        ((4, 3, 5, 5), (0, 2, 3), "(4, 1, 5, 5)", "(3, 1, 1)"),
        ((4, 3, 5), None, "(4, 3, 5)", "()"),
    ],
)
def test_parameter_shape_error_names_both_shapes_that_fit(shape, axes, per_position, per_group):
    x = np.ones(shape)
    with pytest.raises(NormgradError) as info:
        ng.normalize(x, axes=axes, weight=np.ones(7))
    message = str(info.value)
    assert f"{per_position} for one value per position" in message
    assert f"{per_group} for one value per group" in message
    for fits in (per_position, per_group):  # the shapes the message names are accepted
        ng.normalize(x, axes=axes, weight=np.ones(ast.literal_eval(fits)))


def test_tangent_parameter_shape_error_names_the_shapes():
    x = np.ones((8, 6)) + np.arange(6.0)
    with pytest.raises(NormgradError, match=r"tweight of shape \(7,\).*\(6,\) for one value"):
        ng.normalize_jvp(x, np.ones_like(x), axes=-1, weight=np.ones(6), tweight=np.ones(7))
