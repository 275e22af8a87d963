r"""The numerical side: the user's function flattened to one float64 vector, and directional
derivatives by central differences with a Richardson error estimate.

For a perturbation `u` (the step is built into `u`), with $D(s) = [F(x+su) - F(x-su)]/(2s)$:

$$ R = \frac{4 D(1/2) - D(1)}{3}, \qquad
   \text{err} = 3\,|R - D(1/2)| + 4\,\epsilon_F \,(\max|F(x \pm su)| + \text{cond}) $$

$R$ cancels the $O(s^2)$ truncation term, so $|R - D(1/2)|$ measures the truncation error of
the plain estimate (a safe bound for $R$'s); the second term bounds rounding in $F$, with
cond $\approx \max_i \sum_j |J_{ij}||x_j|$ (see `Target.calibrate`).
Where `f` accepts complex input, the complex step $C(t) = \operatorname{Im} F(x + itu)/t$
($t \approx 10^{-20}$) replaces $R$, extrapolated like $R$: $(4 C(t/2) - C(t))/3$, with
$|C(t) - C(t/2)|$ in its error estimate. Its $O(t^2)$ truncation is far below rounding except
where the derivative itself is 0 (like $x^3$ at 0), where the extrapolation makes it exact.
One-sided differences come free: $G(s) = [F(x+su) - 2F(x) + F(x-su)]/s$ is $O(s)$ where $F$
is smooth and a constant jump at a kink, so $|G(1/2)| \approx |G(1)| \gg$ rounding flags one.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from .._errors import NormgradError

F64 = NDArray[np.float64]


@dataclass
class Directional:
    """`J u` estimated along one perturbation `u` (all arrays flat over the outputs)."""

    value: F64  # best estimate (complex step where validated, else Richardson)
    err: F64  # error estimate of `value`
    kink: NDArray[np.bool_]  # one-sided differences disagree (nondifferentiable)
    richardson: F64
    rounding: F64  # the rounding part of `err`

    def scaled(self, k: float) -> Directional:
        return Directional(
            self.value * k, self.err * k, self.kink, self.richardson * k, self.rounding * k
        )


class Target:
    """The user's `f`, `vjp`, `jvp` seen through flat float64 vectors.

    `x` is one array (then `f(x)`, `vjp(x, dy)`, `jvp(x, tx)`) or a tuple of arrays (then
    `f(*xs)`, `vjp(*xs, dy) -> tuple`, `jvp(*xs, *txs)`); a list is one array. Inputs are never
    mutated: each call gets fresh copies. `vjp` may be None when only `f`'s derivatives are
    wanted (see `numerical_jacobian`).
    """

    def __init__(
        self,
        f: Callable[..., Any],
        x: Any,
        vjp: Callable[..., Any] | None = None,
        jvp: Callable[..., Any] | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> None:
        for name, fn in (("f", f), ("vjp", vjp)):
            if not callable(fn) and not (name == "vjp" and fn is None):
                raise NormgradError(
                    f"{name} must be a function; got {type(fn).__name__}. Pass "
                    "check_gradients(f, x, vjp) with f(x) -> y and vjp(x, dy) -> dx."
                )
        if jvp is not None and not callable(jvp):
            raise NormgradError(f"jvp must be a function jvp(x, tx) -> ty or None; got {jvp!r}.")
        self.f, self.vjp_fn, self.jvp_fn, self.progress = f, vjp, jvp, progress
        self.multi = isinstance(x, tuple)
        raw = list(x) if self.multi else [x]
        if self.multi and not raw:
            raise NormgradError("x is an empty tuple; pass at least one input array.")
        self.xs = [_as_input(a, i if self.multi else None) for i, a in enumerate(raw)]
        self.shapes = [a.shape for a in self.xs]
        self.sizes = [a.size for a in self.xs]
        self.offsets = np.cumsum([0, *self.sizes])
        self.n = int(self.offsets[-1])
        self.x64 = np.concatenate([a.astype(np.float64).ravel() for a in self.xs])
        self.n_evals = 0
        self.total = 1
        self.notes: list[str] = []

        y = self._call_f([a.copy() for a in self.xs], "x as given")
        _require_finite(y, "f(x)", "x as given")
        self.y_shape = y.shape
        self.y_dtype = y.dtype if np.issubdtype(y.dtype, np.floating) else np.dtype(np.float64)
        self.m = y.size
        self.eval_dtype = self._pick_eval_dtype(y)
        self.y0 = self.F(self.x64)
        self.eps_f = float(np.finfo(self.eval_out_dtype).eps)
        self.complex_ok = False
        self.adaptive = True  # False when the user fixed the step
        self.cond = 0.0  # sum_j |J_ij| |x_j|: how far rounding x moves y (see `calibrate`)
        self.analytic_jacobian: F64 | None = None  # built by the diagnosis when needed

    # -- evaluation ------------------------------------------------------------------------

    def _call_f(self, args: Sequence[Any], what: str) -> NDArray[Any]:
        try:
            with np.errstate(all="ignore"):  # a NaN or Inf result is reported, not warned about
                out = self.f(*args)
        except NormgradError:
            raise
        except Exception as e:
            raise NormgradError(f"f raised {type(e).__name__} on {what}: {e}") from e
        y = np.asarray(out)
        if not (np.issubdtype(y.dtype, np.number) or y.dtype == np.bool_):
            raise NormgradError(
                f"f must return one numeric array; got {type(out).__name__} with dtype "
                f"{y.dtype}. Return a single array (stack several outputs into one)."
            )
        return y

    def _pick_eval_dtype(self, y_user: NDArray[Any]) -> Any:
        """float64 if f accepts it (and returns the same shape), else the inputs' own dtypes."""
        if all(a.dtype == np.float64 for a in self.xs):
            y, good = y_user, True
        else:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    y = np.asarray(self.f(*[a.astype(np.float64) for a in self.xs]))
                good = y.shape == self.y_shape and np.issubdtype(y.dtype, np.floating)
                why = f"it returned shape {y.shape}, dtype {y.dtype}"
            except Exception as e:  # the user's f may raise anything on float64
                good, why = False, f"it raised {type(e).__name__}: {e}"
            self.tick()
        if good:
            self.eval_out_dtype = _coarser(y.dtype, np.float64)
            if self.eval_out_dtype != np.float64:
                self.notes.append(
                    f"f returns {np.dtype(y.dtype).name} even for float64 input, so finite "
                    "differences resolve derivatives only to about eps**(2/3) of that dtype."
                )
            return np.float64
        worst = max((a.dtype for a in self.xs), key=lambda d: np.finfo(d).eps)
        self.eval_out_dtype = _coarser(worst, y_user.dtype)
        self.notes.append(
            f"f refused float64 input ({why}); finite differences run in the input dtype "
            f"{np.dtype(worst).name}, with larger steps and a larger error estimate."
        )
        return None  # each input keeps its dtype

    def _split(self, v: NDArray[Any]) -> list[NDArray[Any]]:
        """Fresh arrays for one call of the user's code (it may write into its arguments)."""
        parts = []
        for i, a in enumerate(self.xs):
            p = v[self.offsets[i] : self.offsets[i + 1]].reshape(a.shape)
            keep = self.eval_dtype is None and not np.iscomplexobj(p)
            parts.append(p.astype(a.dtype) if keep else p.copy())
        return parts

    def tick(self, k: int = 1) -> None:
        self.n_evals += k
        if self.n_evals > self.total:
            self.total = self.n_evals
        if self.progress is not None:
            self.progress(self.n_evals, self.total)

    def F(self, v: NDArray[Any], finite: bool = True) -> NDArray[Any]:
        """f at the flat point `v` (float64 or complex128), flattened to float64/complex128.

        A real evaluation must be finite (`finite=False` lets the step sweep of the plot
        run into overflow): NaN or Inf near x means x is within a step of f's domain edge."""
        y = self._call_f(self._split(v), "a perturbed x")
        self.tick()
        if y.shape != self.y_shape:
            raise NormgradError(
                f"f returned shape {y.shape} on a perturbed x but {self.y_shape} on x itself; "
                "the output shape must not depend on the values of x."
            )
        if finite and not np.iscomplexobj(v):
            moved = np.flatnonzero(v != self.x64)
            if len(moved) == 0:
                _require_finite(y, "f(x)", "x in float64")
            elif len(moved) == 1:
                j = int(moved[0])
                step = abs(float(v[j] - self.x64[j]))
                _require_finite(y, "f", f"x with element {self.index(j)} moved by {step:.3g}")
            else:
                step = float(np.max(np.abs(v - self.x64)))
                _require_finite(y, "f", f"x moved by up to {step:.3g} along a random direction")
        dtype = np.complex128 if np.iscomplexobj(y) else np.float64
        return y.astype(dtype).ravel()

    def steps(self, step: Any) -> F64:
        """Per-element step: eps_F**(1/4) * xscale_j, or the user's (see `xscale`)."""
        if step is not None:
            try:
                h = np.broadcast_to(np.asarray(step, dtype=np.float64), (self.n,)).copy()
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
            h = self.eps_f**0.25 * self.xscale()
        # Make x + h exactly representable so the step taken is the step used.
        return (self.x64 + h) - self.x64

    def xscale(self) -> F64:
        """The size of each element: max(|x_j|, rms of its input), 1 for an all-zero input."""
        out = np.empty(self.n)
        for i in range(len(self.xs)):
            sl = slice(self.offsets[i], self.offsets[i + 1])
            xi = self.x64[sl]
            top = float(np.max(np.abs(xi)))
            rms = top * float(np.sqrt(np.mean((xi / top) ** 2))) if top > 0 else 0.0  # no overflow
            out[sl] = np.maximum(np.abs(xi), rms if rms > 0 else 1.0)
        return out

    def rounding_floor(self, eps_a: float) -> F64:
        """Per element: 8 ulp of max|y| / xscale_j, the size of a derivative error that rounding
        of quantities as large as y (e.g. 1 - tanh(x)**2 near saturation) can cause in the
        analytic side, even where the derivative itself is tiny."""
        return 8 * eps_a * float(np.max(np.abs(self.y0.real), initial=0.0)) / self.xscale()

    # -- derivatives -----------------------------------------------------------------------

    def directional(self, u: F64) -> Directional:
        """`J u` by `_directional`. Where the error estimate exceeds sqrt(eps_F) of the value
        (f curves on a scale finer than the step), steps shrink 16x at a time until rounding
        dominates (at most 5 times); then each level's error is also estimated from the next
        level, |R_k - R_{k+1}| (a Richardson table), and the level with the smallest estimate
        wins."""
        first = self._directional(u)
        if not self.adaptive or _relative(first) <= np.sqrt(self.eps_f):
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
                best = Directional(d.value, err, d.kink, d.richardson, d.rounding)
        return best

    def _directional(self, u: F64) -> Directional:
        fp1, fm1 = self.F(self.x64 + u), self.F(self.x64 - u)
        fp2, fm2 = self.F(self.x64 + u / 2), self.F(self.x64 - u / 2)
        d1, d2 = (fp1 - fm1) / 2, fp2 - fm2
        rich = (4 * d2 - d1) / 3
        ymag = np.maximum.reduce([np.abs(fp1), np.abs(fm1), np.abs(fp2), np.abs(fm2)])
        rounding = 4 * self.eps_f * (ymag + self.cond)
        err = 3 * np.abs(rich - d2) + rounding
        g1 = fp1 - 2 * self.y0 + fm1
        g2 = 2 * (fp2 - 2 * self.y0 + fm2)
        floor = max(1e-4 * float(np.max(np.abs(rich), initial=0.0)), 0.0)
        kink = (np.abs(g2) > 0.75 * np.abs(g1)) & (np.abs(g1) > np.maximum(100 * rounding, floor))
        kink &= np.abs(g1) > 0
        value, est = rich, err
        if self.complex_ok:
            cs, trunc = self.complex_step(u)
            agree = np.abs(cs - rich) <= err
            cs_err = 8 * np.finfo(np.float64).eps * (np.abs(cs) + np.max(np.abs(cs), initial=0))
            cs_err = cs_err + trunc
            value = np.where(agree, cs, rich)
            est = np.where(agree, np.minimum(err, cs_err), err)
        return Directional(value, est, kink, rich, rounding)

    def calibrate(self, rng: np.random.Generator, h: F64) -> None:
        """Estimate max_i sum_j |J_ij| |x_j| from two directional derivatives along
        xscale * (Gaussian): rounding x_j by eps |x_j| (in the perturbed inputs and inside f)
        moves y by eps times that, often far more than eps |y| (think x - mean(x) for
        x ~ 1000 +- 0.01). It enters every rounding estimate. The perturbation is no larger
        than the steps `h` (a user's small step keeps f inside its domain)."""
        c = self.eps_f**0.25
        if not self.adaptive:
            c *= min(1.0, float(np.min(h / (c * self.xscale()))))
        top = 0.0
        for _ in range(2):
            d = self.directional(c * self.xscale() * rng.standard_normal(self.n))
            top = max(top, float(np.max(np.abs(d.value), initial=0.0)))
        self.cond = 2 * top / c

    def _complex_eval(self, u: F64, shrink: float = 1.0) -> tuple[NDArray[Any], float]:
        scale = max(1.0, float(np.max(np.abs(self.x64), initial=0.0)))
        t = shrink * 1e-20 * scale / max(float(np.max(np.abs(u))), 1e-300)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return self.F(self.x64 + 1j * t * u), t

    def complex_step(self, u: F64) -> tuple[F64, F64]:
        """`J u` without subtractive cancellation (analytic f only): C(t) = Im f(x + i t u) / t
        at t and t/2, extrapolated, and the truncation estimate |C(t) - C(t/2)|."""
        c = []
        for shrink in (1.0, 0.5):
            y, t = self._complex_eval(u, shrink)
            c.append(np.asarray(np.imag(y) / t, dtype=np.float64))
        return (4 * c[1] - c[0]) / 3, np.abs(c[0] - c[1])

    def columns(self, h: F64) -> Iterator[tuple[int, Directional]]:
        """(j, column j of the Jacobian with its error estimate), from `directional(h_j e_j)`."""
        for j in range(self.n):
            u = np.zeros(self.n)
            u[j] = h[j]
            yield j, self.directional(u).scaled(1 / h[j])

    def jacobian(self, h: F64) -> tuple[F64, F64, NDArray[np.bool_]]:
        """The dense numerical Jacobian: (J, its error estimate, where one-sided differences
        disagree), each of shape (m, n)."""
        jac = np.empty((self.m, self.n))
        err = np.empty((self.m, self.n))
        kink = np.zeros((self.m, self.n), dtype=bool)
        for j, d in self.columns(h):
            jac[:, j], err[:, j], kink[:, j] = d.value, d.err, d.kink
        return jac, err, kink

    def detect_complex(self, rng: np.random.Generator, h: F64) -> None:
        """Use the complex step only if f maps complex input to a complex output whose real part
        is f(x) and whose derivative agrees with central differences in a random direction."""
        if self.eval_dtype is None:
            return
        u = h * rng.standard_normal(self.n)
        try:
            y, t = self._complex_eval(u)
        except Exception:  # f may reject complex input in any way
            return
        if not np.iscomplexobj(y) or not np.all(np.isfinite(y)):
            return
        ys = float(np.max(np.abs(self.y0), initial=0.0))
        if not np.allclose(y.real, self.y0, rtol=1e-12, atol=1e-12 * ys):
            return
        cs = np.imag(y) / t
        ref = self.directional(u)
        if np.all(np.abs(cs - ref.richardson) <= ref.err):
            self.complex_ok = True

    # -- the user's derivatives ------------------------------------------------------------

    def vjp_raw(self, dy: F64) -> Any:
        """The user's vjp on the cotangent `dy` (flat float64, cast to y's dtype)."""
        assert self.vjp_fn is not None
        dyu = dy.reshape(self.y_shape).astype(self.y_dtype)
        try:
            return self.vjp_fn(*[a.copy() for a in self.xs], dyu)
        except NormgradError:
            raise
        except Exception as e:
            raise NormgradError(f"vjp raised {type(e).__name__}: {e}") from e

    def vjp64(self, dy: F64) -> F64 | None:
        """The user's vjp on float64 copies of x and dy, or None if it refuses them: the
        difference from the low-precision result measures the backward's own rounding."""
        assert self.vjp_fn is not None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out = self.vjp_fn(
                    *[a.astype(np.float64) for a in self.xs], dy.reshape(self.y_shape).copy()
                )
            flat = self._flatten_grads(out, "vjp", "dx")
        except Exception:  # any refusal means: no float64 reference
            return None
        return flat if np.all(np.isfinite(flat)) else None

    def flatten_vjp(self, out: Any) -> F64:
        return self._flatten_grads(out, "vjp", "dx")

    def vjp(self, dy: F64) -> F64:
        return self.flatten_vjp(self.vjp_raw(dy))

    def jvp(self, t: F64) -> F64:
        assert self.jvp_fn is not None
        txs = [p.astype(a.dtype) for p, a in zip(self._split(t), self.xs, strict=True)]
        try:
            out = self.jvp_fn(*[a.copy() for a in self.xs], *txs)
        except NormgradError:
            raise
        except Exception as e:
            raise NormgradError(f"jvp raised {type(e).__name__}: {e}") from e
        ty = np.asarray(out)
        if ty.shape != self.y_shape:
            raise NormgradError(
                f"jvp must return ty with the shape of y, {self.y_shape}; got {ty.shape}."
            )
        return ty.astype(np.float64).ravel()

    def _flatten_grads(self, out: Any, name: str, what: str) -> F64:
        parts = list(out) if self.multi and isinstance(out, (tuple, list)) else [out]
        if self.multi and not isinstance(out, (tuple, list)):
            raise NormgradError(
                f"x is a tuple of {len(self.xs)} arrays, so {name} must return a tuple of "
                f"{len(self.xs)} gradients; got {type(out).__name__}."
            )
        if len(parts) != len(self.xs):
            raise NormgradError(
                f"{name} returned {len(parts)} gradients for {len(self.xs)} inputs; return one "
                "per input, in order."
            )
        flat = []
        for i, (p, a) in enumerate(zip(parts, self.xs, strict=True)):
            g = np.asarray(p)
            if g.shape != a.shape:
                where = f" for input {i}" if self.multi else ""
                raise NormgradError(
                    f"{name} must return {what} with the shape of x{where}, {a.shape}; got "
                    f"{g.shape}."
                )
            if not np.issubdtype(g.dtype, np.number) or np.iscomplexobj(g):
                raise NormgradError(f"{name} returned dtype {g.dtype}; return real numbers.")
            flat.append(g.astype(np.float64).ravel())
        return np.concatenate(flat)

    def analytic_eps(self, sample: Any) -> float:
        """Machine epsilon of the user's gradients (the coarsest of their dtypes)."""
        parts = list(sample) if self.multi else [sample]
        eps = [np.finfo(np.asarray(p).dtype).eps for p in parts if _is_float(p)]
        return float(max(eps)) if eps else float(np.finfo(np.float64).eps)

    def unflatten(self, v: F64) -> Any:
        parts = [
            v[self.offsets[i] : self.offsets[i + 1]].reshape(s) for i, s in enumerate(self.shapes)
        ]
        return tuple(parts) if self.multi else parts[0]

    def index(self, j: int) -> tuple[int, ...]:
        """Flat position -> index in x (with the input's position first for a tuple x)."""
        i = int(np.searchsorted(self.offsets, j, side="right") - 1)
        idx = tuple(int(k) for k in np.unravel_index(j - self.offsets[i], self.shapes[i]))
        return (i, *idx) if self.multi else idx


