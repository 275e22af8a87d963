"""The checker's driver: validate the arguments, choose the mode, compute both sides, compare,
call the rules (`_rules.diagnose`), build the report.

Tolerance for each compared value (an element of dx in `full` mode, a directional derivative
in `probe` mode), one formula (`_evidence.Tol`) everywhere:

    tol = fd_error_estimate + analytic rounding + atol + rtol * |numerical|

- `fd_error_estimate`: the Richardson estimate (see `_fd`), propagated through `dy`.
- analytic rounding: 8 ulp (of the gradient's dtype) of the magnitudes involved,
  sum_i |dy_i| |J_ij| + |dx_j|, plus 8 ulp of max|dy| max|y| / xscale_j (y-sized terms that
  cancel inside the backward), plus, for a float32 backward, its rounding measured against
  the same vjp on float64 copies (`_measured`).
- `rtol` defaults to sqrt(eps) of the gradient's dtype (1.5e-8 for float64, 3.5e-4 for
  float32) and `atol` to `rtol * max_j sum_i |dy_i| |J_ij|`, so elements whose true gradient
  cancels to about 0 are judged against the scale of the terms, not against 0.

The check passes when every value is within `tol`. If some value only passes thanks to the
finite-difference term, the finding is `fd_noise` (no evidence of a bug, but the numerical side
cannot confirm the requested accuracy). A NaN or Inf in the backward's dx always fails
(finding `nonfinite`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import numpy as np

from .._errors import NormgradError
from ._catalogue import PASSING
from ._evidence import (
    Directions,
    Evidence,
    Gradient,
    NumericalJacobian,
    Side,
    Tol,
    finite_abs,
)
from ._fd import FiniteDifferences
from ._report import GradReport
from ._routes import route
from ._rules import Diagnosis, diagnose
from ._target import F64, Evaluations, Target

MODES = ("auto", "full", "probe")
# The defaults of `Budgets` (check_gradients' `budgets=`; setting these names changes nothing):
FULL_MAX = 2048  # full_max: most inputs (and outputs) for the dense Jacobian of mode="full"
AUTO_FULL_MAX = 1024  # auto_full_max: mode="auto" builds the dense Jacobian up to this many inputs
PROBES = 8  # probes: random directions in probe mode
LOCALIZE_BUDGET = 1000  # localize_budget: evaluations of f for localizing bad elements (probe)


class Budgets(NamedTuple):
    """How much work a check may do: `check_gradients(..., budgets=Budgets(probes=16))` (or a
    dict of the same names). Each is a positive int."""

    probes: int = PROBES  # random directions in probe mode
    full_max: int = FULL_MAX  # most inputs and outputs for mode="full"
    auto_full_max: int = AUTO_FULL_MAX  # mode="auto" is full up to this many inputs
    localize_budget: int = LOCALIZE_BUDGET  # evaluations of f to localize bad elements


_BUDGET_MEANING = {
    "probes": "the number of random directions in probe mode",
    "full_max": "the most inputs and outputs for mode='full'",
    "auto_full_max": "mode='auto' checks up to this many inputs in full mode",
    "localize_budget": "evaluations of f for localizing bad elements in probe mode",
}
_BUDGET_DEFAULT = Budgets(PROBES, FULL_MAX, AUTO_FULL_MAX, LOCALIZE_BUDGET)


class _Setup(NamedTuple):
    """What both modes start from: the numerical side, its steps, the random stream, the
    tolerance, the two cotangents and the user's vjp for each."""

    fd: FiniteDifferences
    steps: F64
    rng: np.random.Generator
    tol: Tol
    dys: list[F64]
    grads: list[Gradient]
    budgets: Budgets
    raw: Any = None  # the vjp's result for the first cotangent, as returned


