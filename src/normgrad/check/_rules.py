"""The checker's rules: what kind of mistake explains the difference between the analytic and
the numerical derivatives, tried in the order of docs/checker.md.

Each rule takes the `Evidence` of one check and returns its findings, or None to let the next
rule try; the first rule that answers decides. The order is in the tables at the end of this
file (VERDICT, FULL, ON_JACOBIANS, PROBE); a new rule is one function and one table entry.
Texts come from `_catalogue.py`; what is specific to normalizations (the mean and variance
paths) from `_normalization.py`.

In full mode the analytic Jacobian `A` is built row by row from the vjp (one call per output,
with basis cotangents) and compared with the numerical `J` entry by entry: a model "fits" when
`|A - model| <= 2 T` everywhere (`Jacobians.fits`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any, NamedTuple

import numpy as np

from . import _catalogue as cat
from . import _normalization
from ._catalogue import PASSING, nice_number
from ._evidence import Evidence, Jacobians, finite_abs
from ._localize import group_test
from ._report import Finding
from ._target import F64, Target

MAX_LISTED = 20  # indices listed in evidence
MAX_LOCATED = 16  # partial: at most this many bad elements (probe mode)

Rule = Callable[[Evidence], list[Finding] | None]


class Diagnosis(NamedTuple):
    """The findings, most important first, and what the diagnosis built on the way."""

    findings: list[Finding]
    located: list[int] | None = None  # probe mode: flat indices of the bad elements found
    analytic_jacobian: F64 | None = None  # full mode, built once the check failed


def diagnose(ev: Evidence) -> Diagnosis:
    """Both modes: `VERDICT`, then the mode's rules, then the jvp (`jvp_findings`)."""
    found = first_answer(ev, VERDICT)
    if found is not None:
        diagnosis = Diagnosis(found)
    else:
        diagnosis = diagnose_full(ev) if ev.full else diagnose_probe(ev)
    mismatch = jvp_findings(ev) if ev.target.jvp_fn is not None else None
    if not mismatch:
        return diagnosis
    kept = [f for f in diagnosis.findings if f.kind not in PASSING]
    return diagnosis._replace(findings=kept + mismatch)


def diagnose_full(ev: Evidence) -> Diagnosis:
    """`FULL`; then the analytic Jacobian (M vjp calls) and `ON_JACOBIANS`. Where bad elements
    sit at kinks, `nondifferentiable` is reported too."""
    found = first_answer(ev, FULL)
    if found is not None:
        return Diagnosis(found)
    t = ev.target
    A = np.stack([t.vjp(np.eye(1, t.m, i).ravel()) for i in range(t.m)])
    bad_rows = [i for i in range(t.m) if not np.all(np.isfinite(A[i]))]
    if bad_rows:
        label = f"dy = the unit vector at output {bad_rows[0]}"
        return Diagnosis([_nonfinite(t, label, A[bad_rows[0]])], analytic_jacobian=A)
    assert ev.numerical is not None
    ev = replace(ev, jacobians=Jacobians.compare(A, ev.numerical.J, _entry_tolerance(ev, A)))
    found = first_answer(ev, ON_JACOBIANS)
    assert found is not None  # `unknown` always answers
    return Diagnosis(found + _also_at_kinks(ev, found), analytic_jacobian=A)


def diagnose_probe(ev: Evidence) -> Diagnosis:
    """`PROBE`; then the bad elements are localized by adaptive group testing (`localize`)."""
    found = first_answer(ev, PROBE)
    return Diagnosis(found) if found is not None else localize(ev)


def first_answer(ev: Evidence, rules: tuple[Rule, ...]) -> list[Finding] | None:
    for rule in rules:
        found = rule(ev)
        if found is not None:
            return found
    return None


# ---------------------------------------------------------------------------------------------
# both modes
# ---------------------------------------------------------------------------------------------


def nonfinite(ev: Evidence) -> list[Finding] | None:
    """A NaN or Inf in the backward's dx fails, whatever else holds (first cotangent with one)."""
    for label, dx in ev.grads:
        if not np.all(np.isfinite(dx)):
            return [_nonfinite(ev.target, label, dx)]
    return None


def _nonfinite(t: Target, label: str, dx: F64) -> Finding:
    where = np.flatnonzero(~np.isfinite(dx))
    idx = [t.index(int(j)) for j in where[:MAX_LISTED]]
    evidence = {"indices": idx, "count": len(where), "cotangent": label}
    return cat.NONFINITE.finding(
        evidence, count=len(where), n=t.n, label=label, first=idx[0], value=dx[where[0]]
    )


def passed(ev: Evidence) -> list[Finding] | None:
    """Every value within tolerance: `ok`, or `fd_noise` where only the finite-difference
    error estimate lets a value pass."""
    if not all(s.passed for s in ev.sides):
        return None
    noisy = [s for s in ev.sides if np.any(np.abs(s.dx - s.num) > s.strict)]
    if not noisy:
        return [cat.OK.finding()]
    s = noisy[0]
    diff = np.abs(s.dx - s.num)
    evidence = {"max_mismatch": float(diff.max()), "max_fd_error": float(s.fd.max())}
    return [cat.FD_NOISE.finding(evidence, mismatch=diff.max(), fd_error=s.fd.max())]


