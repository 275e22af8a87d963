"""The checker's driver: choose the mode, compute both sides, compare, hand over to diagnosis.

Tolerance for each compared value (an element of dx in `full` mode, a directional derivative
in `probe` mode), one formula (`_diagnose.Tol`) everywhere:

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
from collections.abc import Callable
from typing import Any

import numpy as np

from .._errors import NormgradError
from ._diagnose import (
    Side,
    Tol,
    diagnose_full,
    diagnose_jvp,
    diagnose_probe,
    nonfinite_finding,
    passed_findings,
)
from ._fd import FiniteDifferences
from ._report import Finding, GradReport
from ._target import F64, Evaluations, Target

MODES = ("auto", "full", "probe")
FULL_MAX = 2048  # largest number of inputs (and of outputs) for the dense Jacobian
AUTO_FULL_MAX = 1024  # `auto` builds the dense Jacobian up to this many inputs
PROBES = 8  # random directions in probe mode
LOCALIZE_BUDGET = 400  # evaluations of f spent on localizing bad elements in probe mode

Pair = tuple[F64, F64]  # (dy, dx = vjp(x, dy)), flat
Diagnosis = tuple[list[Finding], list[int] | None]  # findings, localized flat indices


def check_gradients(
    f: Callable[..., Any],
    x: Any,
    vjp: Callable[..., Any],
    *,
    dy: Any = None,
    jvp: Callable[..., Any] | None = None,
    mode: str = "auto",
    step: Any = None,
    rtol: float | None = None,
    atol: float | None = None,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
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
    - `mode`: `"full"` (dense numerical Jacobian, up to `FULL_MAX` elements), `"probe"`
      (`PROBES` random directional derivatives, any size), `"auto"` (full up to
      `AUTO_FULL_MAX` inputs).
    - `step`: finite-difference step (number or one per element), used as is; default per
      element `eps**(1/4) * max(|x_j|, rms(x))`, shrunk where f curves on a finer scale.
    - `rtol`, `atol`: added to the finite-difference error estimate (defaults above).
    - `seed`: a non-negative int that seeds every random choice; the same call gives the same
      report.
    - `progress(done, total)`: called after each evaluation of `f` (keyword only); `total`
      is the planned number of evaluations and may grow (step refinement, localization).

    Returns a `GradReport`; `report.ok` is the verdict and `report.diagnosis` the findings.
    """
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

    t = Target(f, x, vjp, jvp, Evaluations(progress))
    fd = FiniteDifferences(t)
    # A stream of its own, so dy is not the very vector a user drew with default_rng(seed).
    rng = np.random.default_rng((int(seed), 0x6E67))
    dy1 = _cotangent(dy, t, rng)
    dy2 = rng.standard_normal(t.m)
    h = fd.steps(step)
    if mode == "auto":
        mode = "full" if t.n <= AUTO_FULL_MAX and t.m <= FULL_MAX else "probe"
    if mode == "full" and (t.n > FULL_MAX or t.m > FULL_MAX):
        raise NormgradError(
            f"mode='full' builds a dense {t.m}x{t.n} Jacobian with {4 * t.n} evaluations of f; "
            f"it is limited to {FULL_MAX} inputs and outputs. Use mode='probe' (or 'auto') for "
            "large inputs, or check a smaller input."
        )
    raw = t.vjp_raw(dy1)
    eps_a = t.analytic_eps(raw)
    pairs = [(dy1, t.flatten_vjp(raw)), (dy2, t.vjp(dy2))]
    tol = Tol(eps_a, math.sqrt(eps_a) if rtol is None else float(rtol), atol)
    columns = t.n if mode == "full" else PROBES
    t.evals.plan(13 + 4 * columns)
    fd.calibrate(rng, h)
    fd.detect_complex(rng, h)
    t.evals.plan((6 if fd.complex_ok else 4) * columns)
    labels = ("the given dy" if dy is not None else "a random dy", "a second, random dy")
    if mode == "full":
        return _full(fd, rng, h, pairs, tol, labels)
    return _probe(fd, rng, h, pairs, tol, labels)


def assert_gradients(
    f: Callable[..., Any],
    x: Any,
    vjp: Callable[..., Any],
    *,
    dy: Any = None,
    jvp: Callable[..., Any] | None = None,
    mode: str = "auto",
    step: Any = None,
    rtol: float | None = None,
    atol: float | None = None,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
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
    )
    if not report.ok:
        raise AssertionError(str(report))
    return report


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


