"""Diagnosis: what kind of mistake explains the difference between the analytic and numerical
derivatives.

In `full` mode the analytic Jacobian `A` is built row by row from the user's vjp (one call per
output, with basis cotangents) and compared with the numerical Jacobian `J` entry by entry,
under a per-entry tolerance `T`. A model "fits" when `|A - model| <= 2 T` everywhere:

    NaN or Inf in A -> nonfinite,
    A ~ 0 -> zero,  A ~ -J -> sign,  A ~ c J -> scale,  A ~ c J^T -> transpose,
    off-diagonal A ~ 0 but J's is not -> diagonal,  few wrong columns -> partial,
    A - J in span{1, x - mean} per group (or of rank <= 2) -> missing_term.

Groups are the connected components of J's significant entries (a normalization's groups).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _catalogue as cat
from . import _normalization
from ._catalogue import nice_number
from ._fd import FiniteDifferences
from ._report import Finding
from ._target import F64, Target

MAX_LISTED = 20  # indices listed in evidence
MAX_LOCATED = 8  # partial: at most this many bad elements (probe mode)


@dataclass(frozen=True)
class Tol:
    """The checker's one tolerance formula, for any compared values `num` (numerical) whose
    analytic counterparts involve magnitudes `terms`:

        strict = 8 eps_a terms + floor + atol + rtol |num|,    tol = strict + fd

    with `fd` the finite-difference error estimate of `num`, `floor` rounding measured or
    bounded elsewhere, and atol = rtol * scale by default (`scale`: the size of the terms
    that cancel in `num`), or the user's atol times `weight` (sum |u| for a directional
    derivative along `u`)."""

    eps_a: float  # machine epsilon of the analytic side
    rtol: float
    atol: float | None  # the user's, or None for the default

    def atol_for(self, scale: float, weight: Any = 1.0) -> Any:
        return self.rtol * scale if self.atol is None else self.atol * weight

    def __call__(
        self, num: Any, fd: Any, terms: Any, scale: float, weight: Any = 1.0, floor: Any = 0.0
    ) -> tuple[Any, Any]:
        """(tol, strict)"""
        strict = 8 * self.eps_a * terms + floor + self.atol_for(scale, weight)
        strict = strict + self.rtol * np.abs(num)
        return strict + fd, strict


@dataclass
class Side:
    """One cotangent's comparison: analytic vs numerical values and their tolerances."""

    dy: F64
    dx: F64  # analytic values (dx in full mode, <dx, u> per probe in probe mode)
    num: F64
    fd: F64
    tol: F64
    strict: F64  # tol without the finite-difference term
    kinks: Any  # where one-sided differences disagree
    atol: float = 0.0  # the absolute part of `tol` (reported)
    rel_mag: Any = 0.0  # magnitudes that floor the relative error's denominator

    @property
    def bad(self) -> Any:
        return ~(np.abs(self.dx - self.num) <= self.tol)  # NaN counts as bad

    @property
    def passed(self) -> bool:
        return not bool(np.any(self.bad))


def passed_findings(sides: list[Side]) -> list[Finding]:
    noisy = [bool(np.any(np.abs(s.dx - s.num) > s.strict)) for s in sides]
    if any(noisy):
        s = sides[0] if noisy[0] else sides[1]
        diff = np.abs(s.dx - s.num)
        evidence = {"max_mismatch": float(diff.max()), "max_fd_error": float(s.fd.max())}
        return [cat.FD_NOISE.finding(evidence, mismatch=diff.max(), fd_error=s.fd.max())]
    return [cat.OK.finding()]


def nonfinite_finding(t: Target, grads: list[tuple[str, F64]]) -> Finding | None:
    """A NaN or Inf in the backward's dx (for the first cotangent that has one)."""
    for label, dx in grads:
        where = np.flatnonzero(~np.isfinite(dx))
        if len(where):
            idx = [t.index(int(j)) for j in where[:MAX_LISTED]]
            return cat.NONFINITE.finding(
                {"indices": idx, "count": len(where), "cotangent": label},
                count=len(where),
                n=t.n,
                label=label,
                first=idx[0],
                value=dx[where[0]],
            )
    return None


