"""check_gradients(f, x) on torch and JAX callables: the framework's own backward is checked, a
planted bug is named as the NumPy path names it, inputs are named, bad input is refused."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from normgrad import NormgradError
from normgrad.check import assert_gradients, check_gradients

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
jnp = jax.numpy

X = np.random.default_rng(0).standard_normal((4, 5))
DIAGONAL = {"diagonal", "missing_term"}


def kinds(report):
    return {f.kind for f in report.diagnosis}


def t_norm(x):
    return (x - x.mean()) / torch.sqrt(x.var(unbiased=False) + 1e-5)


class DiagonalOnly(torch.autograd.Function):
    """The problem's mistake: the backward keeps only the Jacobian's diagonal path."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return t_norm(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g / torch.sqrt(x.var(unbiased=False) + 1e-5)


class Gain(torch.nn.Module):
    """y = gain * normalize(x), with a planted bug in the gradient of `gain` only."""

    def __init__(self, bug: bool):
        super().__init__()
        self.gain = torch.nn.Parameter(torch.full((5,), 1.5, dtype=torch.float64))
        self.register_buffer("count", torch.zeros(()))
        self.bug = bug

    def forward(self, x):
        return _GainFn.apply(x, self.gain, self.bug)


class _GainFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gain, bug):
        y = t_norm(x)
        ctx.save_for_backward(x, y, gain)
        ctx.bug = bug
        return gain * y

    @staticmethod
    def backward(ctx, g):
        x, y, gain = ctx.saved_tensors
        with torch.enable_grad():
            xx = x.detach().requires_grad_(True)
            (dx,) = torch.autograd.grad(t_norm(xx), xx, g * gain)
        dgain = (g * y).sum(0) * (2.0 if ctx.bug else 1.0)
        return dx, dgain, None


def test_torch_function_of_tensors_and_float32_pass():
    for dtype in (torch.float64, torch.float32):
        report = check_gradients(t_norm, torch.tensor(X, dtype=dtype))
        assert report.ok, report


def test_autograd_function_with_the_problems_bug_is_named():
    report = check_gradients(DiagonalOnly.apply, torch.tensor(X))
    assert not report.ok and kinds(report) >= DIAGONAL, report
    with pytest.raises(AssertionError, match="diagonal"):
        assert_gradients(DiagonalOnly.apply, torch.tensor(X))


def test_numpy_input_to_a_torch_function_is_detected():
    assert not check_gradients(DiagonalOnly.apply, X).ok


def test_module_parameters_are_inputs_and_named():
    x = torch.tensor(X)
    assert check_gradients(Gain(bug=False), x).ok
    report = check_gradients(Gain(bug=True), x)
    assert not report.ok
    notes = " ".join(report.notes)
    assert "x, gain" in notes and "errors are in: gain" in notes, notes

    # The same mistake through the NumPy path gets the same findings.
    def f(x, gain):
        return gain * (x - x.mean()) / np.sqrt(x.var() + 1e-5)

    def vjp(x, gain, dy):
        s = np.sqrt(x.var() + 1e-5)
        y, g = (x - x.mean()) / s, dy * gain
        return (g - g.mean() - y * (g * y).mean()) / s, 2.0 * (dy * y).sum(0)

    numpy_report = check_gradients(f, (X, np.full(5, 1.5)), vjp)
    assert kinds(report) == kinds(numpy_report), (report, numpy_report)


def test_torch_jvp_is_checked_where_forward_mode_works():
    report = check_gradients(t_norm, torch.tensor(X))
    assert report.ok and not any("forward-mode" in n for n in report.notes)
    assert any("forward-mode" in n for n in check_gradients(DiagonalOnly.apply, X).notes)


def test_train_mode_dropout_is_refused_with_the_fix():
    m = torch.nn.Sequential(torch.nn.Linear(5, 5).double(), torch.nn.Dropout(0.5))
    with pytest.raises(NormgradError, match=r"training mode with dropout.*eval\(\)"):
        check_gradients(m, torch.tensor(X))
    assert check_gradients(m.eval(), torch.tensor(X)).ok


def test_a_nondeterministic_function_is_refused():
    with pytest.raises(NormgradError, match="nondeterministic"):
        check_gradients(lambda x: x * torch.rand(()), torch.tensor(X))


