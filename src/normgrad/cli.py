"""The `normgrad` command line: demo, check, explain, vectors, bench.

Exit codes: 0 ok, 1 a gradient check failed, 2 a usage or input error (one line on stderr
that says how to fix it). Output uses rich on a terminal, plain text otherwise or under
NO_COLOR; `--json` prints one JSON document instead. See docs/cli.md.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from ._errors import NormgradError

PROG = "normgrad"
PROGRESS_MIN_STEPS = 200  # checks shorter than this show no progress bar
ARRAY_PRINT_MAX = 36  # explain prints arrays up to this many elements in full
WRAP_WIDTH = 100  # plain-text lines are wrapped at this width


class InputError(Exception):
    """A usage or input problem found by the CLI itself (exit 2, one line)."""


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------


def _stdout_is_terminal() -> bool:
    return sys.stdout.isatty()


class Printer:
    """Plain text, or rich markup on a terminal (never under NO_COLOR, never without rich)."""

    def __init__(self, use_rich: bool | None = None) -> None:
        if use_rich is None:
            use_rich = _stdout_is_terminal() and not os.environ.get("NO_COLOR")
        self.console: Any = None
        if use_rich:
            try:
                from rich.console import Console
            except ImportError:
                pass
            else:
                self.console = Console(highlight=False)

    def _emit(self, text: str, style: str | None = None) -> None:
        if self.console is None:
            print(_wrap(text))
        else:
            from rich.markup import escape

            self.console.print(f"[{style}]{escape(text)}[/]" if style else escape(text))

    def title(self, text: str) -> None:
        if self.console is None:
            print(f"\n== {text} ==")
        else:
            self.console.rule(f"[bold]{text}")

    def line(self, text: str = "") -> None:
        self._emit(text)

    def dim(self, text: str) -> None:
        self._emit(text, "dim")

    def verdict(self, ok: bool, text: str) -> None:
        label = "PASS" if ok else "FAIL"
        self._emit(f"{label}  {text}", "bold green" if ok else "bold red")


def _wrap(text: str, width: int = WRAP_WIDTH) -> str:
    from .check._report import wrap

    return wrap(text, width)


@contextmanager
def _progress(enabled: bool, description: str) -> Iterator[Callable[[int, int], None] | None]:
    """A `progress(done, total)` callback drawing a rich bar on stderr for long checks.

    Plain (non-terminal, NO_COLOR, --json, or no rich): no callback, no output.
    """
    if not enabled or not sys.stderr.isatty() or os.environ.get("NO_COLOR"):
        yield None
        return
    try:
        from rich.console import Console
        from rich.progress import Progress
    except ImportError:
        yield None
        return
    bar = Progress(console=Console(stderr=True), transient=True)
    task: list[Any] = []

    def update(done: int, total: int) -> None:
        if total < PROGRESS_MIN_STEPS:
            return
        if not task:
            bar.start()
            task.append(bar.add_task(description, total=total))
        bar.update(task[0], completed=done, total=total)

    try:
        yield update
    finally:
        if task:
            bar.stop()


def _print_json(doc: Any) -> None:
    from .check._report import jsonable  # strict JSON: NaN and infinities become null

    print(json.dumps(jsonable(doc), indent=2, allow_nan=False))


def _g(v: float) -> str:
    return f"{v:.3g}"


def _format_array(a: np.ndarray) -> str:
    a = np.asarray(a)
    a = np.where(np.round(a, 6) == 0, 0.0, a)  # no "-0." for rounding noise below 6 decimals
    if a.size <= ARRAY_PRINT_MAX:
        flat = a.reshape(-1) if a.size == 1 else a
        with np.printoptions(precision=6, suppress=True, linewidth=96):
            return np.array2string(np.squeeze(flat) if a.size == 1 else flat)
    return (
        f"shape {'x'.join(map(str, a.shape))}: min {a.min():.6g}, max {a.max():.6g}, "
        f"mean {a.mean():.6g}"
    )


# ---------------------------------------------------------------------------------------------
# Parser
# ---------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors and exit code 2."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message}; see {self.prog} --help\n")
        raise SystemExit(2)


def _seed(text: str) -> int:
    """argparse type: a seed is an int >= 0 (NumPy refuses negative seeds)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid seed {text!r}: give an int >= 0") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"invalid seed {text}: give an int >= 0")
    return value


