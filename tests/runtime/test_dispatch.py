"""Which path a call takes (`_dispatch`): the modes, the environment, the planned-call
cache, `plan_forward`/`plan_backward`, and the generic path for everything else."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import normgrad as ng
from normgrad import _runtime, testing
from normgrad._errors import NormgradError

pytest.importorskip("numba")


def _paths(fn):
    with testing.record_paths() as seen:
        fn()
    return [p for _, p in seen]


def test_env_and_context_select_the_path(rng, monkeypatch):
    x = rng.normal(size=(4, 5))
    w = np.ones(5)
    monkeypatch.setattr(_runtime.STATE, "env_mode", None)  # read at the next call
    monkeypatch.setenv("NORMGRAD_KERNELS", "0")
    assert _paths(lambda: ng.normalize(x)) == ["generic"]
    with ng.use_kernels(False):
        assert _paths(lambda: ng.normalize(x)) == ["generic"]
    with ng.use_kernels("auto"):
        # strided, below kernel_min_size: generic; C-contiguous: the small kernels
        assert _paths(lambda: ng.normalize(x.T, -1, weight=w[:4])) == ["generic"]
        assert _paths(lambda: ng.normalize(x, -1, weight=w)) == ["small"]
        assert _paths(lambda: ng.normalize(x)) == ["small"]
    monkeypatch.setattr(_runtime.STATE, "env_mode", None)
    monkeypatch.setenv("NORMGRAD_KERNELS", "1")  # a kernel at every size, strided included
    assert _paths(lambda: ng.normalize(x, -1, weight=w)) == ["small"]
    assert _paths(lambda: ng.normalize(x.T, -1, weight=w[:4])) == ["blocked"]
    monkeypatch.setattr(_runtime.STATE, "env_mode", None)
    monkeypatch.setenv("NORMGRAD_KERNELS", "sweep")  # path names work there too
    assert _paths(lambda: ng.normalize(x, -1)) == ["generic"]  # not a batch-norm layout
    monkeypatch.setattr(_runtime.STATE, "env_mode", None)
    monkeypatch.setenv("NORMGRAD_KERNELS", "yes")
    with pytest.raises(NormgradError, match="NORMGRAD_KERNELS"):
        ng.normalize(x)
    monkeypatch.setattr(_runtime.STATE, "env_mode", None)
    with pytest.raises(NormgradError, match="mode"), ng.use_kernels("fast"):
        pass


CALLS = [
    pytest.param((40, 50), -1, None, ["small", "native", "blocked", "generic"], id="rows"),
    pytest.param(
        (8, 4, 30, 30),
        (0, 2, 3),
        (4, 1, 1),
        ["small", "native", "sweep", "blocked", "generic"],
        id="bn",
    ),
    pytest.param(
        (300, 400), None, (400,), ["small", "native", "blocked", "generic"], id="whole-affine"
    ),
]


@pytest.mark.parametrize(("shape", "axes", "wshape", "paths"), CALLS)
def test_use_kernels_forces_each_path_where_it_applies(rng, shape, axes, wshape, paths):
    """Each path named in `use_kernels` runs where it can take the call, the generic path
    elsewhere; the plan says which and why, and every path gives the generic results."""
    x = rng.normal(size=shape) + 3
    dy = rng.normal(size=shape)
    kw = {} if wshape is None else {"weight": rng.normal(size=wshape), "bias": np.ones(wshape)}
    with ng.use_kernels(False):
        y0, c0 = ng.normalize_forward(x, axes, **kw)
        g0 = ng.normalize_backward(c0, dy)
    for path in ("small", "native", "blocked", "sweep", "generic"):
        with ng.use_kernels(path):
            plan = ng.plan_forward(x, axes, **kw)
            seen = _paths(lambda: ng.normalize_backward(ng.normalize_forward(x, axes, **kw)[1], dy))
            y, ctx = ng.normalize_forward(x, axes, **kw)
            bplan = ng.plan_backward(ctx, dy)
        expected = path if path in paths else "generic"
        assert plan.path == bplan.path == expected and seen == [expected, expected], path
        assert plan.reason
        np.testing.assert_allclose(y, y0, rtol=1e-12, atol=1e-12)
        g = ng.normalize_backward(ctx, dy)
        np.testing.assert_allclose(g.x, g0.x, rtol=1e-10, atol=1e-12)


def test_plans_say_why(rng):
    x = rng.normal(size=(40, 50))
    assert ng.plan_forward(x.astype(">f8")).reason.startswith("x is not a NumPy")
    assert ng.plan_forward(x[:, ::2], -1).reason.startswith("below kernel_min_size")
    with ng.use_kernels(False):
        assert "switched off" in ng.plan_forward(x).reason
    plan = ng.plan_forward(x, -1)
    assert plan.path == "small" and plan.layout.shape4 == (40, 1, 1, 50)
    _, ctx = ng.normalize_forward(x, -1)
    assert ng.plan_backward(ctx, x.astype(np.float32)).path == "small"
    with pytest.raises(NormgradError, match="shape"):
        ng.plan_backward(ctx, x[:3])


def test_thresholds_are_settings(rng):
    x = rng.normal(size=(40, 50))
    with testing.settings(small_max_size=100):
        assert ng.plan_forward(x, -1).path == "native"
        with testing.settings(kernel_min_size=10**9):
            assert ng.plan_forward(x[:, ::2], -1).path == "generic"
    assert ng.plan_forward(x, -1).path == "small"


def test_non_numpy_inputs_use_the_generic_path(rng):
    torch = pytest.importorskip("torch")
    x = torch.tensor(rng.normal(size=(4, 5)))
    with ng.use_kernels(True):
        assert _paths(lambda: ng.normalize(x)) == ["generic"]


def test_import_does_not_import_numba():
    code = "import sys, normgrad; print('numba' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "False"


def test_small_call_cache_keeps_validation(rng):
    """The small forward caches validated arguments per call signature: a value that
    compares equal to a cached valid one (True == 1) must still be refused, with the same
    message as the generic path."""
    x = rng.normal(size=(4, 5))
    bad = [
        ({"eps": 1}, {"eps": True}),
        ({"axes": 1}, {"axes": True}),
        ({"axes": (1,)}, {"axes": (True,)}),
        ({"ddof": 1}, {"ddof": True}),
    ]
    for good, wrong in bad:
        for mode in (True, False):
            with ng.use_kernels(mode):
                ng.normalize(x, **good)
                with pytest.raises(NormgradError) as err:
                    ng.normalize(x, **wrong)
            if mode:
                msg = str(err.value)
            else:
                assert str(err.value) == msg
    with testing.record_paths() as seen:
        y1 = ng.normalize(x, (1,))
        y2 = ng.normalize(x, [1])  # unhashable axes: the general path, same numbers
    assert [p for _, p in seen] == ["small", "generic"]
    np.testing.assert_allclose(y1, y2, rtol=0, atol=8 * np.finfo(float).eps * np.abs(y2).max())


def test_axis_is_axes(rng):
    """`axis=` as NumPy spells it: the same results; both at once is an error; axis errors
    are also NumPy's AxisError."""
    from numpy.exceptions import AxisError

    x = rng.normal(size=(4, 5))
    np.testing.assert_array_equal(ng.normalize(x, axis=-1), ng.normalize(x, -1))
    np.testing.assert_array_equal(ng.normalize_jvp(x, x, axis=0)[1], ng.normalize_jvp(x, x, 0)[1])
    np.testing.assert_array_equal(ng.normalize_jacobian(x, axis=1), ng.normalize_jacobian(x, 1))
    with pytest.raises(NormgradError, match="both given"):
        ng.normalize(x, 0, axis=1)
    for bad in (2, (0, 0), (), "a"):
        with pytest.raises(AxisError) as err:
            ng.normalize(x, bad)
        assert isinstance(err.value, NormgradError)
