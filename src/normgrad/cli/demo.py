"""`normgrad demo`: the original question's wrong gradient, reproduced, diagnosed and fixed."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

import numpy as np

from ._checking import op_functions, print_report, run_check, save_plot
from ._options import add_seed
from ._output import Printer, print_json, short_float

if TYPE_CHECKING:
    from .._explain import Explanation


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "demo",
        help="reproduce the original question's wrong gradient, diagnose it, fix it",
        description="Build a 28x28 matrix like the question's, check the question's chain-rule "
        "gradient against finite differences (it fails, max diff about 3.17), show which "
        "terms are wrong, then check normgrad's exact gradient (it passes).",
    )
    add_seed(p, "the matrix")
    p.add_argument("--plot", metavar="FILE.png", help="save the checker's picture of the failure")
    p.add_argument("--json", action="store_true", help="print one JSON document")


def run(args: argparse.Namespace) -> int:
    """The question, reproduced, diagnosed and fixed. 0 when the wrong gradient was caught
    and the exact one passed (the demo ran as intended)."""
    from .._explain import explain
    from .._ops import normalize
    from .._problem import PROBLEM_EPS, problem_backward, problem_forward, problem_input

    out = Printer()
    x = problem_input(seed=args.seed)
    dy = np.ones_like(x)
    forward_diff = float(np.max(np.abs(problem_forward(x) - normalize(x, eps=PROBLEM_EPS))))

    def f(z: Any) -> Any:
        return problem_forward(np.asarray(z))

    def vjp_problem(z: Any, g: Any) -> Any:
        return problem_backward(np.asarray(z), np.asarray(g))

    f_exact, vjp_exact, _ = op_functions(x, None, {"eps": PROBLEM_EPS})["dx"]
    wrong = run_check("the question's gradient", f, x, vjp_problem, args, dy=dy, mode="auto")
    ex = explain(x, None, dy, eps=PROBLEM_EPS)
    right = run_check("normgrad's gradient", f_exact, x, vjp_exact, args, dy=dy, mode="auto")
    ok = (not wrong.ok) and bool(right.ok)

    if args.json:
        save_plot(wrong, args.plot, None)
        print_json(
            {
                "ok": ok,
                "shape": list(x.shape),
                "eps": PROBLEM_EPS,
                "forward_max_abs_diff": forward_diff,
                "question_gradient": wrong.to_dict(),
                "departures": [d.to_dict(values=False) for d in ex.departures],
                "normgrad_gradient": right.to_dict(),
            }
        )
        return 0 if ok else 1

    _print_setting(out, x, args.seed, PROBLEM_EPS, forward_diff)
    out.title("1. The question's chain-rule gradient vs finite differences")
    print_report(out, "question's gradient", wrong)
    s = float(ex.node("s").value.reshape(-1)[0])
    out.line(
        f"  max diff {wrong.max_abs_error:.2f} (the question reports about 3.18); "
        f"1/sqrt(σ² + ε) = {1 / s:.2f}"
    )
    _print_wrong_terms(out, ex, x.size)
    out.title("3. normgrad's exact gradient vs finite differences")
    print_report(out, "normgrad's gradient", right)
    save_plot(wrong, args.plot, out)

    out.title("Result")
    if ok:
        out.verdict(True, "the wrong gradient was caught and explained; the exact one passes.")
    else:
        out.verdict(False, "the demo did not run as intended (see the reports above).")
    return 0 if ok else 1


def _print_setting(out: Printer, x: np.ndarray, seed: int, eps: float, forward_diff: float) -> None:
    out.title("normgrad demo: the question's whole-matrix normalization")
    out.line(
        f"x: {x.shape[0]}x{x.shape[1]} matrix (seed {seed}), mean {x.mean():.3f}, "
        f"std {x.std():.3f}; eps = {eps:g} inside the sqrt; dy = ones (gradient of "
        "sum(y), whose true value is exactly 0)."
    )
    out.line(
        "forward: the question's loops vs normgrad.normalize, max |diff| = "
        f"{short_float(forward_diff)}"
    )


def _print_wrong_terms(out: Printer, ex: Explanation, n: int) -> None:
    """Section 2: where the question's σ² and μ paths depart from the reverse sweep `ex`."""
    out.title("2. Which terms are wrong (reverse sweep over x → μ → x−μ → σ² → s → y)")
    dx_q, dx_true = ex.departures[2].problem_value, ex.node("x").adjoint
    mu_bar = float(ex.node("mu").adjoint.reshape(-1)[0])
    var_bar = float(ex.node("var").adjoint.reshape(-1)[0])
    var_q = ex.departures[0].problem_value
    out.line(
        "  σ² path: the question multiplies dy_i·∂y_i/∂σ² by ∂σ²/∂x_i for the SAME i: only the "
        f"diagonal of the sum over outputs. Its per-element values range over [{var_q.min():.3g}, "
        f"{var_q.max():.3g}]; the true adjoint σ̄² = Σ_j dy_j·∂y_j/∂σ² is one number per group "
        f"(here {var_bar:.2g}, i.e. 0 up to rounding)."
    )
    out.line(
        "  μ path: the question's dOutput/dμ is computed but never sent to x (no ∂μ/∂x_i = 1/n "
        f"step), and its dy2/dμ term has no edge in the graph. The true μ̄ = −Σ_i d̄_i = "
        f"{mu_bar:.4g} adds μ̄/n = {mu_bar / n:.4g} to every dx_i: that is the max diff."
    )
    out.line(
        f"  dx: the question's max |dx| = {np.max(np.abs(dx_q)):.3g}; the true dx is 0 (up to "
        f"{np.max(np.abs(dx_true)):.1g}): Σ y does not depend on x."
    )
    out.line("  run `normgrad explain` to see every node's adjoint next to finite differences.")
