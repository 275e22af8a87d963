"""Benchmarks: normgrad's fused kernels against its generic path, plain NumPy, PyTorch and JAX.

`make bench`, `python benchmarks/run.py` and `normgrad bench` (from a source checkout) call
`add_arguments` and `run`; it uses only public API (`normgrad`, `normgrad.testing`). In one
process it measures a STREAM-style triad (the machine's bytes/s), then for every layout, size, dtype
and pass (forward, forward+backward) each implementation: its result is first checked
against normgrad's generic path, then timed (median of repeats). It writes `bench.json`,
`bench.md` (tables) and `bench.png` (throughput against size) to `--out`.

The roofline of a pass is the time to move its bytes at the triad's rate: forward reads x
twice and writes y (3 passes), backward reads x and dy twice and writes dx (5 passes).

The accuracy part normalizes float32 inputs with large offsets and reports the max error of
y and dx against a float64 reference computed from the same float32 inputs, also in ulp of
max|reference|. The start-up part times import + first call in fresh processes, with an
empty numba cache (cold) and a filled one (warm).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import normgrad as ng
from normgrad import testing

SIZES = (10**3, 10**4, 10**5, 10**6, 10**7, 5 * 10**7)
QUICK_SIZES = (10**3, 10**5, 10**7)
LAYOUTS = ("whole", "rows", "channels", "instance")
IMPLS = ("fused", "fused_out", "fused_mapped", "generic", "numpy", "torch", "jax")
OURS = ("fused", "fused_out", "fused_mapped")  # (columns of their own % roof)
PASSES = ("fwd", "fwdbwd")
ROOF_PASSES = {"fwd": 3, "fwdbwd": 8}
LOCAL_TRIAD_MIN = 10**6  # cases this large get a triad of their own
HANDOFF_MIN = 10**5  # cases this large record how fast the two threads exchange a cache line
EPS = 1e-5
TIME_BUDGET_S = 2.0  # stop repeating a measurement after this long (at least 3 samples)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `normgrad bench` (also used by benchmarks/run.py)."""
    parser.add_argument("--quick", action="store_true", help=f"sizes {QUICK_SIZES} only")
    parser.add_argument("--sizes", help="comma-separated element counts (overrides --quick)")
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help="subset of " + str(LAYOUTS))
    parser.add_argument("--dtypes", default="float32,float64")
    parser.add_argument("--impls", default=",".join(IMPLS), help="subset of " + str(IMPLS))
    parser.add_argument("--passes", default=",".join(PASSES))
    parser.add_argument("--repeat", type=int, default=7, help="timed runs per case (median)")
    parser.add_argument("--out", default="benchmarks/results", help="output folder")
    parser.add_argument("--no-plot", action="store_true", help="skip bench.png")
    parser.add_argument("--no-accuracy", action="store_true", help="skip the accuracy part")
    parser.add_argument("--no-startup", action="store_true", help="skip start-up timing")
    parser.add_argument(
        "--models", default="all", help="model layers: all, none or keys (bench_models.CASES)"
    )
    parser.add_argument("--no-compile", action="store_true", help="models without torch.compile")
    parser.add_argument("--plain", action="store_true", help="plain progress lines, no rich")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="normgrad bench", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    """Run the benchmarks that `args` select; write JSON, tables and plot. Return 0."""
    sizes = _ints(args.sizes) if args.sizes else (QUICK_SIZES if args.quick else SIZES)
    layouts = _choices(args.layouts, LAYOUTS, "layout")
    dtypes = _choices(args.dtypes, ("float32", "float64"), "dtype")
    impls = _choices(args.impls, IMPLS, "impl")
    passes = _choices(args.passes, PASSES, "pass")
    if args.repeat < 1:
        raise ng.NormgradError(f"--repeat must be at least 1; got {args.repeat}.")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    peers = _load_peers(impls)
    impls = [i for i in impls if i in peers]
    cases = [(lay, n, dt, p) for lay in layouts for n in sizes for dt in dtypes for p in passes]
    report: dict[str, Any] = {"meta": _meta(), "results": [], "accuracy": [], "startup": {}}
    models = _models_module()
    model_cases = models.select(args.models)
    parts = [bool(model_cases), not args.no_accuracy, not args.no_startup]
    steps = 1 + len(cases) + sum(parts)
    with _progress(steps, args.plain) as step:
        step("triad")
        # arrays far larger than caches, unless only small sizes run (the smoke test)
        triad_n = min(2 * 10**7, max(10**6, 4 * max(sizes)))
        triad = measure_triad(max(args.repeat, 3), triad_n)
        report["triad_bytes_per_s"] = triad
        for lay, n, dt, p in cases:
            step(f"{lay} n={n:.0e} {dt} {p}")
            # a shared machine's bandwidth drifts over minutes (docs/performance.md): cases
            # whose roofline matters get a triad of their own, taken just before them
            local = measure_triad(3, triad_n) if n >= LOCAL_TRIAD_MIN else triad
            # and virtual CPUs may share an L3 at times and not at others (a slower
            # cache-line hand-off): in-cache sizes feel it most
            hand = measure_handoff() if n >= HANDOFF_MIN else None
            res = bench_case(lay, n, dt, p, impls, peers, args.repeat, local)
            report["results"] += [dict(r, handoff_ns=hand) for r in res]
        if model_cases:
            step("model layers")
            report["models"] = models.run_models(
                model_cases, dtypes, passes, args.repeat, triad, not args.no_compile
            )
        if not args.no_accuracy:
            step("accuracy")
            acc_sizes = [s for s in (10**5, 10**6, 10**7) if s <= max(sizes)] or [max(sizes)]
            report["accuracy"] = bench_accuracy(acc_sizes, peers)
        if not args.no_startup:
            step("start-up")
            report["startup"] = bench_startup()
    (out / "bench.json").write_text(json.dumps(report, indent=1))
    table = format_report(report)
    (out / "bench.md").write_text(table)
    print(table)
    if not args.no_plot:
        plot(report, out / "bench.png")
    print(
        f"wrote {out / 'bench.json'}, {out / 'bench.md'}" + ("" if args.no_plot else ", bench.png")
    )
    return 0