def _full(
    fd: FiniteDifferences,
    rng: np.random.Generator,
    h: F64,
    pairs: list[Pair],
    tol: Tol,
    labels: Any,
) -> GradReport:
    t = fd.target
    jac, err, kink = fd.jacobian(h)
    sides = []
    for dy, dx in pairs:
        num = jac.T @ dy
        mag = np.abs(dy) @ np.abs(jac)
        floor = fd.rounding_floor(tol.eps_a) * float(np.max(np.abs(dy)))
        floor = floor + _measured(t, dy, dx, tol.eps_a)
        fde = np.abs(dy) @ err
        scale = float(np.max(mag, initial=0.0))
        tl, strict = tol(num, fde, mag + _finite_abs(dx), scale, floor=floor)
        kinks = (kink & (dy != 0)[:, None]).any(axis=0)
        sides.append(Side(dy, dx, num, fde, tl, strict, kinks, tol.atol_for(scale), mag))
    analytic_jacobian: list[F64 | None] = [None]

    def diagnose() -> Diagnosis:
        findings, analytic_jacobian[0] = diagnose_full(fd, sides, jac, err, tol)
        return findings, None

    n = t.n
    unit = [np.eye(1, n, j).ravel() for j in range(n)] if t.jvp_fn is not None else []
    report = _finish(
        fd, "full", sides, pairs, tol, labels, diagnose, unit, list(jac.T), list(err.T)
    )
    report.analytic_jacobian = analytic_jacobian[0]
    report.numerical_jacobian = jac
    report.step_sweep = _sweep_fn(fd, h, rng)
    return report


def _probe(
    fd: FiniteDifferences,
    rng: np.random.Generator,
    h: F64,
    pairs: list[Pair],
    tol: Tol,
    labels: Any,
) -> GradReport:
    t = fd.target
    dirs, vals, errs, kinks = [], [], [], []
    for _ in range(PROBES):
        u = h * rng.standard_normal(t.n)
        d = fd.directional(u)
        dirs.append(u)
        vals.append(d.value)
        errs.append(d.err)
        kinks.append(d.kink)
    sides = []
    for dy, dx in pairs:
        num = np.array([dy @ v for v in vals])
        fde = np.array([np.abs(dy) @ e for e in errs])
        ana = np.array([dx @ u for u in dirs])
        dxa = _finite_abs(dx)
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

    def diagnose() -> Diagnosis:
        return diagnose_probe(fd, sides, pairs[0][1], dirs, vals, h, tol, rng, LOCALIZE_BUDGET)

    report = _finish(fd, "probe", sides, pairs, tol, labels, diagnose, dirs, vals, errs)
    report.step_sweep = _sweep_fn(fd, h, rng)
    return report


def _finish(
    fd: FiniteDifferences,
    mode: str,
    sides: list[Side],
    pairs: list[Pair],
    tol: Tol,
    labels: Any,
    diagnose: Callable[[], Diagnosis],
    jvp_dirs: list[F64],
    jvp_vals: list[F64],
    jvp_errs: list[F64],
) -> GradReport:
    """The verdict, the findings and the report, common to both modes."""
    t = fd.target
    ok = all(s.passed for s in sides)
    located: list[int] | None = None
    bad_grad = nonfinite_finding(t, [(lab, dx) for lab, (_, dx) in zip(labels, pairs, strict=True)])
    if bad_grad is not None:
        ok, findings = False, [bad_grad]
    elif ok:
        findings = passed_findings(sides)
    else:
        findings, located = diagnose()
    if t.jvp_fn is not None:
        findings_jvp = _check_jvp(t, jvp_dirs, jvp_vals, jvp_errs, tol)
        if findings_jvp:
            ok = False
            findings = [f for f in findings if f.kind not in ("ok", "fd_noise")] + findings_jvp
    # The summary shows the user's cotangent, unless only the second one fails.
    k = 1 if sides[0].passed and not sides[1].passed else 0
    s, dx = sides[k], pairs[k][1]
    notes = list(t.notes.items)
    if k == 1:
        notes.append(
            f"the check passes for {labels[0]} but fails for {labels[1]}; the errors and arrays "
            "shown are for the second one."
        )
    diff = np.abs(s.dx - s.num)
    full = mode == "full"
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
        mode=mode,
        n_evals=t.evals.done,
        tolerance=t.unflatten(s.tol) if full else s.tol,
        rtol=tol.rtol,
        atol=s.atol,
        notes=notes,
        eval_dtype=np.dtype(t.eval_out_dtype).name,
        analytic_dtype=_dtype_name(tol.eps_a),
        complex_step=fd.complex_ok,
        probe_analytic=None if full else s.dx,
        probe_numerical=None if full else s.num,
        input_shapes=list(t.shapes),
        output_shape=tuple(t.y_shape),
    )


def _check_jvp(
    t: Target, dirs: list[F64], vals: list[F64], errs: list[F64], tol: Tol
) -> list[Finding]:
    """jvp(u) against the numerical J u along each direction (unit vectors in full mode)."""
    ana = np.concatenate([t.jvp(u) for u in dirs])
    num, err = np.concatenate(vals), np.concatenate(errs)
    weight = np.concatenate([np.full(t.m, np.sum(np.abs(u))) for u in dirs])
    scale = float(np.max(np.abs(num), initial=0.0))
    limit, _ = tol(num, err, _finite_abs(ana) + np.abs(num), scale, weight=weight)
    if np.all(np.abs(ana - num) <= limit):
        return []
    return diagnose_jvp(ana, num, limit, t)


def _finite_abs(a: F64) -> F64:
    """|a| where finite, else 0: a NaN or Inf in the user's values fails the comparison itself
    and must not widen the tolerance it is compared with."""
    return np.where(np.isfinite(a), np.abs(a), 0.0)


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
