r"""normgrad's op on torch tensors: the custom ops, the autograd.Functions, the paths.

$$ y = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}}\,w + b, \qquad
   dx = r\,(g - \bar g) - \frac{c}{m}\,\hat x \sum g\,\hat x,\quad g = dy\,w $$

Three entry points run the same host functions (`host_forward`, `host_backward`):

- eager CPU code goes through `Eager`, a lean `autograd.Function` (one output; the forward's
  NumPy context kept for the backward), its call checked once per signature
  (`checked_call`);
- `torch.func` transforms, forward-mode AD and other devices go through `Normalize`, an
  `autograd.Function` with `setup_context`, `backward`, `jvp` and `vmap`;
- `torch.compile` goes through the custom ops `normgrad::forward` and `normgrad::backward`
  (`register_fake` for shapes, `register_autograd`), which Dynamo keeps in its graph (it
  cannot trace a Function with a custom `jvp`).

The paths: CPU float32/float64 tensors reach normgrad's NumPy kernels through zero-copy
NumPy views of their storage (strided views included), the kernels' native jobs on torch's
OpenMP team (`on_torch`: the host functions run with `_runtime.ON_TORCH` set); float16,
bfloat16 and integer CPU tensors are computed in float64 and rounded once; tensors on other
devices take the generic path in torch ops (the tensor's dtype, float32 statistics for
16-bit floats), whose Python never looks at values, so it never waits for the device. A
backward under grad mode (`create_graph=True`, `torch.func`) is written in differentiable
torch ops.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple, ParamSpec, TypeVar

import array_api_compat.torch as xpt
import numpy as np
import torch
from torch.autograd import forward_ad

from . import _dispatch, _generic, _ops, _runtime
from ._axes import Axes, normalize_axes
from ._errors import NormgradError
from ._ops import (
    _context,
    context_from_statistics,
    normalize_backward,
    normalize_forward,
)
from ._validate import (
    Spec,
    _check_center,
    _check_options,
    check_param_shape,
    cotangent,
    namespace,
    refuse_zero_variance,
)

Tensor = torch.Tensor
Stats = tuple[Tensor, Tensor, Tensor]  # mean, var, rstd: keepdims, the compute dtype
_KERNEL_DTYPES = (torch.float32, torch.float64)


class Call(NamedTuple):
    """A validated call without its tensors: sorted non-negative axes and the options."""

    axes: tuple[int, ...]
    eps: float
    eps_mode: str
    ddof: float
    center: bool = True  # False: RMS normalization


# --- checks --------------------------------------------------------------------------------------


def check_call(
    x: Tensor, axes: Axes, options: tuple[Any, Any, Any], params: Any, center: bool = True
) -> Call:
    """Every check that needs no values: axes, options, dtypes and devices of the tensors.
    `options = (eps, eps_mode, ddof)`, `params = (weight, bias)`."""
    _check_dtype(x, "x")
    if x.ndim == 0 or x.numel() == 0:
        raise NormgradError(
            f"x has shape {tuple(x.shape)}; normalization needs at least one dimension and "
            "one element in every group."
        )
    ax = normalize_axes(axes, x.ndim)
    n = 1
    for i in ax:  # (a loop: torch.compile traces it)
        n *= int(x.shape[i])
    eps, eps_mode, ddof = options
    _check_options(eps, eps_mode, ddof, n)
    _check_center(center, ddof)
    for p, name in zip(params, ("weight", "bias"), strict=True):
        if p is not None:
            _check_param(p, name, x, ax)
    return Call(ax, float(eps), eps_mode, float(ddof), center)


def _check_dtype(t: Tensor, name: str) -> None:
    if t.dtype.is_complex or t.dtype == torch.bool:
        raise NormgradError(
            f"{name} has dtype {t.dtype}; normalize needs real numbers (floats or integers). "
            f"Convert it, e.g. {name}.real or {name}.float()."
        )


def _check_param(p: Any, name: str, x: Tensor, axes: tuple[int, ...]) -> None:
    if not isinstance(p, Tensor):
        raise NormgradError(
            f"{name} must be a torch.Tensor like x; got {type(p).__name__}. "
            f"Use torch.as_tensor({name}, device=x.device)."
        )
    _check_dtype(p, name)
    if p.device != x.device:
        raise NormgradError(
            f"{name} is on device {p.device} but x is on {x.device}; all tensors of one call "
            f"must be on one device: move it with {name}.to(x.device)."
        )
    check_param_shape(tuple(p.shape), name, tuple(x.shape), axes)


def _check_dy(dy: Tensor, x: Tensor, dtype: torch.dtype) -> None:
    if dy.dtype != dtype or dy.device != x.device:
        raise NormgradError(
            f"dy has dtype {dy.dtype} on {dy.device}, but y has dtype {dtype} on {x.device}; "
            f"the cotangent must match y: pass dy.to(y)."
        )
    cotangent(xpt, x, dy, "dy")


def result_dtype(x: Tensor) -> torch.dtype:
    """y's dtype (and dx's): x's floating dtype, float64 for integers."""
    return x.dtype if x.dtype.is_floating_point else torch.float64


