"""What the rules (`_rules.py`) look at: `Evidence`, everything one check measured, with
`Tol` (the checker's one tolerance formula), `Side` (one cotangent's comparison) and, in full
mode once the check failed, `Jacobians` (analytic against numerical, entry by entry)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from ._fd import FiniteDifferences
from ._target import F64, Target


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

    def columns(self, part: slice) -> Side:
        """Full mode: the comparison of one input's elements only."""

        def cut(a: Any) -> Any:
            return a[part] if np.ndim(a) else a

        dx, num, fd, tol, strict = (
            cut(a) for a in (self.dx, self.num, self.fd, self.tol, self.strict)
        )
        return Side(
            self.dy, dx, num, fd, tol, strict, cut(self.kinks), self.atol, cut(self.rel_mag)
        )

    def cotangent_only(self) -> Side:
        """Probe mode: the cotangent without the probes' values (which mix all inputs)."""
        none = np.zeros(0)
        return Side(self.dy, none, none, none, none, none, np.zeros(0, dtype=bool), self.atol)


class Gradient(NamedTuple):
    """The user's vjp for one cotangent (flat), and how the report names that cotangent."""

    label: str
    dx: F64


class Directions(NamedTuple):
    """Numerical derivatives along directions: `values[k]` ~ J `dirs[k]`, within `errors[k]`."""

    dirs: list[F64]
    values: list[F64]
    errors: list[F64]


class NumericalJacobian(NamedTuple):
    """Full mode: the dense J by finite differences (m x n) and its error estimate."""

    J: F64
    err: F64


@dataclass(frozen=True)
class Jacobians:
    """Full mode, once the check failed: the analytic Jacobian `A` (row i = vjp(e_i)) against
    the numerical `J` under the entry tolerance `T`. `E = A - J` is wrong where `bad`. Groups
    are the connected components of J's significant entries (a normalization's groups, a
    softmax's rows): labels per row and per column."""

    A: F64
    J: F64
    T: F64
    E: F64
    bad: Any  # |E| > 2 T
    row_groups: Any
    col_groups: Any

    @classmethod
    def compare(cls, A: F64, J: F64, T: F64) -> Jacobians:
        E = A - J
        rows, cols = _groups(J, T)
        return cls(A, J, T, E, np.abs(E) > 2 * T, rows, cols)

    def fits(self, model: F64, k: float = 1.0) -> bool:
        """A model of A "fits" when it reproduces A within twice the entry tolerance."""
        return bool(np.all(np.abs(self.A - model) <= 2 * self.T * k))

    def joint_groups(self) -> tuple[Any, Any]:
        """Connected components of J's and the error's significant entries together: groups
        that the backward couples, whether or not the function does (a term it has too many)."""
        return _groups(np.where(self.bad, np.abs(self.E) + np.abs(self.J), self.J), self.T)

    def sizes(self) -> list[int]:
        """m, n and the group sizes: the sizes a fitted factor may be named after."""
        m, n = self.J.shape
        return [m, n, *sorted({int(c) for c in np.bincount(self.col_groups) if c > 0})]


@dataclass(frozen=True)
class Evidence:
    """Everything one check measured, for the rules. `numerical` is set in full mode, `probes`
    in probe mode; `jacobians` is added (a new Evidence) by the full-mode diagnosis."""

    fd: FiniteDifferences
    sides: list[Side]  # the user's cotangent, then a second, random one
    grads: list[Gradient]  # the full vjp for each side's dy
    tol: Tol
    steps: F64
    rng: np.random.Generator
    localize_budget: int
    numerical: NumericalJacobian | None = None
    probes: Directions | None = None
    jacobians: Jacobians | None = None
    raw: Any = None  # the vjp's own result for the first cotangent (its dtypes)
    one_sided: Any = None  # full mode: `_fd.OneSided`, the one-sided Jacobians (kinks)

    @property
    def target(self) -> Target:
        return self.fd.target

    @property
    def full(self) -> bool:
        return self.numerical is not None

    @property
    def jac(self) -> Jacobians:
        """The Jacobians, for the rules that run after they are built."""
        assert self.jacobians is not None, "a Jacobian rule ran before the Jacobians were built"
        return self.jacobians

    def for_input(self, i: int) -> Evidence:
        """The evidence of input `i` of a tuple x on its own (`Target.restricted`): in full mode
        its columns of the Jacobians and its elements of each comparison; in probe mode the
        cotangents only (no probes: each probe moved every input), for the rules that build
        what they need from vjp calls and directional derivatives on that input."""
        view = self.target.restricted(i)
        part = view.part
        grads = [Gradient(g.label, g.dx[part]) for g in self.grads]
        common = (self.tol, self.steps[part], self.rng, self.localize_budget)
        fd = self.fd.restricted(view)
        if self.numerical is None:
            sides = [s.cotangent_only() for s in self.sides]
            return Evidence(fd, sides, grads, *common)
        numerical = NumericalJacobian(self.numerical.J[:, part], self.numerical.err[:, part])
        jac = self.jacobians
        if jac is not None:
            jac = Jacobians.compare(jac.A[:, part], jac.J[:, part], jac.T[:, part])
        sides = [s.columns(part) for s in self.sides]
        return Evidence(fd, sides, grads, *common, numerical=numerical, jacobians=jac)

    def jvp_directions(self) -> Directions:
        """Where the jvp is checked: the probes, or (full mode) the unit vectors with J's
        columns."""
        if self.numerical is None:
            assert self.probes is not None
            return self.probes
        n = self.target.n
        unit = [np.eye(1, n, j).ravel() for j in range(n)]
        return Directions(unit, list(self.numerical.J.T), list(self.numerical.err.T))


def finite_abs(a: F64) -> F64:
    """|a| where finite, else 0: a NaN or Inf in the user's values fails the comparison itself
    and must not widen the tolerance it is compared with."""
    return np.where(np.isfinite(a), np.abs(a), 0.0)


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
