r"""The numerical side: steps, directional derivatives by central differences with a Richardson
error estimate (refined where f curves on a finer scale), the complex step, the dense Jacobian,
and `fd_vjp`. The user's function is seen through `_target.Target` (flat float64 vectors).

For a perturbation `u` (the step is built into `u`), with $D(s) = [F(x+su) - F(x-su)]/(2s)$:

$$ R = \frac{4 D(1/2) - D(1)}{3}, \qquad
   \text{err} = 3\,|R - D(1/2)| + 4\,\epsilon_F \,(\max|F(x \pm su)| + \text{cond}) $$

$R$ cancels the $O(s^2)$ truncation term, so $|R - D(1/2)|$ measures the truncation error of
the plain estimate (a safe bound for $R$'s); the second term bounds rounding in $F$, with
cond $\approx \max_i \sum_j |J_{ij}||x_j|$ (see `FiniteDifferences.calibrate`).
Where `f` accepts complex input, the complex step $C(t) = \operatorname{Im} F(x + itu)/t$
($t \approx 10^{-20}$) replaces $R$, extrapolated like $R$: $(4 C(t/2) - C(t))/3$, with
$|C(t) - C(t/2)|$ in its error estimate. Its $O(t^2)$ truncation is far below rounding except
where the derivative itself is 0 (like $x^3$ at 0), where the extrapolation makes it exact.
One-sided differences come free: $G(s) = [F(x+su) - 2F(x) + F(x-su)]/s$ is $O(s)$ where $F$
is smooth and a constant jump at a kink, so $|G(1/2)| \approx |G(1)| \gg$ rounding flags one.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import NDArray

from .._errors import NormgradError
from ._target import F64, Target


@dataclass
class Directional:
    """`J u` estimated along one perturbation `u` (all arrays flat over the outputs)."""

    value: F64  # best estimate (complex step where validated, else Richardson)
    err: F64  # error estimate of `value`
    kink: NDArray[np.bool_]  # one-sided differences disagree (nondifferentiable)
    richardson: F64
    rounding: F64  # the rounding part of `err`
    # One-sided derivatives (first-order Richardson from the same evaluations): along +u from
    # the right, and from the left; and their error estimate. Used at kinks.
    right: F64 | None = None
    left: F64 | None = None
    side_err: F64 | None = None

    def scaled(self, k: float) -> Directional:
        one = [None if a is None else a * k for a in (self.right, self.left, self.side_err)]
        return Directional(
            self.value * k, self.err * k, self.kink, self.richardson * k, self.rounding * k, *one
        )


class FiniteDifferences:
    """Derivatives of the target's `f` by finite differences around its `x`.

    Three settings are found once per check, in this order: `steps` (the user's, or chosen:
    then `adaptive`), `calibrate` (`cond`, for the rounding estimate) and `detect_complex`
    (`complex_ok`)."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.complex_ok = False
        self.adaptive = True  # False when the user fixed the step
        self.cond = 0.0  # sum_j |J_ij| |x_j|: how far rounding x moves y (see `calibrate`)

    def restricted(self, view: Target) -> FiniteDifferences:
        """The same settings (complex step, adaptive steps, cond) on a view of one input
        (`Target.restricted`): directions on that input only."""
        fd = FiniteDifferences(view)
        fd.complex_ok, fd.adaptive, fd.cond = self.complex_ok, self.adaptive, self.cond
        return fd

    def steps(self, step: Any) -> F64:
        """Per-element step: eps_F**(1/4) * xscale_j, or the user's (see `xscale`)."""
        t = self.target
        if step is not None:
            try:
                h = np.broadcast_to(np.asarray(step, dtype=np.float64), (t.n,)).copy()
            except (ValueError, TypeError):
                raise NormgradError(
                    f"step must be a positive number (or one per element of x); got {step!r}."
                ) from None
            if not np.all(np.isfinite(h)) or np.any(h <= 0):
                raise NormgradError(f"step must be positive and finite; got {step!r}.")
            self.adaptive = False
        else:
            # Between eps**(1/3) (best for a plain central difference) and eps**(1/5) (best
            # for the Richardson value): rounding inside f is often worse than eps·|y|.
            # `directional` shrinks it where f curves on a finer scale than |x|.
            h = t.eps_f**0.25 * self.xscale()
        # Make x + h exactly representable so the step taken is the step used.
        return (t.x64 + h) - t.x64

    def xscale(self) -> F64:
        """The size of each element: max(|x_j|, rms of its input), 1 for an all-zero input."""
        t = self.target
        out = np.empty(t.n)
        for i in range(len(t.shapes)):
            sl = t.input_slice(i)
            xi = t.x64[sl]
            top = float(np.max(np.abs(xi)))
            rms = top * float(np.sqrt(np.mean((xi / top) ** 2))) if top > 0 else 0.0  # no overflow
            out[sl] = np.maximum(np.abs(xi), rms if rms > 0 else 1.0)
        return out

    def rounding_floor(self, eps_a: float) -> F64:
        """Per element: 8 ulp of max|y| / xscale_j, the size of a derivative error that rounding
        of quantities as large as y (e.g. 1 - tanh(x)**2 near saturation) can cause in the
        analytic side, even where the derivative itself is tiny."""
        top = float(np.max(np.abs(self.target.y0.real), initial=0.0))
        return 8 * eps_a * top / self.xscale()

    def directional(self, u: F64) -> Directional:
        """`J u` by `_directional`. Where the error estimate exceeds sqrt(eps_F) of the value
        (f curves on a scale finer than the step), steps shrink 16x at a time until rounding
        dominates (at most 5 times); then each level's error is also estimated from the next
        level, |R_k - R_{k+1}| (a Richardson table), and the level with the smallest estimate
        wins."""
        first = self._directional(u)
        if not self.adaptive or _relative(first) <= np.sqrt(self.target.eps_f):
            return first
        levels = [first]
        shrink = 1.0
        while len(levels) < 6:
            last = levels[-1]
            shrink /= 16
            levels.append(self._directional(u * shrink).scaled(1 / shrink))
            if float(np.max(last.err - last.rounding)) <= float(np.max(last.rounding)):
                break  # `last` was limited by rounding: smaller steps only get worse
        best = levels[0]
        for k, d in enumerate(levels):
            err = d.err
            if k + 1 < len(levels):
                table = 2 * np.abs(d.value - levels[k + 1].value) + d.rounding
                err = np.minimum(err, np.maximum(table, levels[k + 1].rounding))
            if float(np.max(err)) < float(np.max(best.err)) or k == 0:
                best = Directional(
                    d.value, err, d.kink, d.richardson, d.rounding, d.right, d.left, d.side_err
                )
        return best

    def _directional(self, u: F64) -> Directional:
        t = self.target
        fp1, fm1 = t.F(t.x64 + u), t.F(t.x64 - u)
        fp2, fm2 = t.F(t.x64 + u / 2), t.F(t.x64 - u / 2)
        d1, d2 = (fp1 - fm1) / 2, fp2 - fm2
        rich = (4 * d2 - d1) / 3
        ymag = np.maximum.reduce([np.abs(fp1), np.abs(fm1), np.abs(fp2), np.abs(fm2)])
        rounding = 4 * t.eps_f * (ymag + self.cond)
        err = 3 * np.abs(rich - d2) + rounding
        # A safety floor: one output's |R - D(1/2)| can vanish by chance (its D(1) and D(1/2)
        # agree while higher-order terms do not), so no output's estimate along a direction is
        # taken below 1 % of the largest one along it.
        err = np.maximum(err, 1e-2 * float(np.max(err, initial=0.0)))
        g1 = fp1 - 2 * t.y0 + fm1
        g2 = 2 * (fp2 - 2 * t.y0 + fm2)
        floor = max(1e-4 * float(np.max(np.abs(rich), initial=0.0)), 0.0)
        kink = (np.abs(g2) > 0.75 * np.abs(g1)) & (np.abs(g1) > np.maximum(100 * rounding, floor))
        kink &= np.abs(g1) > 0
        right, left = 2 * (2 * (fp2 - t.y0)) - (fp1 - t.y0), 2 * (2 * (t.y0 - fm2)) - (t.y0 - fm1)
        side_err = np.maximum(np.abs(right - 2 * (fp2 - t.y0)), np.abs(left - 2 * (t.y0 - fm2)))
        side_err = side_err + 2 * rounding
        value, est = rich, err
        if self.complex_ok:
            cs, trunc = self.complex_step(u)
            agree = np.abs(cs - rich) <= err
            cs_err = 8 * np.finfo(np.float64).eps * (np.abs(cs) + np.max(np.abs(cs), initial=0))
            cs_err = cs_err + trunc
            value = np.where(agree, cs, rich)
            est = np.where(agree, np.minimum(err, cs_err), err)
        return Directional(value, est, kink, rich, rounding, right, left, side_err)

    def calibrate(self, rng: np.random.Generator, h: F64) -> None:
        """Estimate max_i sum_j |J_ij| |x_j| from two directional derivatives along
        xscale * (Gaussian): rounding x_j by eps |x_j| (in the perturbed inputs and inside f)
        moves y by eps times that, often far more than eps |y| (think x - mean(x) for
        x ~ 1000 +- 0.01). It enters every rounding estimate. The perturbation is no larger
        than the steps `h` (a user's small step keeps f inside its domain)."""
        c = self.target.eps_f**0.25
        if not self.adaptive:
            c *= min(1.0, float(np.min(h / (c * self.xscale()))))
        top = 0.0
        for _ in range(2):
            d = self.directional(c * self.xscale() * rng.standard_normal(self.target.n))
            top = max(top, float(np.max(np.abs(d.value), initial=0.0)))
        self.cond = 2 * top / c

    def _complex_eval(self, u: F64, shrink: float = 1.0) -> tuple[NDArray[Any], float]:
        x64 = self.target.x64
        scale = max(1.0, float(np.max(np.abs(x64), initial=0.0)))
        t = shrink * 1e-20 * scale / max(float(np.max(np.abs(u))), 1e-300)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return self.target.F(x64 + 1j * t * u), t

    def complex_step(self, u: F64) -> tuple[F64, F64]:
        """`J u` without subtractive cancellation (analytic f only): C(t) = Im f(x + i t u) / t
        at t and t/2, extrapolated, and the truncation estimate |C(t) - C(t/2)|."""
        c = []
        for shrink in (1.0, 0.5):
            y, t = self._complex_eval(u, shrink)
            c.append(np.asarray(np.imag(y) / t, dtype=np.float64))
        return (4 * c[1] - c[0]) / 3, np.abs(c[0] - c[1])

    def detect_complex(self, rng: np.random.Generator, h: F64) -> None:
        """Use the complex step only if f maps complex input to a complex output whose real part
        is f(x) and whose derivative agrees with central differences in a random direction."""
        target = self.target
        if target.eval_dtype is None:
            return
        u = h * rng.standard_normal(target.n)
        try:
            y, t = self._complex_eval(u)
        except Exception:  # f may reject complex input in any way
            return
        if not np.iscomplexobj(y) or not np.all(np.isfinite(y)):
            return
        ys = float(np.max(np.abs(target.y0), initial=0.0))
        if not np.allclose(y.real, target.y0, rtol=1e-12, atol=1e-12 * ys):
            return
        cs = np.imag(y) / t
        ref = self.directional(u)
        if np.all(np.abs(cs - ref.richardson) <= ref.err):
            self.complex_ok = True

    def columns(self, h: F64) -> Iterator[tuple[int, Directional]]:
        """(j, column j of the Jacobian with its error estimate), from `directional(h_j e_j)`."""
        n = self.target.n
        for j in range(n):
            u = np.zeros(n)
            u[j] = h[j]
            yield j, self.directional(u).scaled(1 / h[j])

    def jacobian(self, h: F64) -> tuple[F64, F64, NDArray[np.bool_], OneSided]:
        """The dense numerical Jacobian: (J, its error estimate, where one-sided differences
        disagree, the one-sided Jacobians), each of shape (m, n)."""
        m, n = self.target.m, self.target.n
        jac = np.empty((m, n))
        err = np.empty((m, n))
        kink = np.zeros((m, n), dtype=bool)
        sides = OneSided(np.empty((m, n)), np.empty((m, n)), np.empty((m, n)))
        for j, d in self.columns(h):
            jac[:, j], err[:, j], kink[:, j] = d.value, d.err, d.kink
            assert d.right is not None and d.left is not None and d.side_err is not None
            sides.right[:, j], sides.left[:, j], sides.err[:, j] = d.right, d.left, d.side_err
        return jac, err, kink, sides