# --- the host side: zero-copy NumPy views --------------------------------------------------------

_RECORD: list[tuple[str, int]] | None = None


@contextmanager
def record_host_arrays() -> Iterator[list[tuple[str, int]]]:
    """Record `(name, address)` of every NumPy array handed to normgrad's NumPy entry points
    inside the block (for tests: the kernels read the tensor's own memory)."""
    global _RECORD
    saved, _RECORD = _RECORD, []
    try:
        yield _RECORD
    finally:
        _RECORD = saved


def _host(t: Tensor | None, name: str) -> np.ndarray | None:
    """A NumPy view of `t`'s storage (float32/float64, any strides), or of a float64 copy
    for the other dtypes: float16/bfloat16 are then rounded once, from float64 results."""
    if t is None:
        return None
    if t.dtype not in _KERNEL_DTYPES:
        t = t.to(torch.float64)
    a = t.detach().numpy()
    if _RECORD is not None:
        _RECORD.append((name, a.__array_interface__["data"][0]))
    return a


def _tensor(a: Any, dtype: torch.dtype) -> Tensor:
    t = torch.from_numpy(a)
    return t if t.dtype == dtype else t.to(dtype)


# --- the two functions both entry points run ----------------------------------------------------

_P = ParamSpec("_P")
_R = TypeVar("_R")