def _add_shared(
    p: argparse.ArgumentParser,
    *,
    dy: str,
    json_help: str = "print one JSON document",
    dtype: str | None = None,
    affine: str | None = None,
) -> None:
    """Options several subcommands share: --dy (its default said by `dy`), --json, and
    optionally --dtype and --affine (with their help texts)."""
    if dtype is not None:
        p.add_argument("--dtype", choices=("float64", "float32"), default="float64", help=dtype)
    if affine is not None:
        p.add_argument("--affine", action="store_true", help=affine)
    p.add_argument("--dy", metavar="FILE|ones|random", help=f"cotangent on y: {dy}")
    p.add_argument("--json", action="store_true", help=json_help)


def _add_op_options(p: argparse.ArgumentParser, *, default_shape: str) -> None:
    g = p.add_argument_group("the op and its input")
    g.add_argument(
        "--axes",
        default="all",
        help="axes to normalize over: 'all' (default, the whole array) or ints like 1 or 0,2",
    )
    g.add_argument("--eps", type=float, default=1e-5, help="epsilon (default 1e-5)")
    g.add_argument(
        "--eps-mode",
        choices=("inside", "outside"),
        default="inside",
        help="inside: (x-mu)/sqrt(var+eps) (default); outside: (x-mu)/(sqrt(var)+eps)",
    )
    g.add_argument(
        "--ddof", type=float, default=0, help="variance divides by n - ddof (default 0: biased)"
    )
    g.add_argument(
        "--shape",
        default=default_shape,
        help=f"shape of the random input, like 8x8 (default {default_shape})",
    )
    g.add_argument("--seed", type=_seed, default=0, help="seed of the random input (default 0)")
    g.add_argument(
        "--input",
        metavar="FILE",
        help="read x from a .npy, .npz[:name], .csv or .json file instead of a random one",
    )


def _add_check_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("checker")
    g.add_argument(
        "--mode",
        choices=("auto", "full", "probe"),
        default="auto",
        help="full: dense Jacobian; probe: random directions; auto (default): full up to 1024 "
        "elements",
    )
    g.add_argument("--step", type=float, help="finite-difference step (default: chosen per x)")
    g.add_argument("--rtol", type=float, help="relative tolerance (default: the checker's)")
    g.add_argument("--atol", type=float, help="absolute tolerance (default: the checker's)")
    g.add_argument("--plot", metavar="FILE.png", help="save the checker's picture (matplotlib)")


