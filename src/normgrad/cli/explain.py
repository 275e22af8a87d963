"""`normgrad explain`: the chain rule node by node (values, adjoints, finite differences), and
the user's own adjoints compared with it (`--compare`). The library side is
`normgrad._explain`."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from ._options import add_op_options, add_shared, input_dy, input_x, op_kwargs, parse_axes
from ._output import Printer, format_array, indented, print_json, short_float

if TYPE_CHECKING:
    from .._explain import AdjointComparison, Explanation


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "explain",
        help="the chain rule node by node: values, adjoints, finite differences",
        description="Run the op's forward (mu, x-mu, var, s, y) and its reverse sweep node by "
        "node on a small input: every node's adjoint from its local derivatives next to a "
        "finite-difference estimate. In the question's setting (all axes, eps inside, ddof 0) "
        "also show where the question's derivation departs.",
    )
    add_op_options(p, default_shape="3x4")
    add_shared(p, dy="a file, ones (default: the gradient of sum(y)) or random")
    p.add_argument(
        "--compare",
        metavar="FILE",
        help="your own adjoints to compare, node by node (a .json object or .npz; names x, mu, "
        "d, var, s, y): exit 1 and name the first that differs",
    )


def run(args: argparse.Namespace) -> int:
    """Print the forward and the reverse sweep node by node (exit 0 on valid input; 1 when
    --compare finds an adjoint that differs)."""
    from .._explain import explain

    x = input_x(args)
    axes = parse_axes(args.axes)
    dy = input_dy(args, x, "ones")
    ex = explain(x, axes, dy, **op_kwargs(args))
    comparison: tuple[AdjointComparison, ...] = ()
    if args.compare:
        from .._explain import compare_adjoints
        from .._io import load_named_arrays

        comparison = compare_adjoints(ex, load_named_arrays(args.compare))
    first_bad = next((c.node for c in comparison if not c.ok), None)
    code = 1 if first_bad else 0
    if args.json:
        doc = ex.to_dict()
        if args.compare:
            doc["comparison"] = [c.to_dict() for c in comparison]
            doc["first_difference"] = first_bad
        print_json(doc)
        return code

    out = Printer()
    _print_forward(out, ex)
    _print_backward(out, ex, args.dy)
    if ex.departures:
        _print_departures(out, ex)
    if args.compare:
        _print_comparison(out, ex, args.compare, comparison, first_bad)
    return code


def _print_forward(out: Printer, ex: Explanation) -> None:
    o = ex.options
    out.title(
        f"forward: x of shape {'x'.join(map(str, o['shape']))}, axes {tuple(o['axes'])} "
        f"(n = {o['group_size']}), eps = {o['eps']:g} {o['eps_mode']}, ddof = {o['ddof']}"
    )
    for node in ex.nodes:
        out.line(f"{node.symbol:<14} {node.formula}")
        indented(out, format_array(node.value))
    out.dim(f"y vs normgrad.normalize: max |diff| = {short_float(ex.y_vs_normalize)}")


def _print_backward(out: Printer, ex: Explanation, dy_option: str | None) -> None:
    out.title("backward: adjoints v_bar = dL/dv of L = sum(dy * y), consumers first")
    if dy_option and dy_option != "ones":
        out.line("dy =")
        indented(out, format_array(ex.dy))
    else:
        out.line("dy = ones (the gradient of sum(y); its true value is 0 for every x)")
    for node in reversed(ex.nodes):
        out.line()
        out.line(f"[{node.symbol}]  adjoint = sum of these terms:")
        for t in node.terms:
            child = "L" if t.child == "L" else ex.node(t.child).symbol
            out.line(f"    from {child:<12} {t.rule:<26} using {t.local}")
        out.line("  analytic:")
        indented(out, format_array(node.adjoint), 4)
        out.line("  finite differences (perturb this node, recompute downstream):")
        indented(out, format_array(node.adjoint_fd), 4)
        out.verdict(node.ok, f"max |analytic - fd| = {short_float(node.max_abs_diff)}")
    out.dim(
        "x_bar vs normgrad.normalize_backward: max |diff| = "
        f"{short_float(ex.dx_vs_normalize_backward)}"
    )


def _print_departures(out: Printer, ex: Explanation) -> None:
    out.title("where the question's derivation departs")
    for d in ex.departures:
        label = d.node if d.node not in ("var", "mu") else ex.node(d.node).symbol
        out.line(f"[{label}]")
        out.line(f"    question: {d.problem}")
        out.line(f"    correct:  {d.correct}")
        out.line(f"    max |question - correct| = {short_float(d.max_abs_diff)}")


def _print_comparison(
    out: Printer,
    ex: Explanation,
    path: str,
    comparison: tuple[AdjointComparison, ...],
    first_bad: str | None,
) -> None:
    out.title(f"your adjoints ({path}) vs the sweep, consumers first")
    for c in comparison:
        out.verdict(
            c.ok, f"{ex.node(c.node).symbol}: max |yours - sweep| = {short_float(c.max_abs_diff)}"
        )
    if first_bad:
        node = ex.node(first_bad)
        rules = "; ".join(f"{t.rule} (using {t.local})" for t in node.terms)
        out.line(
            f"first difference at {node.symbol}: its adjoint is the sum {rules}. The adjoints "
            "you gave before it in the sweep agree, so look at this step first."
        )
    else:
        out.line("all the adjoints you gave agree with the sweep.")