def on_torch(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """`fn` with `_runtime.ON_TORCH` set: its kernels' native jobs run on torch's OpenMP team
    (`kernels/_team.py`), the threads that run the torch ops around them."""

    @functools.wraps(fn)
    def on_team(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        token = _runtime.ON_TORCH.set(True)
        try:
            return fn(*args, **kwargs)
        finally:
            _runtime.ON_TORCH.reset(token)

    return on_team


def forward(x: Tensor, w: Tensor | None, b: Tensor | None, call: Call) -> tuple[Tensor, ...]:
    """`(y, mean, var, rstd)`: the NumPy kernels for CPU tensors, torch ops elsewhere."""
    axes, eps, mode, ddof, center = call
    if x.device.type != "cpu":
        y, ctx = normalize_forward(
            x, axes, eps=eps, eps_mode=mode, ddof=ddof, weight=w, bias=b, center=center
        )
        return y, ctx.mean, ctx.var, ctx.rstd
    y, ctx = host_forward(x, w, b, call)
    stats = (torch.from_numpy(np.asarray(s)) for s in (ctx.mean, ctx.var, ctx.rstd))
    return (y, *stats)


@on_torch
def host_forward(x: Tensor, w: Tensor | None, b: Tensor | None, call: Call) -> tuple[Tensor, Any]:
    """`(y, the NumPy context)` of a CPU call: normgrad's NumPy entry point on views."""
    axes, eps, mode, ddof, center = call
    y, ctx = normalize_forward(
        _host(x, "x"), axes, eps=eps, eps_mode=mode, ddof=ddof, weight=_host(w, "weight"),
        bias=_host(b, "bias"), center=center,
    )  # fmt: skip
    return _tensor(y, result_dtype(x)), ctx


def backward(
    x: Tensor, params: tuple[Any, Any], stats: Stats, dy: Tensor, call: Call
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """`(dx, dweight, dbias)` from the forward's statistics (not differentiable again)."""
    w, b = params
    axes, eps, mode, ddof, center = call
    if x.device.type != "cpu":
        ctx = context_from_statistics(
            x, axes, *stats, eps=eps, eps_mode=mode, ddof=ddof, weight=w, bias=b, center=center
        )
        return tuple(normalize_backward(ctx, dy))
    xh = _host(x, "x")
    assert xh is not None
    hs = tuple(s.numpy() for s in stats)
    ctx = _context(xh, _spec(xh, call), hs, _host(w, "weight"), _host(b, "bias"))
    return host_backward(ctx, (x, w, b), dy)


@on_torch
def host_backward(
    ctx: Any, tensors: tuple[Tensor, Any, Any], dy: Tensor
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """`(dx, dweight, dbias)` of a CPU call from its NumPy context; `tensors = (x, w, b)`
    give the gradients' dtypes."""
    x, w, b = tensors
    g = normalize_backward(ctx, _host(dy, "dy"))
    dw = None if w is None else _tensor(g.weight, w.dtype)
    db = None if b is None else _tensor(g.bias, b.dtype)
    return _tensor(g.x, result_dtype(x)), dw, db


def _spec(xh: np.ndarray, call: Call) -> Spec:
    """The validated call of a checked one (`check_call` ran in the forward): the
    NumPy context of the backward without validating again."""
    axes, eps, mode, ddof, center = call
    n = 1
    for i in axes:
        n *= xh.shape[i]
    inside = mode == "inside"
    return Spec(namespace(xh), axes, n, eps, mode, ddof, xh.dtype, n - ddof, inside, center)


def differentiable_backward(
    x: Tensor, params: tuple[Any, Any], dy: Tensor, call: Call
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The backward in torch ops, differentiable w.r.t. x through the statistics too (so they
    are computed again from x, not taken from the forward)."""
    axes, eps, mode, ddof, center = call
    w, b = params
    _, ctx = normalize_forward(
        x, axes, eps=eps, eps_mode=mode, ddof=ddof, weight=w, bias=b, center=center
    )
    return tuple(normalize_backward(ctx, dy))


def tangent(saved: tuple[Any, ...], tangents: tuple[Any, Any, Any], call: Call) -> Tensor:
    r"""The forward derivative $ty = w\,J\,tx + \hat x\,tw + tb$ from the saved tensors
    `(x, weight, bias, mean, var, rstd)` (any tangent may be None)."""
    x, w, b, mean, var, rstd = saved
    tx, tw, tb = tangents
    axes, eps, mode, ddof, center = call
    ctx = context_from_statistics(
        x, axes, mean, var, rstd, eps=eps, eps_mode=mode, ddof=ddof, weight=w, bias=b,
        center=center,
    )  # fmt: skip
    d = _generic.centered(xpt, ctx)
    if tx is None:
        ty = torch.zeros_like(d)
    else:
        c = _generic.variance_coefficient(xpt, ctx)
        ty = _generic.apply_jacobian(xpt, ctx, d, c, _generic.cast(xpt, tx, ctx))
    ty = _generic.tangent_affine(xpt, ctx, ty, d * ctx.rstd, (tw, tb))
    return _generic.to_dtype(xpt, ty, ctx.dtype)


# --- eager code and torch.func: the autograd.Function -------------------------------------------


class Normalize(torch.autograd.Function):
    """`forward` and `backward` above, with a forward-mode rule and a batching rule."""

    @staticmethod
    def forward(x: Tensor, w: Tensor | None, b: Tensor | None, call: Call) -> Any:
        return forward(x, w, b, call)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        x, w, b, call = inputs
        saved = (x, w, b, *output[1:])
        ctx.save_for_backward(*saved)
        ctx.save_for_forward(*saved)
        ctx.call = call
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)  # (no zero tensors for the statistics' cotangents)

    @staticmethod
    def backward(ctx: Any, dy: Tensor | None, *_stats: Any) -> Any:
        x, w, b, *stats = ctx.saved_tensors
        if dy is None:  # (y took no part in what is differentiated)
            return None, None, None, None
        if torch.is_grad_enabled():  # create_graph=True, torch.func: differentiable again
            grads = differentiable_backward(x, (w, b), dy, ctx.call)
        else:
            grads = backward(x, (w, b), tuple(stats), dy, ctx.call)
        return (*grads, None)

    @staticmethod
    def jvp(ctx: Any, tx: Any, tw: Any, tb: Any, _call: Any) -> Any:
        return tangent(ctx.saved_tensors, (tx, tw, tb), ctx.call), None, None, None

    @staticmethod
    def vmap(info: Any, in_dims: tuple[Any, ...], x: Tensor, w: Any, b: Any, call: Call) -> Any:
        """One call on the batched layout: the batch dimension becomes a leading kept axis."""
        xb, wb, bb, call = fold_batch(info.batch_size, in_dims, (x, w, b), call)
        return Normalize.apply(xb, wb, bb, call), (0, 0, 0, 0)


def fold_batch(
    size: int, in_dims: tuple[Any, ...], tensors: tuple[Any, Any, Any], call: Call
) -> tuple[Any, Any, Any, Call]:
    """`(x, weight, bias)` with the batch dimension first, as one call over `(B, *shape)`:
    the parameters gain size-1 axes so that they broadcast per sample."""
    x, w, b = tensors
    bx, bw, bb = in_dims[:3]
    x = x.expand(size, *x.shape) if bx is None else x.movedim(bx, 0)
    rank = x.ndim - 1

    def lift(p: Any, bp: Any) -> Any:
        if p is None or bp is None:
            return p  # (an unbatched parameter broadcasts against (B, *shape) unchanged)
        p = p.movedim(bp, 0)
        return p.reshape(size, *([1] * (rank - (p.ndim - 1))), *p.shape[1:])

    axes = tuple(a + 1 for a in call.axes)
    return x, lift(w, bw), lift(b, bb), call._replace(axes=axes)


# --- eager CPU calls: the lean autograd.Function and the checked-call cache ---------------------


class Eager(torch.autograd.Function):
    """CPU calls outside torch.func and forward AD: one output, and the forward's NumPy
    context (statistics, validated call, views) kept for the backward, so the backward
    neither checks nor converts again. Under grad mode (`create_graph=True`) the backward
    is `differentiable_backward`, as `Normalize`'s."""

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, w: Tensor | None, b: Tensor | None, call: Call, fast: Any
    ) -> Any:
        if fast is None:
            y, host = host_forward(x, w, b, call)
        else:  # (a planned kernel call: `eager_forward`)
            y, host = eager_forward(x, w, b, fast)
        ctx.save_for_backward(x, w, b)  # (their version counters: in-place changes raise)
        ctx.call, ctx.host, ctx.fast = call, host, fast
        return y

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> Any:
        x, w, b = ctx.saved_tensors
        if torch.is_grad_enabled():
            return (*differentiable_backward(x, (w, b), dy, ctx.call), None, None)
        if ctx.fast is not None:
            return (*eager_backward(ctx.host, ctx.fast, (x, w, b), dy), None, None)
        return (*host_backward(ctx.host, (x, w, b), dy), None, None)


def checked_call(
    x: Tensor, axes: Axes, options: tuple[Any, Any, Any], params: Any, center: bool = True
) -> Call:
    """`check_call`, run once per call signature (shapes, dtypes, devices, axes, options):
    its checks read no values. The entries live in `_runtime.STATE.planned`."""
    return checked_entry(x, axes, options, params, center)[0]


def checked_entry(
    x: Tensor, axes: Axes, options: tuple[Any, Any, Any], params: Any, center: bool = True
) -> tuple[Call, dict[str, Any] | None]:
    """`(call, planned kernel calls by kernel mode)` of a call signature: `checked_call`'s
    entry, whose second field `planned_eager` fills (None: not cached, never planned)."""
    key = _call_key(x, axes, options, params, center)
    if key is None:
        return check_call(x, axes, options, params, center), None
    planned = _runtime.STATE.planned
    try:
        entry: tuple[Call, dict[str, Any] | None] = planned[key]
        return entry
    except KeyError:
        pass
    entry = (check_call(x, axes, options, params, center), {})
    if len(planned) >= _runtime.PLANNED_MAX:
        planned.clear()
    planned[key] = entry
    return entry


def _call_key(
    x: Tensor, axes: Axes, options: tuple[Any, Any, Any], params: Any, center: Any
) -> Any:
    """The cache key of a call, or None where one could mix calls that the checks tell
    apart (non-tensors, axes tuples of other types than int: `(True,) == (1,)`, a center
    that is not a bool: `1 == True`) or where the cache would keep an argument alive (a
    list, array or tensor option: those are checked on every call)."""
    if not isinstance(x, Tensor) or type(center) is not bool:
        return None
    if type(axes) is tuple:
        if any(type(a) is not int for a in axes):
            return None
    elif axes is not None and type(axes) is not int:
        return None
    metas = []
    for p in params:
        if p is not None and not isinstance(p, Tensor):
            return None
        metas.append(None if p is None else (p.shape, p.dtype, p.device))
    eps, eps_mode, ddof = options
    if type(eps) not in _PLAIN or type(ddof) not in _PLAIN or type(eps_mode) is not str:
        return None  # (a tensor or array option would be kept alive by the cache)
    return ("torch", x.shape, x.dtype, x.device, axes, type(axes), eps, type(eps), eps_mode,
            ddof, type(ddof), center, *metas)  # fmt: skip


_PLAIN = (float, int)


# --- eager CPU calls on the planned kernels: the plan found once per call signature -----------


class Planned(NamedTuple):
    """A planned kernel call of a C-contiguous CPU float32/float64 tensor whose weight and
    bias (if any) have its dtype: the validated NumPy call and its small or native plan, as
    `_dispatch` chose them for this call signature under kernel mode `mode`."""

    spec: Spec
    plan: Any
    mode: str


def planned_eager(
    entry: tuple[Call, dict[str, Any] | None], x: Tensor, w: Any, b: Any
) -> Planned | None:
    """The planned kernel call of CPU tensor `x` under `checked_entry`'s `entry`, or None
    where normgrad's NumPy entry point takes the call (strided or misaligned x, other
    dtypes, other paths, a call signature that is not cached). Per call this costs a
    contiguity check and a look-up: the signature fixes everything else the plan reads."""
    plans = entry[1]
    if plans is None or not x.is_contiguous() or x.data_ptr() % x.element_size():
        return None
    mode = _runtime.kernel_mode()
    try:
        planned: Planned | None = plans[mode]
        return planned
    except KeyError:
        pass
    planned = _plan_eager(x, (w, b), entry[0], mode)
    plans[mode] = planned
    return planned


def _plan_eager(x: Tensor, params: tuple[Any, Any], call: Call, mode: str) -> Planned | None:
    """`_dispatch`'s small or native plan of the call on NumPy views, or None."""
    if x.dtype not in _KERNEL_DTYPES or any(p is not None and p.dtype != x.dtype for p in params):
        return None
    xh = x.detach().numpy()
    hp = tuple(None if p is None else p.detach().numpy() for p in params)
    options = (call.eps, call.eps_mode, call.ddof, call.center)
    hit = _dispatch._planned_forward(xh, call.axes, options, hp, None)
    return None if hit is None else Planned(hit[0], hit[1], mode)


@on_torch
def eager_forward(x: Tensor, w: Any, b: Any, planned: Planned) -> tuple[Tensor, Any]:
    """`host_forward` of a planned call: the plan's kernels on zero-copy views, without
    validating or planning again; `(y, the NumPy context)`."""
    spec, plan, _ = planned
    xh, wh, bh = _host(x, "x"), _host(w, "weight"), _host(b, "bias")
    y, mean, var, rstd, tables = _ops_runner("forward", plan.path)(xh, spec, wh, bh, plan, None)
    if spec.eps == 0:
        refuse_zero_variance(spec.xp, var, xh, spec.axes)
    return torch.from_numpy(y), _context(xh, spec, (mean, var, rstd), wh, bh, tables)


@on_torch
def eager_backward(
    ctx: Any, planned: Planned, tensors: tuple[Tensor, Any, Any], dy: Tensor
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """`host_backward` of a planned call: the forward's plan where `dy` fits it (x's dtype,
    shape and memory order, aligned) under the same kernel mode, else `host_backward`."""
    x, w, b = tensors
    if (
        dy.dtype != x.dtype or dy.shape != x.shape or not dy.is_contiguous()
        or dy.data_ptr() % dy.element_size() or planned.mode != _runtime.kernel_mode()
    ):  # fmt: skip
        return host_backward(ctx, tensors, dy)
    dyh = _host(dy, "dy")
    c = _generic.variance_coefficient(planned.spec.xp, ctx)
    dx, dw, db = _ops_runner("backward", planned.plan.path)(ctx, dyh, c, planned.plan, None)
    tw = None if w is None else torch.from_numpy(dw)
    return torch.from_numpy(dx), tw, None if b is None else torch.from_numpy(db)


def _ops_runner(direction: str, path: str) -> Any:
    return _ops._runner(direction, path)  # (looked up at the call: tests record the paths)


# --- torch.compile: the custom ops ---------------------------------------------------------------


def _op_call(axes: list[int], eps: float, eps_mode: str, ddof: float, center: bool) -> Call:
    return Call(tuple(axes), eps, eps_mode, ddof, center)


@torch.library.custom_op("normgrad::forward", mutates_args=())
def forward_op(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    axes: list[int],
    eps: float,
    eps_mode: str,
    ddof: float,
    center: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """`(y, mean, var, rstd)` of `normalize`, all C-contiguous (as the fake says);
    `center=False`: RMS normalization (mean 0)."""
    res = forward(x, weight, bias, _op_call(axes, eps, eps_mode, ddof, center))
    return tuple(t.contiguous() for t in res)  # type: ignore[return-value]


@torch.library.custom_op("normgrad::backward", mutates_args=())
def backward_op(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    var: Tensor,
    rstd: Tensor,
    dy: Tensor,
    axes: list[int],
    eps: float,
    eps_mode: str,
    ddof: float,
    center: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """`(dx, dweight, dbias)`; an absent parameter's gradient is an empty tensor."""
    _check_dy(dy, x, result_dtype(x))
    call = _op_call(axes, eps, eps_mode, ddof, center)
    dx, dw, db = backward(x, (weight, bias), (mean, var, rstd), dy, call)
    return dx.contiguous(), or_empty(dw, x), or_empty(db, x)


def or_empty(t: Tensor | None, x: Tensor) -> Tensor:
    return x.new_empty(0) if t is None else t.contiguous()  # (outputs may not alias)


def stats_dtype(x: Tensor) -> torch.dtype:
    """The statistics' dtype: float64 on the CPU (the kernels'), else the generic path's."""
    if x.device.type == "cpu":
        return torch.float64
    return _generic.compute_dtype(xpt, x)


@forward_op.register_fake
def _forward_fake(
    x: Tensor, weight: Any, bias: Any, axes: list[int], *_options: Any
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    shape = [1 if i in axes else s for i, s in enumerate(x.shape)]
    mean, var, rstd = (x.new_empty(shape, dtype=stats_dtype(x)) for _ in range(3))
    return x.new_empty(x.shape, dtype=result_dtype(x)), mean, var, rstd


@backward_op.register_fake
def _backward_fake(
    x: Tensor, weight: Any, bias: Any, mean: Any, var: Any, rstd: Any, dy: Tensor, *_: Any
) -> tuple[Tensor, Tensor, Tensor]:
    _check_dy(dy, x, result_dtype(x))
    return fake_gradients(x, weight, bias)


def fake_gradients(x: Tensor, weight: Any, bias: Any) -> tuple[Tensor, Tensor, Tensor]:
    """The fake `(dx, dweight, dbias)` of a backward op (an empty one for an absent
    parameter, as `or_empty` gives)."""

    def like(p: Any) -> Tensor:
        if p is None:
            return x.new_empty(0)
        return torch.empty_like(p, memory_format=torch.contiguous_format)

    return x.new_empty(x.shape, dtype=result_dtype(x)), like(weight), like(bias)


def _op_setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    x, w, b, *options = inputs
    ctx.save_for_backward(x, w, b, *output[1:])
    ctx.options = options
    ctx.mark_non_differentiable(*output[1:])


def _op_backward(ctx: Any, dy: Tensor, *_stats: Any) -> Any:
    x, w, b, mean, var, rstd = ctx.saved_tensors
    dx, dw, db = backward_op(x, w, b, mean, var, rstd, dy, *ctx.options)
    options = (None,) * len(ctx.options)
    return dx, None if w is None else dw, None if b is None else db, *options


forward_op.register_autograd(_op_backward, setup_context=_op_setup_context)


def normalize(
    x: Tensor, axes: Axes, options: tuple[Any, Any, Any], params: Any, center: bool = True
) -> Tensor:
    """`normgrad.torch.normalize` once its arguments are bundled: checked, then the custom op
    under torch.compile, `Normalize` under torch.func or forward AD, and `Eager` for the
    other CPU calls (`Normalize` for the other devices). `center=False`: RMS normalization."""
    w, b = params
    if torch.compiler.is_compiling():
        c = check_call(x, axes, options, params, center)
        return forward_op(x, w, b, list(c.axes), c.eps, c.eps_mode, c.ddof, c.center)[0]
    entry = checked_entry(x, axes, options, params, center)
    call = entry[0]
    if torch._C._are_functorch_transforms_active() or forward_ad._current_level >= 0:
        return Normalize.apply(x, w, b, call)[0]
    if not x.is_cpu:
        return _APPLY(x, w, b, call)[0]
    fast = planned_eager(entry, x, w, b)
    if not (torch.is_grad_enabled() and _needs_grad(x, w, b)):  # (no graph to record)
        return host_forward(x, w, b, call)[0] if fast is None else eager_forward(x, w, b, fast)[0]
    return _EAGER(x, w, b, call, fast)


def _needs_grad(x: Tensor, w: Any, b: Any) -> bool:
    return x.requires_grad or (w is not None and w.requires_grad) or (
        b is not None and b.requires_grad
    )  # fmt: skip


# Without a torch.func transform, Function.apply only binds the arguments to forward's
# signature (inspect.signature: a third of the adapter's cost) and calls this:
_APPLY = super(torch.autograd.Function, Normalize).apply
_EAGER = super(torch.autograd.Function, Eager).apply
