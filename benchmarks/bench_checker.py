"""Time the gradient checker, in evaluations of f and seconds: full mode at 10^2, 10^3 and
2*10^3 inputs (a normalization with a planted scale bug), the problem's 28x28 backward, and
a 10^6-element normalization over groups of 10 in probe mode: correct, a scale bug, a
diagonal-only backward, and 1, 3 and 10 bad elements localized. Part of `make bench` (not
with --quick); prints a Markdown table (docs/performance.md, "Checker cost").

    .venv/bin/python benchmarks/bench_checker.py
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

import normgrad
from normgrad._problem import problem_backward, problem_forward, problem_input
from normgrad.check import check_gradients


def _vjp(axes: Any) -> Callable[[Any, Any], Any]:
    return lambda x, dy: normgrad.normalize_backward(normgrad.normalize_forward(x, axes)[1], dy).x


def _partial(x: Any, dy: Any) -> Any:
    dx = _vjp(-1)(x, dy)
    dx[3, 17] *= 3.0
    return dx


def _full_run(n: int) -> Callable[[], Any]:
    v = np.random.default_rng(1).standard_normal((n // 10, 10))

    def run() -> Any:
        return check_gradients(
            lambda z: normgrad.normalize(z, -1),
            v,
            lambda z, dy: 0.5 * _vjp(-1)(z, dy),
            mode="full",
        )

    return run


def _planted(k: int, seed: int, n: int) -> Callable[[Any, Any], Any]:
    bad = np.random.default_rng(seed).choice(n, k, replace=False)

    def vjp(x: Any, dy: Any) -> Any:
        dx = _vjp(-1)(x, dy)
        dx.flat[bad] *= 3.0
        return dx

    return vjp


def _diagonal(x: Any, dy: Any) -> Any:
    """The question's mistake, vectorized: only dy/σ per row."""
    d = x - x.mean(-1, keepdims=True)
    return dy / np.sqrt((d * d).mean(-1, keepdims=True) + 1e-5)


def main() -> None:
    x = problem_input()
    big = np.random.default_rng(0).standard_normal((10**5, 10))  # 10^6 elements, groups of 10
    normgrad.normalize(big, -1)  # warm-up: the first call may compile kernels
    norm = lambda v: normgrad.normalize(v, -1)  # noqa: E731
    runs: list[tuple[str, Callable[[], Any]]] = [
        (f"normalize {n}, full mode, scale bug", _full_run(n)) for n in (100, 1000, 2000)
    ]
    runs += [
        (
            "problem 28x28, full mode",
            lambda: check_gradients(problem_forward, x, problem_backward, dy=np.ones_like(x)),
        ),
        ("normalize 10^6, probe, correct", lambda: check_gradients(norm, big, _vjp(-1))),
        (
            "normalize 10^6, probe, scale bug",
            lambda: check_gradients(norm, big, lambda v, dy: 2 * _vjp(-1)(v, dy)),
        ),
        (
            "normalize 10^6, probe, diagonal-only backward",
            lambda: check_gradients(norm, big, _diagonal),
        ),
    ]
    runs += [
        (
            f"normalize 10^6, probe, {k} bad element(s) (localized)",
            lambda k=k: check_gradients(norm, big, _planted(k, k, big.size)),
        )
        for k in (1, 3, 10)
    ]
    print("| check | seconds | evaluations of f | findings |")
    print("|---|---|---|---|")
    for name, run in runs:
        t0 = time.perf_counter()
        report = run()
        dt = time.perf_counter() - t0
        print(f"| {name} | {dt:.2f} | {report.n_evals} | {', '.join(report.kinds)} |", flush=True)


if __name__ == "__main__":
    main()
