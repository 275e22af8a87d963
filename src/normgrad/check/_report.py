"""What the checker returns: `Finding` (one diagnosis) and `GradReport` (the whole verdict); and
`Template`, a finding before its values are known (each one is in `_catalogue.py`)."""

from __future__ import annotations

import math
import re
import string
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Finding:
    """One diagnosis: a stable `kind` (one of `KINDS`), a one-line `message`, a `hint` for the
    fix, and `evidence` (plain numbers, strings and index lists: a fitted factor, bad indices).
    The checker builds each one from a `Template` of `_catalogue.py`."""

    kind: str
    message: str
    hint: str = ""
    evidence: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "message": self.message,
            "hint": self.hint,
            "evidence": jsonable(self.evidence),
        }


@dataclass(frozen=True)
class Template:
    """One kind of finding's text: `message` has `str.format` fields, filled by `finding`."""

    kind: str
    message: str
    hint: str = ""

    def finding(self, evidence: dict[str, Any] | None = None, **fields: Any) -> Finding:
        return Finding(self.kind, self.message.format(**fields), self.hint, dict(evidence or {}))

    def matches(self, finding: Finding) -> bool:
        """Whether `finding` reads as if built by `self.finding` (any values in the fields)."""
        pattern = "".join(
            re.escape(literal) + ("" if name is None else "(.*)")
            for literal, name, _, _ in string.Formatter().parse(self.message)
        )
        return (finding.kind, finding.hint) == (self.kind, self.hint) and bool(
            re.fullmatch(pattern, finding.message, flags=re.DOTALL)
        )


Grad = Any  # one ndarray, or a tuple of ndarrays for a tuple of inputs