def at_kinks(ev: Evidence) -> list[Finding] | None:
    """Every bad element at a kink: `kink` (inconclusive) when each value lies between the
    one-sided derivatives (per entry, Σ_i min/max of dy_i ∂⁺ and dy_i ∂⁻, within tolerance plus
    their error), `nondifferentiable` when one lies outside. Probe mode: `kink` along the
    directions (one-sided values along a direction do not bound a subgradient's)."""
    flags = [(s.bad, np.asarray(s.kinks, dtype=bool)) for s in ev.sides]
    bad = np.concatenate([b for b, _ in flags])
    kinks = np.concatenate([k for _, k in flags])
    if not (np.any(bad) and np.all(kinks[bad])):
        return None
    if not ev.full or ev.one_sided is None:
        return [cat.KINK_PROBES.finding({"count": int(bad.sum())}, count=int(bad.sum()))]
    t, one = ev.target, ev.one_sided
    where = np.flatnonzero(np.logical_or.reduce([b for b, _ in flags]))
    seen = {"the right-hand derivative": 0, "the left-hand derivative": 0, "a value between": 0}
    for k, s in enumerate(ev.sides):
        r, lf = s.dy[:, None] * one.right, s.dy[:, None] * one.left
        lo, hi = np.minimum(r, lf).sum(axis=0), np.maximum(r, lf).sum(axis=0)
        slack = s.tol + np.abs(s.dy) @ one.err
        for j in np.flatnonzero(s.bad):
            v = s.dx[j]
            if not lo[j] - slack[j] <= v <= hi[j] + slack[j]:
                return [_outside(ev, where, int(j), v, lo[j], hi[j])]
            if k == 0:
                near_r = abs(v - r[:, j].sum()) <= slack[j]
                near_l = abs(v - lf[:, j].sum()) <= slack[j]
                name = "the right-hand derivative" if near_r else "the left-hand derivative"
                seen[name if near_r or near_l else "a value between"] += 1
    joint = _joint_kink_check(ev, where)
    if joint is not None:
        return [joint]
    said = ", ".join(f"{what} at {c}" for what, c in seen.items() if c) or "values between"
    idx = [t.index(int(j)) for j in where[:MAX_LISTED]]
    evidence = {"count": len(where), "indices": idx, "seen": seen}
    return [cat.KINK.finding(evidence, count=len(where), examples=idx[:3], seen=said)]


def _joint_kink_check(ev: Evidence, where: Any) -> Finding | None:
    """The kink elements moved together (one directional derivative): where f is smooth along
    that direction (ties of a max moved together), the backward must match it there, or its
    values are not one subgradient (each tied element given the full gradient)."""
    s1, tol = ev.sides[0], ev.tol
    v = np.zeros(ev.target.n)
    v[where] = ev.steps[where]
    d = ev.fd.directional(v)
    if np.any(d.kink & (s1.dy != 0)):
        return None  # a kink along this direction too (relu at 0): nothing more to compare
    num, fde = float(s1.dy @ d.value), float(np.abs(s1.dy) @ d.err)
    ana, av = float(ev.grads[0].dx @ v), np.abs(v)
    terms = float(np.abs(ev.grads[0].dx) @ av)
    floor = float(ev.fd.rounding_floor(tol.eps_a) @ av) * float(np.max(np.abs(s1.dy)))
    limit, _ = tol(num, fde, terms, terms, float(np.sum(av)), floor)
    if abs(ana - num) <= limit:
        return None
    idx = [ev.target.index(int(j)) for j in where[:MAX_LISTED]]
    evidence = {"count": len(where), "indices": idx, "along": ana, "numerical": num}
    return cat.NONDIFFERENTIABLE_JOINT.finding(
        evidence, count=len(where), examples=idx[:3], ana=ana, num=num
    )


def _outside(ev: Evidence, where: Any, j: int, v: float, lo: float, hi: float) -> Finding:
    t = ev.target
    idx = [t.index(int(i)) for i in where[:MAX_LISTED]]
    evidence = {"count": len(where), "indices": idx, "first": t.index(j), "range": (lo, hi)}
    return cat.NONDIFFERENTIABLE_OUTSIDE.finding(
        evidence, count=len(where), examples=idx[:3], value=v, first=t.index(j), lo=lo, hi=hi
    )


def zero(ev: Evidence) -> list[Finding] | None:
    """The backward returns zeros (within rounding) and the true gradient is not zero."""
    sides = ev.sides
    if not all(np.all(np.abs(s.dx) <= s.strict) for s in sides):
        return None
    if not ev.full and np.any(ev.grads[0].dx):  # zero along the probes only
        return None
    top = float(np.max(np.abs(sides[0].num)))
    return [cat.ZERO.finding({"max_numerical": top}, top=top)]


def _rounding(ev: Evidence, *dxs: F64) -> F64:
    """What rounding may change between vjp results built from `dxs`: 64 ulp of the
    magnitudes involved, plus 64 ulp of the largest (terms that cancel)."""
    mags = np.sum([finite_abs(d) for d in dxs], axis=0)
    return np.asarray(64 * ev.tol.eps_a * (mags + float(np.max(mags, initial=0.0))) + 1e-300)


def nondeterministic(ev: Evidence) -> list[Finding] | None:
    """The same x and dy twice (one more vjp call) must give the same dx, up to rounding."""
    t, dx1 = ev.target, ev.grads[0].dx
    again = t.vjp(ev.sides[0].dy)
    diff = np.abs(np.nan_to_num(again - dx1, nan=np.inf))
    where = np.flatnonzero(diff > _rounding(ev, dx1, again))
    if len(where) == 0:
        return None
    spread = float(np.max(diff))
    idx = [t.index(int(j)) for j in where[:MAX_LISTED]]
    evidence = {"spread": spread, "count": len(where), "indices": idx}
    return [
        cat.NONDETERMINISTIC.finding(
            evidence, spread=spread, count=len(where), n=t.n, indices=idx[:3]
        )
    ]