def fd_vjp(
    f: Callable[[NDArray[np.float64]], Any], x: NDArray[np.float64], dy: Any, seed: int = 0
) -> tuple[F64, F64]:
    """`J^T dy` of `f` at `x` (shaped like x) and its error estimate `sum_i |dy_i| err_ij`, by
    the checker's finite differences (its step choice and refinement, complex step, error
    estimate), one column of J at a time."""
    t = Target(f, np.asarray(x, dtype=np.float64))
    g = np.asarray(dy, dtype=np.float64).ravel()
    rng = np.random.default_rng((seed, 0x6E67))
    h = t.steps(None)
    t.calibrate(rng, h)
    t.detect_complex(rng, h)
    out, err = np.empty(t.n), np.empty(t.n)
    for j, d in t.columns(h):
        out[j], err[j] = g @ d.value, np.abs(g) @ d.err
    shape = t.shapes[0]
    return out.reshape(shape), err.reshape(shape)


def _require_finite(y: NDArray[Any], what: str, where: str) -> None:
    bad = ~np.isfinite(y)
    if np.any(bad):
        first = tuple(int(i) for i in np.unravel_index(int(np.argmax(bad)), y.shape))
        raise NormgradError(
            f"{what} is NaN or Inf at output index {first} ({where}): derivatives are undefined "
            "there. Check at a point inside f's domain (e.g. log needs x > 0), away from "
            "overflow; if x itself is fine, pass a smaller step=."
        )


