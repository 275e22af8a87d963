"""`normgrad.explain`: the reverse sweep node by node, against independent references."""

import numpy as np
import pytest
from _fd import fd_jacobian
from hypothesis import given
from hypothesis import strategies as st

from normgrad import NormgradError, explain, normalize, normalize_backward, normalize_forward
from normgrad._problem import problem_backward, problem_input

OPTIONS = [
    ((3, 4), None, "inside", 0),
    ((3, 4), 1, "outside", 1),
    ((2, 3, 2), (0, 2), "inside", 0.5),
    ((5,), None, "outside", 0),
]


@pytest.mark.parametrize(("shape", "axes", "eps_mode", "ddof"), OPTIONS)
def test_every_node_agrees_with_finite_differences(shape, axes, eps_mode, ddof, rng):
    x = rng.standard_normal(shape)
    dy = rng.standard_normal(shape)
    ex = explain(x, axes, dy, eps_mode=eps_mode, ddof=ddof)
    assert [n.name for n in ex.nodes] == ["x", "mu", "d", "var", "s", "y"]
    for node in ex.nodes:
        scale = 1.0 + np.max(np.abs(node.adjoint))
        assert node.max_abs_diff < 1e-7 * scale, node.name
    assert ex.first_mismatch is None
    # x_bar equals the op's backward, and an independent full-Jacobian reference.
    ctx = normalize_forward(x, axes, eps_mode=eps_mode, ddof=ddof)[1]
    np.testing.assert_allclose(ex.node("x").adjoint, normalize_backward(ctx, dy).x, atol=1e-12)
    jac = fd_jacobian(lambda z: normalize(z, axes, eps_mode=eps_mode, ddof=ddof), x)
    ref = np.tensordot(dy, jac, axes=dy.ndim)
    np.testing.assert_allclose(ex.node("x").adjoint, ref, atol=1e-7)
    np.testing.assert_allclose(ex.node("y").value, normalize(x, axes, eps_mode=eps_mode, ddof=ddof))


def test_forward_values_are_the_intermediates(rng):
    x = rng.standard_normal((4, 3))
    ex = explain(x, 0, eps=1e-3)
    mu = x.mean(axis=0, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=0, keepdims=True)
    np.testing.assert_allclose(ex.node("mu").value, mu)
    np.testing.assert_allclose(ex.node("d").value, x - mu)
    np.testing.assert_allclose(ex.node("var").value, var)
    np.testing.assert_allclose(ex.node("s").value, np.sqrt(var + 1e-3))


def test_adjoints_are_built_from_the_local_derivatives(rng):
    """Each adjoint is the sum of its terms, and each term is its rule applied by hand."""
    x, dy = rng.standard_normal((3, 4)), rng.standard_normal((3, 4))
    ex = explain(x, None, dy)
    n = x.size
    d, s = ex.node("d").value, ex.node("s").value
    for node in ex.nodes[:-1]:
        total = sum(np.broadcast_to(t.value, node.value.shape) for t in node.terms)
        np.testing.assert_allclose(node.adjoint, total)
    s_bar = np.sum(-dy * d / s**2)
    np.testing.assert_allclose(ex.node("s").adjoint.item(), s_bar)
    var_bar = s_bar / (2 * s.item())
    np.testing.assert_allclose(ex.node("var").adjoint.item(), var_bar)
    d_bar = dy / s + var_bar * 2 * d / n
    np.testing.assert_allclose(ex.node("d").adjoint, d_bar)
    np.testing.assert_allclose(ex.node("mu").adjoint.item(), -d_bar.sum())
    assert {t.child for t in ex.node("x").terms} == {"d", "mu"}


def test_dy_defaults_to_ones_and_mu_adjoint_is_not_zero(rng):
    """With dy = ones the true gradient is 0, yet mu's adjoint is -n/s: the mean path matters."""
    x = rng.standard_normal((3, 4))
    ex = explain(x)
    np.testing.assert_array_equal(ex.dy, np.ones_like(x))
    s = ex.node("s").value.item()
    np.testing.assert_allclose(ex.node("mu").adjoint.item(), -x.size / s)
    np.testing.assert_allclose(ex.node("x").adjoint, 0, atol=1e-12)


def test_departures_of_the_question():
    x = problem_input()
    ex = explain(x)
    by_node = {d.node: d for d in ex.departures}
    assert set(by_node) == {"var", "mu", "x", "x (missing mean path)"}
    # The question's dx is problem_backward's, and its error is the missing mean path.
    np.testing.assert_array_equal(by_node["x"].problem_value, problem_backward(x, np.ones_like(x)))
    assert by_node["x"].max_abs_diff == pytest.approx(3.17, abs=0.01)
    assert by_node["x (missing mean path)"].max_abs_diff == pytest.approx(3.17, abs=0.01)
    # The per-element variance adjoint differs from the summed one.
    assert by_node["var"].max_abs_diff > 1.0
    # No departures outside the question's setting.
    assert explain(x[:3, :4], 1).departures == ()
    assert explain(x[:3, :4], eps_mode="outside").departures == ()