def check_gradients(
    f: Callable[..., Any],
    x: Any,
    vjp: Callable[..., Any] | None = None,
    *,
    dy: Any = None,
    jvp: Callable[..., Any] | None = None,
    mode: str = "auto",
    step: Any = None,
    rtol: float | None = None,
    atol: float | None = None,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
    budgets: Budgets | Mapping[str, int] | None = None,
) -> GradReport:
    """Compare a backward `vjp` with finite differences of `f` and say what is wrong.

    - `f(x) -> y`: any function of NumPy arrays (it is called with NumPy arrays); `f(x)` must
      be finite.
    - `vjp(x, dy) -> dx`: the backward under test, `dx = J^T dy`.
    - `x`: one array, or a tuple of arrays; then `f(*xs)`, `vjp(*xs, dy)` returns a tuple of
      gradients, and `jvp(*xs, *txs)` returns `ty` (a list is one array, not several inputs).
    - `dy`: the cotangent (default: seeded Gaussian; never all ones, since the gradient of
      `sum(y)` of a normalization is exactly zero and hides bugs). A second random cotangent
      is always checked too.
    - `jvp(x, tx) -> ty`: optional forward derivative, checked against `J tx`.
    - `mode`: `"full"` (dense numerical Jacobian, up to `full_max` inputs and outputs),
      `"probe"` (`probes` random directional derivatives, any size), `"auto"` (full up to
      `auto_full_max` inputs, and never above `full_max`).
    - `step`: finite-difference step (number or one per element), used as is; default per
      element `eps**(1/4) * max(|x_j|, rms(x))`, shrunk where f curves on a finer scale.
    - `rtol`, `atol`: added to the finite-difference error estimate (defaults above).
    - `seed`: a non-negative int that seeds every random choice; the same call gives the same
      report.
    - `progress(done, total)`: called after each evaluation of `f` (keyword only); `total`
      is the planned number of evaluations and may grow (step refinement, localization).
    - `budgets`: a `Budgets` (or a dict of its names), positive ints: `probes=8`,
      `full_max=2048`, `auto_full_max=1024`, and `localize_budget=1000` evaluations of `f`
      for localizing bad elements in probe mode.

    Returns a `GradReport`; `report.ok` is the verdict and `report.diagnosis` the findings.
    With no `vjp`, `f` may be `normgrad.external(cmd)` (a program speaking docs/protocol.md) or a
    torch or JAX callable, whose own backward is checked (docs/checker.md).
    """
    if vjp is None:  # a program (normgrad.external) or a torch/JAX callable: see _routes
        kw = dict(dy=dy, jvp=jvp, mode=mode, step=step, rtol=rtol, atol=atol, seed=seed)
        routed = route(check_gradients, f, x, kw | dict(progress=progress, budgets=budgets))
        if routed is not None:
            return routed
    _check_options(mode, rtol, atol, seed, progress, vjp)
    budgets = _budgets(budgets)
    t = Target(f, x, vjp, jvp, Evaluations(progress), names=getattr(f, "input_names", None))
    fd = FiniteDifferences(t)
    # A stream of its own, so dy is not the very vector a user drew with default_rng(seed).
    rng = np.random.default_rng((int(seed), 0x6E67))
    dy1 = _cotangent(dy, t, rng)
    dy2 = rng.standard_normal(t.m)
    h = fd.steps(step)
    mode = _choose_mode(mode, t, budgets)
    raw = t.vjp_raw(dy1)
    eps_a = t.analytic_eps(raw)
    labels = ("the given dy" if dy is not None else "a random dy", "a second, random dy")
    grads = [Gradient(labels[0], t.flatten_vjp(raw)), Gradient(labels[1], t.vjp(dy2))]
    tol = Tol(eps_a, math.sqrt(eps_a) if rtol is None else float(rtol), atol)
    columns = t.n if mode == "full" else budgets.probes
    t.evals.plan(13 + 4 * columns)
    fd.calibrate(rng, h)
    fd.detect_complex(rng, h)
    t.evals.plan((6 if fd.complex_ok else 4) * columns)
    setup = _Setup(fd, h, rng, tol, [dy1, dy2], grads, budgets, raw)
    ev = _full(setup) if mode == "full" else _probe(setup)
    diagnosis = diagnose(ev)
    return _report(ev, diagnosis, _sweep_fn(fd, h, rng))