def build_parser() -> argparse.ArgumentParser:
    """The `normgrad` argument parser (subcommands demo, check, explain, vectors, bench)."""
    from . import __version__

    parser = _Parser(
        prog=PROG,
        description="Mean-variance normalization with exact derivatives, and a gradient "
        "checker that says what is wrong.",
    )
    parser.add_argument("--version", action="version", version=f"normgrad {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser(
        "demo",
        help="reproduce the original question's wrong gradient, diagnose it, fix it",
        description="Build a 28x28 matrix like the question's, check the question's chain-rule "
        "gradient against finite differences (it fails, max diff about 3.17), show which "
        "terms are wrong, then check normgrad's exact gradient (it passes).",
    )
    p.add_argument("--seed", type=_seed, default=0, help="seed of the matrix (default 0)")
    p.add_argument("--plot", metavar="FILE.png", help="save the checker's picture of the failure")
    p.add_argument("--json", action="store_true", help="print one JSON document")

    p = sub.add_parser(
        "check",
        help="check normgrad's op, or your own forward/backward, against finite differences",
        description="Without --forward: check normgrad's op with the given options. With "
        "--forward and --backward: check your functions, forward(x) -> y and "
        "backward(x, dy) -> dx (optional --jvp: jvp(x, tx) -> ty). Exit 1 when the check "
        "fails.",
    )
    _add_op_options(p, default_shape="8x8")
    _add_shared(
        p,
        dy="a file shaped like y, ones or random (default: the checker's choice)",
        dtype="dtype of x",
        affine="also check the gradients (and jvps) of weight and bias",
    )
    g = p.add_argument_group("your own functions (instead of normgrad's op)")
    g.add_argument("--forward", metavar="FILE.py:fn|module:fn", help="forward(x) -> y")
    g.add_argument("--backward", metavar="FILE.py:fn|module:fn", help="backward(x, dy) -> dx")
    g.add_argument("--jvp", metavar="FILE.py:fn|module:fn", help="optional jvp(x, tx) -> ty")
    _add_check_options(p)

    p = sub.add_parser(
        "explain",
        help="the chain rule node by node: values, adjoints, finite differences",
        description="Run the op's forward (mu, x-mu, var, s, y) and its reverse sweep node by "
        "node on a small input: every node's adjoint from its local derivatives next to a "
        "finite-difference estimate. In the question's setting (all axes, eps inside, ddof 0) "
        "also show where the question's derivation departs.",
    )
    _add_op_options(p, default_shape="3x4")
    _add_shared(p, dy="a file, ones (default: the gradient of sum(y)) or random")
    p.add_argument(
        "--compare",
        metavar="FILE",
        help="your own adjoints to compare, node by node (a .json object or .npz; names x, mu, "
        "d, var, s, y): exit 1 and name the first that differs",
    )

    p = sub.add_parser(
        "vectors",
        help="reference test vectors (x, dy, y, mean, var, dx, Jacobian) as JSON, CSV or NPZ",
        description="Write reference vectors for porting the op: x, dy, y, mean, var, dx "
        "(weight, bias, dweight, dbias with --affine; the Jacobian for small inputs), with "
        "every option recorded in the file.",
    )
    _add_op_options(p, default_shape="3x4")
    _add_shared(
        p,
        dy="a file, ones or random (default: random, seed + 1)",
        json_help="with --output: print a JSON summary",
        dtype="dtype of x and y",
        affine="include random weight and bias",
    )
    p.add_argument(
        "--jacobian",
        choices=("auto", "yes", "no"),
        default="auto",
        help="include dy/dx (auto: when x has at most 64 elements)",
    )
    p.add_argument("--format", choices=("json", "csv", "npz"), help="default: from --output")
    p.add_argument("-o", "--output", metavar="FILE", help="output file (default: stdout)")

    sub.add_parser(
        "bench",
        help="benchmarks (see normgrad bench --help)",
        add_help=False,
        prefix_chars="\0",  # every argument goes to the benchmark runner's own parser
    ).add_argument("rest", nargs=argparse.REMAINDER)
    return parser


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return the exit code (0 ok, 1 check failed, 2 usage or input error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        return _guard(lambda: _bench(argv[1:]))
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version and usage errors
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    commands: dict[str, Callable[[argparse.Namespace], int]] = {
        "demo": cmd_demo,
        "check": cmd_check,
        "explain": cmd_explain,
        "vectors": cmd_vectors,
    }
    return _guard(lambda: commands[args.command](args))


def _guard(run: Callable[[], int]) -> int:
    try:
        return run()
    except (NormgradError, InputError) as e:
        message = " ".join(str(e).split())  # one line, whatever the message held
        sys.stderr.write(f"{PROG}: error: {message}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROG}: interrupted\n")
        return 130
    except BrokenPipeError:  # e.g. `normgrad explain | head`: the reader left, stop quietly
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):
            pass
        return 0


def _bench(rest: list[str]) -> int:
    try:
        bench = importlib.import_module("normgrad._bench")
    except ImportError as e:
        raise InputError(
            f"the benchmark runner is not available ({e}); reinstall normgrad from a full checkout."
        ) from None
    parser = _Parser(prog=f"{PROG} bench", description="normgrad benchmarks")
    bench.add_arguments(parser)
    try:
        args = parser.parse_args(rest)
    except SystemExit as e:
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    return int(bench.run(args))


# ---------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------


