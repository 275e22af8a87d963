"""Time the gradient checker, in evaluations of f and seconds: full mode at 10^2, 10^3 and
2*10^3 inputs (a normalization with a planted missing mean path), the problem's 28x28
backward, and a planted bug in a 10^6-element normalization (probe mode, with and without
localization).

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


def main() -> None:
    x = problem_input()
    big = np.random.default_rng(0).standard_normal((1000, 1000))
    normgrad.normalize(big, -1)  # warm-up: the first call may compile kernels
    runs: list[tuple[str, Callable[[], Any]]] = [
        (f"normalize {n}, full mode, scale bug", _full_run(n)) for n in (100, 1000, 2000)
    ]
    runs += [
        (
            "problem 28x28, full mode",
            lambda: check_gradients(problem_forward, x, problem_backward, dy=np.ones_like(x)),
        ),
        (
            "normalize 10^6, probe, correct",
            lambda: check_gradients(lambda v: normgrad.normalize(v, -1), big, _vjp(-1)),
        ),
        (
            "normalize 10^6, probe, scale bug",
            lambda: check_gradients(
                lambda v: normgrad.normalize(v, -1), big, lambda v, dy: 2 * _vjp(-1)(v, dy)
            ),
        ),
        (
            "normalize 10^6, probe, one bad element (bisection)",
            lambda: check_gradients(lambda v: normgrad.normalize(v, -1), big, _partial),
        ),
    ]
    for name, run in runs:
        t0 = time.perf_counter()
        report = run()
        dt = time.perf_counter() - t0
        print(f"{name:55s} {dt:7.2f} s  {report.n_evals:5d} evals  -> {', '.join(report.kinds)}")


if __name__ == "__main__":
    main()