@pytest.mark.parametrize(
    ("x", "match"),
    [
        (torch.arange(6), "dtype int64"),
        (torch.ones(3, dtype=torch.complex128), "dtype complex128"),
        ((torch.ones(3), "abc"), r"input x\[1\] is str"),
    ],
)
def test_bad_torch_inputs_are_named(x, match):
    with pytest.raises(NormgradError, match=match):
        check_gradients(lambda *a: a[0] * 2, x)


def test_tuple_and_dict_outputs_are_refused_clearly():
    with pytest.raises(NormgradError, match=r"tuple of 2 outputs.*f\(\*a\)\[0\]"):
        check_gradients(lambda x: (x, 2 * x), torch.tensor(X))
    with pytest.raises(NormgradError, match=r"dict of outputs \(keys \['y'\]\)"):
        check_gradients(lambda x: {"y": jnp.sin(x)}, jnp.asarray(X))


# -- JAX ------------------------------------------------------------------------------------


def j_norm(x):
    return (x - x.mean()) / jnp.sqrt(x.var() + 1e-5)


def _rule(bug: bool):
    @jax.custom_vjp
    def f(x):
        return j_norm(x)

    def fwd(x):
        return j_norm(x), x

    def bwd(x, g):
        if bug:
            return (g / jnp.sqrt(x.var() + 1e-5),)
        return (jax.vjp(j_norm, x)[1](g)[0],)

    f.defvjp(fwd, bwd)
    return f


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_jax_custom_vjp(dtype):
    assert check_gradients(_rule(False), X.astype(dtype)).ok
    report = check_gradients(_rule(True), X.astype(dtype))
    assert kinds(report) >= DIAGONAL, report


def test_jax_jvp_is_checked_for_plain_functions():
    report = check_gradients(j_norm, jnp.asarray(X, dtype=jnp.float32))
    assert report.ok and not report.notes, report


def test_a_pytree_leaf_with_a_bug_is_named():
    @jax.custom_vjp
    def scaled(w, x):
        return w * x

    scaled.defvjp(lambda w, x: (w * x, (w, x)), lambda r, g: ((3.0 * g * r[1]).sum(0), g * r[0]))

    def f(params, x):
        return jnp.tanh(scaled(params["w"], x) + params["b"][0])

    params = {"w": jnp.ones(5), "b": [jnp.zeros(5)]}
    report = check_gradients(f, (params, jnp.asarray(X)))
    assert not report.ok
    notes = " ".join(report.notes)
    assert "params['b'][0], params['w'], x" in notes
    assert "errors are in: params['w']" in notes, notes


def test_float64_holds_on_every_thread_while_a_check_runs_and_is_restored_after():
    """XLA may run a pure_callback on a thread of its own: there a thread-local x64 flag is off
    and JAX would refuse the callback's float64 result."""
    import threading

    from normgrad.check._fw_jax import x64

    def dtype_on_another_thread() -> object:
        seen: list[object] = []
        t = threading.Thread(target=lambda: seen.append(jnp.asarray(np.zeros(1)).dtype))
        t.start()
        t.join()
        return seen[0]

    before = jax.config.read("jax_enable_x64")
    with x64(), x64():  # nested: restored once, by the outer one
        assert dtype_on_another_thread() == np.float64
    assert jax.config.read("jax_enable_x64") == before
    if not before:
        assert dtype_on_another_thread() == np.float32


def test_a_float64_pure_callback_backward_is_checked():
    def host_vjp(x, g):
        return np.asarray(g) * (1 - np.tanh(np.asarray(x)) ** 2)

    @jax.custom_vjp
    def op(x):
        return jnp.tanh(x)

    def bwd(x, g):
        return (jax.pure_callback(host_vjp, jax.ShapeDtypeStruct(x.shape, x.dtype), x, g),)

    op.defvjp(lambda x: (op(x), x), bwd)
    with jax.enable_x64(True):
        x = jnp.asarray(np.random.default_rng(3).standard_normal(4000))
    for _ in range(5):  # the callback's thread varies from call to call
        assert check_gradients(op, x, mode="probe").ok


def test_a_jax_function_closing_over_a_tracer_is_refused():
    leaked = []

    @jax.jit
    def grab(a):
        leaked.append(a)
        return a

    grab(1.0)
    with pytest.raises(NormgradError, match="closes over a JAX tracer"):
        check_gradients(lambda x: x * leaked[0], jnp.asarray(X))