def parse_axes(text: str) -> int | tuple[int, ...] | None:
    """`"all"` -> None; `"1"` -> 1; `"0,2"` -> (0, 2)."""
    t = text.strip().lower()
    if t in ("all", "none", ""):
        return None
    try:
        items = tuple(int(p) for p in t.replace(" ", "").split(","))
    except ValueError:
        raise InputError(
            f"--axes {text!r} is not a list of ints; write all, 1, -1 or 0,2."
        ) from None
    return items[0] if len(items) == 1 else items


def _op_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    ddof: float = int(args.ddof) if float(args.ddof).is_integer() else args.ddof
    return {"eps": args.eps, "eps_mode": args.eps_mode, "ddof": ddof}


def _user_dy(args: argparse.Namespace) -> Any:
    """--dy for the user's own forward, whose y may not be shaped like x: ones as a scalar
    (the checker broadcasts it), random as None (the checker's own), a file as it is (the
    checker checks it against y's shape)."""
    from ._io import load_array

    if args.dy is None or args.dy == "random":
        return None
    if args.dy == "ones":
        return 1.0
    return load_array(args.dy)


def _input_x(args: argparse.Namespace, dtype: str = "float64") -> np.ndarray:
    from ._io import load_array, parse_shape

    if args.input:
        x = load_array(args.input)
    else:
        shape = parse_shape(args.shape)
        if math.prod(shape) > 10_000_000:
            raise InputError(f"--shape {args.shape} is too large; use at most 1e7 elements.")
        x = np.random.default_rng(args.seed).standard_normal(shape)
    return x.astype(dtype)


def _input_dy(args: argparse.Namespace, x: np.ndarray, default: str) -> np.ndarray:
    from ._io import load_array

    choice = getattr(args, "dy", None) or default
    if choice == "ones":
        return np.ones_like(x)
    if choice == "random":
        return np.random.default_rng(args.seed + 1).standard_normal(x.shape).astype(x.dtype)
    dy = load_array(choice)
    if dy.shape != x.shape:
        raise InputError(
            f"--dy {choice} has shape {dy.shape} but x has shape {x.shape}; give one value "
            "per element of y."
        )
    return dy.astype(x.dtype)


def _options_record(args: argparse.Namespace, x: np.ndarray, axes: Any) -> dict[str, Any]:
    return {
        "shape": list(x.shape),
        "axes": "all" if axes is None else ([axes] if isinstance(axes, int) else list(axes)),
        **_op_kwargs(args),
        "seed": args.seed,
        "input": args.input,
        "dtype": str(x.dtype),
    }