def assert_gradients(
    f: Callable[..., Any],
    x: Any,
    vjp: Callable[..., Any] | None = None,
    *,
    dy: Any = None,
    jvp: Callable[..., Any] | None = None,
    mode: str = "auto",
    step: Any = None,
    rtol: float | None = None,
    atol: float | None = None,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
    budgets: Budgets | Mapping[str, int] | None = None,
) -> GradReport:
    """`check_gradients`, raising `AssertionError` with the report's text when not ok."""
    report = check_gradients(
        f,
        x,
        vjp,
        dy=dy,
        jvp=jvp,
        mode=mode,
        step=step,
        rtol=rtol,
        atol=atol,
        seed=seed,
        progress=progress,
        budgets=budgets,
    )
    if not report.ok:
        raise AssertionError(str(report))
    return report


def _check_options(mode: str, rtol: Any, atol: Any, seed: Any, progress: Any, vjp: Any) -> None:
    if mode not in MODES:
        raise NormgradError(f"mode must be one of {MODES}; got {mode!r}.")
    for name, v in (("rtol", rtol), ("atol", atol)):
        if v is not None and (
            isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0
        ):
            raise NormgradError(f"{name} must be a finite number >= 0 or None; got {v!r}.")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise NormgradError(f"seed must be an int >= 0; got {seed!r}.")
    if progress is not None and not callable(progress):
        raise NormgradError(f"progress must be a function progress(done, total); got {progress!r}.")
    if not callable(vjp):
        raise NormgradError(
            f"vjp must be a function; got {type(vjp).__name__}. Pass check_gradients(f, x, vjp) "
            "with f(x) -> y and vjp(x, dy) -> dx."
        )


def _budgets(given: Any) -> Budgets:
    """`budgets=` as a `Budgets`: None (the defaults), a `Budgets` or a dict of its names;
    each an int >= 1."""
    if given is None:
        return _BUDGET_DEFAULT
    if not isinstance(given, Budgets):
        unknown = set(given) - set(Budgets._fields) if isinstance(given, Mapping) else None
        if unknown is None or unknown:
            raise NormgradError(
                f"budgets must be a normgrad.check.Budgets or a dict of {Budgets._fields}; got "
                f"{given!r}. Pass e.g. budgets=Budgets(probes=16)."
            )
        given = Budgets(**given)
    for name, v, default in zip(Budgets._fields, given, _BUDGET_DEFAULT, strict=True):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise NormgradError(
                f"{name} must be an int >= 1 ({_BUDGET_MEANING[name]}); got {v!r}. Pass e.g. "
                f"budgets=Budgets({name}={default})."
            )
    return Budgets(*(int(v) for v in given))


def _choose_mode(mode: str, t: Target, budgets: Budgets) -> str:
    """`auto`: full up to `auto_full_max` inputs (and `full_max` outputs), else probe."""
    full_max = budgets.full_max
    if mode == "auto":
        small = t.n <= min(budgets.auto_full_max, full_max) and t.m <= full_max
        return "full" if small else "probe"
    if mode == "full" and (t.n > full_max or t.m > full_max):
        raise NormgradError(
            f"mode='full' builds a dense {t.m}x{t.n} Jacobian with {4 * t.n} evaluations of f; "
            f"it is limited to {full_max} inputs and outputs. Use mode='probe' (or 'auto') for "
            "large inputs, check a smaller input, or raise budgets=Budgets(full_max=...)."
        )
    return mode


def _cotangent(dy: Any, t: Target, rng: np.random.Generator) -> F64:
    if dy is None:
        return rng.standard_normal(t.m)
    try:
        arr = np.asarray(dy, dtype=np.float64)
    except (TypeError, ValueError):
        raise NormgradError(
            f"dy must be a real array shaped like y; got {type(dy).__name__}."
        ) from None
    if arr.shape != t.y_shape:
        if arr.ndim == 0:
            arr = np.broadcast_to(arr, t.y_shape)
        else:
            raise NormgradError(
                f"dy must have the shape of y = f(x), {t.y_shape}; got {arr.shape}."
            )
    if not np.all(np.isfinite(arr)):
        raise NormgradError("dy holds NaN or Inf; pass finite values.")
    return arr.ravel().copy()