def _common(t: Target, sides: list[Side], dx1: F64, eps_a: float, probe: bool) -> Any:
    """Checks that need only vjp calls: zero, ignores_dy, nondifferentiable (and, in full mode
    with several inputs, zero for one input). `dx1` is vjp(x, dy) for the first side's dy."""
    s1 = sides[0]
    all_zero = all(np.all(np.abs(s.dx) <= s.strict) for s in sides)
    if all_zero and (not probe or not np.any(dx1)):
        top = float(np.max(np.abs(s1.num)))
        return [cat.ZERO.finding({"max_numerical": top}, top=top)]
    dx2 = t.vjp(2 * s1.dy)
    scale = float(np.max(np.abs(dx1), initial=0.0))
    lin_tol = 16 * eps_a * (np.abs(dx1) + scale) + 1e-300
    if np.any(np.abs(dx2 - 2 * dx1) > lin_tol):
        const = bool(np.all(np.abs(dx2 - dx1) <= lin_tol))
        template = cat.IGNORES_DY if const else cat.NOT_LINEAR_IN_DY
        return [template.finding({"constant_in_dy": const})]
    if probe:  # one value per probe direction and side
        bad = np.concatenate([s.bad for s in sides])
        kinks = np.concatenate([np.asarray(s.kinks, dtype=bool) for s in sides])
    else:  # one value per element of x, for either side
        bad = np.logical_or.reduce([s.bad for s in sides])
        kinks = np.logical_or.reduce([np.asarray(s.kinks, dtype=bool) for s in sides])
    if np.any(bad) and np.all(kinks[bad]):
        return [_nondiff(t, np.flatnonzero(bad & kinks), probe)]
    if probe or not t.multi:
        return None
    for i in range(len(t.shapes)):
        sl = t.input_slice(i)
        if all(np.any(s.bad[sl]) and np.all(np.abs(s.dx[sl]) <= s.strict[sl]) for s in sides):
            top = float(np.max(np.abs(s1.num[sl])))
            return [
                cat.ZERO_FOR_INPUT.finding({"max_numerical": top, "input": i}, top=top, input=i)
            ]
    return None


def _nondiff(t: Target, where: Any, probe: bool = False) -> Finding:
    if probe:
        return cat.NONDIFFERENTIABLE_PROBES.finding({"count": len(where)}, count=len(where))
    idx = [t.index(int(j)) for j in where[:MAX_LISTED]]
    evidence = {"count": len(where), "indices": idx}
    return cat.NONDIFFERENTIABLE.finding(evidence, count=len(where), examples=idx[:3])


# ---------------------------------------------------------------------------------------------
# full mode
# ---------------------------------------------------------------------------------------------


def diagnose_full(
    fd: FiniteDifferences, sides: list[Side], jac: F64, err: F64, tol: Tol
) -> tuple[list[Finding], F64 | None]:
    """(findings, the analytic Jacobian when it was built)."""
    t = fd.target
    eps_a = tol.eps_a
    found = _common(t, sides, sides[0].dx, eps_a, probe=False)
    if found is not None:
        return found, None
    A = np.stack([t.vjp(np.eye(1, t.m, i).ravel()) for i in range(t.m)])
    bad_rows = [i for i in range(t.m) if not np.all(np.isfinite(A[i]))]
    if bad_rows:
        label = f"dy = the unit vector at output {bad_rows[0]}"
        finding = nonfinite_finding(t, [(label, A[bad_rows[0]])])
        assert finding is not None
        return [finding], A
    scale = float(np.max(np.abs(jac), initial=0.0))
    T, _ = tol(jac, err, np.abs(A) + np.abs(jac), scale, floor=fd.rounding_floor(eps_a)[None, :])
    if eps_a > np.finfo(np.float64).eps:  # the low-precision backward's measured rounding
        rows64 = [t.vjp64(np.eye(1, t.m, i).ravel()) for i in range(t.m)]
        got = [r64 for r64 in rows64 if r64 is not None]
        if len(got) == t.m:
            T += 2 * np.nan_to_num(np.abs(A - np.stack(got)), nan=0.0, posinf=0.0)
    findings = structure(t, A, jac, T)
    kink_bad = np.zeros(t.n, dtype=bool)
    for s in sides:
        kink_bad |= s.bad & s.kinks
    if np.any(kink_bad) and findings[0].kind != "nondifferentiable":
        findings.append(_nondiff(t, np.flatnonzero(kink_bad)))
    return findings, A