def _affine_params(x: np.ndarray, axes: Any, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random weight and bias of the reduced axes' shape (size 1 on the kept axes)."""
    from ._axes import normalize_axes

    ax = normalize_axes(axes, x.ndim)
    shape = tuple(s if i in ax else 1 for i, s in enumerate(x.shape))
    rng = np.random.default_rng(seed + 2)
    w = (1.0 + 0.5 * rng.standard_normal(shape)).astype(x.dtype)
    b = (0.5 * rng.standard_normal(shape)).astype(x.dtype)
    return w, b


# ---------------------------------------------------------------------------------------------
# Running the checker
# ---------------------------------------------------------------------------------------------


def _checker() -> Any:
    try:
        from . import check as checker
    except ImportError as e:  # pragma: no cover - part of the package
        raise InputError(f"the gradient checker is not available ({e}).") from None
    return checker


def _run_check(
    name: str,
    f: Callable[[Any], Any],
    x: Any,
    vjp: Callable[[Any, Any], Any],
    args: argparse.Namespace,
    *,
    dy: np.ndarray | None = None,
    jvp: Callable[[Any, Any], Any] | None = None,
    mode: str | None = None,
    show_progress: bool = True,
) -> Any:
    checker = _checker()
    with _progress(show_progress and not getattr(args, "json", False), f"checking {name}") as cb:
        return checker.check_gradients(
            f,
            x,
            vjp,
            dy=dy,
            jvp=jvp,
            mode=mode if mode is not None else getattr(args, "mode", "auto"),
            step=getattr(args, "step", None),
            rtol=getattr(args, "rtol", None),
            atol=getattr(args, "atol", None),
            seed=getattr(args, "seed", 0),
            progress=cb,
        )


def _diagnosis_kinds(report: Any) -> list[str]:
    return [str(getattr(d, "kind", d)) for d in getattr(report, "diagnosis", [])]


def _print_report(out: Printer, name: str, report: Any) -> None:
    kinds = [k for k in _diagnosis_kinds(report) if k not in ("ok", "fd_noise")]
    verdict = f"{name}: max |analytic − numerical| = {_g(report.max_abs_error)}"
    if kinds:
        verdict += f"; diagnosis: {', '.join(kinds)}"
    out.verdict(bool(report.ok), verdict)
    for line in str(report).splitlines():
        out.line(f"  {line}")


def _save_plot(report: Any, path: str | None, out: Printer | None) -> None:
    if not path:
        return
    try:
        report.plot(path)
    except ImportError as e:
        if (e.name or "").split(".")[0] == "matplotlib":
            raise InputError(
                "--plot needs matplotlib; install it with pip install 'normgrad[plot]'."
            ) from None
        raise InputError(f"--plot is not available ({e}); drop --plot.") from None
    except OSError as e:
        raise InputError(
            f"--plot {path}: cannot write it ({e.strerror or e}); give a path in an existing, "
            "writable folder."
        ) from None
    if out is not None:
        out.dim(f"saved the checker's picture to {path}")


# ---------------------------------------------------------------------------------------------
# demo
# ---------------------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    """The question, reproduced, diagnosed and fixed. 0 when the wrong gradient was caught
    and the exact one passed (the demo ran as intended)."""
    from ._explain import explain
    from ._ops import normalize
    from ._problem import PROBLEM_EPS, problem_backward, problem_forward, problem_input

    out = Printer()
    x = problem_input(seed=args.seed)
    dy = np.ones_like(x)
    n = x.size
    y_problem = problem_forward(x)
    forward_diff = float(np.max(np.abs(y_problem - normalize(x, eps=PROBLEM_EPS))))

    def f(z: Any) -> Any:
        return problem_forward(np.asarray(z))

    def vjp_problem(z: Any, g: Any) -> Any:
        return problem_backward(np.asarray(z), np.asarray(g))

    f_exact, vjp_exact, _ = _op_functions(x, None, {"eps": PROBLEM_EPS})["dx"]
    wrong = _run_check("the question's gradient", f, x, vjp_problem, args, dy=dy, mode="auto")
    ex = explain(x, None, dy, eps=PROBLEM_EPS)
    right = _run_check("normgrad's gradient", f_exact, x, vjp_exact, args, dy=dy, mode="auto")
    ok = (not wrong.ok) and bool(right.ok)

    if args.json:
        _save_plot(wrong, args.plot, None)
        _print_json(
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

    s = float(ex.node("s").value.reshape(-1)[0])
    out.title("normgrad demo: the question's whole-matrix normalization")
    out.line(
        f"x: {x.shape[0]}x{x.shape[1]} matrix (seed {args.seed}), mean {x.mean():.3f}, "
        f"std {x.std():.3f}; eps = {PROBLEM_EPS:g} inside the sqrt; dy = ones (gradient of "
        "sum(y), whose true value is exactly 0)."
    )
    out.line(
        f"forward: the question's loops vs normgrad.normalize, max |diff| = {_g(forward_diff)}"
    )

    out.title("1. The question's chain-rule gradient vs finite differences")
    _print_report(out, "question's gradient", wrong)
    out.line(
        f"  max diff {wrong.max_abs_error:.2f} (the question reports about 3.18); "
        f"1/sqrt(σ² + ε) = {1 / s:.2f}"
    )

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

    out.title("3. normgrad's exact gradient vs finite differences")
    _print_report(out, "normgrad's gradient", right)
    _save_plot(wrong, args.plot, out)

    out.title("Result")
    if ok:
        out.verdict(True, "the wrong gradient was caught and explained; the exact one passes.")
    else:
        out.verdict(False, "the demo did not run as intended (see the reports above).")
    return 0 if ok else 1


# ---------------------------------------------------------------------------------------------
# check
# ---------------------------------------------------------------------------------------------


def load_function(spec: str, option: str) -> Callable[..., Any]:
    """`path/to/file.py:fn` or `package.module:fn` -> the callable."""
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise InputError(
            f"{option} {spec!r} must name a function as FILE.py:function or module:function."
        )
    if target.endswith(".py") or "/" in target or os.sep in target:
        path = Path(target)
        if not path.is_file():
            raise InputError(f"{option}: no such file {target}; check the path.")
        module = _load_file(path, option)
    else:
        try:
            module = importlib.import_module(target)
        except Exception as e:
            raise InputError(
                f"{option}: cannot import module {target!r} ({type(e).__name__}: {e}); check "
                "the name, or give a file path like path/to/file.py:function."
            ) from None
    fn = getattr(module, name, None)
    if fn is None:
        raise InputError(f"{option}: {target} has no attribute {name!r}; check the name.")
    if not callable(fn):
        raise InputError(f"{option}: {target}:{name} is not a function.")
    return fn  # type: ignore[no-any-return]


def _load_file(path: Path, option: str) -> Any:
    """Import a .py file once per run (the forward and backward often share one file)."""
    resolved = str(path.resolve())
    name = "normgrad_user_" + "".join(c if c.isalnum() else "_" for c in path.stem)
    cached = sys.modules.get(name)
    if cached is not None and getattr(cached, "__file__", None) == resolved:
        return cached
    spec = importlib.util.spec_from_file_location(name, resolved)
    if spec is None or spec.loader is None:
        raise InputError(f"{option}: cannot load {path} as Python; give a .py file.")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look their module up here
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise InputError(
            f"{option}: running {path} raised {type(e).__name__}: {e}; fix that file."
        ) from None
    return module


def cmd_check(args: argparse.Namespace) -> int:
    """Check normgrad's op (default) or the user's forward/backward. 1 when a check fails."""
    out = Printer()
    x = _input_x(args, args.dtype)
    user = args.forward is not None or args.backward is not None or args.jvp is not None
    checks: list[tuple[str, Any]] = []
    if user:
        if args.forward is None or args.backward is None:
            raise InputError(
                "checking your own code needs both --forward FILE.py:fn and --backward FILE.py:fn."
            )
        if args.affine:
            raise InputError("--affine applies to normgrad's op; drop it with --forward.")
        f = load_function(args.forward, "--forward")
        vjp = load_function(args.backward, "--backward")
        jvp = load_function(args.jvp, "--jvp") if args.jvp else None
        dy = _user_dy(args)
        title = f"check: {args.backward} against finite differences of {args.forward}"
        checks.append(("dx", _run_check("dx", f, x, vjp, args, dy=dy, jvp=jvp)))
        options: dict[str, Any] = {
            "forward": args.forward,
            "backward": args.backward,
            "jvp": args.jvp,
            "shape": list(x.shape),
            "seed": args.seed,
            "input": args.input,
            "dtype": str(x.dtype),
        }
    else:
        axes = parse_axes(args.axes)
        kw = _op_kwargs(args)
        options = _options_record(args, x, axes) | {"affine": args.affine}
        title = (
            f"check: normgrad's op on x of shape {'x'.join(map(str, x.shape))} ({x.dtype}), "
            f"axes {options['axes']}, eps {kw['eps']:g} {kw['eps_mode']}, ddof {kw['ddof']:g}"
            + (", with weight and bias" if args.affine else "")
        )
        dy = _input_dy(args, x, "random") if args.dy else None
        w, b = _affine_params(x, axes, args.seed) if args.affine else (None, None)
        inputs = {"dx": x, "dweight": w, "dbias": b}
        checks = [
            (name, _run_check(name, f, inputs[name], vjp, args, dy=dy, jvp=jvp))
            for name, (f, vjp, jvp) in _op_functions(x, axes, kw, w, b).items()
        ]

    ok = all(bool(r.ok) for _, r in checks)
    if args.plot:
        failed = [r for _, r in checks if not r.ok]
        _save_plot(failed[0] if failed else checks[0][1], args.plot, None if args.json else out)
    if args.json:
        _print_json(
            {
                "ok": ok,
                "options": options,
                "checks": [{"name": n, **r.to_dict()} for n, r in checks],
            }
        )
        return 0 if ok else 1
    out.title(title)
    for n, r in checks:
        _print_report(out, n, r)
    if not ok:
        kinds = sorted({k for _, r in checks if not r.ok for k in _diagnosis_kinds(r)})
        out.verdict(False, f"gradient check failed; diagnosis: {', '.join(kinds) or 'none'}")
    return 0 if ok else 1


Functions = tuple[Callable[..., Any], Callable[..., Any], Callable[..., Any]]  # f, vjp, jvp


def _op_functions(
    x: np.ndarray, axes: Any, kw: dict[str, Any], w: Any = None, b: Any = None
) -> dict[str, Functions]:
    """{"dx": (f, vjp, jvp)} of normgrad's op as a function of x and, when weight and bias are
    given, also "dweight" and "dbias" (the op as a function of each, the others held)."""
    from ._ops import normalize, normalize_backward, normalize_forward, normalize_jvp

    def make(part: str) -> Functions:
        def at(v: Any) -> dict[str, Any]:
            return {"x": x, "weight": w, "bias": b, part: v, "axes": axes, **kw}

        def f(v: Any) -> Any:
            return normalize(**at(v))

        def vjp(v: Any, g: Any) -> Any:
            return getattr(normalize_backward(normalize_forward(**at(v))[1], g), part)

        def jvp(v: Any, tv: Any) -> Any:
            tx = tv if part == "x" else np.zeros_like(x)
            tweight = tv if part == "weight" else None
            tbias = tv if part == "bias" else None
            return normalize_jvp(tx=tx, tweight=tweight, tbias=tbias, **at(v))[1]

        return f, vjp, jvp

    parts = ("x", "weight", "bias") if w is not None and b is not None else ("x",)
    return {"d" + p: make(p) for p in parts}


# ---------------------------------------------------------------------------------------------
# explain
# ---------------------------------------------------------------------------------------------


def cmd_explain(args: argparse.Namespace) -> int:
    """Print the forward and the reverse sweep node by node (always exit 0 on valid input)."""
    from ._explain import explain

    x = _input_x(args)
    axes = parse_axes(args.axes)
    dy = _input_dy(args, x, "ones")
    ex = explain(x, axes, dy, **_op_kwargs(args))
    comparison: tuple[Any, ...] = ()
    if args.compare:
        from ._explain import compare_adjoints
        from ._io import load_named_arrays

        comparison = compare_adjoints(ex, load_named_arrays(args.compare))
    first_bad = next((c.node for c in comparison if not c.ok), None)
    code = 1 if first_bad else 0
    if args.json:
        doc = ex.to_dict()
        if args.compare:
            doc["comparison"] = [c.to_dict() for c in comparison]
            doc["first_difference"] = first_bad
        _print_json(doc)
        return code

    out = Printer()
    o = ex.options
    out.title(
        f"forward: x of shape {'x'.join(map(str, o['shape']))}, axes {tuple(o['axes'])} "
        f"(n = {o['group_size']}), eps = {o['eps']:g} {o['eps_mode']}, ddof = {o['ddof']}"
    )
    for node in ex.nodes:
        out.line(f"{node.symbol:<14} {node.formula}")
        _indented(out, _format_array(node.value))
    out.dim(f"y vs normgrad.normalize: max |diff| = {_g(ex.y_vs_normalize)}")

    out.title("backward: adjoints v_bar = dL/dv of L = sum(dy * y), consumers first")
    if args.dy and args.dy != "ones":
        out.line("dy =")
        _indented(out, _format_array(ex.dy))
    else:
        out.line("dy = ones (the gradient of sum(y); its true value is 0 for every x)")
    for node in reversed(ex.nodes):
        out.line()
        out.line(f"[{node.symbol}]  adjoint = sum of these terms:")
        for t in node.terms:
            child = "L" if t.child == "L" else ex.node(t.child).symbol
            out.line(f"    from {child:<12} {t.rule:<26} using {t.local}")
        out.line("  analytic:")
        _indented(out, _format_array(node.adjoint), 4)
        out.line("  finite differences (perturb this node, recompute downstream):")
        _indented(out, _format_array(node.adjoint_fd), 4)
        out.verdict(node.ok, f"max |analytic - fd| = {_g(node.max_abs_diff)}")
    out.dim(f"x_bar vs normgrad.normalize_backward: max |diff| = {_g(ex.dx_vs_normalize_backward)}")
    if ex.departures:
        out.title("where the question's derivation departs")
        for d in ex.departures:
            label = d.node if d.node not in ("var", "mu") else ex.node(d.node).symbol
            out.line(f"[{label}]")
            out.line(f"    question: {d.problem}")
            out.line(f"    correct:  {d.correct}")
            out.line(f"    max |question - correct| = {_g(d.max_abs_diff)}")
    if args.compare:
        out.title(f"your adjoints ({args.compare}) vs the sweep, consumers first")
        for c in comparison:
            out.verdict(
                c.ok, f"{ex.node(c.node).symbol}: max |yours - sweep| = {_g(c.max_abs_diff)}"
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
    return code


def _indented(out: Printer, text: str, n: int = 2) -> None:
    for line in text.splitlines():
        out.line(" " * n + line)


# ---------------------------------------------------------------------------------------------
# vectors
# ---------------------------------------------------------------------------------------------

JACOBIAN_AUTO_MAX = 64


def cmd_vectors(args: argparse.Namespace) -> int:
    """Write x, dy, y, mean, var, dx (and more) with the options that made them."""
    from ._io import vectors_format, write_vectors
    from ._ops import normalize_backward, normalize_forward, normalize_jacobian

    fmt = vectors_format(args.output, args.format)
    x = _input_x(args, args.dtype)
    axes = parse_axes(args.axes)
    kw = _op_kwargs(args)
    dy = _input_dy(args, x, "random")
    w = b = None
    if args.affine:
        w, b = _affine_params(x, axes, args.seed)
    y, ctx = normalize_forward(x, axes, weight=w, bias=b, **kw)
    grads = normalize_backward(ctx, dy)
    arrays: dict[str, np.ndarray] = {"x": x, "dy": dy}
    if w is not None and b is not None:
        arrays |= {"weight": w, "bias": b}
    arrays |= {
        "y": np.asarray(y),
        "mean": np.asarray(ctx.mean),
        "var": np.asarray(ctx.var),
        "dx": np.asarray(grads.x),
    }
    if grads.weight is not None and grads.bias is not None:
        arrays |= {"dweight": np.asarray(grads.weight), "dbias": np.asarray(grads.bias)}
    if args.jacobian == "yes" or (args.jacobian == "auto" and x.size <= JACOBIAN_AUTO_MAX):
        arrays["jacobian"] = np.asarray(normalize_jacobian(x, axes, weight=w, bias=b, **kw))
    options = _options_record(args, x, axes) | {
        "affine": args.affine,
        "dy": (
            f"standard normal, seed {args.seed + 1}"
            if (args.dy or "random") == "random"
            else args.dy
        ),
        "x_source": args.input or f"standard normal, seed {args.seed}",
        "mean_var": "keepdims shape, float64, var divides by n - ddof",
        "jacobian_layout": "shape y.shape + x.shape" if "jacobian" in arrays else None,
        "normgrad": _version(),
    }
    text = write_vectors(arrays, options, fmt, args.output)
    if text is not None:
        sys.stdout.write(text)
        return 0
    summary = {
        "output": args.output,
        "format": fmt,
        "arrays": {k: list(v.shape) for k, v in arrays.items()},
        "options": options,
    }
    if args.json:
        _print_json(summary)
    else:
        shapes = ", ".join(f"{k} {'x'.join(map(str, v.shape))}" for k, v in arrays.items())
        Printer().line(f"wrote {fmt} vectors to {args.output}: {shapes}")
    return 0


def _version() -> str:
    from . import __version__

    return __version__