def _full(s: _Setup) -> Evidence:
    """Full mode: the dense numerical Jacobian, and dx against J^T dy per element."""
    fd, tol = s.fd, s.tol
    t = fd.target
    jac, err, kink, one_sided = fd.jacobian(s.steps)
    sides = []
    for dy, (_, dx) in zip(s.dys, s.grads, strict=True):
        num = jac.T @ dy
        mag = np.abs(dy) @ np.abs(jac)
        floor = fd.rounding_floor(tol.eps_a) * float(np.max(np.abs(dy)))
        floor = floor + _measured(t, dy, dx, tol.eps_a)
        fde = np.abs(dy) @ err
        scale = float(np.max(mag, initial=0.0))
        tl, strict = tol(num, fde, mag + finite_abs(dx), scale, floor=floor)
        kinks = (kink & (dy != 0)[:, None]).any(axis=0)
        sides.append(Side(dy, dx, num, fde, tl, strict, kinks, tol.atol_for(scale), mag))
    return Evidence(
        fd,
        sides,
        s.grads,
        tol,
        s.steps,
        s.rng,
        s.budgets.localize_budget,
        numerical=NumericalJacobian(jac, err),
        raw=s.raw,
        one_sided=one_sided,
    )


def _probe(s: _Setup) -> Evidence:
    """Probe mode: <dy, J u> against <dx, u> along `probes` random directions u."""
    fd, tol = s.fd, s.tol
    t = fd.target
    dirs, vals, errs, kinks = [], [], [], []
    for _ in range(s.budgets.probes):
        u = s.steps * s.rng.standard_normal(t.n)
        d = fd.directional(u)
        dirs.append(u)
        vals.append(d.value)
        errs.append(d.err)
        kinks.append(d.kink)
    sides = []
    for dy, (_, dx) in zip(s.dys, s.grads, strict=True):
        num = np.array([dy @ v for v in vals])
        fde = np.array([np.abs(dy) @ e for e in errs])
        ana = np.array([dx @ u for u in dirs])
        dxa = finite_abs(dx)
        rms = float(np.sqrt(np.mean(dxa * dxa)))
        mag = np.array([(dxa + rms) @ np.abs(u) for u in dirs])
        floor = fd.rounding_floor(tol.eps_a) * float(np.max(np.abs(dy)))
        floor = floor + _measured(t, dy, dx, tol.eps_a)
        scale = max(float(np.abs(dy) @ np.abs(v)) for v in vals)
        weight = np.array([np.sum(np.abs(u)) for u in dirs])
        floors = np.array([floor @ np.abs(u) for u in dirs])
        tl, strict = tol(num, fde, mag, scale, weight=weight, floor=floors)
        kink = np.array([bool(np.any(k & (dy != 0))) for k in kinks])
        sides.append(Side(dy, ana, num, fde, tl, strict, kink, tol.atol_for(scale), strict))
    probes = Directions(dirs, vals, errs)
    budget = s.budgets.localize_budget
    return Evidence(fd, sides, s.grads, tol, s.steps, s.rng, budget, probes=probes, raw=s.raw)


def _report(ev: Evidence, diagnosis: Diagnosis, sweep: Callable[[], Any]) -> GradReport:
    """The verdict and the report. The summary shows the user's cotangent, unless only the
    second one fails."""
    t, sides, findings = ev.target, ev.sides, diagnosis.findings
    within = all(s.passed for s in sides) or any(f.kind == "kink" for f in findings)
    ok = within and all(f.kind in PASSING for f in findings)
    k = 1 if sides[0].passed and not sides[1].passed else 0
    s, dx = sides[k], ev.grads[k].dx
    notes = list(t.notes.items)
    if k == 1:
        notes.append(
            f"the check passes for {ev.grads[0].label} but fails for {ev.grads[1].label}; the "
            "errors and arrays shown are for the second one."
        )
    diff = np.abs(s.dx - s.num)
    full = ev.numerical is not None
    if full and t.multi and not ok:
        notes.insert(0, _wrong_inputs(t, s))
    located = diagnosis.located
    if full:
        worst: tuple[int, ...] | None = t.index(int(np.argmax(diff)))
    else:
        worst = None if not located else t.index(located[0])
    return GradReport(
        ok=ok,
        max_abs_error=float(np.max(diff)),
        max_rel_error=_rel(diff, s.num, s.rel_mag),
        worst_index=worst,
        analytic=t.unflatten(dx),
        numerical=t.unflatten(s.num) if full else None,
        fd_error_estimate=t.unflatten(s.fd) if full else s.fd,
        diagnosis=findings,
        mode="full" if full else "probe",
        n_evals=t.evals.done,
        tolerance=t.unflatten(s.tol) if full else s.tol,
        rtol=ev.tol.rtol,
        atol=s.atol,
        notes=notes,
        eval_dtype=np.dtype(t.eval_out_dtype).name,
        analytic_dtype=_dtype_name(ev.tol.eps_a),
        complex_step=ev.fd.complex_ok,
        probe_analytic=None if full else s.dx,
        probe_numerical=None if full else s.num,
        analytic_jacobian=diagnosis.analytic_jacobian,
        numerical_jacobian=ev.numerical.J if ev.numerical is not None else None,
        input_shapes=list(t.shapes),
        output_shape=tuple(t.y_shape),
        step_sweep=sweep,
    )