def mutates_input(ev: Evidence) -> list[Finding] | None:
    """The vjp wrote into x or dy (seen on the copies it was given, every call so far)."""
    got = list(dict.fromkeys(ev.target.mutated))
    if not got:
        return None
    what = ", ".join(got)
    count = sum(int(w.rsplit("(", 1)[1].rstrip(")")) for w in got)
    return [cat.MUTATES.finding({"arguments": got}, what=what, count=count)]


def wrong_dtype(ev: Evidence) -> list[Finding] | None:
    """dx in a floating dtype other than its input's."""
    t = ev.target
    if t.vjp_fn is None or ev.raw is None:
        return None
    wrong = [(n, g, w) for n, g, w in t.dtypes(ev.raw) if np.issubdtype(g, np.floating)]
    if not wrong:
        return None
    name, got, want = wrong[0]
    evidence = {"input": name, "position": t.names.index(name)}
    evidence.update(got=np.dtype(got).name, want=np.dtype(want).name)
    where = f" for input {name}" if t.multi else ""
    return [cat.DTYPE.finding(evidence, where=where, got=got, want=want)]


LIN_A, LIN_B = 0.75, -1.25  # the combination a*dy1 + b*dy2 checked (exact in binary)


def linearity(ev: Evidence) -> list[Finding] | None:
    """`_linearity`; with several inputs, where the whole dx is not linear in dy, each input
    whose own part is not is named (`ignores_dy`, `offset` or `not_linear`, from `_linearity`
    on its view: two more vjp calls per input), or else the whole is."""
    found = _linearity(ev)
    t = ev.target
    if found is None or found[0].kind == "ignores_dy" or not t.multi:
        return found
    own = [(i, _linearity(ev.for_input(i))) for i in range(len(t.names))]
    named = [cat.for_input(f[0], t.names[i], i) for i, f in own if f]
    return named or found


def _linearity(ev: Evidence) -> list[Finding] | None:
    """vjp(x, 0) must be 0 and vjp(x, a dy1 + b dy2) = a vjp(x, dy1) + b vjp(x, dy2) (two more
    vjp calls): `ignores_dy` if the result is the same for every dy, `offset` if it is linear
    plus a constant, `not_linear` otherwise."""
    t = ev.target
    (dy1, dy2), (dx1, dx2) = [s.dy for s in ev.sides], [g.dx for g in ev.grads]
    z = t.vjp(np.zeros(t.m))
    c = t.vjp(LIN_A * dy1 + LIN_B * dy2)
    lim = _rounding(ev, dx1, dx2, z, c)
    if not np.any(np.abs(np.r_[dx1, dx2, z])):
        return None  # all zeros: `zero` says so
    if np.all(np.abs(dx1 - z) <= lim) and np.all(np.abs(dx2 - z) <= lim):
        return [cat.IGNORES_DY.finding({"constant_in_dy": True})]
    affine = np.abs((c - z) - LIN_A * (dx1 - z) - LIN_B * (dx2 - z))
    where = np.flatnonzero(np.abs(z) > lim)
    if len(where) and np.all(affine <= lim):
        idx = [t.index(int(j)) for j in where[:MAX_LISTED]]
        top = float(np.max(np.abs(z)))
        evidence = {"indices": idx, "count": len(where), "max_offset": top}
        found = cat.OFFSET.finding(evidence, count=len(where), n=t.n, indices=idx[:3], top=top)
        return [found]
    err = np.abs(c - LIN_A * dx1 - LIN_B * dx2)
    if np.all(err <= lim):
        return None
    return [cat.NOT_LINEAR_IN_DY.finding({"max_error": float(err.max())}, err=err.max())]


def _nondifferentiable(ev: Evidence, where: Any) -> Finding:
    idx = [ev.target.index(int(j)) for j in where[:MAX_LISTED]]
    evidence = {"count": len(where), "indices": idx}
    return cat.NONDIFFERENTIABLE.finding(evidence, count=len(where), examples=idx[:3])


def _scale_finding(c: float, sizes: list[int], jvp: bool = False) -> Finding:
    """`sign` (c = -1) or `scale`, the factor named (see `nice_number`)."""
    what = "jvp" if jvp else "backward"
    if abs(c + 1) < 1e-3:
        return (cat.JVP_SIGN if jvp else cat.SIGN).finding({"factor": c}, what=what)
    name = nice_number(c, sizes)
    template = cat.JVP_SCALE if jvp else cat.SCALE
    return template.finding({"factor": c, "factor_name": name}, what=what, factor_name=name)


# ---------------------------------------------------------------------------------------------
# full mode
# ---------------------------------------------------------------------------------------------


def zero_for_one_input(ev: Evidence) -> list[Finding] | None:
    """With a tuple x: zeros for one input whose true gradient is not zero."""
    t, sides = ev.target, ev.sides
    if not t.multi:
        return None
    for i in range(len(t.shapes)):
        sl = t.input_slice(i)
        if all(np.any(s.bad[sl]) and np.all(np.abs(s.dx[sl]) <= s.strict[sl]) for s in sides):
            top = float(np.max(np.abs(sides[0].num[sl])))
            evidence = {"max_numerical": top, "input": t.names[i], "position": i}
            return [cat.ZERO_FOR_INPUT.finding(evidence, top=top, name=t.names[i])]
    return None


