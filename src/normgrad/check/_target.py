"""The user's `f`, `vjp` and `jvp` seen through flat float64 vectors, and the two small logs a
check keeps while calling them: the evaluation count (with progress) and the notes."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from .._errors import NormgradError

F64 = NDArray[np.float64]


class Evaluations:
    """How many times `f` was evaluated (`done`) out of how many are planned (`total`), told
    to the user's `progress(done, total)` after each evaluation."""

    def __init__(self, progress: Callable[[int, int], None] | None = None) -> None:
        self.progress = progress
        self.done = 0
        self.total = 1

    def tick(self) -> None:
        self.done += 1
        if self.done > self.total:
            self.total = self.done
        if self.progress is not None:
            self.progress(self.done, self.total)

    def plan(self, more: int) -> None:
        """`more` evaluations are planned from now on."""
        self.total = self.done + more

    def allow(self, more: int) -> None:
        """Up to `more` further evaluations may come (the total never shrinks)."""
        self.total = max(self.total, self.done + more)


class Notes:
    """Remarks for the report (each said once): what the checker had to assume or fall back to."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, note: str) -> None:
        if note not in self.items:
            self.items.append(note)


class Target:
    """The user's `f`, `vjp`, `jvp` seen through flat float64 vectors.

    `x` is one array (then `f(x)`, `vjp(x, dy)`, `jvp(x, tx)`) or a tuple of arrays (then
    `f(*xs)`, `vjp(*xs, dy) -> tuple`, `jvp(*xs, *txs)`); a list is one array. Inputs are never
    mutated: each call gets fresh copies. `vjp` may be None when only `f`'s derivatives are
    wanted (see `fd_vjp`). Building it evaluates `f` at `x` (and at float64 `x`).
    """

    def __init__(
        self,
        f: Callable[..., Any],
        x: Any,
        vjp: Callable[..., Any] | None = None,
        jvp: Callable[..., Any] | None = None,
        evals: Evaluations | None = None,
        names: Sequence[str] | None = None,
    ) -> None:
        for name, fn in (("f", f), ("vjp", vjp)):
            if not callable(fn) and not (name == "vjp" and fn is None):
                raise NormgradError(
                    f"{name} must be a function; got {type(fn).__name__}. Pass "
                    "check_gradients(f, x, vjp) with f(x) -> y and vjp(x, dy) -> dx."
                )
        if jvp is not None and not callable(jvp):
            raise NormgradError(f"jvp must be a function jvp(x, tx) -> ty or None; got {jvp!r}.")
        self.f, self.vjp_fn, self.jvp_fn = f, vjp, jvp
        self.evals = Evaluations() if evals is None else evals
        self.notes = Notes()
        self.multi = isinstance(x, tuple)
        raw = list(x) if self.multi else [x]
        if self.multi and not raw:
            raise NormgradError("x is an empty tuple; pass at least one input array.")
        self.xs = [_as_input(a, i if self.multi else None) for i, a in enumerate(raw)]
        self.shapes = [a.shape for a in self.xs]
        self.names = _names(names, len(self.xs), self.multi)
        self.mutated: list[str] = []  # what the vjp wrote into (its arguments are copies)
        self.offsets = np.cumsum([0, *[a.size for a in self.xs]])
        self.n = int(self.offsets[-1])
        self.x64 = np.concatenate([a.astype(np.float64).ravel() for a in self.xs])

        y = self._call_f([a.copy() for a in self.xs], "x as given")
        _require_finite(y, "f(x)", "x as given")
        self.y_shape = y.shape
        self.y_dtype = y.dtype if np.issubdtype(y.dtype, np.floating) else np.dtype(np.float64)
        self.m = y.size
        self.eval_dtype = self._pick_eval_dtype(y)
        self.y0 = self.F(self.x64)  # f at x, evaluated as the finite differences evaluate it
        self.eps_f = float(np.finfo(self.eval_out_dtype).eps)

    # -- f ---------------------------------------------------------------------------------

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
            self.evals.tick()
        if good:
            self.eval_out_dtype = _coarser(y.dtype, np.float64)
            if self.eval_out_dtype != np.float64:
                self.notes.add(
                    f"f returns {np.dtype(y.dtype).name} even for float64 input, so finite "
                    "differences resolve derivatives only to about eps**(2/3) of that dtype."
                )
            return np.float64
        worst = max((a.dtype for a in self.xs), key=lambda d: np.finfo(d).eps)
        self.eval_out_dtype = _coarser(worst, y_user.dtype)
        self.notes.add(
            f"f refused float64 input ({why}); finite differences run in the input dtype "
            f"{np.dtype(worst).name}, with larger steps and a larger error estimate."
        )
        return None  # each input keeps its dtype

    def F(self, v: NDArray[Any], finite: bool = True) -> NDArray[Any]:
        """f at the flat point `v` (float64 or complex128), flattened to float64/complex128.

        A real evaluation must be finite (`finite=False` lets the step sweep of the plot
        run into overflow): NaN or Inf near x means x is within a step of f's domain edge."""
        y = self._call_f(self._split(v), "a perturbed x")
        self.evals.tick()
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

    # -- the user's derivatives ------------------------------------------------------------

    def vjp_raw(self, dy: F64) -> Any:
        """The user's vjp on the cotangent `dy` (flat float64, cast to y's dtype)."""
        assert self.vjp_fn is not None
        dyu = dy.reshape(self.y_shape).astype(self.y_dtype)
        args = [a.copy() for a in self.xs]
        try:
            out = self.vjp_fn(*args, dyu)
        except NormgradError:
            raise
        except Exception as e:
            raise NormgradError(f"vjp raised {type(e).__name__}: {e}") from e
        self._note_mutation(args, dyu, dy)
        return out

    def _note_mutation(self, args: list[NDArray[Any]], dyu: NDArray[Any], dy: F64) -> None:
        """Record (count of changed elements) what the vjp wrote into: an input or dy."""
        for name, a, orig in zip(self.names, args, self.xs, strict=True):
            changed = int(np.sum(~_same(a, orig)))
            if changed:
                self.mutated.append(f"x{name if self.multi else ''} ({changed})")
        changed = int(np.sum(~_same(dyu, dy.reshape(self.y_shape).astype(self.y_dtype))))
        if changed:
            self.mutated.append(f"dy ({changed})")

    def dtypes(self, out: Any) -> list[tuple[str, Any, Any]]:
        """(name, got, want) for each gradient whose dtype differs from its input's."""
        parts = list(out) if self.multi else [out]
        return [
            (name, np.asarray(p).dtype, a.dtype)
            for name, p, a in zip(self.names, parts, self.xs, strict=True)
            if np.asarray(p).dtype != a.dtype
        ]

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

    # -- flat vectors and the user's shapes ------------------------------------------------

    def _split(self, v: NDArray[Any]) -> list[NDArray[Any]]:
        """Fresh arrays for one call of the user's code (it may write into its arguments)."""
        parts = []
        for i, a in enumerate(self.xs):
            p = v[self.offsets[i] : self.offsets[i + 1]].reshape(a.shape)
            keep = self.eval_dtype is None and not np.iscomplexobj(p)
            parts.append(p.astype(a.dtype) if keep else p.copy())
        return parts

    def input_slice(self, i: int) -> slice:
        """The flat positions of input `i`."""
        return slice(int(self.offsets[i]), int(self.offsets[i + 1]))

    def unflatten(self, v: F64) -> Any:
        parts = [v[self.input_slice(i)].reshape(s) for i, s in enumerate(self.shapes)]
        return tuple(parts) if self.multi else parts[0]

    def index(self, j: int) -> tuple[int, ...]:
        """Flat position -> index in x (with the input's position first for a tuple x)."""
        i = int(np.searchsorted(self.offsets, j, side="right") - 1)
        idx = tuple(int(k) for k in np.unravel_index(j - self.offsets[i], self.shapes[i]))
        return (i, *idx) if self.multi else idx

    def restricted(self, i: int) -> InputView:
        """Input `i` on its own, the other inputs held at x (see `InputView`)."""
        return InputView(self, i)


