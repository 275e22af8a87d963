"""Model-shaped cases: the normalizations that models call, with their weight and bias.

Part of `make bench` (`bench_kernels.run` calls `run_models`). Each case is a layer as a model
uses it (LayerNorm over the last axis, BatchNorm2d, GroupNorm, InstanceNorm with affine
parameters, BatchNorm2d on a channels-last tensor, BatchNorm1d, a whole tensor, and RMSNorm:
`center=False` with a weight and no bias, over the last axis or the whole tensor; masked
LayerNorm: `mask=` with 80% of the elements counted,
each next to the unmasked case of its shape), timed in one process for:

- `normgrad`: `normgrad.normalize_forward` / `normalize_backward` on NumPy arrays, with the
  gradients of x, weight and bias;
- `normgrad.torch`: `normgrad.torch.normalize` on CPU tensors, gradients by `torch.autograd`
  (RMS cases only where it has `center`);
- `torch`: PyTorch's own op (`F.layer_norm`, `F.batch_norm`, `F.group_norm`,
  `F.instance_norm`, `F.rms_norm`);
- `compile`: `torch.compile` of the plain formula (mean, variance, rsqrt, affine), the code
  that a user without a dedicated op would write (`--no-compile` skips it: it compiles once
  per shape).

With `fwdbwd`, the torch implementations are also timed **between torch ops**
(`BETWEEN`: `h = 1.5 x`, the layer, `gelu(y).sum()`, gradients of x, weight and bias), as a
layer in a model runs: PyTorch's OpenMP threads run the elementwise ops around the layer,
and a runtime's threads that spin on the cores can delay the other's. Those results are
checked against PyTorch's op on float64 copies (at float64, PyTorch's row is its own
reference).

Each other result is checked against normgrad's generic path before it is timed. Ratios are the
peer's time over ours: above 1 means normgrad is faster. No peer has a masked op: the masked
cases time normgrad alone, and the report gives their time over the unmasked case's.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import numpy as np

import normgrad as ng

EPS = 1e-5


@dataclass(frozen=True)
class Case:
    """A layer: the input's shape, the axes normgrad normalizes over, the parameters' shape."""

    key: str  # what --models names
    name: str
    shape: tuple[int, ...]
    groups: int = 0  # GroupNorm: channels split into this many groups
    dims: int = 1  # LayerNorm/RMSNorm: how many trailing axes are normalized (and weighted)
    unmasked: str = ""  # a masked case: the key of the same layer without a mask
    channels_last: bool = False  # BatchNorm2d on NHWC memory (a channels-last tensor)

    @property
    def op(self) -> str:
        return self.name.split()[0]

    @property
    def center(self) -> bool:
        """False for RMS normalization (`center=False`)."""
        return self.op != "RMSNorm"


CASES = (
    Case("ln8192", "LayerNorm 8192x768", (8192, 768)),
    Case("ln2048", "LayerNorm 2048x4096", (2048, 4096)),
    Case("ln64", "LayerNorm 64x768", (64, 768)),
    Case("ln32", "LayerNorm 32x128", (32, 128)),
    Case("ln256", "LayerNorm 256x1024", (256, 1024)),
    Case("lnchw", "LayerNorm (C,H,W) 32x64x56x56", (32, 64, 56, 56), dims=3),
    Case("lnmask8192", "LayerNorm masked 8192x768", (8192, 768), unmasked="ln8192"),
    Case("lnmask256", "LayerNorm masked 256x1024", (256, 1024), unmasked="ln256"),
    Case("bn32", "BatchNorm2d 32x64x56x56", (32, 64, 56, 56)),
    Case("bn8", "BatchNorm2d 8x64x28x28", (8, 64, 28, 28)),
    Case("bn32cl", "BatchNorm2d channels-last 32x64x56x56", (32, 64, 56, 56), channels_last=True),
    Case("bn1d8192", "BatchNorm1d 8192x768", (8192, 768)),
    Case("bn1d256", "BatchNorm1d 256x1024", (256, 1024)),
    Case("gn8", "GroupNorm(32) 8x64x28x28", (8, 64, 28, 28), groups=32),
    Case("in8", "InstanceNorm2d 8x64x28x28", (8, 64, 28, 28)),
    Case("whole6", "whole 10^6", (1000, 1000)),
    Case("whole", "whole 10^7", (1000, 10_000)),
    Case("rms8192", "RMSNorm 8192x768", (8192, 768)),
    Case("rms64", "RMSNorm 64x768", (64, 768)),
    Case("rmswhole", "RMSNorm whole 1000x1000", (1000, 1000)),
)
IMPLS = ("normgrad", "normgrad.torch", "torch", "compile")
BETWEEN = "fwdbwd between torch ops"
PEERS = ("torch", "compile")


def layout(case: Case) -> tuple[tuple[int, ...], Any, tuple[int, ...]]:
    """(shape normgrad sees, its axes, the shape of weight and bias normgrad is given).

    GroupNorm is the channels split in two axes, (N, G, C/G, H, W) over (2, 3, 4), with a
    per-channel weight of shape (G, C/G, 1, 1); per-channel parameters are (C, 1, 1).
    RMSNorm over the whole tensor has a weight of its shape (as `torch.nn.RMSNorm(shape)`)."""
    s = case.shape
    if case.op in ("LayerNorm", "RMSNorm") and "whole" not in case.name:
        d = case.dims
        return s, -1 if d == 1 else tuple(range(len(s) - d, len(s))), s[-d:]
    if case.op == "RMSNorm":
        return s, None, s
    if case.op == "BatchNorm2d":
        return s, (0, 2, 3), (s[1], 1, 1)
    if case.op == "BatchNorm1d":
        return s, 0, (s[1],)
    if case.op == "InstanceNorm2d":
        return s, (2, 3), (s[1], 1, 1)
    if case.op.startswith("GroupNorm"):
        g = case.groups
        return (s[0], g, s[1] // g, s[2], s[3]), (2, 3, 4), (g, s[1] // g, 1, 1)
    return s, None, ()


@dataclass
class Inputs:
    x: Any
    dy: Any
    w: Any
    b: Any
    axes: Any
    channels: int  # weight and bias have this many elements (0: none)
    center: bool = True  # False: RMS normalization (a weight, no bias)
    mask: Any = None  # a masked case: the counted elements


def make_inputs(case: Case, dtype: str) -> Inputs:
    shape, axes, pshape = layout(case)
    rng = np.random.default_rng(0)
    x = rng.normal(size=shape).astype(dtype)
    dy = rng.normal(size=shape).astype(dtype)
    if case.channels_last:  # the same values in NHWC memory, seen as NCHW
        nhwc = (np.ascontiguousarray(a.transpose(0, 2, 3, 1)) for a in (x, dy))
        x, dy = (a.transpose(0, 3, 1, 2) for a in nhwc)
    if not pshape:
        return Inputs(x, dy, None, None, axes, 0)
    w = (1 + 0.1 * rng.normal(size=pshape)).astype(dtype)
    b = (0.1 * rng.normal(size=pshape)).astype(dtype) if case.center else None
    mask = rng.random(shape) < 0.8 if case.unmasked else None
    return Inputs(x, dy, w, b, axes, w.size, case.center, mask)


def _results(y: Any, g: Any) -> tuple[Any, ...]:
    """(y, dx, then dweight and dbias where given)."""
    return (y, g.x, *(p for p in (g.weight, g.bias) if p is not None))


def reference(inp: Inputs) -> tuple[Any, ...]:
    """(y, dx, dweight, dbias) from normgrad's generic path in float64."""
    p = [None if a is None else a.astype(np.float64) for a in (inp.w, inp.b)]
    with ng.use_kernels(False):
        y, ctx = ng.normalize_forward(
            inp.x.astype(np.float64), inp.axes, eps=EPS, weight=p[0], bias=p[1],
            center=inp.center, mask=inp.mask,
        )  # fmt: skip
        g = ng.normalize_backward(ctx, inp.dy.astype(np.float64))
    return _results(y, g)


