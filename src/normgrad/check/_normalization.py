"""What the checker knows about normalizations, y = (x - μ)/σ over groups of elements: a
missing term is named by the path it belongs to, the mean path (every x_j moves the group mean:
an error constant over the group) or the variance path (every x_j moves the group variance: an
error along x - mean, i.e. along x̂). The generic rules (`_rules.py`) consult it."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from ._evidence import Jacobians
from ._report import Finding, Template
from ._target import F64

MEAN_PATH = "the mean path (every x_j moves the group mean: a term constant over the group)"
VARIANCE_PATH = (
    "the variance path (every x_j moves the group variance: a term along x - mean, i.e. along x̂)"
)

# `paths` is MEAN_PATH, VARIANCE_PATH, or both joined by " and ".
CROSS_TERM_PATHS = Template(
    "missing_term",
    "the missing cross terms are {paths}.",
    "for a normalization y = (x - μ)/σ: dx = (1/σ)(g - mean(g) - x̂·mean(g·x̂)) with g = dy; the "
    "mean(g) term is the mean path, the x̂·mean(g·x̂) term the variance path.",
)
GROUP_PATHS = Template(
    "missing_term",
    "a term that couples all elements of a group is missing or wrong: {paths} ({groups} group(s) "
    "affected).",
    "check the chain rule through the shared statistics: the mean path gives -mean(g)/σ, the "
    "variance path -x̂·mean(g·x̂)/σ (g = dy·weight).",
)
EXTRA_PATHS = Template(
    "missing_term",
    "the backward couples elements that f treats separately: it has {paths} over {groups} "
    "group(s) that f does not couple (as when f's mean and variance are constants).",
    "where f's statistics are constants (running or global ones), its backward is the "
    "per-element scale dy·weight/σ: drop the -mean(g) and -x̂·mean(g·x̂) terms; otherwise reduce "
    "over f's own groups only.",
)
COEFFICIENT = Template(
    "coefficient",
    "every path of the normalization is there but {terms} (fitted per group in {basis}, groups "
    "of n = {n} elements).",
    "check the factors of each term: the group size n where another count (the batch, all "
    "elements) is used, 1/n² for 1/n, eps added outside the square root, σ vs σ².",
)
TEMPLATES = (CROSS_TERM_PATHS, GROUP_PATHS, EXTRA_PATHS, COEFFICIENT)


class _Basis(NamedTuple):
    """A normalization's Jacobian per group: Σ_k c_k B_k, with the terms' names."""

    span: str
    terms: tuple[str, ...]
    centered: bool  # u = x - mean (mean-variance) or x itself (RMS)
    mean_path: bool


MEAN_VARIANCE = _Basis(
    "span{g, mean(g), x̂·mean(g·x̂)}",
    ("the direct term g/σ", "the mean-path term", "the variance-path term"),
    True,
    True,
)
RMS = _Basis(
    "span{g, x̂·mean(g·x̂)} (RMS normalization: no mean)",
    ("the direct term g/σ", "the variance-path term"),
    False,
    False,
)


def coefficients(jac: Jacobians, x: F64, name: Any) -> Finding | None:
    """Both A and J, per square group, of a normalization's form: s·I + a·11ᵀ + b·uuᵀ (u = x -
    mean, J's a and b non-zero), or for RMS normalization s·I + b·xxᵀ with J's b/s = -1/(n(mean
    x² + eps)) for an eps >= 0 (what y = x/sqrt(mean x² + eps) gives; a function merely of
    that shape, such as x·Σx², has b/s > 0). The ratio of each of A's coefficients to J's; None
    unless every ratio is the same over the groups, one differs from 1 and none is 0 (an absent
    path is `missing_term`). `name(c)` names a ratio."""
    if not confined_to_groups(jac):
        return None
    for basis in (MEAN_VARIANCE, RMS):
        r = _ratios(jac, x, basis)
        if r is not None:
            return _coefficient_finding(jac, r, basis, name)
    return None


def _ratios(jac: Jacobians, x: F64, basis: _Basis) -> Any:
    """Per group the ratios of A's coefficients to J's, or None where the shape does not fit."""
    ratios = []
    for g in np.unique(jac.col_groups):
        cols = np.flatnonzero(jac.col_groups == g)
        if len(cols) < 3 or not np.array_equal(np.flatnonzero(jac.row_groups == g), cols):
            return None
        u = _centered(x, cols) if basis.centered else np.asarray(x[cols], dtype=np.float64)
        k = len(cols)
        terms = [np.eye(k).ravel(), np.ones(k * k), np.outer(u, u).ravel()]
        B = np.stack(terms if basis.mean_path else [terms[0], terms[2]], axis=1)
        fits = []
        for M in (jac.J, jac.A):
            Mg, Tg = M[np.ix_(cols, cols)], jac.T[np.ix_(cols, cols)]
            c, *_ = np.linalg.lstsq(B, Mg.ravel(), rcond=None)
            if not np.all(np.abs(Mg.ravel() - B @ c) <= 2 * Tg.ravel()):
                return None
            fits.append(c)
        cj, ca = fits
        if np.any(np.abs(cj) <= 1e-8 * np.max(np.abs(cj))):
            return None  # not a normalization's shape
        if not basis.mean_path:
            ms = float(np.mean(u * u))
            eps = -cj[0] / (cj[1] * k) - ms
            if not -1e-6 * ms <= eps <= 0.5 * ms:
                return None  # s·I + b·xxᵀ, but not x/sqrt(mean x² + eps)
        ratios.append(ca / cj)
    r = np.asarray(ratios)
    if not len(r) or np.any(np.abs(r - r[0]) > 1e-6 * np.maximum(1.0, np.abs(r[0]))):
        return None
    return r[0]


def _coefficient_finding(jac: Jacobians, r0: Any, basis: _Basis, name: Any) -> Finding | None:
    off = [i for i in range(len(r0)) if abs(r0[i] - 1) > 1e-6]
    if not off or np.any(np.abs(r0) < 1e-6) or np.allclose(r0, r0[0], rtol=1e-6):
        return None  # right, a path absent, or one common factor (`scale`)
    n = int(np.bincount(jac.col_groups).max())
    terms = " and ".join(
        f"{basis.terms[i]} is {name(r0[i])}× what it should be{_count(r0[i], n) if i else ''}"
        for i in off
    )
    keys = ("direct", "mean", "variance") if basis.mean_path else ("direct", "variance")
    evidence: dict[str, Any] = {f"ratio_{k}": float(r0[i]) for i, k in enumerate(keys)}
    evidence["basis"] = "mean-variance" if basis.mean_path else "rms"
    return COEFFICIENT.finding(evidence, terms=terms, n=n, basis=basis.span)


def cross_term_paths(jac: Jacobians, x: F64) -> Finding | None:
    """For a backward whose Jacobian is diagonal: fit J's off-diagonal entries, per group and
    per row, by a + b (x_j - mean). The `a` part is the mean path, the `b` part the variance
    path; None unless the fit holds for every group. RMS normalization (no mean) is tried
    first: off-diagonal entries b_i x_j per row are its variance path alone."""
    if _rms_cross_terms(jac, x):
        rms: dict[str, Any] = {"groups": len(np.unique(jac.col_groups)), "rms": True}
        return _paths_finding(CROSS_TERM_PATHS, 0.0, 1.0, rms)
    J, T = jac.J, jac.T
    rows_l, cols_l = jac.row_groups, jac.col_groups
    e_mean = e_var = 0.0
    coef_mean = []
    for g in np.unique(cols_l):
        cols = np.flatnonzero(cols_l == g)
        rows = cols[rows_l[cols] == g] if J.shape[0] == J.shape[1] else cols
        if len(cols) < 3 or len(rows) != len(cols) or not np.array_equal(rows, cols):
            return None
        Jg, Tg = J[np.ix_(rows, cols)], T[np.ix_(rows, cols)]
        u = _centered(x, cols)
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
    evidence = {
        "groups": len(coef_mean),
        "mean_path_coefficient": coef_mean[0] if coef_mean else 0.0,
    }
    return _paths_finding(CROSS_TERM_PATHS, e_mean, e_var, evidence)


def _rms_cross_terms(jac: Jacobians, x: F64) -> bool:
    """J's off-diagonal entries, per square group, are b_i x_j (an RMS normalization's
    variance path: no term constant over the group), and not all zero."""
    J, T = jac.J, jac.T
    if J.shape[0] != J.shape[1]:
        return False
    for g in np.unique(jac.col_groups):
        cols = np.flatnonzero(jac.col_groups == g)
        if len(cols) < 3 or not np.array_equal(np.flatnonzero(jac.row_groups == g), cols):
            return False
        Jg, Tg, xg = J[np.ix_(cols, cols)], T[np.ix_(cols, cols)], x[cols]
        off = ~np.eye(len(cols), dtype=bool)
        xs = np.where(off, xg[None, :], 0.0)
        den = np.sum(xs * xs, axis=1)
        if np.any(den <= 0):
            return False
        b = np.sum(np.where(off, Jg, 0.0) * xs, axis=1) / den
        if not np.all(np.abs((Jg - b[:, None] * xg[None, :])[off]) <= 2 * Tg[off]):
            return False
    return True


def _count(r: float, n: int) -> str:
    """A mean over m elements where the group has n: r = n/m for a whole m != n."""
    m = n / r if r > 0 else 0.0
    if m >= 1 and abs(m - round(m)) <= 1e-6 * m and round(m) != n:
        return f" (1/m with m = {round(m)} where the group has n = {n} elements)"
    return ""


def group_paths(jac: Jacobians, x: F64) -> Finding | None:
    """Whether the error A - J lies, in every group with a wrong entry, in span{1, x - mean}
    (per row): a missing or wrong mean path and/or variance path. None otherwise. Where the
    error reaches outside J's groups, the groups are those the backward couples
    (`joint_groups`): a normalization's backward applied to a function without one (constant
    statistics) has mean and variance paths the function lacks."""
    own = confined_to_groups(jac)
    rows_l, cols_l = (jac.row_groups, jac.col_groups) if own else jac.joint_groups()
    bad_groups = np.unique(cols_l[jac.bad.any(axis=0)])
    e_mean = e_var = 0.0
    for g in bad_groups:
        cols = np.flatnonzero(cols_l == g)
        rows = np.flatnonzero(rows_l == g)
        if len(rows) == 0 or len(cols) < 2:  # a "group" of one element couples nothing
            return None
        Eg, Tg = jac.E[np.ix_(rows, cols)], jac.T[np.ix_(rows, cols)]
        u = _centered(x, cols)
        basis = [np.ones(len(cols)) / np.sqrt(len(cols))]
        if float(u @ u) > 0 and len(cols) > 2:
            basis.append(u / np.sqrt(float(u @ u)))
        B = np.stack(basis, axis=1)  # orthonormal: 1 and u are orthogonal
        P = Eg @ B
        if not np.all(np.abs(Eg - P @ B.T) <= 2 * Tg):
            return None
        e_mean += float(np.sum(P[:, 0] ** 2))
        e_var += float(np.sum(P[:, 1] ** 2)) if P.shape[1] > 1 else 0.0
    evidence = {"groups": len(bad_groups), "groups_of_f": own}
    template = GROUP_PATHS if own else EXTRA_PATHS
    return _paths_finding(template, e_mean, e_var, evidence, groups=len(bad_groups))


def confined_to_groups(jac: Jacobians) -> bool:
    """Whether A - J vanishes (within twice the tolerance) outside the groups' blocks. A
    backward that couples elements of different groups (reductions over the wrong axes or
    group size) is not a wrong coefficient or path *of* the groups: the per-group fits, which
    look only inside the blocks, would misname it."""
    outside = jac.row_groups[:, None] != jac.col_groups[None, :]
    return bool(np.all(np.abs(jac.E[outside]) <= 2 * jac.T[outside]))


def _centered(x: F64, cols: Any) -> F64:
    """x - mean(x) over one group's columns: the direction of the variance path."""
    xg = x[cols]
    return np.asarray(xg - xg.mean(), dtype=np.float64)


def _paths_finding(
    template: Template, e_mean: float, e_var: float, evidence: dict[str, Any], **fields: Any
) -> Finding | None:
    """A finding naming the paths by their share of the fitted error's energy (each path named
    when above 0.1 % of it); None when the fitted error is zero."""
    total = e_mean + e_var
    if not total > 0:
        return None
    names = []
    if e_mean > 1e-3 * total:
        names.append(MEAN_PATH)
    if e_var > 1e-3 * total:
        names.append(VARIANCE_PATH)
    shares = {"mean_path_share": e_mean / total, "variance_path_share": e_var / total}
    return template.finding({**evidence, **shares}, paths=" and ".join(names), **fields)