@dataclass
class GradReport:
    """The checker's verdict on a backward.

    - `ok`: no evidence of a bug (findings `ok` or `fd_noise`).
    - `max_abs_error`, `max_rel_error`: over the compared values (elements of dx in `full`
      mode, directional derivatives in `probe` mode); the relative error divides by
      `max(|numerical|, 1e-3 * max|numerical|)`.
    - `worst_index`: index of the worst element in `x` (for a tuple `x`, the first entry is
      the input's position), or None when unknown (probe mode without localization).
    - `analytic`: the user's `vjp(x, dy)`, shaped like `x` (a tuple for a tuple `x`).
    - `numerical`: the finite-difference `J^T dy`, shaped like `x` (`full` mode); None in
      `probe` mode, where `probe_numerical` / `probe_analytic` hold `<dy, J v>` and
      `<vjp(dy), v>` for each probe direction `v`.
    - `fd_error_estimate`: the finite-difference error estimate, shaped like `numerical`
      (`full`) or one per probe (`probe`).
    - `diagnosis`: the findings, most important first.
    """

    ok: bool
    max_abs_error: float
    max_rel_error: float
    worst_index: tuple[int, ...] | None
    analytic: Grad
    numerical: Grad | None
    fd_error_estimate: Any
    diagnosis: list[Finding]
    mode: str = "full"
    n_evals: int = 0
    tolerance: Any = None
    rtol: float = 0.0
    atol: float = 0.0
    notes: list[str] = field(default_factory=list)
    eval_dtype: str = "float64"
    analytic_dtype: str = "float64"
    complex_step: bool = False
    probe_analytic: Any = None
    probe_numerical: Any = None
    analytic_jacobian: Any = None  # (M, N) matrices in full mode when built
    numerical_jacobian: Any = None
    input_shapes: list[tuple[int, ...]] = field(default_factory=list)
    output_shape: tuple[int, ...] = ()
    step_sweep: Callable[[], dict[str, Any]] | None = field(default=None, repr=False)

    @property
    def kinds(self) -> list[str]:
        return [d.kind for d in self.diagnosis]

    @property
    def verdict(self) -> str:
        """`"PASS"` (every value within rtol/atol), `"INCONCLUSIVE"` (no evidence of a bug, but
        some value passes only within the finite-difference error estimate: `fd_noise`), or
        `"FAIL"`. At a kink (finding `kink`: values between the one-sided derivatives), it is
        INCONCLUSIVE too."""
        if not self.ok:
            return "FAIL"
        return "INCONCLUSIVE" if {"fd_noise", "kink"} & set(self.kinds) else "PASS"

    def __str__(self) -> str:
        verdict = {"PASS": "OK", "INCONCLUSIVE": "OK, INCONCLUSIVE", "FAIL": "MISMATCH"}[
            self.verdict
        ]
        shapes = ", ".join(str(s) for s in self.input_shapes)
        lines = [
            f"gradient check: {verdict}  (mode={self.mode}, x: {shapes} -> y: "
            f"{self.output_shape}, {self.n_evals} evaluations of f)",
            f"  max abs error {self.max_abs_error:.3g}, max rel error {self.max_rel_error:.3g}"
            + (f" at index {self.worst_index}" if self.worst_index is not None else ""),
            f"  numerical side: central differences in {self.eval_dtype}"
            + (" with complex step" if self.complex_step else "")
            + f", Richardson error estimate up to {_max(self.fd_error_estimate):.3g}; "
            f"analytic dtype {self.analytic_dtype}, rtol={self.rtol:.3g}, atol={self.atol:.3g}",
        ]
        for note in self.notes:
            lines.append(f"  note: {note}")
        for i, d in enumerate(self.diagnosis, 1):
            lines.append(f"  [{i}] {d.kind}: {d.message}")
            if d.hint:
                lines.append(f"      fix: {d.hint}")
        return "\n".join(lines)

    def to_dict(self, max_elements: int = 4096) -> dict[str, Any]:
        """A strict-JSON-serializable summary (NaN and infinities become null). Arrays with more
        than `max_elements` values are left out (null) to keep the document small."""

        def arr(a: Any) -> Any:
            if a is None:
                return None
            parts = a if isinstance(a, tuple) else (a,)
            if sum(int(np.size(p)) for p in parts) > max_elements:
                return None
            out = [np.asarray(p, dtype=np.float64) for p in parts]
            return out if isinstance(a, tuple) else out[0]

        doc = {
            "ok": bool(self.ok),
            "verdict": self.verdict,
            "mode": self.mode,
            "max_abs_error": self.max_abs_error,
            "max_rel_error": self.max_rel_error,
            "worst_index": None if self.worst_index is None else list(self.worst_index),
            "n_evals": int(self.n_evals),
            "rtol": self.rtol,
            "atol": self.atol,
            "eval_dtype": self.eval_dtype,
            "analytic_dtype": self.analytic_dtype,
            "complex_step": bool(self.complex_step),
            "input_shapes": [list(s) for s in self.input_shapes],
            "output_shape": list(self.output_shape),
            "notes": list(self.notes),
            "diagnosis": [d.to_dict() for d in self.diagnosis],
            "analytic": arr(self.analytic),
            "numerical": arr(self.numerical),
            "fd_error_estimate": arr(self.fd_error_estimate),
            "probe_analytic": arr(self.probe_analytic),
            "probe_numerical": arr(self.probe_numerical),
        }
        return dict(jsonable(doc))

    def plot(self, path: str) -> str:
        """Write a PNG: analytic vs numerical Jacobians (or gradients) with their difference,
        and the finite-difference error against the step size. Needs matplotlib."""
        from ._plot import plot_report

        return plot_report(self, path)


def _max(a: Any) -> float:
    if a is None:
        return float("nan")
    parts = a if isinstance(a, tuple) else (a,)
    vals = [float(np.max(np.abs(p))) for p in parts if np.size(p)]
    return max(vals) if vals else 0.0


def jsonable(v: Any) -> Any:
    """`v` as strict JSON data (`json.dumps(..., allow_nan=False)` accepts it): dicts, lists,
    tuples, arrays and NumPy scalars become plain JSON; NaN and infinities become null; objects
    with `to_dict()` are converted; anything else becomes its `str`."""
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if isinstance(v, np.ndarray):
        return jsonable(v.tolist())
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return float(v) if math.isfinite(v) else None
    if v is None or isinstance(v, str):
        return v
    if hasattr(v, "to_dict"):
        return jsonable(v.to_dict())
    return str(v)


def wrap(text: str, width: int) -> str:
    """Wrap each long line of plain text; continuation lines are indented two spaces more
    than the line they continue."""
    out = []
    for line in text.splitlines() or [""]:
        if len(line) <= width:
            out.append(line)
            continue
        indent = " " * (len(line) - len(line.lstrip()))
        out.append(
            textwrap.fill(
                line,
                width=width,
                subsequent_indent=indent + "  ",
                break_long_words=False,
                break_on_hyphens=False,
            )
        )
    return "\n".join(out)
