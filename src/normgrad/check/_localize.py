"""Probe mode: which elements of dx are wrong, by adaptive group testing.

The residual r = dx - Jᵀdy is unknown (it needs n finite differences), but its weighted sums
over any index set S are one directional derivative each, since for a direction v supported
on S, <dx, v> - <dy, J v> = Σ_{j∈S} r_j v_j. Two fixed weight vectors over all elements are
used: u_j = h_j z_j (z Gaussian) and w_j = t_j u_j with t_j = (j + 1)/n. Both are linear in S,
so a set's sums are its halves' sums added up: splitting S costs the two sums of one half, the
other half comes by subtraction. And when S holds a single wrong element j, the ratio of its
two sums is t_j: the element is named from two numbers (`_decode`), then confirmed by one
directional derivative along e_j, and by the rest of S summing to zero in both weights.

Each sum is compared within the checker's tolerance (`Tol`) as a probe is; the sums of a
difference carry the sum of both finite-difference error estimates.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from ._evidence import Evidence
from ._target import F64


class Sum(NamedTuple):
    """<dx, v> and <dy, J v> for one direction v on one index set, with what its tolerance
    needs: the finite-difference error, |dx|·|v|, Σ|v| and the rounding floor·|v|."""

    ana: float
    num: float
    fde: float
    terms: float
    weight: float
    floor: float

    def minus(self, o: Sum) -> Sum:
        """The sums over the set difference (o's set inside self's); errors add."""
        return Sum(
            self.ana - o.ana,
            self.num - o.num,
            self.fde + o.fde,
            max(self.terms - o.terms, 0.0),
            max(self.weight - o.weight, 0.0),
            max(self.floor - o.floor, 0.0),
        )

    def times(self, k: float) -> Sum:
        return Sum(*(v * k if i < 2 else v * abs(k) for i, v in enumerate(self)))

    @property
    def residual(self) -> float:
        return self.ana - self.num


class Node(NamedTuple):
    """A suspect index set (sorted flat indices) and its sums along u and along w."""

    idx: Any
    su: Sum
    sw: Sum


class Outcome(NamedTuple):
    located: list[int]  # single wrong elements found
    frontier: list[Any]  # index sets still failing when the budget ran out
    spread: bool  # more than `most` sets fail: the mismatch is not confined to a few elements


class GroupTest:
    """The sums of one check's residual over index sets (first cotangent)."""

    def __init__(self, ev: Evidence) -> None:
        self.ev = ev
        t = ev.target
        k, self.u = _worst_probe(ev)
        self.dy, self.dx = ev.sides[k].dy, ev.grads[k].dx
        self.t = (np.arange(t.n) + 1.0) / t.n
        self.w = self.u * self.t
        self.floor = ev.fd.rounding_floor(ev.tol.eps_a) * float(np.max(np.abs(self.dy)))

    def sums(self, idx: Any, base: F64) -> Sum:
        """One directional derivative along `base` restricted to `idx`."""
        v = np.zeros(self.ev.target.n)
        v[idx] = base[idx]
        d = self.ev.fd.directional(v)
        av = np.abs(v[idx])
        return Sum(
            float(self.dx[idx] @ v[idx]),
            float(self.dy @ d.value),
            float(np.abs(self.dy) @ d.err),
            float(np.abs(self.dx[idx]) @ av),
            float(np.sum(av)),
            float(self.floor[idx] @ av),
        )

    def node(self, idx: Any) -> Node:
        return Node(idx, self.sums(idx, self.u), self.sums(idx, self.w))

    def fails(self, s: Sum) -> bool:
        limit, _ = self.ev.tol(s.num, s.fde, s.terms, s.terms, s.weight, s.floor)
        return bool(abs(s.residual) > limit)

    def node_fails(self, nd: Node) -> bool:
        return self.fails(nd.su) or self.fails(nd.sw)

    def decode(self, nd: Node) -> int | None:
        """The one element of `nd.idx` that would explain both sums: t_j = r_w / r_u."""
        ru = nd.su.residual
        if ru == 0 or not np.isfinite(ru):
            return None
        est = nd.sw.residual / ru * len(self.t) - 1.0
        if not (nd.idx[0] - 0.5 <= est <= nd.idx[-1] + 0.5):
            return None  # a weighted mean of several elements' t (of mixed signs)
        k = int(np.clip(np.searchsorted(nd.idx, est), 1, len(nd.idx) - 1))
        j0, j1 = int(nd.idx[k - 1]), int(nd.idx[k])
        return j0 if abs(est - j0) <= abs(est - j1) else j1

    def peel(self, nd: Node, j: int) -> tuple[bool, Node]:
        """Test element j on its own (one directional derivative): (j is wrong, the rest)."""
        one = self.sums(np.array([j]), self.u)
        rest = Node(nd.idx[nd.idx != j], nd.su.minus(one), nd.sw.minus(one.times(self.t[j])))
        return self.fails(one), rest

    def split(self, nd: Node) -> list[Node]:
        half = self.node(nd.idx[: len(nd.idx) // 2])
        other = Node(nd.idx[len(nd.idx) // 2 :], nd.su.minus(half.su), nd.sw.minus(half.sw))
        return [half, other]


def _worst_probe(ev: Evidence) -> tuple[int, F64]:
    """(cotangent, direction) of the probe that fails by most, relative to its tolerance: the
    whole set's sum along it fails as that probe did (a fresh random direction may not, when
    the wrong elements' weights in it happen to be small)."""
    if ev.probes is None:
        return 0, ev.steps * ev.rng.standard_normal(ev.target.n)
    ratios = [np.abs(s.dx - s.num) / np.maximum(s.tol, 1e-300) for s in ev.sides]
    k = int(np.argmax([float(np.max(r)) for r in ratios]))
    return k, np.asarray(ev.probes.dirs[int(np.argmax(ratios[k]))])


def group_test(ev: Evidence, most: int, budget_left: Callable[[], bool]) -> Outcome:
    """The wrong elements: from the whole index set, peel the element each failing set's sums
    name (`decode`) and split what still fails, largest residual first, until single elements
    remain, more than `most` sets fail, or `budget_left()` says no."""
    g = GroupTest(ev)
    n = ev.target.n
    root = g.node(np.arange(n))
    queue = [root] if g.node_fails(root) else []
    located: list[int] = []
    while queue and budget_left():
        queue.sort(key=lambda nd: -abs(nd.su.residual))
        nd = queue.pop(0)
        if len(nd.idx) == 1:
            located.append(int(nd.idx[0]))
            continue
        j = g.decode(nd)
        if j is not None:
            wrong, rest = g.peel(nd, j)
            if wrong:
                located.append(j)
                nd = rest
                if not g.node_fails(nd):
                    continue
                if len(nd.idx) == 1:
                    queue.append(nd)
                    continue
        if not budget_left():
            queue.append(nd)
            break
        queue += [c for c in g.split(nd) if len(c.idx) and g.node_fails(c)]
        if len(queue) + len(located) > most:
            return Outcome(located, [], True)
    located += [int(nd.idx[0]) for nd in queue if len(nd.idx) == 1]
    return Outcome(sorted(set(located)), [nd.idx for nd in queue if len(nd.idx) > 1], False)