def _entry_tolerance(ev: Evidence, A: F64) -> F64:
    """`Tol` per Jacobian entry; for a low-precision backward plus its measured rounding,
    2 |A - A64| (M more vjp calls, on float64 copies)."""
    t, tol = ev.target, ev.tol
    assert ev.numerical is not None
    J, err = ev.numerical
    scale = float(np.max(np.abs(J), initial=0.0))
    floor = ev.fd.rounding_floor(tol.eps_a)[None, :]
    T, _ = tol(J, err, np.abs(A) + np.abs(J), scale, floor=floor)
    if tol.eps_a > np.finfo(np.float64).eps:
        rows64 = [t.vjp64(np.eye(1, t.m, i).ravel()) for i in range(t.m)]
        got = [r64 for r64 in rows64 if r64 is not None]
        if len(got) == t.m:
            T += 2 * np.nan_to_num(np.abs(A - np.stack(got)), nan=0.0, posinf=0.0)
    return np.asarray(T)


def sign_or_scale(ev: Evidence) -> list[Finding] | None:
    """A ~ c J (least-squares c = <A, J>/<J, J>), and A is not simply J."""
    jac = ev.jac
    jj = float(np.sum(jac.J * jac.J))
    if not jj > 0:
        return None
    c = float(np.sum(jac.A * jac.J)) / jj
    if jac.fits(c * jac.J, max(1.0, abs(c))) and not jac.fits(jac.J):
        return [_scale_finding(c, jac.sizes())]
    return None


def layout(ev: Evidence) -> list[Finding] | None:
    """An input's gradient is the true one with its axes permuted, laid back into x's shape in
    C order (`dx.T` for a square x, `dx.T.reshape(x.shape)` or a reshape in the wrong order for
    others): A's columns are J's columns permuted so."""
    t, jac = ev.target, ev.jac
    found = []
    for i, shape in enumerate(t.shapes):
        sl = t.input_slice(i)
        J, A, T = jac.J[:, sl], jac.A[:, sl], jac.T[:, sl]
        if np.all(np.abs(A - J) <= 2 * T):
            continue
        hit = _permuted_layout(J, A, T, shape)
        if hit is None:
            return None
        where = f" of input {t.names[i]}" if t.multi else ""
        evidence = {"input": t.names[i], "axes": hit}
        how = f"transposed with axes {hit} and laid into shape {shape} in C order"
        if len(shape) == 2 and shape[0] == shape[1]:
            how = "transposed (dx.T)"
        found.append(cat.LAYOUT.finding(evidence, where=where, shape=shape, how=how))
    return found or None


def _permuted_layout(J: F64, A: F64, T: F64, shape: Any) -> tuple[int, ...] | None:
    """The axis order (not the identity, up to 4 axes) whose permutation of J's columns fits A."""
    from itertools import permutations

    nd = len(shape)
    if not 2 <= nd <= 4:
        return None
    idx = np.arange(J.shape[1]).reshape(shape)
    for axes in permutations(range(nd)):
        if axes == tuple(range(nd)):
            continue
        perm = idx.transpose(axes).ravel()
        if np.all(np.abs(A - J[:, perm]) <= 2 * (T + T[:, perm])):
            return tuple(int(a) for a in axes)
    return None


def per_input(ev: Evidence) -> list[Finding] | None:
    """With several inputs: each input's columns on their own, right, c_i times right, or named
    by a Jacobian pattern of their own (`ON_ONE_INPUT` on `Evidence.for_input`); answers when
    every wrong input is named so (its findings, input by input, in order)."""
    t, jac = ev.target, ev.jac
    if not t.multi:
        return None
    verdicts: list[tuple[str, Any]] = []  # (name, None if right, else c or its findings)
    for i, name in enumerate(t.names):
        sl = t.input_slice(i)
        J, A, T = jac.J[:, sl], jac.A[:, sl], jac.T[:, sl]
        if np.all(np.abs(A - J) <= 2 * T):
            verdicts.append((name, None))
            continue
        jj = float(np.sum(J * J))
        c = float(np.sum(A * J)) / jj if jj > 0 else 0.0
        if jj > 0 and np.all(np.abs(A - c * J) <= 2 * T * max(1.0, abs(c))):
            verdicts.append((name, c))
            continue
        own = _pattern_of_one_input(ev, i)
        if own is None:
            return None
        verdicts.append((name, own))
    found: list[Finding] = []
    for i, (_, v) in enumerate(verdicts):
        if isinstance(v, float):
            found.append(_input_finding(i, v, verdicts, jac.sizes()))
        elif v is not None:
            found.extend(v)
    return found or None


def _pattern_of_one_input(ev: Evidence, i: int) -> list[Finding] | None:
    """The findings of `ON_ONE_INPUT` on input i's own Jacobian columns, said of that input;
    None when no pattern names them (then the whole Jacobian's rules go on)."""
    sub = ev.for_input(i)
    found = first_answer(sub, ON_ONE_INPUT)
    if found is None or found[0].kind not in PATTERN_KINDS:
        return None
    rank = found[0].evidence.get("rank")
    if rank is not None and (4 * rank > min(sub.jac.E.shape) or partial(ev) is not None):
        # A rank-1/2 error names nothing on an input with so few elements, and comes after
        # `partial` on the whole Jacobian, as it does on one input.
        return None
    name = ev.target.names[i]
    return [cat.for_input(f, name, i) for f in found]


def _input_finding(
    position: int, c: float, verdicts: list[tuple[str, Any]], sizes: list[int]
) -> Finding:
    """`sign`/`scale` of the input at `position` (the others said right or wrong)."""
    name = verdicts[position][0]
    others = ", ".join(f"{n} {'right' if k is None else 'wrong'}" for n, k in verdicts if n != name)
    evidence = {"input": name, "position": position, "factor": c}
    if abs(c + 1) < 1e-3:
        return cat.SIGN_FOR_INPUT.finding(evidence, input=name, others=others)
    nm = nice_number(c, sizes)
    evidence["factor_name"] = nm
    return cat.SCALE_FOR_INPUT.finding(evidence, input=name, factor_name=nm, others=others)


