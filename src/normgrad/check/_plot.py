"""`GradReport.plot`: the picture of a gradient check (matplotlib, imported lazily, Agg)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from .._errors import NormgradError
from ._report import wrap

if TYPE_CHECKING:
    from ._report import GradReport

MAX_PIXELS = 512  # larger matrices are shown strided


def plot_report(report: GradReport, path: str) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise NormgradError(
            "GradReport.plot needs matplotlib, which is not installed; install it with "
            "`pip install matplotlib` (or `pip install normgrad[plot]`)."
        ) from None

    fig, axes = plt.subplots(2, 2, figsize=(11, 8.5))
    title = f"gradient check: {'OK' if report.ok else 'MISMATCH'}"
    if report.diagnosis:
        title += f" — {', '.join(report.kinds)}"
    fig.suptitle(title, fontsize=13)
    if report.analytic_jacobian is not None and report.numerical_jacobian is not None:
        a, n = report.analytic_jacobian, report.numerical_jacobian
        _heat(fig, axes[0, 0], a, "analytic Jacobian (rows: outputs, columns: inputs)")
        _heat(fig, axes[0, 1], n, "numerical Jacobian (finite differences)")
        _heat(fig, axes[1, 0], a - n, "analytic − numerical", diverging=True)
    elif report.numerical is not None:
        a, n = _flat2d(report.analytic), _flat2d(report.numerical)
        _heat(fig, axes[0, 0], a, "analytic gradient vjp(x, dy)")
        _heat(fig, axes[0, 1], n, "numerical gradient Jᵀ·dy")
        _heat(fig, axes[1, 0], a - n, "analytic − numerical", diverging=True)
    else:
        _heat(fig, axes[0, 0], _flat2d(report.analytic), "analytic gradient vjp(x, dy)")
        _probes(axes[0, 1], report)
        axes[1, 0].axis("off")
        text = wrap(str(report), 90)
        axes[1, 0].text(0.0, 0.5, text, fontsize=7, family="monospace", va="center")
    _sweep(axes[1, 1], report)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _flat2d(g: Any) -> np.ndarray:
    parts = g if isinstance(g, tuple) else (g,)
    if len(parts) == 1 and np.ndim(parts[0]) == 2:
        return np.asarray(parts[0], dtype=np.float64)
    flat = np.concatenate([np.ravel(p) for p in parts]).astype(np.float64)
    return flat[None, :]


def _heat(fig: Any, ax: Any, m: np.ndarray, title: str, diverging: bool = False) -> None:
    m = np.asarray(m, dtype=np.float64)
    if m.ndim != 2:
        m = m.reshape(1, -1)
    step_r = max(1, m.shape[0] // MAX_PIXELS)
    step_c = max(1, m.shape[1] // MAX_PIXELS)
    m = m[::step_r, ::step_c]
    if diverging:
        lim = float(np.max(np.abs(m), initial=0.0)) or 1.0
        im = ax.imshow(
            m, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto", interpolation="nearest"
        )
    else:
        im = ax.imshow(m, cmap="viridis", aspect="auto", interpolation="nearest")
    strided = " (strided)" if step_r > 1 or step_c > 1 else ""
    ax.set_title(title + strided, fontsize=10)
    fig.colorbar(im, ax=ax, shrink=0.8)


def _probes(ax: Any, report: GradReport) -> None:
    a = np.asarray(report.probe_analytic, dtype=np.float64)
    n = np.asarray(report.probe_numerical, dtype=np.float64)
    ax.scatter(n, a, color="C3", zorder=3, label="probes")
    lim = float(max(np.max(np.abs(a)), np.max(np.abs(n)), 1e-300))
    ax.plot([-lim, lim], [-lim, lim], color="gray", lw=1, label="analytic = numerical")
    ax.set_xlabel("numerical ⟨dy, J v⟩")
    ax.set_ylabel("analytic ⟨vjp(dy), v⟩")
    ax.set_title("random directional derivatives", fontsize=10)
    ax.legend(fontsize=8)


def _sweep(ax: Any, report: GradReport) -> None:
    if report.step_sweep is None:
        ax.axis("off")
        return
    s = report.step_sweep()
    steps, errors = np.asarray(s["steps"]), np.asarray(s["errors"])
    shown = np.maximum(errors, 1e-18)
    ax.loglog(steps, shown, "o-", ms=3, label="central-difference error")
    ax.axvline(s["chosen_step"], color="C2", ls="--", label="step used")
    ax.axhline(max(s["estimate"], 1e-18), color="C1", ls=":", label="error estimate")
    ax.set_xlabel("step h")
    ax.set_ylabel("relative error of the difference quotient")
    ax.set_title("rounding (left, ~eps/h) vs truncation (right, ~h²)", fontsize=10)
    ax.legend(fontsize=8)