def _normgrad_fn(inp: Inputs, bwd: bool) -> Any:
    kw = {"eps": EPS, "weight": inp.w, "bias": inp.b, "center": inp.center}
    if inp.mask is not None:
        kw["mask"] = inp.mask

    def fn() -> tuple[Any, ...]:
        y, ctx = ng.normalize_forward(inp.x, inp.axes, **kw)
        if not bwd:
            return (y,)
        return _results(y, ng.normalize_backward(ctx, inp.dy))

    return fn


def torch_op(torch: Any, case: Case) -> Any:
    """PyTorch's dedicated op for the case: f(x, w, b) on the case's own shape."""
    F = torch.nn.functional
    op = case.op
    if op == "LayerNorm":
        d = case.dims
        return lambda x, w, b: F.layer_norm(
            x, x.shape[-d:], w.reshape(x.shape[-d:]), b.reshape(x.shape[-d:]), eps=EPS
        )
    if op in ("BatchNorm2d", "BatchNorm1d"):
        return lambda x, w, b: F.batch_norm(x, None, None, w, b, training=True, eps=EPS)
    if op == "InstanceNorm2d":
        return lambda x, w, b: F.instance_norm(x, weight=w, bias=b, eps=EPS)
    if op.startswith("GroupNorm"):
        return lambda x, w, b: F.group_norm(x, case.groups, w, b, eps=EPS)
    if op == "RMSNorm":
        nd = len(layout(case)[2])
        return lambda x, w, b: F.rms_norm(x, x.shape[-nd:], w.reshape(x.shape[-nd:]), eps=EPS)
    return lambda x, w, b: F.layer_norm(x.reshape(1, -1), (x.numel(),), eps=EPS).reshape(x.shape)