class OneSided(NamedTuple):
    """Full mode: the Jacobians of right-hand and left-hand differences, and their error."""

    right: F64
    left: F64
    err: F64


def fd_vjp(
    f: Callable[[NDArray[np.float64]], Any], x: NDArray[np.float64], dy: Any, seed: int = 0
) -> tuple[F64, F64]:
    """`J^T dy` of `f` at `x` (shaped like x) and its error estimate `sum_i |dy_i| err_ij`, by
    the checker's finite differences (its step choice and refinement, complex step, error
    estimate), one column of J at a time."""
    t = Target(f, np.asarray(x, dtype=np.float64))
    fd = FiniteDifferences(t)
    g = np.asarray(dy, dtype=np.float64).ravel()
    rng = np.random.default_rng((seed, 0x6E67))
    h = fd.steps(None)
    fd.calibrate(rng, h)
    fd.detect_complex(rng, h)
    out, err = np.empty(t.n), np.empty(t.n)
    for j, d in fd.columns(h):
        out[j], err[j] = g @ d.value, np.abs(g) @ d.err
    shape = t.shapes[0]
    return out.reshape(shape), err.reshape(shape)


def _relative(d: Directional) -> float:
    top = float(np.max(np.abs(d.value), initial=0.0))
    err = float(np.max(d.err, initial=0.0))
    return 0.0 if err == 0 else (err / top if top > 0 else np.inf)
