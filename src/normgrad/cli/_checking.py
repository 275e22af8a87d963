"""Running the gradient checker for `demo` and `check`: normgrad's op as the functions the
checker takes, the check itself (with a progress bar), its report and its picture."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import numpy as np

from .._errors import NormgradError
from . import _output
from ._output import Printer, short_float

Functions = tuple[Callable[..., Any], Callable[..., Any], Callable[..., Any]]  # f, vjp, jvp


def _checker() -> Any:
    try:
        from .. import check as checker
    except ImportError as e:  # pragma: no cover - part of the package
        raise NormgradError(f"the gradient checker is not available ({e}).") from None
    return checker


def run_check(
    name: str,
    f: Callable[[Any], Any],
    x: Any,
    vjp: Callable[[Any, Any], Any] | None,
    args: argparse.Namespace,
    *,
    dy: np.ndarray | None = None,
    jvp: Callable[[Any, Any], Any] | None = None,
    mode: str | None = None,
    show_progress: bool = True,
) -> Any:
    checker = _checker()
    enabled = show_progress and not getattr(args, "json", False)
    with _output.progress(enabled, f"checking {name}") as cb:  # looked up here: tests spy on it
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


def diagnosis_kinds(report: Any) -> list[str]:
    return [str(getattr(d, "kind", d)) for d in getattr(report, "diagnosis", [])]


def print_report(out: Printer, name: str, report: Any) -> None:
    kinds = [k for k in diagnosis_kinds(report) if k not in ("ok", "fd_noise")]
    verdict = f"{name}: max |analytic − numerical| = {short_float(report.max_abs_error)}"
    if kinds:
        verdict += f"; diagnosis: {', '.join(kinds)}"
    out.verdict(bool(report.ok), verdict)
    for line in str(report).splitlines():
        out.line(f"  {line}")


def save_plot(report: Any, path: str | None, out: Printer | None) -> None:
    """Save the report's picture to `path` (nothing without one); say so on `out` if given."""
    if not path:
        return
    try:
        report.plot(path)
    except ImportError as e:
        if (e.name or "").split(".")[0] == "matplotlib":
            raise NormgradError(
                "--plot needs matplotlib; install it with pip install 'normgrad[plot]'."
            ) from None
        raise NormgradError(f"--plot is not available ({e}); drop --plot.") from None
    except OSError as e:
        raise NormgradError(
            f"--plot {path}: cannot write it ({e.strerror or e}); give a path in an existing, "
            "writable folder."
        ) from None
    if out is not None:
        out.dim(f"saved the checker's picture to {path}")


def op_functions(
    x: np.ndarray, axes: Any, kw: dict[str, Any], w: Any = None, b: Any = None
) -> dict[str, Functions]:
    """{"dx": (f, vjp, jvp)} of normgrad's op as a function of x and, when weight and bias are
    given, also "dweight" and "dbias" (the op as a function of each, the others held)."""
    from .._ops import normalize, normalize_backward, normalize_forward, normalize_jvp

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