def plain_formula(torch: Any, case: Case) -> Any:
    """What one writes without a dedicated op (on normgrad's layout of the case)."""
    _, axes, _ = layout(case)
    dims = None if axes is None else axes

    def f(x: Any, w: Any, b: Any) -> Any:
        d = x - x.mean(dim=dims, keepdim=True) if case.center else x
        y = d * torch.rsqrt((d * d).mean(dim=dims, keepdim=True) + EPS)
        if w is not None:
            y = y * w
        return y if b is None else y + b

    return f


def _torch_fn(
    torch: Any, f: Any, inp: Inputs, bwd: bool, native_shape: Any, between: bool = False
) -> Any:
    """Time `f` on tensors sharing the NumPy arrays' memory; gradients of x, w, b
    (`between`: of `gelu(f(1.5 x)).sum()`, the `BETWEEN` pass)."""
    x = torch.from_numpy(inp.x.reshape(native_shape))
    dy = torch.from_numpy(inp.dy.reshape(native_shape))
    params = [None if a is None else torch.from_numpy(a.reshape(-1)) for a in (inp.w, inp.b)]

    def fn() -> tuple[Any, ...]:
        if not bwd:
            with torch.no_grad():
                return (f(x, *params).numpy(),)
        args = [None if t is None else t.detach().requires_grad_() for t in (x, *params)]
        leaves = [t for t in args if t is not None]
        if between:
            y = f(args[0] * 1.5, *args[1:])
            grads = torch.autograd.grad(torch.nn.functional.gelu(y).sum(), leaves)
        else:
            y = f(*args)
            grads = torch.autograd.grad(y, leaves, dy)
        return (y.detach().numpy(), *(g.numpy() for g in grads))

    return fn


def _make(impl: str, case: Case, inp: Inputs, bwd: bool, torch: Any, between: bool = False) -> Any:
    if impl == "normgrad":
        return None if between else _normgrad_fn(inp, bwd)
    if torch is None or case.unmasked:  # (no peer has a masked op)
        return None
    ours = inp.x.shape
    if impl == "torch":
        return _torch_fn(torch, torch_op(torch, case), inp, bwd, case.shape, between)
    if impl == "compile":
        f = plain_formula(torch, case)
        compiled = torch.compile(_on_layout(torch, f, inp), dynamic=False)
        return _torch_fn(torch, compiled, inp, bwd, ours, between)
    import inspect

    import normgrad.torch as ngt

    kw: dict[str, Any] = {"eps": EPS}
    if not case.center:
        if "center" not in inspect.signature(ngt.normalize).parameters:
            return None  # (an adapter without center=)
        kw["center"] = False

    def f_ours(x: Any, w: Any, b: Any) -> Any:
        return ngt.normalize(x, inp.axes, weight=_param(w, inp), bias=_param(b, inp), **kw)

    return _torch_fn(torch, f_ours, inp, bwd, ours, between)


def _param(t: Any, inp: Inputs) -> Any:
    return None if t is None else t.reshape(inp.w.shape)


def _on_layout(torch: Any, f: Any, inp: Inputs) -> Any:
    """`f` with the flat parameters reshaped as normgrad is given them."""
    if inp.w is None:
        return lambda x, w, b: f(x, None, None)
    return lambda x, w, b: f(x, w.reshape(inp.w.shape), _param(b, inp))


def _check(got: tuple[Any, ...], ref: tuple[Any, ...], what: str) -> float:
    err = 0.0
    for g, r in zip(got, ref, strict=False):
        g64 = np.asarray(g, dtype=np.float64).reshape(r.shape)
        err = max(err, float(np.max(np.abs(g64 - r)) / max(1.0, float(np.max(np.abs(r))))))
    if not err <= 2e-3:
        raise AssertionError(f"{what} differs from the float64 reference by {err:.3g}")
    return err


def select(text: str) -> list[Case]:
    """The cases that `--models` names: "all", "none" or comma-separated keys."""
    if text == "all":
        return list(CASES)
    keys = [k.strip() for k in text.split(",") if k.strip() and k.strip() != "none"]
    known = {c.key: c for c in CASES}
    bad = [k for k in keys if k not in known]
    if bad:
        raise ng.NormgradError(
            f"unknown model case {bad}; choose from all, none, {', '.join(known)}."
        )
    return [known[k] for k in keys]


