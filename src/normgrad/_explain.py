r"""The chain rule of `normalize`, node by node, checked against finite differences.

The op is the graph (within each group of `n` elements, `m = n - ddof`):

    x ─┬─> mu = mean(x) ──┐
       └──────────────────┴─> d = x - mu ─┬─> var = sum(d**2)/m ─> s ─┐
                                          └───────────────────────────┴─> y = d / s

with `s = sqrt(var + eps)` (eps inside) or `sqrt(var) + eps` (eps outside). `explain` runs
the forward, then a reverse sweep over this graph: every node's adjoint
$\bar v = \partial L/\partial v$ of $L = \sum dy \cdot y$ is accumulated from its consumers,
each edge using its own local derivative. Independently, each node's adjoint is estimated by
finite differences: perturb one element of the node, recompute only the nodes downstream of
it (upstream values held fixed), difference $y$ and contract with `dy`, with the gradient
checker's own differences (step per element, refined where $y$ curves on a finer scale,
complex step where exact). The two columns agree at every node (`NodeReport.ok`), and the
final $\bar x$ equals `normalize_backward`'s.

For the whole-array, eps-inside, ddof=0 case (the original question's), `explain` also lists
where the question's derivation departs from this sweep.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ._axes import Axes
from ._errors import NormgradError
from ._ops import normalize_backward, normalize_forward

FloatArray = NDArray[np.float64]
EXPLAIN_MAX_SIZE = 4096
AGREE_RTOL = 1e-6  # two adjoints agree when max |a - b| <= AGREE_RTOL * (1 + max |b|)


def _agree(diff: float, reference: FloatArray) -> bool:
    return diff <= AGREE_RTOL * (1.0 + float(np.max(np.abs(reference))))


@dataclass(frozen=True)
class Term:
    """One edge of the reverse sweep: `child` sends `value` to a node's adjoint."""

    child: str
    local: str  # the local derivative used, e.g. "∂σ²/∂d = 2d/m"
    rule: str  # how it enters the adjoint, e.g. "d̄ += σ̄² · 2d/m"
    value: FloatArray


@dataclass(frozen=True)
class NodeReport:
    """A node of the graph: its forward value and its adjoint, analytic and numerical."""

    name: str
    symbol: str
    formula: str
    value: FloatArray
    adjoint: FloatArray
    adjoint_fd: FloatArray
    terms: tuple[Term, ...]

    @property
    def max_abs_diff(self) -> float:
        """Largest |analytic - finite-difference| over the node's elements."""
        return float(np.max(np.abs(self.adjoint - self.adjoint_fd)))

    @property
    def ok(self) -> bool:
        """The two columns agree: max |diff| <= AGREE_RTOL * (1 + max |adjoint|)."""
        return _agree(self.max_abs_diff, self.adjoint)


@dataclass(frozen=True)
class Departure:
    """Where the original question's derivation leaves the correct reverse sweep."""

    node: str
    problem: str  # what the question does
    correct: str  # what the sweep does
    problem_value: FloatArray
    correct_value: FloatArray

    @property
    def max_abs_diff(self) -> float:
        return float(np.max(np.abs(self.problem_value - self.correct_value)))

    def to_dict(self, values: bool = True) -> dict[str, Any]:
        """JSON-ready; `values=False` leaves the two arrays out."""
        doc: dict[str, Any] = {"node": self.node, "problem": self.problem, "correct": self.correct}
        if values:
            doc["problem_value"] = self.problem_value.tolist()
            doc["correct_value"] = self.correct_value.tolist()
        return doc | {"max_abs_diff": self.max_abs_diff}