def transpose(ev: Evidence) -> list[Finding] | None:
    """A ~ c Jᵀ for a square J that is not symmetric: J·dy instead of Jᵀ·dy."""
    jac = ev.jac
    J, T = jac.J, jac.T
    jj = float(np.sum(J * J))
    if J.shape[0] != J.shape[1] or not jj > 0 or np.all(np.abs(J - J.T) <= 2 * (T + T.T)):
        return None
    c = float(np.sum(jac.A * J.T)) / jj
    if not jac.fits(c * J.T, max(1.0, abs(c))):
        return None
    if abs(c - 1) < 1e-3:
        return [cat.TRANSPOSE.finding({"factor": c})]
    name = nice_number(c, jac.sizes())
    return [cat.TRANSPOSE_SCALED.finding({"factor": c}, factor_name=name)]


def diagonal(ev: Evidence) -> list[Finding] | None:
    """A is diagonal while the square J is not: the cross terms are missing. Also says how the
    diagonal compares, and which normalization paths the cross terms are, when they fit."""
    jac = ev.jac
    A, J, T = jac.A, jac.J, jac.T
    n = J.shape[1]
    if J.shape[0] != n or not float(np.sum(J * J)) > 0:
        return None
    off = ~np.eye(n, dtype=bool)
    if not np.any(np.abs(J[off]) > 2 * T[off]) or not np.all(np.abs(A[off]) <= 2 * T[off]):
        return None
    d = np.diag(A) - np.diag(J)
    td = 2 * np.diag(T)
    if np.all(np.abs(d) <= td):
        finding = cat.DIAGONAL.finding()
    elif np.all(np.abs(d - d.mean()) <= td):
        evidence = {"extra_dy_coefficient": float(d.mean())}
        finding = cat.DIAGONAL_SHIFTED.finding(evidence, shift=d.mean())
    else:
        finding = cat.DIAGONAL_WRONG.finding({"max_diagonal_error": float(np.max(np.abs(d)))})
    paths = _normalization.cross_term_paths(jac, ev.target.x64)
    return [finding] if paths is None else [finding, paths]