def test_first_mismatch_finds_a_corrupted_node(rng):
    from dataclasses import replace

    ex = explain(rng.standard_normal((2, 3)), None, rng.standard_normal((2, 3)))
    var = ex.node("var")
    bad = replace(var, adjoint=var.adjoint + 1.0)
    nodes = tuple(bad if n.name == "var" else n for n in ex.nodes)
    assert replace(ex, nodes=nodes).first_mismatch == "var"


def test_to_dict_is_json_ready(rng):
    import json

    ex = explain(rng.standard_normal((2, 2)))
    doc = json.loads(json.dumps(ex.to_dict()))
    assert [n["name"] for n in doc["nodes"]] == ["x", "mu", "d", "var", "s", "y"]
    assert doc["dx_vs_normalize_backward"] < 1e-12
    assert doc["departures"][0]["node"] == "var"


def test_does_not_mutate_inputs(rng):
    x, dy = rng.standard_normal((3, 3)), rng.standard_normal((3, 3))
    x0, dy0 = x.copy(), dy.copy()
    explain(x, None, dy)
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(dy, dy0)


def test_refuses_bad_input():
    with pytest.raises(NormgradError, match="at most"):
        explain(np.ones(5000))
    with pytest.raises(NormgradError, match="shape of x"):
        explain(np.arange(4.0), dy=np.ones(3))
    with pytest.raises(NormgradError, match="out of range"):
        explain(np.arange(4.0), axes=3)


@given(
    st.lists(st.floats(-10, 10), min_size=2, max_size=8),
    st.sampled_from(["inside", "outside"]),
)
def test_property_sweep_matches_backward(values, eps_mode):
    x = np.asarray(values)
    if np.ptp(x) < 1e-3:
        x = x + np.arange(x.size)
    dy = np.cos(np.arange(x.size))
    ex = explain(x, None, dy, eps_mode=eps_mode)
    assert ex.dx_vs_normalize_backward <= 1e-9 * (1 + np.max(np.abs(ex.node("x").adjoint)))


def test_compare_adjoints_finds_the_first_wrong_node(rng):
    from normgrad._explain import compare_adjoints

    x, dy = rng.standard_normal((3, 4)), rng.standard_normal((3, 4))
    ex = explain(x, None, dy)
    right = {n.name: n.adjoint for n in ex.nodes}
    assert all(c.ok for c in compare_adjoints(ex, right))
    # The question's variance adjoint (per element, not summed) is wrong; mu given as a scalar.
    d, var = ex.node("d").value, ex.node("var").value
    given = {
        "mean": ex.node("mu").adjoint.item(),
        "sigma2": dy * (-0.5 * d / (var + 1e-5) ** 1.5),
        "s": ex.node("s").adjoint,
    }
    result = compare_adjoints(ex, given)
    assert [c.node for c in result] == ["s", "var", "mu"]  # reverse-sweep order
    assert [c.ok for c in result] == [True, False, True]
    with pytest.raises(NormgradError, match="unknown node"):
        compare_adjoints(ex, {"sigma": 1.0})
    with pytest.raises(NormgradError, match="broadcast"):
        compare_adjoints(ex, {"d": np.ones(5)})


def test_large_offset_small_spread_agrees_at_every_node(rng):
    # A fixed relative step (1e-4 of |μ| = 1 here) would swamp a spread of 0.01.
    x = 1e4 + 1e-2 * rng.standard_normal((3, 4))
    dy = rng.standard_normal((3, 4))
    ex = explain(x, None, dy)
    assert all(n.ok for n in ex.nodes), [(n.name, n.max_abs_diff) for n in ex.nodes]
    assert ex.first_mismatch is None
    jac = fd_jacobian(lambda z: normalize(z), x)
    ref = np.tensordot(dy, jac, axes=2)
    np.testing.assert_allclose(ex.node("x").adjoint, ref, rtol=1e-4, atol=1e-4)


def test_compare_adjoints_refuses_two_names_for_one_node_and_complex(rng):
    from normgrad._explain import compare_adjoints

    ex = explain(rng.standard_normal((2, 3)))
    with pytest.raises(NormgradError, match="both name the node mu"):
        compare_adjoints(ex, {"mu": 1.0, "mean": 2.0})
    with pytest.raises(NormgradError, match="complex"):
        compare_adjoints(ex, {"mu": 1.0 + 2.0j})
    doc = compare_adjoints(ex, {"mu": ex.node("mu").adjoint})[0].to_dict()
    assert doc["node"] == "mu" and doc["ok"] is True


def test_explain_is_the_function_and_its_module_is_private():
    import normgrad
    import normgrad._explain as module

    assert normgrad.explain is module.explain
    assert callable(normgrad.explain) and not hasattr(normgrad.explain, "compare_adjoints")
