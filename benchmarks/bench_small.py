"""Small-input latency of normgrad against PyTorch CPU, measured in one process.

    python benchmarks/bench_small.py [--repeat 7] [--startup]

For 10^3 and 10^4 elements, float32 and float64, whole tensor and rows (layer norm over the
last axis), it times (best of `--repeat` rounds, each the mean of a loop of about 20 ms):

* `normgrad`: `normalize_forward` (+ `normalize_backward`) on NumPy, default dispatch;
* `generic`: the same on the generic Array-API path (`use_kernels(False)`);
* `kernels`: the same on the numba kernels (`use_kernels(True)`);
* `torch`: `torch.nn.functional.layer_norm` over the same axes, and autograd's backward;
  `torch1`: the same on one thread (`torch.set_num_threads(1)`: no stalls on a busy machine).

The ratio column divides normgrad's time by the faster of the two torch columns.

Every implementation is checked against the generic path before it is timed. `--startup`
also times a first small call in fresh processes (numba cache cold and warm). Not part of
the test suite: it measures, it asserts nothing about time.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np

import normgrad as ng
from normgrad import testing

CASES = [  # (layout, shape, axes): torch's normalized_shape is the shape of the reduced axes
    ("whole", (10, 100), None),
    ("whole", (100, 100), None),
    ("rows", (10, 100), -1),
    ("rows", (100, 100), -1),
]
DTYPES = ("float32", "float64")
IMPLS = ("normgrad", "generic", "kernels", "torch", "torch1")
MODES = {"normgrad": None, "generic": False, "kernels": True}


def _best_time(fn: Callable[[], Any], repeat: int, budget: float = 0.02) -> float:
    """Seconds per call: best of `repeat` rounds, each the mean of a loop of ~`budget` s."""
    fn()
    t = time.perf_counter()
    fn()
    once = max(time.perf_counter() - t, 1e-7)
    loops = max(1, int(budget / once))
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        for _ in range(loops):
            fn()
        best = min(best, (time.perf_counter() - t) / loops)
    return best


def _normgrad_fns(x: np.ndarray, dy: np.ndarray, axes: Any, mode: bool | None):
    def fwd() -> Any:
        return ng.normalize_forward(x, axes)[0]

    def fwdbwd() -> Any:
        y, ctx = ng.normalize_forward(x, axes)
        return y, ng.normalize_backward(ctx, dy).x

    def wrap(fn: Callable[[], Any]) -> Callable[[], Any]:
        if mode is None:
            return fn

        def inner() -> Any:
            with ng.use_kernels(mode):
                return fn()

        return inner

    return wrap(fwd), wrap(fwdbwd)


def _torch_fns(x: np.ndarray, dy: np.ndarray, axes: Any):
    import torch

    nshape = x.shape if axes is None else x.shape[-1:]
    xt = torch.from_numpy(x)
    xg = torch.from_numpy(x).requires_grad_(True)
    dyt = torch.from_numpy(dy)
    ln = torch.nn.functional.layer_norm

    def fwd() -> Any:
        return ln(xt, nshape, eps=1e-5)

    def fwdbwd() -> Any:
        y = ln(xg, nshape, eps=1e-5)
        (dx,) = torch.autograd.grad(y, xg, dyt)
        return y.detach(), dx

    return fwd, fwdbwd


def _torch_threads(n: int | None) -> int | None:
    """Set torch's intra-op threads to `n` (None: leave them); return the previous count."""
    if n is None:
        return None
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(n)
    return old


def _check(name: str, got: Any, ref: Any, dtype: str) -> None:
    tol = 1e-4 if dtype == "float32" else 1e-10
    for g, r in zip(got, ref, strict=True):
        g = g.detach().numpy() if hasattr(g, "detach") else np.asarray(g)
        err = float(np.max(np.abs(g.astype(np.float64) - r.astype(np.float64))))
        if err > tol:
            raise SystemExit(f"{name}: max error {err:.3g} > {tol} against the generic path")


def measure(repeat: int, impls: tuple[str, ...]) -> list[dict[str, Any]]:
    rng = np.random.default_rng(0)
    rows = []
    for layout, shape, axes in CASES:
        for dtype in DTYPES:
            x = (rng.normal(size=shape) * 2 + 1).astype(dtype)
            dy = rng.normal(size=shape).astype(dtype)
            with ng.use_kernels(False):
                y_ref, ctx = ng.normalize_forward(x, axes)
                ref = (y_ref, ng.normalize_backward(ctx, dy).x)
            row: dict[str, Any] = {"layout": layout, "shape": shape, "dtype": dtype}
            for impl in impls:
                if impl.startswith("torch"):
                    fwd, fwdbwd = _torch_fns(x, dy, axes)
                else:
                    fwd, fwdbwd = _normgrad_fns(x, dy, axes, MODES[impl])
                _check(impl, fwdbwd(), ref, dtype)
                threads = _torch_threads(1 if impl == "torch1" else None)
                row[impl] = (_best_time(fwd, repeat), _best_time(fwdbwd, repeat))
                _torch_threads(threads)
            rows.append(row)
    return rows


def table(rows: list[dict[str, Any]], impls: tuple[str, ...]) -> str:
    torches = [i for i in impls if i.startswith("torch")]
    head = ["layout", "shape", "dtype", "pass", *[f"{i} us" for i in impls]]
    if torches and "normgrad" in impls:
        head.append("normgrad / torch")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        for p, name in enumerate(("fwd", "fwd+bwd")):
            cells = [r["layout"], "x".join(map(str, r["shape"])), r["dtype"], name]
            cells += [f"{r[i][p] * 1e6:.1f}" for i in impls]
            if torches and "normgrad" in impls:
                best = min(r[i][p] for i in torches)
                cells.append(f"{r['normgrad'][p] / best:.2f}")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


STARTUP = """
import time
t0 = time.perf_counter()
import numpy as np, normgrad as ng
t1 = time.perf_counter()
x = np.random.default_rng(0).normal(size=(10, 100))
y, ctx = ng.normalize_forward(x)
ng.normalize_backward(ctx, np.ones_like(x))
t2 = time.perf_counter()
print(t1 - t0, t2 - t1)
"""


def startup() -> str:
    """First small forward+backward in fresh processes: numba cache empty, then filled."""
    lines = ["| case | import s | first fwd+bwd s |", "|---|---|---|"]
    cache = tempfile.mkdtemp(prefix="normgrad-numba-")
    env = dict(os.environ, NUMBA_CACHE_DIR=cache)
    try:
        for case in ("cold cache", "warm cache", "warm cache"):
            out = subprocess.run(
                [sys.executable, "-c", STARTUP], env=env, capture_output=True, text=True
            )
            if out.returncode:
                raise SystemExit(out.stderr)
            imp, first = (float(v) for v in out.stdout.split())
            lines.append(f"| {case} | {imp:.3f} | {first:.3f} |")
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--startup", action="store_true", help="also time first calls")
    args = p.parse_args()
    impls = tuple(args.impls.split(","))
    if any(i.startswith("torch") for i in impls):
        try:
            import torch

            print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
        except ImportError:
            impls = tuple(i for i in impls if not i.startswith("torch"))
    settings = testing.settings()  # the thresholds in force (nothing changed)
    with settings as s:
        print(f"kernel_min_size = {s.kernel_min_size}, small_max_size = {s.small_max_size}\n")
    print(table(measure(args.repeat, impls), impls))
    if args.startup:
        print("\n" + startup())
    return 0


if __name__ == "__main__":
    sys.exit(main())
