"""`normgrad check`: normgrad's op, or the user's own forward/backward, against finite
differences."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .._errors import NormgradError
from ._checking import diagnosis_kinds, op_functions, print_report, run_check, save_plot
from ._options import (
    add_check_options,
    add_op_options,
    add_shared,
    affine_params,
    input_dy,
    input_x,
    op_kwargs,
    options_record,
    parse_axes,
)
from ._output import Printer, print_json

Checks = list[tuple[str, Any]]  # (name, the checker's report)


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "check",
        help="check normgrad's op, or your own forward/backward, against finite differences",
        description="Without --forward: check normgrad's op with the given options. With "
        "--forward and --backward: check your functions, forward(x) -> y and "
        "backward(x, dy) -> dx (optional --jvp: jvp(x, tx) -> ty). Exit 1 when the check "
        "fails.",
    )
    add_op_options(p, default_shape="8x8")
    add_shared(
        p,
        dy="a file shaped like y, ones or random (default: the checker's choice)",
        dtype="dtype of x",
        affine="also check the gradients (and jvps) of weight and bias",
    )
    g = p.add_argument_group("your own functions (instead of normgrad's op)")
    g.add_argument("--forward", metavar="FILE.py:fn|module:fn", help="forward(x) -> y")
    g.add_argument("--backward", metavar="FILE.py:fn|module:fn", help="backward(x, dy) -> dx")
    g.add_argument("--jvp", metavar="FILE.py:fn|module:fn", help="optional jvp(x, tx) -> ty")
    g = p.add_argument_group("a program in any language (docs/protocol.md)")
    g.add_argument(
        "--exec",
        metavar="CMD",
        help="a command speaking normgrad's line protocol, e.g. "
        '"mono norm.exe right" (split like a shell\'s words, no shell)',
    )
    g.add_argument(
        "--timeout",
        type=_seconds,
        default=60.0,
        metavar="SECONDS",
        help="--exec: the limit per answer (default 60)",
    )
    add_check_options(p)


def _seconds(text: str) -> float:
    """argparse type: a timeout is a number of seconds > 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"invalid timeout {text!r}: give seconds > 0")
    return value


def run(args: argparse.Namespace) -> int:
    """Check normgrad's op (default) or the user's forward/backward. 1 when a check fails."""
    out = Printer()
    x = input_x(args, args.dtype)
    user = args.forward is not None or args.backward is not None or args.jvp is not None
    if args.exec is not None:
        title, options, checks = _exec_checks(args, x, user)
    else:
        title, options, checks = _user_checks(args, x) if user else _op_checks(args, x)

    ok = all(bool(r.ok) for _, r in checks)
    if args.plot:
        failed = [r for _, r in checks if not r.ok]
        save_plot(failed[0] if failed else checks[0][1], args.plot, None if args.json else out)
    if args.json:
        print_json(
            {
                "ok": ok,
                "options": options,
                "checks": [{"name": n, **r.to_dict()} for n, r in checks],
            }
        )
        return 0 if ok else 1
    out.title(title)
    for n, r in checks:
        print_report(out, n, r)
    if not ok:
        kinds = sorted({k for _, r in checks if not r.ok for k in diagnosis_kinds(r)})
        out.verdict(False, f"gradient check failed; diagnosis: {', '.join(kinds) or 'none'}")
    return 0 if ok else 1


def _user_checks(args: argparse.Namespace, x: np.ndarray) -> tuple[str, dict[str, Any], Checks]:
    """The user's backward (and jvp) against finite differences of their forward: the title,
    the options recorded in the JSON output, the checks."""
    if args.affine:
        raise NormgradError("--affine applies to normgrad's op; drop it with --forward.")
    f = load_function(args.forward, "--forward") if args.forward else None
    vjp = load_function(args.backward, "--backward") if args.backward else None
    if f is not None and vjp is None:
        f = _framework_forward(f, x)
    if f is None:
        raise NormgradError(
            "checking your own code needs both --forward FILE.py:fn and --backward FILE.py:fn "
            "(only --forward when it is a torch or JAX function, module or class)."
        )
    jvp = load_function(args.jvp, "--jvp") if args.jvp else None
    dy = _user_dy(args)
    title = (
        f"check: {args.backward or 'its own backward'} against finite differences of {args.forward}"
    )
    checks: Checks = [("dx", run_check("dx", f, x, vjp, args, dy=dy, jvp=jvp))]
    options: dict[str, Any] = {
        "forward": args.forward,
        "backward": args.backward,
        "jvp": args.jvp,
        "shape": list(x.shape),
        "seed": args.seed,
        "input": args.input,
        "dtype": str(x.dtype),
    }
    return title, options, checks