def test_import_normgrad_check_imports_neither_framework():
    code = (
        "import sys, numpy as np, normgrad\n"
        "from normgrad.check import check_gradients\n"
        "check_gradients(np.sin, np.ones(3), lambda x, dy: np.cos(x) * dy)\n"
        "assert 'torch' not in sys.modules and 'jax' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# -- the drop-in helpers ------------------------------------------------------------------


def test_torch_gradcheck_checks_only_inputs_that_require_grad():
    import normgrad.torch as ntorch

    x = torch.tensor(X, requires_grad=True)
    assert ntorch.gradcheck(t_norm, (x,)) is True
    with pytest.raises(AssertionError, match="diagonal"):
        ntorch.gradcheck(DiagonalOnly.apply, (x,))
    assert ntorch.gradcheck(DiagonalOnly.apply, (x,), raise_exception=False) is False
    # The buggy gain is held fixed when it does not require grad:
    gain = torch.full((5,), 1.5, dtype=torch.float64)
    assert ntorch.gradcheck(lambda x, g: _GainFn.apply(x, g, True), (x, gain))
    with pytest.raises(AssertionError):
        ntorch.gradcheck(lambda x, g: _GainFn.apply(x, g, True), (x, gain.requires_grad_(True)))
    with pytest.raises(NormgradError, match="no input requires grad"):
        ntorch.gradcheck(t_norm, (torch.tensor(X),))


def test_jax_check_grads_orders_and_modes():
    import normgrad.jax as njax

    njax.check_grads(j_norm, (jnp.asarray(X),), order=2, modes=("fwd", "rev"))
    njax.check_grads(_rule(False), (jnp.asarray(X),), modes=("rev",))
    with pytest.raises(AssertionError, match="diagonal"):
        njax.check_grads(_rule(True), (jnp.asarray(X),), modes=("rev",))
    with pytest.raises(NormgradError, match="no forward mode"):
        njax.check_grads(_rule(False), (jnp.asarray(X),), modes=("fwd",))
    with pytest.raises(NormgradError, match="order"):
        njax.check_grads(j_norm, (jnp.asarray(X),), order=0)


# -- per-input findings name pytree leaves and module parameters ------------------------------


class _SignedWeight(torch.autograd.Function):
    """A linear layer whose weight gradient has the wrong sign."""

    @staticmethod
    def forward(ctx, x, w, b):
        ctx.save_for_backward(x, w)
        return x @ w.T + b

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        return g @ w, -(g.T @ x), g.sum(0)


class _Layered(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(5, 3).double()

    def forward(self, x):
        return torch.tanh(_SignedWeight.apply(x, self.layer.weight, self.layer.bias))


def test_a_module_parameter_is_named_in_the_finding_and_leads_the_report():
    report = check_gradients(_Layered(), torch.tensor(X))
    first = report.diagnosis[0]
    assert first.kind == "sign" and first.evidence["input"] == "layer.weight", str(report)
    assert "input layer.weight" in first.message and "layer.bias right" in first.message
    assert report.notes[0].startswith("the errors are in: layer.weight"), report.notes


def test_pytree_leaves_are_named_in_findings():
    @jax.custom_vjp
    def scaled(w, x):
        return w * x

    scaled.defvjp(lambda w, x: (w * x, (w, x)), lambda r, g: ((3.0 * g * r[1]).sum(0), g * r[0]))

    def f(params, x):
        return jnp.tanh(scaled(params["w"], x) + params["b"][0])

    params = {"w": jnp.ones(5), "b": [jnp.zeros(5)]}
    report = check_gradients(f, (params, jnp.asarray(X)))
    first = report.diagnosis[0]
    assert first.kind == "scale" and first.evidence["input"] == "params['w']", str(report)
    assert first.evidence["factor"] == pytest.approx(3.0, rel=1e-4)
    assert report.notes[0].startswith("the errors are in: params['w']"), report.notes

    def zero_w(w, x):
        return w * x

    zw = jax.custom_vjp(zero_w)
    zw.defvjp(lambda w, x: (w * x, (w, x)), lambda r, g: (jnp.zeros_like(r[0]), g * r[0]))
    report = check_gradients(lambda p, x: jnp.tanh(zw(p["w"], x)), ({"w": jnp.ones(5)}, X))
    assert report.kinds[0] == "zero" and "input p['w']" in report.diagnosis[0].message, str(report)