def partial(ev: Evidence) -> list[Finding] | None:
    """At most 10 % of the columns (elements of x) are wrong."""
    cols = np.flatnonzero(ev.jac.bad.any(axis=0))
    n = ev.target.n
    if not 0 < len(cols) <= max(1, n // 10):
        return None
    return [_partial(ev.target, cols)]


def _partial(t: Target, cols: Any, evidence: dict[str, Any] | None = None) -> Finding:
    idx = [t.index(int(j)) for j in cols[:MAX_LISTED]]
    more = " ..." if len(cols) > MAX_LISTED else ""
    listed = {"indices": idx, "count": len(cols), **(evidence or {})}
    return cat.PARTIAL.finding(listed, count=len(cols), n=t.n, indices=idx, more=more)


def coefficient(ev: Evidence) -> list[Finding] | None:
    """A normalization-shaped backward with every path but a wrong coefficient on one
    (`_normalization.coefficients`)."""
    sizes = ev.jac.sizes()
    found = _normalization.coefficients(ev.jac, ev.target.x64, lambda c: nice_number(c, sizes))
    return None if found is None else [found]


def missing_term(ev: Evidence) -> list[Finding] | None:
    """A - J is what one shared term gives: per group in span{1, x - mean} (a normalization's
    mean and variance paths, `_normalization.group_paths`), or else of rank 1 or 2."""
    found = _normalization.group_paths(ev.jac, ev.target.x64)
    if found is None:
        found = _low_rank_error(ev.jac)
    return None if found is None else [found]


def _low_rank_error(jac: Jacobians) -> Finding | None:
    E = jac.E
    if not np.all(np.isfinite(E)):
        return None
    try:
        U, s, Vt = np.linalg.svd(E, full_matrices=False)
    except np.linalg.LinAlgError:
        return None
    for k in (1, 2):
        if len(s) > k and np.all(np.abs(E - (U[:, :k] * s[:k]) @ Vt[:k]) <= 2 * jac.T):
            evidence = {"rank": k, "singular_values": s[: k + 1].tolist()}
            return cat.LOW_RANK_ERROR.finding(evidence, rank=k)
    return None


def partial_outputs(ev: Evidence) -> list[Finding] | None:
    """The cotangents of at most 10 % of the outputs are mishandled (rows of A)."""
    rows = np.flatnonzero(ev.jac.bad.any(axis=1))
    m = ev.target.m
    if not 0 < len(rows) <= max(1, m // 10):
        return None
    listed = rows[:MAX_LISTED].tolist()
    evidence = {"outputs": listed, "count": len(rows)}
    return [cat.PARTIAL_OUTPUTS.finding(evidence, count=len(rows), m=m, outputs=listed)]


def unknown(ev: Evidence) -> list[Finding] | None:
    """No known pattern fits: said honestly."""
    jac = ev.jac
    evidence = {"bad_entries": int(jac.bad.sum()), "max_error": float(np.max(np.abs(jac.E)))}
    bad = int(jac.bad.any(axis=0).sum())
    return [cat.UNKNOWN.finding(evidence, bad=bad, n=jac.E.shape[1])]


def _also_at_kinks(ev: Evidence, found: list[Finding]) -> list[Finding]:
    """`nondifferentiable` as a further finding, for bad elements at kinks."""
    kink_bad = np.zeros(ev.target.n, dtype=bool)
    for s in ev.sides:
        kink_bad |= s.bad & s.kinks
    if np.any(kink_bad) and found[0].kind != "nondifferentiable":
        return [_nondifferentiable(ev, np.flatnonzero(kink_bad))]
    return []


# ---------------------------------------------------------------------------------------------
# probe mode
# ---------------------------------------------------------------------------------------------


def probe_sign_or_scale(ev: Evidence) -> list[Finding] | None:
    """Every probe of both cotangents is off by the same factor c."""
    a = np.concatenate([s.dx for s in ev.sides])
    n = np.concatenate([s.num for s in ev.sides])
    limit = np.concatenate([s.tol for s in ev.sides])
    nn = float(n @ n)
    if not nn > 0:
        return None
    c = float(a @ n) / nn
    if np.all(np.abs(a - c * n) <= 2 * limit * max(1.0, abs(c))):
        return [_scale_finding(c, [ev.target.n, ev.target.m])]
    return None


def probe_zero_for_one_input(ev: Evidence) -> list[Finding] | None:
    """With a tuple x: the backward returns exact zeros for one input while a directional
    derivative on that input's elements (through either cotangent) is clearly not zero."""
    t, tol = ev.target, ev.tol
    if not t.multi:
        return None
    for i, name in enumerate(t.names):
        sl = t.input_slice(i)
        if any(np.any(g.dx[sl]) for g in ev.grads):
            continue
        u = np.zeros(t.n)
        u[sl] = ev.steps[sl] * ev.rng.standard_normal(sl.stop - sl.start)
        d = ev.fd.directional(u)
        au = np.abs(u)
        for s in ev.sides:
            num, fde = float(s.dy @ d.value), float(np.abs(s.dy) @ d.err)
            floor = float(ev.fd.rounding_floor(tol.eps_a) @ au) * float(np.max(np.abs(s.dy)))
            limit, _ = tol(num, fde, 0.0, 0.0, float(np.sum(au)), floor)
            if abs(num) > 4 * limit:
                evidence = {"max_numerical": abs(num), "input": name, "position": i}
                return [cat.ZERO_FOR_INPUT.finding(evidence, top=abs(num), name=name)]
    return None


def probe_per_input(ev: Evidence) -> list[Finding] | None:
    """With several inputs, each seen along a directional derivative of its own
    (`_probe_one_input`) through both cotangents: right, off by its own factor c_i (the same
    for both: `sign`/`scale`), or named by a pattern on its view (`ON_ONE_INPUT_PROBE` on
    `Evidence.for_input`: vjp calls and directional derivatives on that input, the others held
    at x). Answers when every wrong input is named so, input by input, in order."""
    t = ev.target
    if not t.multi:
        return None
    verdicts: list[tuple[str, Any]] = []  # (name, None if right, else c or its findings)
    for i, name in enumerate(t.names):
        seen = _probe_one_input(ev, i)
        if all(abs(ana - num) <= limit for ana, num, limit in seen):
            verdicts.append((name, None))
            continue
        c = _probe_factor(seen)
        if c is not None:
            verdicts.append((name, c))
            continue
        own = first_answer(ev.for_input(i), ON_ONE_INPUT_PROBE)
        if own is None:
            return None
        verdicts.append((name, [cat.for_input(f, name, i) for f in own]))
    factors = [c for _, c in verdicts if isinstance(c, float)]
    if not factors and all(c is None for _, c in verdicts):
        return None
    if len(factors) == len(verdicts) and len({round(c, 6) for c in factors}) == 1:
        return None  # one common factor: `probe_sign_or_scale` names it
    sizes = [t.n, t.m, *[int(np.prod(sh)) for sh in t.shapes]]
    found: list[Finding] = []
    for i, (_, v) in enumerate(verdicts):
        if isinstance(v, float):
            found.append(_input_finding(i, _nice(v), verdicts, sizes))
        elif v is not None:
            found.extend(v)
    return found


def _probe_factor(seen: list[tuple[float, float, float]]) -> float | None:
    """The one factor c with analytic = c numerical through both cotangents, or None (a
    numerical value too small to name one, or two factors)."""
    ratios = []
    for ana, num, limit in seen:
        if not abs(num) > 4 * limit:
            return None
        ratios.append((ana / num, limit / abs(num)))
    (c1, e1), (c2, e2) = ratios
    if abs(c1 - c2) <= 2 * (e1 + e2) * max(1.0, abs(c1)):
        return (c1 + c2) / 2
    return None


def _probe_one_input(ev: Evidence, i: int) -> list[tuple[float, float, float]]:
    """One directional derivative along a random u on input i's elements only (the others
    held): (analytic <dx, u>, numerical <dy, J u>, tolerance) through each cotangent."""
    t, tol = ev.target, ev.tol
    sl = t.input_slice(i)
    u = np.zeros(t.n)
    u[sl] = ev.steps[sl] * ev.rng.standard_normal(sl.stop - sl.start)
    d = ev.fd.directional(u)
    au = np.abs(u)
    out = []
    for s, (_, dx) in zip(ev.sides, ev.grads, strict=True):
        num, fde = float(s.dy @ d.value), float(np.abs(s.dy) @ d.err)
        ana, terms = float(dx @ u), float(np.abs(dx) @ au)
        floor = float(ev.fd.rounding_floor(tol.eps_a) @ au) * float(np.max(np.abs(s.dy)))
        limit, _ = tol(num, fde, terms, terms, float(np.sum(au)), floor)
        out.append((ana, num, float(limit)))
    return out


def _nice(c: float) -> float:
    """A probe's factor, snapped to a simple fraction when within 1e-6 of one (the probes'
    finite differences are not exact)."""
    for q in range(1, 9):
        p = round(c * q)
        if p != 0 and abs(c - p / q) <= 1e-6 * abs(c):
            return p / q
    return c


def probe_transpose(ev: Evidence) -> list[Finding] | None:
    """For square J: does vjp(dy) equal J·dy (one more directional derivative, along dy)?"""
    t, s1, tol = ev.target, ev.sides[0], ev.tol
    if t.m != t.n:
        return None
    dx = ev.grads[0].dx
    scale = float(np.median(ev.steps)) / max(float(np.sqrt(np.mean(s1.dy**2))), 1e-300)
    d = ev.fd.directional(scale * s1.dy)
    jdy, err = d.value / scale, d.err / scale
    floor = ev.fd.rounding_floor(tol.eps_a) * float(np.max(np.abs(s1.dy)))
    big = float(np.max(np.abs(jdy), initial=0.0))
    limit, _ = tol(jdy, err, np.abs(dx) + np.abs(jdy), big, floor=floor)
    if not np.all(np.abs(dx - jdy) <= 2 * limit):
        return None
    # J dy must differ from J^T dy: <J dy, u> vs <dy, J u>, along the probes or one of its own.
    if ev.probes is None:
        return None if _symmetric_along(ev, jdy, err) else [cat.TRANSPOSE.finding()]
    sym = all(
        abs(jdy @ u - n) <= tl + float(np.abs(err) @ np.abs(u))
        for u, n, tl in zip(ev.probes.dirs, s1.num, s1.tol, strict=True)
    )
    return None if sym else [cat.TRANSPOSE.finding()]


def _symmetric_along(ev: Evidence, jdy: F64, err: F64) -> bool:
    """<J dy, u> = <dy, J u> within tolerance, for one random direction u (one directional
    derivative): for the view of one input (`Evidence.for_input`), which has no probes."""
    dy, tol = ev.sides[0].dy, ev.tol
    u = ev.steps * ev.rng.standard_normal(ev.target.n)
    d = ev.fd.directional(u)
    lhs, rhs = float(jdy @ u), float(dy @ d.value)
    fde = float(np.abs(err) @ np.abs(u)) + float(np.abs(dy) @ d.err)
    au = np.abs(u)
    floor = float(ev.fd.rounding_floor(tol.eps_a) @ au) * float(np.max(np.abs(dy)))
    scale = float(np.abs(dy) @ np.abs(d.value)) + float(np.abs(jdy) @ au)
    limit, _ = tol(lhs - rhs, fde, scale, scale, float(np.sum(au)), floor)
    return abs(lhs - rhs) <= 2 * limit


def probe_diagonal(ev: Evidence) -> list[Finding] | None:
    """For square J: is the backward diagonal while J is not? A cotangent on a random half H
    of the outputs: a diagonal backward's dx is zero off H (one vjp call); and J couples the
    other half to H: <dy_H, J v> != 0 for v on the other half (one directional derivative)."""
    t, s1, tol = ev.target, ev.sides[0], ev.tol
    if t.m != t.n or t.n < 2:
        return None
    half = ev.rng.random(t.n) < 0.5
    g = np.where(half, s1.dy, 0.0)
    a = t.vjp(g)
    if not np.any(np.abs(a[half]) > 0) or np.any(np.abs(a[~half]) > _rounding(ev, a)[~half]):
        return None
    v = np.where(half, 0.0, ev.steps * ev.rng.standard_normal(t.n))
    d = ev.fd.directional(v)
    num, fde = float(g @ d.value), float(np.abs(g) @ d.err)
    av = np.abs(v)
    floor = float(ev.fd.rounding_floor(tol.eps_a) @ av) * float(np.max(np.abs(g)))
    scale = float(np.abs(g) @ np.abs(d.value))
    limit, _ = tol(num, fde, scale, scale, float(np.sum(av)), floor)
    if not abs(num) > 2 * limit:
        return None  # J has no cross terms from that half either
    return [cat.DIAGONAL_PROBE.finding({"cross_term": num, "tolerance": float(limit)})]


MAX_BLOCK = 64  # probe_group: the largest group whose Jacobian block is built


def probe_group(ev: Evidence) -> list[Finding] | None:
    """For square J: the Jacobian block of one group, built as full mode would (a row of A by
    one vjp call gives the group; its k columns of J by k directional derivatives, its k rows
    of A by k vjp calls), and the normalization fits (`coefficient`, `missing_term`) on it.
    None unless the block is closed (nothing outside it in those rows and columns), at most
    MAX_BLOCK elements, wrong, and a normalization-shaped fit names it."""
    t = ev.target
    if t.m != t.n:
        return None
    i = int(ev.rng.integers(t.n))
    row = t.vjp(np.eye(1, t.n, i).ravel())
    cols = np.flatnonzero(np.abs(row) > _rounding(ev, row))
    if not 3 <= len(cols) <= MAX_BLOCK or i not in cols:
        return None
    block = _block(ev, cols)
    if block is None or not np.any(block.bad):
        return None
    x = t.x64[cols]
    sizes = block.sizes()
    found = _normalization.coefficients(block, x, lambda c: nice_number(c, sizes))
    found = found or _normalization.group_paths(block, x)
    if found is None:
        return None
    t.notes.add(
        f"probe mode: the finding comes from the Jacobian block of one group of {len(cols)} "
        f"elements (around {t.index(i)}), built with {len(cols)} directional derivatives and "
        f"{len(cols)} vjp calls."
    )
    return [found]


def _block(ev: Evidence, cols: Any) -> Jacobians | None:
    """A and J restricted to `cols` (rows and columns), or None if either reaches outside."""
    t, tol = ev.target, ev.tol
    outside = np.ones(t.n, dtype=bool)
    outside[cols] = False
    J, err, A = [], [], []
    for j in cols:
        d = ev.fd.directional(np.eye(1, t.n, j).ravel() * ev.steps[j]).scaled(1 / ev.steps[j])
        if np.any(np.abs(d.value[outside]) > 2 * d.err[outside] + 1e-12 * np.max(np.abs(d.value))):
            return None
        J.append(d.value[cols])
        err.append(d.err[cols])
        a = t.vjp(np.eye(1, t.n, j).ravel())
        if np.any(np.abs(a[outside]) > _rounding(ev, a)[outside]):
            return None
        A.append(a[cols])
    Jb, Eb, Ab = np.stack(J, axis=1), np.stack(err, axis=1), np.stack(A)
    scale = float(np.max(np.abs(Jb), initial=0.0))
    floor = ev.fd.rounding_floor(tol.eps_a)[cols][None, :]
    T, _ = tol(Jb, Eb, np.abs(Ab) + np.abs(Jb), scale, floor=floor)
    return Jacobians.compare(Ab, Jb, np.asarray(T))


def localize(ev: Evidence) -> Diagnosis:
    """The bad elements by adaptive group testing (`_localize.group_test`): single elements
    (`partial`), index sets when the budget ran out first (`partial`), or spread out
    (`unknown`)."""
    t = ev.target
    start = t.evals.done
    per_test = 6 if ev.fd.complex_ok else 4
    t.evals.allow(ev.localize_budget)

    def budget_left() -> bool:
        return t.evals.done - start + 2 * per_test <= ev.localize_budget

    located, frontier, spread = group_test(ev, MAX_LOCATED, budget_left)
    spent = {"evaluations": t.evals.done - start, "budget": ev.localize_budget}
    if not spread and located and not frontier:
        return Diagnosis([_partial(t, np.asarray(located), spent)], located)
    if not spread and frontier:
        ranges = [(t.index(int(S[0])), t.index(int(S[-1]))) for S in frontier]
        evidence = {"ranges": ranges, "indices": [t.index(j) for j in located], **spent}
        finding = cat.PARTIAL_RANGES.finding(
            evidence,
            count=len(frontier),
            ranges=ranges[:MAX_LOCATED],
            indices=[t.index(j) for j in located],
        )
        return Diagnosis([finding], located)
    return Diagnosis([cat.UNKNOWN_PROBES.finding(spent)])


# ---------------------------------------------------------------------------------------------
# the forward derivative
# ---------------------------------------------------------------------------------------------


def jvp_findings(ev: Evidence) -> list[Finding]:
    """jvp(u) against the numerical J u along each direction (`Evidence.jvp_directions`):
    nothing when it matches, else nonfinite, zero, sign/scale or unknown."""
    t, tol = ev.target, ev.tol
    dirs, vals, errs = ev.jvp_directions()
    ana = np.concatenate([t.jvp(u) for u in dirs])
    num, err = np.concatenate(vals), np.concatenate(errs)
    weight = np.concatenate([np.full(t.m, np.sum(np.abs(u))) for u in dirs])
    scale = float(np.max(np.abs(num), initial=0.0))
    limit, _ = tol(num, err, finite_abs(ana) + np.abs(num), scale, weight=weight)
    if np.all(np.abs(ana - num) <= limit):
        return []
    if not np.all(np.isfinite(ana)):
        return [cat.JVP_NONFINITE.finding({"count": int(np.sum(~np.isfinite(ana)))})]
    if np.all(ana == 0):
        return [cat.JVP_ZERO.finding()]
    nn = float(num @ num)
    c = float(ana @ num) / nn if nn > 0 else 0.0
    if nn > 0 and np.all(np.abs(ana - c * num) <= 2 * limit * max(1.0, abs(c))):
        return [_scale_finding(c, [t.n, t.m], jvp=True)]
    return [cat.JVP_UNKNOWN.finding({"max_error": float(np.max(np.abs(ana - num)))})]


# The order of the rules (docs/checker.md, "Order of the tests").
# Both modes, first: a NaN or Inf in dx always fails; a check within tolerance passes.
# Then the checks that need no finite differences (a few vjp calls), before the verdict.
VERDICT: tuple[Rule, ...] = (
    nonfinite,
    nondeterministic,
    mutates_input,
    wrong_dtype,
    linearity,
    passed,
    at_kinks,
)
# Full mode, from vjp calls and the one-sided differences only.
FULL: tuple[Rule, ...] = (zero, zero_for_one_input)
# Full mode, on the Jacobians (after the analytic one is built and found finite).
ON_JACOBIANS: tuple[Rule, ...] = (
    sign_or_scale,
    layout,
    per_input,
    transpose,
    diagonal,
    partial,
    coefficient,
    missing_term,
    partial_outputs,
    unknown,
)
# Full mode, `per_input`: on one input's own columns (`Evidence.for_input`), in the order of
# ON_JACOBIANS; an input is named when the first answer is one of PATTERN_KINDS (a `partial`
# there lets the whole Jacobian's rules go on).
ON_ONE_INPUT: tuple[Rule, ...] = (layout, transpose, diagonal, partial, coefficient, missing_term)
PATTERN_KINDS = ("layout", "transpose", "diagonal", "coefficient", "missing_term")
# Probe mode, before `localize`.
PROBE: tuple[Rule, ...] = (
    zero,
    probe_zero_for_one_input,
    probe_sign_or_scale,
    probe_per_input,
    probe_transpose,
    probe_diagonal,
    probe_group,
)
# Probe mode, `probe_per_input`: the rules that build what they need on one input (the view has
# no probes: `probe_transpose` checks symmetry along a direction of its own there).
ON_ONE_INPUT_PROBE: tuple[Rule, ...] = (probe_transpose, probe_diagonal, probe_group)