def _exec_checks(
    args: argparse.Namespace, x: np.ndarray, user: bool
) -> tuple[str, dict[str, Any], Checks]:
    """A program speaking the line protocol, started once for the whole check."""
    from ..check._external import external

    if user or args.affine:
        what = "--affine" if args.affine else "--forward/--backward/--jvp"
        raise NormgradError(f"--exec checks the program's own functions; drop {what}.")
    prog = external(args.exec, timeout=args.timeout)
    checks: Checks = [("dx", run_check("dx", prog, x, None, args, dy=_user_dy(args)))]
    options: dict[str, Any] = {
        "exec": args.exec,
        "timeout": args.timeout,
        "shape": list(x.shape),
        "seed": args.seed,
        "input": args.input,
        "dtype": str(x.dtype),
    }
    return f"check: the program {args.exec!r} against finite differences", options, checks


def _framework_forward(f: Callable[..., Any], x: np.ndarray) -> Callable[..., Any]:
    """--forward with no --backward: a torch or JAX function, module or class (a class is
    instantiated with no arguments), detected from what it is and returns."""
    from ..check._frameworks import framework_of

    if isinstance(f, type):
        try:
            f = f()
        except Exception as e:
            raise NormgradError(
                f"--forward names the class {f.__name__}; it could not be built with no "
                f"arguments ({type(e).__name__}: {e}). Name an instance or a function."
            ) from None
    if framework_of(f, x) is None:
        raise NormgradError(
            "checking your own code needs both --forward and --backward: the forward is not a "
            "torch or JAX function (it neither takes nor returns tensors), so add --backward "
            "FILE.py:fn."
        )
    return f


def _op_checks(args: argparse.Namespace, x: np.ndarray) -> tuple[str, dict[str, Any], Checks]:
    """normgrad's op (and, with --affine, its weight and bias) against finite differences."""
    axes = parse_axes(args.axes)
    kw = op_kwargs(args)
    options = options_record(args, x, axes) | {"affine": args.affine}
    title = (
        f"check: normgrad's op on x of shape {'x'.join(map(str, x.shape))} ({x.dtype}), "
        f"axes {options['axes']}, eps {kw['eps']:g} {kw['eps_mode']}, ddof {kw['ddof']:g}"
        + (", with weight and bias" if args.affine else "")
    )
    dy = input_dy(args, x, "random") if args.dy else None
    w, b = affine_params(x, axes, args.seed) if args.affine else (None, None)
    inputs = {"dx": x, "dweight": w, "dbias": b}
    checks = [
        (name, run_check(name, f, inputs[name], vjp, args, dy=dy, jvp=jvp))
        for name, (f, vjp, jvp) in op_functions(x, axes, kw, w, b).items()
    ]
    return title, options, checks


def _user_dy(args: argparse.Namespace) -> Any:
    """--dy for the user's own forward, whose y may not be shaped like x: ones as a scalar
    (the checker broadcasts it), random as None (the checker's own), a file as it is (the
    checker checks it against y's shape)."""
    from .._io import load_array

    if args.dy is None or args.dy == "random":
        return None
    if args.dy == "ones":
        return 1.0
    return load_array(args.dy)


def load_function(spec: str, option: str) -> Callable[..., Any]:
    """`path/to/file.py:fn` or `package.module:fn` -> the callable."""
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise NormgradError(
            f"{option} {spec!r} must name a function as FILE.py:function or module:function."
        )
    if target.endswith(".py") or "/" in target or os.sep in target:
        path = Path(target)
        if not path.is_file():
            raise NormgradError(f"{option}: no such file {target}; check the path.")
        module = _load_file(path, option)
    else:
        try:
            module = importlib.import_module(target)
        except Exception as e:
            raise NormgradError(
                f"{option}: cannot import module {target!r} ({type(e).__name__}: {e}); check "
                "the name, or give a file path like path/to/file.py:function."
            ) from None
    fn = getattr(module, name, None)
    if fn is None:
        raise NormgradError(f"{option}: {target} has no attribute {name!r}; check the name.")
    if not callable(fn):
        raise NormgradError(f"{option}: {target}:{name} is not a function.")
    return fn


def _load_file(path: Path, option: str) -> Any:
    """Import a .py file once per run (the forward and backward often share one file)."""
    resolved = str(path.resolve())
    name = "normgrad_user_" + "".join(c if c.isalnum() else "_" for c in path.stem)
    cached = sys.modules.get(name)
    if cached is not None and getattr(cached, "__file__", None) == resolved:
        return cached
    spec = importlib.util.spec_from_file_location(name, resolved)
    if spec is None or spec.loader is None:
        raise NormgradError(f"{option}: cannot load {path} as Python; give a .py file.")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look their module up here
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise NormgradError(
            f"{option}: running {path} raised {type(e).__name__}: {e}; fix that file."
        ) from None
    return module