class InputView(Target):
    """One input of a tuple (or pytree) target seen as a target of its own: flat vectors over
    that input's elements, the other inputs held at x. `F` and `jvp` embed a vector into the
    whole x, `vjp` keeps that input's part of dx, and `index` gives indices in the whole x
    (the input's position first), so findings built on the view point into the user's x.
    Evaluations, notes and what the vjp wrote into are the parent's (one count, one log)."""

    def __init__(self, parent: Target, i: int) -> None:  # no evaluation: all comes from parent
        self.parent, self.position = parent, i
        self.part = parent.input_slice(i)
        self.f, self.vjp_fn, self.jvp_fn = parent.f, parent.vjp_fn, parent.jvp_fn
        self.evals, self.notes, self.mutated = parent.evals, parent.notes, parent.mutated
        self.multi = False
        self.xs = [parent.xs[i]]
        self.shapes = [parent.shapes[i]]
        self.names = [parent.names[i]]
        self.offsets = np.array([0, self.xs[0].size])
        self.n = int(self.xs[0].size)
        self.x64 = parent.x64[self.part].copy()
        self.y_shape, self.y_dtype, self.m = parent.y_shape, parent.y_dtype, parent.m
        self.eval_dtype, self.eval_out_dtype = parent.eval_dtype, parent.eval_out_dtype
        self.y0, self.eps_f = parent.y0, parent.eps_f

    def embed(self, v: NDArray[Any], fill: Any = None) -> NDArray[Any]:
        """`v` (this input's elements) placed into the whole x (or into `fill`'s values)."""
        base = self.parent.x64 if fill is None else fill
        out = base.astype(np.result_type(base, v))
        out[self.part] = v
        return out

    def F(self, v: NDArray[Any], finite: bool = True) -> NDArray[Any]:
        return self.parent.F(self.embed(v), finite)

    def vjp(self, dy: F64) -> F64:
        return self.parent.vjp(dy)[self.part]

    def vjp64(self, dy: F64) -> F64 | None:
        dx = self.parent.vjp64(dy)
        return None if dx is None else dx[self.part]

    def jvp(self, t: F64) -> F64:
        return self.parent.jvp(self.embed(t, np.zeros(self.parent.n)))

    def index(self, j: int) -> tuple[int, ...]:
        return self.parent.index(self.part.start + j)


def _names(given: Sequence[str] | None, k: int, multi: bool) -> list[str]:
    """How findings name each input: given, else `[0]`, `[1]`... (or "" for a single x)."""
    if given is None:
        return [f"[{i}]" for i in range(k)] if multi else [""]
    names = [str(v) for v in given]
    if len(names) != k:
        raise NormgradError(f"names must give one name per input ({k}); got {len(names)}.")
    return names


def _same(a: NDArray[Any], b: NDArray[Any]) -> NDArray[np.bool_]:
    """Elementwise equal, NaN equal to NaN."""
    return np.asarray((a == b) | (np.isnan(a) & np.isnan(b)))


def _require_finite(y: NDArray[Any], what: str, where: str) -> None:
    bad = ~np.isfinite(y)
    if np.any(bad):
        first = tuple(int(i) for i in np.unravel_index(int(np.argmax(bad)), y.shape))
        raise NormgradError(
            f"{what} is NaN or Inf at output index {first} ({where}): derivatives are undefined "
            "there. Check at a point inside f's domain (e.g. log needs x > 0), away from "
            "overflow; if x itself is fine, pass a smaller step=."
        )


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