@dataclass(frozen=True)
class Explanation:
    """What `explain` returns: nodes in forward order, plus checks and departures."""

    options: dict[str, Any]
    nodes: tuple[NodeReport, ...]
    dy: FloatArray
    dx_normalize_backward: FloatArray
    y_normalize: FloatArray
    departures: tuple[Departure, ...] = field(default=())

    def node(self, name: str) -> NodeReport:
        return next(n for n in self.nodes if n.name == name)

    @property
    def dx_vs_normalize_backward(self) -> float:
        """max |x̄ (this sweep) - normalize_backward(...).x|: 0 up to rounding."""
        return float(np.max(np.abs(self.node("x").adjoint - self.dx_normalize_backward)))

    @property
    def y_vs_normalize(self) -> float:
        return float(np.max(np.abs(self.node("y").value - self.y_normalize)))

    @property
    def first_mismatch(self) -> str | None:
        """The first node (in reverse-sweep order) whose two adjoint columns disagree."""
        return next((n.name for n in reversed(self.nodes) if not n.ok), None)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: arrays as nested lists."""
        return {
            "options": self.options,
            "dy": self.dy.tolist(),
            "nodes": [
                {
                    "name": n.name,
                    "symbol": n.symbol,
                    "formula": n.formula,
                    "shape": list(n.value.shape),
                    "value": n.value.tolist(),
                    "adjoint": n.adjoint.tolist(),
                    "adjoint_fd": n.adjoint_fd.tolist(),
                    "max_abs_diff": n.max_abs_diff,
                    "ok": n.ok,
                    "terms": [
                        {
                            "from": t.child,
                            "local": t.local,
                            "rule": t.rule,
                            "value": t.value.tolist(),
                        }
                        for t in n.terms
                    ],
                }
                for n in self.nodes
            ],
            "dx_vs_normalize_backward": self.dx_vs_normalize_backward,
            "y_vs_normalize": self.y_vs_normalize,
            "first_mismatch": self.first_mismatch,
            "departures": [d.to_dict() for d in self.departures],
        }


# ---------------------------------------------------------------------------------------------
# The graph
# ---------------------------------------------------------------------------------------------

Vjp = Callable[[FloatArray, dict[str, FloatArray]], FloatArray]


@dataclass(frozen=True)
class _Edge:
    parent: str
    local: str
    rule: str
    vjp: Vjp  # (adjoint of the child, all node values) -> contribution to the parent's adjoint


@dataclass(frozen=True)
class _Node:
    name: str
    symbol: str
    formula: str
    compute: Callable[[dict[str, FloatArray]], FloatArray]
    edges: tuple[_Edge, ...]


def _s_node(eps: float, eps_mode: str) -> _Node:
    """s, the denominator: sqrt(σ² + ε) (eps inside) or sqrt(σ²) + ε (outside)."""
    if eps_mode == "inside":
        formula, local = "sqrt(σ² + ε)", "∂s/∂σ² = 1/(2s)"

        def s_fn(v: dict[str, FloatArray]) -> FloatArray:
            return np.sqrt(v["var"] + eps)

        def ds_dvar(v: dict[str, FloatArray]) -> FloatArray:
            return 0.5 / v["s"]

    else:
        formula, local = "sqrt(σ²) + ε", "∂s/∂σ² = 1/(2·sqrt(σ²))  (0 where σ² = 0)"

        def s_fn(v: dict[str, FloatArray]) -> FloatArray:
            return np.sqrt(v["var"]) + eps

        def ds_dvar(v: dict[str, FloatArray]) -> FloatArray:
            std = np.sqrt(v["var"])
            # At σ² = 0 the derivative is infinite but every d is 0, so the term vanishes.
            return np.where(std > 0, 0.5 / np.where(std > 0, std, 1.0), 0.0)

    edge = _Edge("var", local, "σ̄² += s̄ · ∂s/∂σ²", lambda a, v: a * ds_dvar(v))
    return _Node("s", formula, f"s = {formula}", s_fn, (edge,))


def _graph(axes: tuple[int, ...], n: int, m: float, eps: float, eps_mode: str) -> list[_Node]:
    def gsum(a: FloatArray) -> FloatArray:  # sum over each group, keepdims: a parent's shape
        return np.sum(a, axis=axes, keepdims=True)

    return [
        _Node("x", "x", "input", lambda v: v["x"], ()),
        _Node(
            "mu",
            "μ",
            f"μ = mean(x)   (over axes {axes}, n = {n})",
            lambda v: np.mean(v["x"], axis=axes, keepdims=True),
            (
                _Edge(
                    "x",
                    "∂μ/∂x_i = 1/n",
                    "x̄_i += μ̄ / n",
                    lambda a, v: np.broadcast_to(a / n, v["x"].shape),
                ),
            ),
        ),
        _Node(
            "d",
            "x−μ",
            "d = x − μ",
            lambda v: v["x"] - v["mu"],
            (
                _Edge("x", "∂d_i/∂x_i = 1", "x̄_i += d̄_i", lambda a, v: a),
                _Edge("mu", "∂d_i/∂μ = −1", "μ̄ += −Σ_i d̄_i", lambda a, v: -gsum(a)),
            ),
        ),
        _Node(
            "var",
            "σ²",
            f"σ² = Σ d² / m   (m = n − ddof = {m:g})",
            lambda v: gsum(v["d"] ** 2) / m,
            (
                _Edge(
                    "d",
                    "∂σ²/∂d_i = 2 d_i / m",
                    "d̄_i += σ̄² · 2 d_i / m",
                    lambda a, v: a * 2.0 * v["d"] / m,
                ),
            ),
        ),
        _s_node(eps, eps_mode),
        _Node(
            "y",
            "y",
            "y = d / s",
            lambda v: v["d"] / v["s"],
            (
                _Edge("d", "∂y_i/∂d_i = 1/s", "d̄_i += ȳ_i / s", lambda a, v: a / v["s"]),
                _Edge(
                    "s",
                    "∂y_i/∂s = −d_i / s²",
                    "s̄ += −Σ_i ȳ_i d_i / s²",
                    lambda a, v: gsum(-a * v["d"] / v["s"] ** 2),
                ),
            ),
        ),
    ]


def _forward(graph: list[_Node], values: dict[str, FloatArray], start: int) -> None:
    """Recompute, in place, every node after position `start` from its parents."""
    for node in graph[start + 1 :]:
        values[node.name] = node.compute(values)


def _reverse(
    graph: list[_Node], values: dict[str, FloatArray], dy: FloatArray
) -> tuple[dict[str, FloatArray], dict[str, list[Term]]]:
    """The reverse sweep: adjoints and, per node, the terms that built them."""
    adj = {node.name: np.zeros_like(values[node.name]) for node in graph}
    terms: dict[str, list[Term]] = {node.name: [] for node in graph}
    adj["y"] = dy.copy()
    terms["y"].append(Term("L", "∂L/∂y = dy", "ȳ = dy", dy.copy()))
    for node in reversed(graph):  # consumers come after producers, so adj[node] is complete
        for edge in node.edges:
            contrib = np.asarray(edge.vjp(adj[node.name], values), dtype=np.float64)
            adj[edge.parent] = adj[edge.parent] + contrib
            terms[edge.parent].append(Term(node.name, edge.local, edge.rule, contrib))
    return adj, terms


def _fd_adjoint(
    graph: list[_Node], values: dict[str, FloatArray], dy: FloatArray, k: int
) -> FloatArray:
    """∂L/∂v for node k by the checker's finite differences of the downstream map v -> y
    (upstream nodes held fixed), contracted with dy: y is differenced before the sum, so large
    terms of L do not cancel."""
    from .check._fd import fd_vjp

    name = graph[k].name

    def downstream(v: FloatArray) -> FloatArray:
        trial = dict(values)
        trial[name] = v
        _forward(graph, trial, k)
        return trial["y"]

    return fd_vjp(downstream, values[name], dy)[0]


def explain(
    x: Any,
    axes: Axes = None,
    dy: Any = None,
    *,
    eps: float = 1e-5,
    eps_mode: str = "inside",
    ddof: float = 0,
) -> Explanation:
    r"""Run `normalize`'s forward and reverse sweep node by node on a small float64 input.

    `dy` is the cotangent on `y` (ones when omitted: the gradient of $\sum y$, whose true value
    is exactly 0). Returns every node's value, its analytic adjoint with the terms that built
    it, its finite-difference adjoint, and (question's setting only) the departures of the
    question's derivation.
    """
    x = np.array(x, dtype=np.float64)  # a copy: never mutate the caller's array
    if x.size > EXPLAIN_MAX_SIZE:
        raise NormgradError(
            f"explain prints every node of a {x.size}-element input and differentiates each "
            f"element numerically; give at most {EXPLAIN_MAX_SIZE} elements (e.g. --shape 4x4)."
        )
    y_ref, ctx = normalize_forward(x, axes, eps=eps, eps_mode=eps_mode, ddof=ddof)  # validates
    dy = np.ones_like(x) if dy is None else np.array(dy, dtype=np.float64)
    if dy.shape != x.shape:
        raise NormgradError(
            f"dy has shape {dy.shape} but must have the shape of x, {x.shape}; pass one value "
            "per element (or omit it for ones)."
        )
    dx_ref = np.asarray(normalize_backward(ctx, dy).x, dtype=np.float64)
    ax, n = ctx.axes, ctx.group_size
    graph = _graph(ax, n, n - ddof, eps, eps_mode)
    values: dict[str, FloatArray] = {"x": x}
    _forward(graph, values, 0)
    adj, terms = _reverse(graph, values, dy)
    nodes = tuple(
        NodeReport(
            node.name,
            node.symbol,
            node.formula,
            values[node.name],
            adj[node.name],
            _fd_adjoint(graph, values, dy, k),
            tuple(terms[node.name]),
        )
        for k, node in enumerate(graph)
    )
    options = {
        "shape": list(x.shape),
        "axes": list(ax),
        "eps": eps,
        "eps_mode": eps_mode,
        "ddof": ddof,
        "group_size": n,
    }
    departures: tuple[Departure, ...] = ()
    if ax == tuple(range(x.ndim)) and eps_mode == "inside" and ddof == 0:
        departures = _problem_departures(x, adj, dy, eps)
    return Explanation(options, nodes, dy, dx_ref, np.asarray(y_ref, dtype=np.float64), departures)


def _problem_departures(
    x: FloatArray, adj: dict[str, FloatArray], dy: FloatArray, eps: float
) -> tuple[Departure, ...]:
    """The question's steps, evaluated, next to the sweep's (whole array, eps inside, ddof 0)."""
    from ._problem import problem_backward, problem_terms

    q = problem_terms(x, eps)
    d = q.y1
    # The question's dy2/dσ² is taken element by element and multiplied by the same element's
    # dσ²/dx: the variance's adjoint is never summed over the outputs.
    var_question = dy * q.dy2_dvar
    # The question's dOutput/dμ (per element), which it never sends on to x.
    dmu_question = np.broadcast_to(q.doutput_dmu, d.shape)
    dx_question = problem_backward(x, dy, epsilon=eps)
    mu_to_x = np.broadcast_to(adj["mu"] / q.n, d.shape)
    return (
        Departure(
            "var",
            "σ̄² taken per element: dy_i · (−½ d_i (σ²+ε)^−3/2), one value for each i "
            "(only the diagonal j = i of the sum)",
            "σ̄² = Σ_j ȳ_j · ∂y_j/∂σ²: one number per group that every output feeds",
            var_question,
            np.broadcast_to(adj["var"], d.shape),
        ),
        Departure(
            "mu",
            "dOutput/dμ = (dy2/dy1)(dy1/dμ) + (dy2/dσ²)(dσ²/dμ) + dy2/dμ is computed, but "
            "never multiplied by dμ/dx = 1/n and added to x̄; its dy2/dμ term has no edge in "
            "the graph",
            "μ̄ = −Σ_i d̄_i, sent to x as x̄_i += μ̄/n",
            np.array(dmu_question),
            np.broadcast_to(adj["mu"], d.shape),
        ),
        Departure(
            "x",
            "x̄_i = dy_i/s + dy_i (dy2/dσ²)_i (dσ²/dx)_i  (no μ̄/n term, diagonal σ̄²)",
            "x̄_i = d̄_i + μ̄/n, with d̄ from y and σ²",
            dx_question,
            adj["x"],
        ),
        Departure(
            "x (missing mean path)",
            "no μ̄/n term",
            "the term μ̄/n that reaches every x_i",
            np.zeros_like(d),
            np.array(mu_to_x),
        ),
    )


# ---------------------------------------------------------------------------------------------
# Comparing a user's own adjoints
# ---------------------------------------------------------------------------------------------

ALIASES = {
    "x": "x",
    "dx": "x",
    "mu": "mu",
    "mean": "mu",
    "d": "d",
    "y1": "d",
    "x-mu": "d",
    "var": "var",
    "sigma2": "var",
    "s": "s",
    "std": "s",
    "y": "y",
    "y2": "y",
}


@dataclass(frozen=True)
class AdjointComparison:
    """A user's adjoint of one node next to the sweep's."""

    node: str
    given: FloatArray
    expected: FloatArray
    max_abs_diff: float
    ok: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "ok": self.ok,
            "max_abs_diff": self.max_abs_diff,
            "given": self.given.tolist(),
            "expected": self.expected.tolist(),
        }


def compare_adjoints(
    ex: Explanation, given: dict[str, Any], rtol: float = AGREE_RTOL
) -> tuple[AdjointComparison, ...]:
    """Compare the user's adjoints (node name or alias -> array) in reverse-sweep order.

    The first entry with `ok == False` is where the user's chain rule first goes wrong. Names:
    x|dx, mu|mean, d|y1|x-mu, var|sigma2, s|std, y|y2. Values broadcast against the node's
    (keepdims) shape, so a per-element array given for a per-group node is compared too.
    """
    wanted: dict[str, FloatArray] = {}
    keys: dict[str, Any] = {}
    for key, value in given.items():
        name = ALIASES.get(str(key).strip().lower())
        if name is None:
            raise NormgradError(
                f"unknown node {key!r} in the adjoints to compare; use {', '.join(ALIASES)}."
            )
        if name in keys:
            raise NormgradError(
                f"{keys[name]!r} and {key!r} both name the node {name}; give each node once."
            )
        keys[name] = key
        try:
            raw = np.asarray(value)
            if np.iscomplexobj(raw):
                raise NormgradError(f"the adjoint of {key!r} is complex; give real numbers.")
            wanted[name] = np.asarray(raw, dtype=np.float64)
        except (TypeError, ValueError) as e:
            if isinstance(e, NormgradError):
                raise
            raise NormgradError(
                f"the adjoint of {key!r} is not numeric; give a number or nested lists."
            ) from None
    out = []
    for node in reversed(ex.nodes):
        if node.name not in wanted:
            continue
        try:
            a, b = np.broadcast_arrays(wanted[node.name], node.adjoint)
        except ValueError:
            raise NormgradError(
                f"the adjoint of {node.name} has shape {wanted[node.name].shape}, which does not "
                f"broadcast to the node's shape {node.adjoint.shape}."
            ) from None
        diff = float(np.max(np.abs(a - b)))
        ok = diff <= rtol * (1.0 + float(np.max(np.abs(b))))  # `_agree` with the caller's rtol
        out.append(AdjointComparison(node.name, np.array(a), np.array(b), diff, ok))
    return tuple(out)