def structure(t: Target, A: F64, J: F64, T: F64) -> list[Finding]:
    """Classify A (analytic Jacobian) against J (numerical) under the entry tolerance T."""
    m, n = J.shape

    def fits(model: F64, k: float = 1.0) -> bool:
        return bool(np.all(np.abs(A - model) <= 2 * T * k))

    jj = float(np.sum(J * J))
    sizes = [m, n, *_group_sizes(t, J, T)]
    if jj > 0:
        c = float(np.sum(A * J)) / jj
        if fits(c * J, max(1.0, abs(c))) and not fits(J):
            return [_scale_finding(c, sizes)]
    if m == n and jj > 0:
        JT = J.T
        if not np.all(np.abs(J - JT) <= 2 * (T + T.T)):
            c = float(np.sum(A * JT)) / jj
            if fits(c * JT, max(1.0, abs(c))):
                if abs(c - 1) < 1e-3:
                    return [cat.TRANSPOSE.finding({"factor": c})]
                name = nice_number(c, sizes)
                return [cat.TRANSPOSE_SCALED.finding({"factor": c}, factor_name=name)]
        off = ~np.eye(n, dtype=bool)
        j_off = np.any(np.abs(J[off]) > 2 * T[off])
        if j_off and np.all(np.abs(A[off]) <= 2 * T[off]):
            return _diagonal(t, A, J, T, sizes)
    E = A - J
    badmask = np.abs(E) > 2 * T
    cols, rows = np.flatnonzero(badmask.any(axis=0)), np.flatnonzero(badmask.any(axis=1))
    if 0 < len(cols) <= max(1, n // 10):
        return [_partial(t, cols, n)]
    missing = _missing_term(t, E, J, T, badmask)
    if missing is not None:
        return [missing]
    if 0 < len(rows) <= max(1, m // 10):
        listed = rows[:MAX_LISTED].tolist()
        evidence = {"outputs": listed, "count": len(rows)}
        return [cat.PARTIAL_OUTPUTS.finding(evidence, count=len(rows), m=m, outputs=listed)]
    return [_unknown(E, T, badmask)]


def _scale_finding(c: float, sizes: list[int], jvp: bool = False) -> Finding:
    what = "jvp" if jvp else "backward"
    if abs(c + 1) < 1e-3:
        return (cat.JVP_SIGN if jvp else cat.SIGN).finding({"factor": c}, what=what)
    name = nice_number(c, sizes)
    template = cat.JVP_SCALE if jvp else cat.SCALE
    return template.finding({"factor": c, "factor_name": name}, what=what, factor_name=name)


def _diagonal(t: Target, A: F64, J: F64, T: F64, sizes: list[int]) -> list[Finding]:
    d = np.diag(A) - np.diag(J)
    td = 2 * np.diag(T)
    if np.all(np.abs(d) <= td):
        finding = cat.DIAGONAL.finding()
    elif np.all(np.abs(d - d.mean()) <= td):
        evidence = {"extra_dy_coefficient": float(d.mean())}
        finding = cat.DIAGONAL_SHIFTED.finding(evidence, shift=d.mean())
    else:
        finding = cat.DIAGONAL_WRONG.finding({"max_diagonal_error": float(np.max(np.abs(d)))})
    findings = [finding]
    paths = _cross_term_paths(t, J, T)
    if paths is not None:
        findings.append(paths)
    return findings


def _cross_term_paths(t: Target, J: F64, T: F64) -> Finding | None:
    """Fit J's off-diagonal entries, per group and per row, by a + b (x_j - mean): the mean path
    (constant in j) and the variance path (along the centered input)."""
    rows_l, cols_l = _groups(J, T)
    e_mean = e_var = 0.0
    coef_mean = []
    for g in np.unique(cols_l):
        cols = np.flatnonzero(cols_l == g)
        rows = cols[rows_l[cols] == g] if J.shape[0] == J.shape[1] else cols
        if len(cols) < 3 or len(rows) != len(cols) or not np.array_equal(rows, cols):
            return None
        Jg, Tg = J[np.ix_(rows, cols)], T[np.ix_(rows, cols)]
        u = _centered(t, cols)
        k = len(cols)
        # Per-row least squares of Jg[i, j] ~ p0 + p1 u_j over j != i (normal equations minus
        # the diagonal point).
        diag = np.diag(Jg)
        s0 = k - 1.0
        s1 = -u
        s11 = float(u @ u) - u * u
        r0 = Jg.sum(axis=1) - diag
        r1 = Jg @ u - diag * u
        det = s0 * s11 - s1 * s1
        if np.any(det <= 0):
            return None
        p0 = (s11 * r0 - s1 * r1) / det
        p1 = (s0 * r1 - s1 * r0) / det
        model = p0[:, None] + p1[:, None] * u[None, :]
        off = ~np.eye(k, dtype=bool)
        if not np.all(np.abs((Jg - model)[off]) <= 2 * Tg[off] + 1e-12 * np.abs(Jg).max()):
            return None
        e_mean += float(np.sum(p0**2)) * k
        e_var += float(np.sum(p1**2)) * float(u @ u)
        coef_mean.append(float(np.mean(p0)))
    return _paths_finding(
        _normalization.CROSS_TERM_PATHS,
        e_mean,
        e_var,
        {"groups": len(coef_mean), "mean_path_coefficient": coef_mean[0] if coef_mean else 0.0},
    )


def _centered(t: Target, cols: Any) -> F64:
    """x - mean(x) over one group's columns: the direction of the variance path."""
    xg = t.x64[cols]
    return np.asarray(xg - xg.mean(), dtype=np.float64)


def _paths_finding(
    template: Any, e_mean: float, e_var: float, evidence: dict[str, Any], **fields: Any
) -> Finding | None:
    """A `missing_term` finding naming the normalization's paths by their share of the fitted
    error's energy: the mean path (constant over a group) and the variance path (along
    x - group mean)."""
    total = e_mean + e_var
    if not total > 0:
        return None
    names = []
    if e_mean > 1e-3 * total:
        names.append(_normalization.MEAN_PATH)
    if e_var > 1e-3 * total:
        names.append(_normalization.VARIANCE_PATH)
    shares = {"mean_path_share": e_mean / total, "variance_path_share": e_var / total}
    return template.finding({**evidence, **shares}, paths=" and ".join(names), **fields)


def _partial(t: Target, cols: Any, n: int) -> Finding:
    idx = [t.index(int(j)) for j in cols[:MAX_LISTED]]
    more = " ..." if len(cols) > MAX_LISTED else ""
    evidence = {"indices": idx, "count": len(cols)}
    return cat.PARTIAL.finding(evidence, count=len(cols), n=n, indices=idx, more=more)


def _groups(J: F64, T: F64) -> tuple[Any, Any]:
    """Connected components of J's significant entries: (row labels, column labels).

    Labels spread by taking minima across significant entries until stable (at most 64 rounds:
    a longer chain of couplings counts as one group)."""
    m, n = J.shape
    S = np.abs(J) > 2 * T
    big = np.iinfo(np.int64).max
    col = np.arange(n, dtype=np.int64)
    row = np.where(S, col[None, :], big).min(axis=1) if n else np.zeros(m, dtype=np.int64)
    for _ in range(64):
        new_col = np.minimum(col, np.where(S, row[:, None], big).min(axis=0))
        new_row = np.minimum(row, np.where(S, new_col[None, :], big).min(axis=1))
        if np.array_equal(new_col, col) and np.array_equal(new_row, row):
            break
        col, row = new_col, new_row
    else:
        return np.zeros(m, dtype=np.int64), np.zeros(n, dtype=np.int64)
    return row, col


def _group_sizes(t: Target, J: F64, T: F64) -> list[int]:
    _, col = _groups(J, T)
    return sorted({int(c) for c in np.bincount(col) if c > 0})


def _missing_term(t: Target, E: F64, J: F64, T: F64, badmask: Any) -> Finding | None:
    rows_l, cols_l = _groups(J, T)
    bad_groups = np.unique(cols_l[badmask.any(axis=0)])
    e_mean = e_var = 0.0
    fitted = True
    for g in bad_groups:
        cols = np.flatnonzero(cols_l == g)
        rows = np.flatnonzero(rows_l == g)
        if len(rows) == 0 or len(cols) < 2:  # a "group" of one element couples nothing
            fitted = False
            break
        Eg, Tg = E[np.ix_(rows, cols)], T[np.ix_(rows, cols)]
        u = _centered(t, cols)
        basis = [np.ones(len(cols)) / np.sqrt(len(cols))]
        if float(u @ u) > 0 and len(cols) > 2:
            basis.append(u / np.sqrt(float(u @ u)))
        B = np.stack(basis, axis=1)  # orthonormal: 1 and u are orthogonal
        P = Eg @ B
        if not np.all(np.abs(Eg - P @ B.T) <= 2 * Tg):
            fitted = False
            break
        e_mean += float(np.sum(P[:, 0] ** 2))
        e_var += float(np.sum(P[:, 1] ** 2)) if P.shape[1] > 1 else 0.0
    if fitted:
        found = _paths_finding(
            _normalization.GROUP_PATHS,
            e_mean,
            e_var,
            {"groups": len(bad_groups)},
            groups=len(bad_groups),
        )
        if found is not None:
            return found
    # Generic: is the error a matrix of rank 1 or 2?
    if not np.all(np.isfinite(E)):
        return None
    try:
        U, s, Vt = np.linalg.svd(E, full_matrices=False)
    except np.linalg.LinAlgError:
        return None
    for k in (1, 2):
        if len(s) > k and np.all(np.abs(E - (U[:, :k] * s[:k]) @ Vt[:k]) <= 2 * T):
            evidence = {"rank": k, "singular_values": s[: k + 1].tolist()}
            return cat.LOW_RANK_ERROR.finding(evidence, rank=k)
    return None


def _unknown(E: F64, T: F64, badmask: Any) -> Finding:
    evidence = {"bad_entries": int(badmask.sum()), "max_error": float(np.max(np.abs(E)))}
    return cat.UNKNOWN.finding(evidence, bad=int(badmask.any(axis=0).sum()), n=E.shape[1])


# ---------------------------------------------------------------------------------------------
# probe mode
# ---------------------------------------------------------------------------------------------


def diagnose_probe(
    fd: FiniteDifferences,
    sides: list[Side],
    dx1: F64,
    dirs: list[F64],
    vals: list[F64],
    h: F64,
    tol: Tol,
    rng: np.random.Generator,
    budget: int,
) -> tuple[list[Finding], list[int] | None]:
    """`dx1` is the full vjp(x, dy) of the first side (sides hold its projections)."""
    t = fd.target
    found = _common(t, sides, dx1, tol.eps_a, probe=True)
    if found is not None:
        return found, None
    s1, s2 = sides
    a = np.concatenate([s1.dx, s2.dx])
    n = np.concatenate([s1.num, s2.num])
    limit = np.concatenate([s1.tol, s2.tol])
    nn = float(n @ n)
    if nn > 0:
        c = float(a @ n) / nn
        if np.all(np.abs(a - c * n) <= 2 * limit * max(1.0, abs(c))):
            return [_scale_finding(c, [t.n, t.m])], None
    if t.m == t.n:
        tr = _probe_transpose(fd, s1, dx1, dirs, h, tol)
        if tr is not None:
            return [tr], None
    return _localize(fd, s1, dx1, h, tol, rng, budget)


def _probe_transpose(
    fd: FiniteDifferences, s1: Side, dx: F64, dirs: list[F64], h: F64, tol: Tol
) -> Finding | None:
    """Does vjp(dy) = `dx` equal J·dy (one more directional derivative, along dy itself)?"""
    scale = float(np.median(h)) / max(float(np.sqrt(np.mean(s1.dy**2))), 1e-300)
    d = fd.directional(scale * s1.dy)
    jdy, err = d.value / scale, d.err / scale
    floor = fd.rounding_floor(tol.eps_a) * float(np.max(np.abs(s1.dy)))
    big = float(np.max(np.abs(jdy), initial=0.0))
    limit, _ = tol(jdy, err, np.abs(dx) + np.abs(jdy), big, floor=floor)
    if not np.all(np.abs(dx - jdy) <= 2 * limit):
        return None
    # J dy must differ from J^T dy, seen through the probes: <J dy, u> vs <dy, J u>.
    sym = all(
        abs(jdy @ u - n) <= tl + float(np.abs(err) @ np.abs(u))
        for u, n, tl in zip(dirs, s1.num, s1.tol, strict=True)
    )
    if sym:
        return None
    return cat.TRANSPOSE.finding()


def _localize(
    fd: FiniteDifferences,
    s1: Side,
    dx: F64,
    h: F64,
    tol: Tol,
    rng: np.random.Generator,
    budget: int,
) -> tuple[list[Finding], list[int] | None]:
    """Bisection: probe directions restricted to halves of a failing index set, breadth first,
    until single elements remain, more than MAX_LOCATED sets fail, or the budget is spent.
    `dx` is vjp(x, dy) for the side's dy."""
    t, evals = fd.target, fd.target.evals
    start = evals.done
    per_test = 6 if fd.complex_ok else 4
    floor = fd.rounding_floor(tol.eps_a) * float(np.max(np.abs(s1.dy)))
    evals.allow(budget)

    def fails(idx: Any) -> bool:
        u = np.zeros(t.n)
        u[idx] = h[idx] * rng.standard_normal(len(idx))
        d = fd.directional(u)
        num = float(s1.dy @ d.value)
        fde = float(np.abs(s1.dy) @ d.err)
        terms = float(np.abs(dx[idx]) @ np.abs(u[idx]))
        au = np.abs(u[idx])
        limit, _ = tol(num, fde, terms, terms, float(np.sum(au)), float(floor[idx] @ au))
        return bool(abs(float(dx @ u) - num) > limit)

    frontier = [np.arange(t.n)]
    located: list[int] = []
    spread = False
    while frontier and evals.done - start + 2 * per_test <= budget:
        S = frontier.pop(0)
        if len(S) == 1:
            located.append(int(S[0]))
            continue
        halves = [S[: len(S) // 2], S[len(S) // 2 :]]
        frontier += [hf for hf in halves if fails(hf)]
        if len(frontier) + len(located) > MAX_LOCATED:
            spread = True
            break
    located += [int(S[0]) for S in frontier if len(S) == 1]
    frontier = [S for S in frontier if len(S) > 1]
    ev_budget = {"evaluations": evals.done - start, "budget": budget}
    if not spread and located and not frontier:
        located.sort()
        f = _partial(t, np.asarray(located), t.n)
        return [Finding(f.kind, f.message, f.hint, {**f.evidence, **ev_budget})], located
    if not spread and frontier:
        ranges = [(t.index(int(S[0])), t.index(int(S[-1]))) for S in frontier]
        evidence = {"ranges": ranges, "indices": located, **ev_budget}
        finding = cat.PARTIAL_RANGES.finding(
            evidence, count=len(frontier), ranges=ranges[:MAX_LOCATED], indices=located
        )
        return [finding], located
    return [cat.UNKNOWN_PROBES.finding(ev_budget)], None


def diagnose_jvp(ana: F64, num: F64, tol: F64, t: Target) -> list[Finding]:
    """The forward derivative jvp(x, tx) against J·tx (values flattened)."""
    if not np.all(np.isfinite(ana)):
        return [cat.JVP_NONFINITE.finding({"count": int(np.sum(~np.isfinite(ana)))})]
    if np.all(ana == 0):
        return [cat.JVP_ZERO.finding()]
    nn = float(num @ num)
    c = float(ana @ num) / nn if nn > 0 else 0.0
    if nn > 0 and np.all(np.abs(ana - c * num) <= 2 * tol * max(1.0, abs(c))):
        return [_scale_finding(c, [t.n, t.m], jvp=True)]
    return [cat.JVP_UNKNOWN.finding({"max_error": float(np.max(np.abs(ana - num)))})]