def _relative(d: Directional) -> float:
    top = float(np.max(np.abs(d.value), initial=0.0))
    err = float(np.max(d.err, initial=0.0))
    return 0.0 if err == 0 else (err / top if top > 0 else np.inf)


def _coarser(a: Any, b: Any) -> Any:
    fa = np.dtype(a) if np.issubdtype(a, np.floating) else np.dtype(np.float64)
    fb = np.dtype(b) if np.issubdtype(b, np.floating) else np.dtype(np.float64)
    return fa if np.finfo(fa).eps >= np.finfo(fb).eps else fb


def _is_float(a: Any) -> bool:
    return bool(np.issubdtype(np.asarray(a).dtype, np.floating))


def _as_input(a: Any, pos: int | None) -> NDArray[Any]:
    name = "x" if pos is None else f"x[{pos}]"
    try:
        arr = np.asarray(a)
    except Exception as e:
        raise NormgradError(f"{name} must be an array; got {type(a).__name__} ({e}).") from e
    if not np.issubdtype(arr.dtype, np.floating):
        raise NormgradError(
            f"{name} has dtype {arr.dtype}; gradients are checked with respect to real floating "
            f"inputs. Convert it, e.g. {name}.astype(float)."
        )
    if arr.size == 0:
        raise NormgradError(f"{name} is empty (shape {arr.shape}); there is nothing to check.")
    if not np.all(np.isfinite(arr)):
        raise NormgradError(
            f"{name} holds NaN or Inf; derivatives there are undefined. Check finite inputs."
        )
    return arr


def nice_number(c: float, sizes: Sequence[int]) -> str:
    """A readable name for a fitted factor: 2, 1/2, -1, N=784, 1/N, 3/2..."""
    if not math.isfinite(c):
        return str(c)
    for n in sorted(set(int(s) for s in sizes if s > 2), reverse=True):
        for val, name in ((n, f"{n} (= n)"), (1 / n, f"1/{n} (= 1/n)")):
            for sgn, sname in ((1, ""), (-1, "-")):
                if abs(c - sgn * val) <= 1e-4 * abs(val):
                    return sname + name
    for q in range(1, 9):
        p = round(c * q)
        if p != 0 and abs(c - p / q) <= 1e-4 * abs(c):
            return str(p) if q == 1 else f"{p}/{q}"
    return f"{c:.6g}"