def _models_module() -> Any:
    """benchmarks/bench_models.py, found next to this file however this one was loaded."""
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    import bench_models

    return bench_models


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(float(s)) for s in text.split(",") if s.strip())


def _choices(text: str, allowed: tuple[str, ...], what: str) -> list[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in items if s not in allowed]
    if bad:
        raise ng.NormgradError(f"unknown {what} {bad}; choose from {', '.join(allowed)}.")
    return items


# ---------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------


def case_shape(layout: str, n: int) -> tuple[tuple[int, ...], Any]:
    """Shape (about n elements) and axes of a layout: whole (matrix, all axes), rows (layer
    norm over a trailing axis of up to 10^4), channels (batch norm over (0, 2, 3) of
    (B, 64, H, W)) and instance (over (2, 3) of the same shape)."""
    if layout == "whole":
        rows = max(1, round(math.sqrt(n / 10)))
        return (rows, max(1, n // rows)), None
    if layout == "rows":
        d = min(10_000, max(10, n // 100))
        return (max(1, n // d), d), -1
    c = 64 if n >= 64 * 16 else 4
    b = max(1, round(n / (c * 3136)))
    hw = max(2, round(math.sqrt(n / (b * c))))
    shape = (b, c, hw, hw)
    return shape, ((0, 2, 3) if layout == "channels" else (2, 3))


@dataclass
class Result:
    layout: str
    shape: tuple[int, ...]
    size: int
    dtype: str
    passes: str
    impl: str
    median_s: float
    samples: list[float] = field(default_factory=list)
    roofline_s: float = 0.0
    max_err: float = 0.0
    triad_bytes_per_s: float = 0.0


def bench_case(
    layout: str,
    n: int,
    dtype: str,
    passes: str,
    impls: list[str],
    peers: dict[str, Any],
    repeat: int,
    triad: float,
) -> list[dict[str, Any]]:
    shape, axes = case_shape(layout, n)
    rng = np.random.default_rng(0)
    x = rng.normal(size=shape).astype(dtype)
    dy = rng.normal(size=shape).astype(dtype)
    with ng.use_kernels(False):
        ry, rctx = ng.normalize_forward(x, axes, eps=EPS)
        rdx = ng.normalize_backward(rctx, dy).x
    ref = (ry,) if passes == "fwd" else (ry, rdx)
    roof = ROOF_PASSES[passes] * x.nbytes / triad
    results = []
    for impl in impls:
        fn = _make(impl, layout, axes, x, dy, passes, peers)
        if fn is None:
            continue
        with testing.recycling_paused() if impl == "fused_mapped" else contextlib.nullcontext():
            err = _check(fn(), ref, dtype, impl, layout)
            samples = time_it(fn, repeat)
        res = Result(layout, shape, x.size, dtype, passes, impl, float(np.median(samples)))
        res.samples, res.roofline_s, res.max_err = samples, roof, err
        res.triad_bytes_per_s = triad
        results.append(asdict(res))
    return results


def _loops(fn: Callable[[], Any], min_sample_s: float) -> int:
    """Back-to-back calls per sample so that a sample lasts about `min_sample_s` (a single
    10-us call mostly measures the timer and the scheduler)."""
    t = time.perf_counter()
    fn()
    return max(1, int(min_sample_s / max(time.perf_counter() - t, 1e-7)))


def _check(got: tuple[Any, ...], ref: tuple[Any, ...], dtype: str, impl: str, lay: str) -> float:
    """Max error against normgrad's generic path; refuse to time a wrong result."""
    err = 0.0
    for g, r in zip(got, ref, strict=True):
        err = max(err, float(np.max(np.abs(np.asarray(g, dtype=np.float64) - r))))
    tol = 1e-3 if dtype == "float32" else 1e-9
    if not err <= tol:
        raise AssertionError(f"{impl} on {lay} ({dtype}) differs from the reference by {err}")
    return err


def time_it(fn: Callable[[], Any], repeat: int, min_sample_s: float = 2e-3) -> list[float]:
    """Seconds per call, `repeat` samples (after a warm-up), each the mean of enough
    back-to-back calls to last `min_sample_s`; stops early, with at least 3 samples, once
    TIME_BUDGET_S has passed."""
    loops = _loops(fn, min_sample_s)
    samples: list[float] = []
    start = time.perf_counter()
    for _ in range(repeat):
        t = time.perf_counter()
        for _ in range(loops):
            fn()
        samples.append((time.perf_counter() - t) / loops)
        if len(samples) >= 3 and time.perf_counter() - start > TIME_BUDGET_S:
            break
    return samples


# ---------------------------------------------------------------------------------------------
# Implementations: each returns a function that computes (y,) or (y, dx) as NumPy-convertible
# ---------------------------------------------------------------------------------------------


def _make(
    impl: str, layout: str, axes: Any, x: Any, dy: Any, passes: str, peers: dict[str, Any]
) -> Callable[[], tuple[Any, ...]] | None:
    bwd = passes == "fwdbwd"
    if impl in ("fused", "generic", "fused_out", "fused_mapped"):
        mode = impl != "generic"
        yo = np.empty_like(x) if impl == "fused_out" else None
        dxo = np.empty_like(x) if impl == "fused_out" else None

        def normgrad_fn() -> tuple[Any, ...]:
            with ng.use_kernels(mode):
                y, ctx = ng.normalize_forward(x, axes, eps=EPS, out=yo)
                if not bwd:
                    return (y,)
                return y, ng.normalize_backward(ctx, dy, out=dxo).x

        return normgrad_fn
    if impl == "numpy":
        return lambda: _numpy_norm(x, axes, dy if bwd else None)
    if impl == "torch":
        return _torch_fn(peers["torch"], layout, x, dy, bwd)
    if impl == "jax":
        return _jax_fn(peers["jax"], layout, axes, x, dy, bwd)
    return None


def _numpy_norm(x: Any, axes: Any, dy: Any) -> tuple[Any, ...]:
    """What one writes by hand in NumPy: two-pass statistics in the input dtype."""
    mean = x.mean(axis=axes, keepdims=True)
    d = x - mean
    rstd = 1.0 / np.sqrt((d * d).mean(axis=axes, keepdims=True) + EPS)
    xhat = d * rstd
    if dy is None:
        return (xhat,)
    g = dy - dy.mean(axis=axes, keepdims=True)
    dx = rstd * (g - xhat * (dy * xhat).mean(axis=axes, keepdims=True))
    return xhat, dx.astype(x.dtype, copy=False)


def _torch_fn(torch: Any, layout: str, x: Any, dy: Any, bwd: bool) -> Callable[[], tuple[Any, ...]]:
    """PyTorch's dedicated op for the layout, on CPU, with autograd for the backward."""
    F = torch.nn.functional
    xt, dyt = torch.from_numpy(x), torch.from_numpy(dy)

    def op(t: Any) -> Any:
        if layout == "whole":
            return F.layer_norm(t.reshape(1, -1), (t.numel(),), eps=EPS).reshape(t.shape)
        if layout == "rows":
            return F.layer_norm(t, (t.shape[-1],), eps=EPS)
        if layout == "channels":
            return F.batch_norm(t, None, None, training=True, eps=EPS)
        return F.instance_norm(t, eps=EPS)

    def fn() -> tuple[Any, ...]:
        if not bwd:
            with torch.no_grad():
                return (op(xt).numpy(),)
        xg = xt.detach().requires_grad_()
        y = op(xg)
        (dx,) = torch.autograd.grad(y, xg, dyt)
        return y.detach().numpy(), dx.numpy()

    return fn


def _jax_axes(layout: str, ndim: int) -> tuple[int, ...]:
    return {"whole": tuple(range(ndim)), "rows": (ndim - 1,), "channels": (0, 2, 3)}.get(
        layout, (2, 3)
    )


def _jax_fn(
    jax: Any, layout: str, axes: Any, x: Any, dy: Any, bwd: bool
) -> Callable[[], tuple[Any, ...]]:
    """jax.nn.standardize (its default algorithm) under jit; jax.vjp for the backward."""
    ax = _jax_axes(layout, x.ndim)
    std = jax.nn.standardize
    xj, dyj = jax.device_put(x), jax.device_put(dy)
    fwd = jax.jit(lambda a: std(a, axis=ax, epsilon=EPS))

    @jax.jit
    def both(a: Any, g: Any) -> Any:
        y, vjp = jax.vjp(lambda t: std(t, axis=ax, epsilon=EPS), a)
        return y, vjp(g)[0]

    def fn() -> tuple[Any, ...]:
        if not bwd:
            return (fwd(xj).block_until_ready(),)
        y, dx = both(xj, dyj)
        return y.block_until_ready(), dx.block_until_ready()

    return fn


def _load_peers(impls: list[str]) -> dict[str, Any]:
    """The optional libraries that the chosen implementations need (skipped if missing)."""
    peers: dict[str, Any] = {i: None for i in impls if i not in ("torch", "jax")}
    if "torch" in impls:
        with contextlib.suppress(ImportError):
            import torch

            peers["torch"] = torch
    if "jax" in impls:
        with contextlib.suppress(ImportError):
            import jax
            import jax.nn

            jax.config.update("jax_enable_x64", True)  # float64 cases stay float64
            peers["jax"] = jax
    return peers


# ---------------------------------------------------------------------------------------------
# Triad, accuracy, start-up
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _triad_kernel() -> Any:
    import numba

    @numba.njit(parallel=True)
    def triad(a: Any, b: Any, c: Any, s: float, nthreads: int) -> None:  # pragma: no cover
        for t in numba.prange(nthreads):
            lo, hi = a.size * t // nthreads, a.size * (t + 1) // nthreads
            av, bv, cv = a[lo:hi], b[lo:hi], c[lo:hi]
            for i in range(av.size):
                av[i] = bv[i] + s * cv[i]

    return triad


def measure_triad(repeat: int, n: int = 2 * 10**7) -> float:
    """STREAM-style triad a = b + s*c on every numba thread; bytes/s of the best run (24
    bytes per element: two reads and a write), as STREAM reports it."""
    import numba

    triad = _triad_kernel()
    a, b, c = np.empty(n), np.ones(n), np.full(n, 2.0)
    nthreads = numba.get_num_threads()
    triad(a, b, c, 3.0, nthreads)
    samples = time_it(lambda: triad(a, b, c, 3.0, nthreads), repeat)
    return 24 * n / min(samples)


def measure_handoff(n: int = 20_000) -> float | None:
    """Nanoseconds for a cache line to pass between the two pool threads and back, or None
    without a second thread (`normgrad.testing.thread_handoff_ns`)."""
    return testing.thread_handoff_ns(n)


def bench_accuracy(sizes: list[int], peers: dict[str, Any]) -> list[dict[str, Any]]:
    """float32 inputs with offsets: max error of y and dx against float64 from the same inputs."""
    rows = []
    for n in sizes:
        for offset in (0.0, 1e3, 1e4, 1e6):
            rng = np.random.default_rng(1)
            x = (rng.normal(size=n) + offset).astype(np.float32)
            dy = rng.normal(size=n).astype(np.float32)
            xd, dyd = x.astype(np.float64), dy.astype(np.float64)
            mean = xd.mean()
            d = xd - mean
            rstd = 1.0 / math.sqrt(float(np.mean(d * d)) + EPS)
            yref = d * rstd
            dxref = rstd * (dyd - dyd.mean() - yref * np.mean(dyd * yref))
            for name, fn in _accuracy_impls(peers):
                y, dx = fn(x, dy)
                rows.append(_errors(name, n, offset, y, dx, yref, dxref))
    return rows


def _accuracy_impls(peers: dict[str, Any]) -> list[tuple[str, Callable[..., tuple[Any, Any]]]]:
    def normgrad_fn(x: Any, dy: Any) -> tuple[Any, Any]:
        y, ctx = ng.normalize_forward(x, eps=EPS)
        return y, ng.normalize_backward(ctx, dy).x

    impls: list[tuple[str, Callable[..., tuple[Any, Any]]]] = [("normgrad", normgrad_fn)]
    impls.append(("numpy float32", lambda x, dy: _numpy_norm(x, None, dy)))
    torch = peers.get("torch")
    if torch is not None:

        def torch_fn(x: Any, dy: Any) -> tuple[Any, Any]:
            xt = torch.from_numpy(x).reshape(1, -1).requires_grad_()
            y = torch.nn.functional.layer_norm(xt, (x.size,), eps=EPS)
            (dx,) = torch.autograd.grad(y, xt, torch.from_numpy(dy).reshape(1, -1))
            return y.detach().numpy().ravel(), dx.numpy().ravel()

        impls.append(("torch layer_norm", torch_fn))
    jax = peers.get("jax")
    if jax is not None:
        for algorithm in ("fast", "stable"):

            def jax_fn(x: Any, dy: Any, algorithm: str = algorithm) -> tuple[Any, Any]:
                f = lambda t: jax.nn.standardize(t, axis=0, epsilon=EPS, algorithm=algorithm)  # noqa: E731
                y, vjp = jax.vjp(f, jax.device_put(x))
                return np.asarray(y), np.asarray(vjp(jax.device_put(dy))[0])

            impls.append((f"jax standardize {algorithm}", jax_fn))
    return impls


def _errors(name: str, n: int, offset: float, y: Any, dx: Any, yref: Any, dxref: Any) -> dict:  # type: ignore[type-arg]
    ey = float(np.max(np.abs(np.asarray(y, np.float64) - yref)))
    edx = float(np.max(np.abs(np.asarray(dx, np.float64) - dxref)))
    uy = float(np.spacing(np.float32(np.max(np.abs(yref)))))
    udx = float(np.spacing(np.float32(np.max(np.abs(dxref)))))
    return {
        "impl": name,
        "size": n,
        "offset": offset,
        "dtype_out": str(np.asarray(y).dtype),
        "y_err": ey,
        "y_ulp": ey / uy,
        "dx_err": edx,
        "dx_ulp": edx / udx,
    }


_STARTUP_CODE = """
import time
t0 = time.perf_counter()
import numpy as np
import normgrad as ng
t1 = time.perf_counter()
x = np.random.default_rng(0).normal(size={n})
with ng.use_kernels({mode!r}):
    y, ctx = ng.normalize_forward(x)
    ng.normalize_backward(ctx, x)
t2 = time.perf_counter()
print(t1 - t0, t2 - t1)
"""


def bench_startup() -> dict[str, Any]:
    """Import and first forward+backward in fresh processes: small input (generic path),
    large input on the kernels with an empty numba cache (cold) and a filled one (warm)."""
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        cases = [("small_auto", 1000, "auto"), ("kernels_cold", 10**6, "1")]
        cases += [("kernels_warm", 10**6, "1")]
        for name, n, mode in cases:
            code = _STARTUP_CODE.format(n=n, mode=mode)
            t = time.perf_counter()
            res = subprocess.run(
                [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
            )
            total = time.perf_counter() - t
            imp, first = (float(v) for v in res.stdout.split())
            out[name] = {"size": n, "import_s": imp, "first_call_s": first, "process_s": total}
    return out


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def _meta() -> dict[str, Any]:
    import numba

    versions = {"numpy": np.__version__, "numba": numba.__version__, "normgrad": ng.__version__}
    for mod in ("torch", "jax"):
        with contextlib.suppress(ImportError):
            versions[mod] = __import__(mod).__version__
    return {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "numba_threads": numba.get_num_threads(),
        "versions": versions,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def format_report(report: dict[str, Any]) -> str:
    """Markdown: one table per layout/dtype/pass (median ms, GB/s of roofline traffic,
    fraction of roofline, speed-up of fused over each peer), accuracy and start-up tables."""
    triad = report["triad_bytes_per_s"]
    res = report["results"]
    local = [r["triad_bytes_per_s"] for r in res if r["size"] >= LOCAL_TRIAD_MIN]
    lines = [f"Triad (STREAM-style, all threads): {triad / 1e9:.1f} GB/s at the start"]
    if local:
        lines[0] += (
            f"; per case from {LOCAL_TRIAD_MIN:.0e} elements, taken just before it (each row's"
            f" % roof uses its own): {min(local) / 1e9:.1f}-{max(local) / 1e9:.1f} GB/s"
        )
    hand = [r["handoff_ns"] for r in res if r.get("handoff_ns") is not None]
    if hand:
        lines[0] += (
            f"; cache-line hand-off between the two threads, taken before each case from"
            f" {HANDOFF_MIN:.0e} elements: {min(hand):.0f}-{max(hand):.0f} ns (over 130:"
            " they sit behind different L3 caches, see docs/performance.md)"
        )
    lines[0] += "\n"
    keys = sorted({(r["layout"], r["dtype"], r["passes"]) for r in res}, key=str)
    for lay, dt, p in keys:
        rows = [r for r in res if (r["layout"], r["dtype"], r["passes"]) == (lay, dt, p)]
        impls = list(dict.fromkeys(r["impl"] for r in rows))
        peers = [i for i in impls if i not in OURS]
        lines.append(f"### {lay}, {dt}, {p}\n")
        ours = [i for i in OURS if i in impls]
        head = ["size", "shape"] + [f"{i} ms" for i in impls]
        head += [f"{i.replace('fused_', '')} % roof" for i in ours]
        head += [f"fused vs {i}" for i in peers] + ["hand-off ns"]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        for size in sorted({r["size"] for r in rows}):
            by = {r["impl"]: r for r in rows if r["size"] == size}
            any_r = next(iter(by.values()))
            cells = [f"{size:.0e}", "x".join(map(str, any_r["shape"]))]
            cells += [f"{by[i]['median_s'] * 1e3:.3g}" if i in by else "" for i in impls]
            for i in ours:
                r = by.get(i)
                cells.append(f"{100 * r['roofline_s'] / r['median_s']:.0f}%" if r else "")
            f = by.get("fused")
            for i in peers:
                ok = f is not None and i in by
                cells.append(f"{by[i]['median_s'] / f['median_s']:.2f}x" if ok else "")  # type: ignore[index]
            h = any_r.get("handoff_ns")
            cells.append(f"{h:.0f}" if h is not None else "")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    if report.get("models"):
        lines.append(_models_module().format_models(report["models"]))
    if report.get("accuracy"):
        lines.append("### float32 accuracy (whole tensor, max error vs float64 reference)\n")
        lines.append("| impl | N | offset | y err | y ulp | dx err | dx ulp |")
        lines.append("|---|---|---|---|---|---|---|")
        for a in report["accuracy"]:
            lines.append(
                f"| {a['impl']} | {a['size']:.0e} | {a['offset']:.0e} | {a['y_err']:.2e} | "
                f"{a['y_ulp']:.3g} | {a['dx_err']:.2e} | {a['dx_ulp']:.3g} |"
            )
        lines.append("")
    if report.get("startup"):
        lines.append("### start-up (fresh process)\n")
        lines.append("| case | size | import s | first fwd+bwd s | process s |")
        lines.append("|---|---|---|---|---|")
        for name, s in report["startup"].items():
            lines.append(
                f"| {name} | {s['size']:.0e} | {s['import_s']:.3f} | {s['first_call_s']:.3f} | "
                f"{s['process_s']:.2f} |"
            )
        lines.append("")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    """Throughput (elements/s) against size, one line per implementation, one panel per
    layout (rows) and dtype/pass (columns); the dashed line is the triad roofline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = report["results"]
    layouts = list(dict.fromkeys(r["layout"] for r in res))
    cols = list(dict.fromkeys((r["dtype"], r["passes"]) for r in res))
    fig, axs = plt.subplots(
        len(layouts), len(cols), figsize=(4 * len(cols), 3 * len(layouts)), squeeze=False
    )
    for i, lay in enumerate(layouts):
        for j, (dt, p) in enumerate(cols):
            ax = axs[i][j]
            rows = [r for r in res if (r["layout"], r["dtype"], r["passes"]) == (lay, dt, p)]
            for impl in dict.fromkeys(r["impl"] for r in rows):
                pts = sorted(
                    (r["size"], r["size"] / r["median_s"]) for r in rows if r["impl"] == impl
                )
                ax.plot(*zip(*pts, strict=True), marker="o", label=impl)
            roof = sorted((r["size"], r["size"] / r["roofline_s"]) for r in rows)
            if roof:
                ax.plot(*zip(*roof, strict=True), "k--", label="roofline")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title(f"{lay} {dt} {p}", fontsize=9)
            ax.set_xlabel("elements")
            ax.set_ylabel("elements/s")
    handles, labels = axs[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=len(labels))
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=90)
    plt.close(fig)


@contextlib.contextmanager
def _progress(total: int, plain: bool) -> Iterator[Callable[[str], None]]:
    """A `step(description)` callback: rich progress bar if available, else plain lines."""
    if not plain:
        try:
            from rich.progress import Progress
        except ImportError:
            plain = True
    if plain:
        count = [0]

        def step_plain(desc: str) -> None:
            count[0] += 1
            print(f"[{count[0]}/{total}] {desc}", file=sys.stderr, flush=True)

        yield step_plain
        return
    with Progress(transient=False) as prog:
        task = prog.add_task("bench", total=total)
        started = [False]

        def step_rich(desc: str) -> None:
            if started[0]:
                prog.advance(task)
            started[0] = True
            prog.update(task, description=desc)

        yield step_rich
        prog.advance(task)