def run_models(
    cases: list[Case],
    dtypes: list[str],
    passes: list[str],
    repeat: int,
    triad: float,
    compile_: bool,
) -> list[dict[str, Any]]:
    """Every case, dtype and pass, for each implementation; one dict per measurement."""
    from bench_kernels import ROOF_PASSES, time_it

    torch = None
    with contextlib.suppress(ImportError):
        import torch
    impls = [i for i in IMPLS if compile_ or i != "compile"]
    rows = []
    for case in cases:
        between = None  # (None: no torch, no fwdbwd, or no peer: a masked case)
        if "fwdbwd" in passes and torch is not None:
            between = _between_reference(case, torch)  # (once per case: it is float64)
        for dt in dtypes:
            inp = make_inputs(case, dt)
            full = reference(inp)
            refs = {"fwd": full[:1], "fwdbwd": full, BETWEEN: between}
            for p in [*passes, BETWEEN]:
                if refs.get(p) is None:
                    continue
                for impl in impls:
                    fn = _make(impl, case, inp, p != "fwd", torch, p == BETWEEN)
                    if fn is None:
                        continue
                    err = _check(fn(), refs[p], f"{impl} on {case.name}")
                    t = float(np.median(time_it(fn, repeat)))
                    roof = ROOF_PASSES.get(p, ROOF_PASSES["fwdbwd"]) * inp.x.nbytes / triad
                    rows.append(
                        dict(case=case.name, size=inp.x.size, dtype=dt, passes=p, impl=impl,
                             median_s=t, roofline_s=roof, max_rel_err=err)
                    )  # fmt: skip
    return rows


def _between_reference(case: Case, torch: Any) -> tuple[Any, ...] | None:
    """The `BETWEEN` pass's results from PyTorch's op on float64 copies of the inputs
    (None where PyTorch has no such op)."""
    fn = _make("torch", case, make_inputs(case, "float64"), True, torch, between=True)
    return None if fn is None else tuple(fn())


def format_models(rows: list[dict[str, Any]]) -> str:
    """One table per dtype and pass: time of each implementation, normgrad's % of the
    roofline, and each peer's time over normgrad's and over normgrad.torch's."""
    lines = ["## Model layers with weight and bias\n"]
    for dt, p in dict.fromkeys((r["dtype"], r["passes"]) for r in rows):
        sel = [r for r in rows if (r["dtype"], r["passes"]) == (dt, p)]
        impls = list(dict.fromkeys(r["impl"] for r in sel))
        peers = [i for i in PEERS if i in impls]
        ours = [i for i in ("normgrad", "normgrad.torch") if i in impls]
        head = ["case"] + [f"{i} ms" for i in impls] + ["normgrad % roof"]
        head += [f"{o} vs {q}" for o in ours for q in peers]
        lines += [f"### {dt}, {p}\n", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for name in dict.fromkeys(r["case"] for r in sel):
            by = {r["impl"]: r for r in sel if r["case"] == name}
            cells = [name] + [f"{by[i]['median_s'] * 1e3:.3g}" if i in by else "" for i in impls]
            ng_r = by.get("normgrad")
            cells.append(f"{100 * ng_r['roofline_s'] / ng_r['median_s']:.0f}%" if ng_r else "")
            for o in ours:
                for q in peers:
                    ok = o in by and q in by
                    cells.append(f"{by[q]['median_s'] / by[o]['median_s']:.2f}x" if ok else "")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines + _mask_ratios(rows))


def _mask_ratios(rows: list[dict[str, Any]]) -> list[str]:
    """normgrad's time on each masked case over its time on the unmasked case of the
    same layer (measured in the same run)."""
    names = {c.key: c.name for c in CASES}
    pairs = {c.name: names[c.unmasked] for c in CASES if c.unmasked}
    ours = {(r["case"], r["dtype"], r["passes"]): r["median_s"] for r in rows
            if r["impl"] == "normgrad"}  # fmt: skip
    lines = []
    for (name, dt, p), t in ours.items():
        base = ours.get((pairs.get(name, ""), dt, p))
        if base is not None:
            lines.append(f"| {name} | {dt} | {p} | {t * 1e3:.3g} | {base * 1e3:.3g} | "
                         f"{t / base:.2f}x |")  # fmt: skip
    if not lines:
        return []
    head = ["### Masked over unmasked (normgrad)\n", "| case | dtype | passes | masked ms | "
            "unmasked ms | ratio |", "|---|---|---|---|---|---|"]  # fmt: skip
    return [*head, *lines, ""]