def _wrong_inputs(t: Target, s: Side) -> str:
    """The note the report leads with for several inputs: which hold errors beyond tolerance."""
    bad = []
    for i, name in enumerate(t.names):
        sl = t.input_slice(i)
        if np.any(s.bad[sl]):
            err = np.abs(s.dx[sl] - s.num[sl])
            bad.append(f"{name} (max error {float(np.nanmax(err)):.3g})")
    if not bad:  # e.g. mutates_input, dtype, a jvp finding: right values, wrong otherwise
        return (
            "the errors are in: no input's values (every input's gradient matches within "
            "tolerance for this cotangent); the findings say what is wrong."
        )
    return "the errors are in: " + ", ".join(bad) + "."


def _measured(t: Target, dy: F64, dx: F64, eps_a: float) -> F64:
    """A low-precision backward's own rounding, measured: 2 |vjp(x, dy) - vjp(float64 x, dy)|
    (zero for float64 gradients, or when the vjp refuses float64)."""
    if eps_a <= np.finfo(np.float64).eps:
        return np.zeros(t.n)
    dx64 = t.vjp64(dy)
    if dx64 is None:
        t.notes.add(
            "the backward refused float64 input, so its rounding is estimated, not measured."
        )
        return np.zeros(t.n)
    ok = np.isfinite(dx)
    return np.where(ok, 2 * np.abs(np.where(ok, dx, 0.0) - dx64), 0.0)


def _rel(diff: F64, num: F64, mag: F64) -> float:
    """Relative error, with a floor of 1e-3 of the magnitudes involved where num ~ 0."""
    big = max(float(np.max(np.abs(num), initial=0.0)), float(np.max(mag, initial=0.0)))
    floor = 1e-3 * big if big > 0 else 1.0
    return float(np.max(diff / np.maximum(np.abs(num), floor)))


def _dtype_name(eps: float) -> str:
    for name in ("float16", "float32", "float64"):
        if eps == float(np.finfo(name).eps):
            return name
    return "float"


def _sweep_fn(
    fd: FiniteDifferences, h: F64, rng: np.random.Generator
) -> Callable[[], dict[str, Any]]:
    """Lazy (run by `plot`): the error of a plain central difference against the step size,
    along one random direction, relative to the largest derivative along it."""
    seed = int(rng.integers(2**31))
    t = fd.target

    def sweep() -> dict[str, Any]:
        u = h * np.random.default_rng(seed).standard_normal(t.n)
        best = fd.directional(u)
        scale = float(np.max(np.abs(best.value), initial=0.0)) or 1.0
        mults = np.logspace(-8, 4, 37)
        errors = []
        with np.errstate(all="ignore"):  # the largest steps may leave f's domain
            for s in mults:
                d = (t.F(t.x64 + s * u, finite=False) - t.F(t.x64 - s * u, finite=False)) / (2 * s)
                errors.append(float(np.max(np.abs(d - best.value))) / scale)
        hmax = float(np.max(np.abs(h)))
        return {
            "steps": (mults * hmax).tolist(),
            "errors": errors,
            "chosen_step": hmax,
            "estimate": float(np.max(best.err)) / scale,
        }

    return sweep
