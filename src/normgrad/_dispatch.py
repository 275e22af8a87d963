"""Which code runs: every rule of it, in one place.

`forward` and `backward` take a call as the user made it and return the validated call with
a `Plan` that names its path and carries what that path needs:

    small    one single-threaded kernel call (C-contiguous NumPy input, no affine
             parameters, up to `settings.small_max_size` elements)
    native   the same layouts above that size: one native job on the thread pool
             (`kernels/_native.py`), no Python on the workers; groups innermost in
             memory (batch norm over (N, F) or NHWC: the column kernels go along rows)
             at every size above it
    blocked  the group kernels on the pool, through Python jobs: any strides, affine
             parameters, from `settings.kernel_min_size` elements
    sweep    batch-norm layouts (several runs per group, per-group parameters), swept in
             memory order (strided input: a channels-last tensor); also planned
             batch-norm calls of `settings.sweep_min_bytes` whose groups are not innermost
    generic  the Array-API formulas (`_generic.py`): every other array, dtype or layout,
             and given statistics (`stats=`)

RMS normalization (`center=False`) takes the paths by the same rules (`Plan.op` carries
`center` to the kernels). A masked call (`mask=`, `nan_policy="omit"`) takes the masked
group kernels ("small" on one thread, or "blocked" on the pool, where a few large groups,
such as a whole tensor, split into chunks as unmasked ones do) at every size, the generic
path where they cannot take it (`_masked`); NumPy masked calls without `out=` are planned
once per signature (`_planned_masked`).

`use_kernels(mode)` changes the choice inside a block: `False`/`"0"`/`"generic"` never a
kernel, `True`/`"1"` a kernel at every size, `"auto"` the rules above, or a path name to use
that path wherever it can take the call (the generic path elsewhere). `plan_forward` and
`plan_backward` tell which path a call takes, and why.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import numpy as np

from . import _runtime
from ._axes import Axes
from ._validate import Spec, check_out, count_mask, validate


class Plan(NamedTuple):
    """The path a call takes (`path`, one of "small", "native", "blocked", "sweep",
    "generic"), why (`reason`), and what the path needs: the kernels' `layout`, the block
    `views` (blocked and sweep: x, weight, bias and output views; masked: and the mask's),
    the op's scalars `op` (eps, eps inside, m, center; masked: ddof for m), `threads`
    (chunks per group or row chunks, threads) and, for a masked call, `mask`."""

    path: str
    reason: str
    layout: Any = None
    views: Any = None
    op: tuple[Any, ...] = ()
    threads: tuple[int, int] = (1, 1)
    mask: Any = None  # a masked call: the counted elements, a boolean array of x's shape


KERNEL_OFF = ("0", "generic")
VARIANT_REASON = "given statistics (stats=) run on the generic path"
MASK_REASON = "a mask (mask=, nan_policy='omit') runs on the generic path"
MASK_KERNEL_REASON = "a mask (mask=, nan_policy='omit') on the masked group kernels"
_PLANNED_MODES = ("auto", "1", "small", "native")


@contextmanager
def use_kernels(mode: bool | str = True) -> Iterator[None]:
    """Choose, inside a `with` block, which code NumPy float32/float64 inputs run on:
    `True`/`"1"` the fused kernels at every size, `False`/`"0"`/`"generic"` never (the
    generic Array-API path), `"auto"` (the default) the kernels where they are faster, or a
    path name (`"small"`, `"native"`, `"blocked"`, `"sweep"`) to use that path wherever it
    can take the call and the generic path elsewhere.

    Without it, the environment variable `NORMGRAD_KERNELS` (any of these values), read at
    the first call that needs it, decides. Every path gives the same results within a few
    ulp; `plan_forward` tells which one a call takes.
    """
    named = "1" if mode is True else "0" if mode is False else mode
    token = _runtime.MODE.set(_runtime.check_mode(named, "mode"))
    try:
        yield
    finally:
        _runtime.MODE.reset(token)


def plan_forward(
    x: Any,
    axes: Axes = None,
    *,
    eps: float = 1e-5,
    eps_mode: str = "inside",
    ddof: float = 0,
    weight: Any = None,
    bias: Any = None,
    out: Any = None,
    center: bool = True,
    mask: Any = None,
    nan_policy: str = "propagate",
) -> Plan:
    """The `Plan` that `normalize_forward` with these arguments runs: its path and why."""
    masked = (mask, nan_policy == "omit") if mask is not None or nan_policy == "omit" else None
    return forward(x, axes, eps, eps_mode, ddof, weight, bias, out, (center, False, masked))[3]


def plan_backward(ctx: Any, dy: Any, *, out: Any = None) -> Plan:
    """The `Plan` that `normalize_backward(ctx, dy, out=out)` runs: its path and why."""
    from ._validate import cotangent

    return backward(ctx, cotangent(ctx.xp, ctx.x, dy, "dy"), out)


# --- forward -------------------------------------------------------------------------------------


def forward(
    x: Any,
    axes: Axes,
    eps: Any,
    eps_mode: Any,
    ddof: Any,
    weight: Any,
    bias: Any,
    out: Any,
    variant: tuple[Any, bool, Any] = (True, False, None),
) -> tuple[Spec, Any, Any, Plan]:
    """Validate a forward call and choose its path: `(spec, weight, bias, plan)`.
    `variant = (center, stats given, mask)`: RMS (center False) takes the paths center=True
    does; `mask` is None or `(mask, omit NaN)`, and a masked plan carries the counted
    elements (`Plan.mask`)."""
    center, fixed, masked = variant
    if masked is not None and out is None and type(x) is np.ndarray and type(center) is bool:
        if _plain(weight) and _plain(bias):
            hit = _planned_masked(x, axes, (eps, eps_mode, ddof, center), (weight, bias), masked)
            if hit is not None:
                return hit[0], weight, bias, hit[1]
    if fixed or masked is not None:  # given statistics or a mask
        spec, w, b = validate(x, axes, eps, eps_mode, ddof, weight, bias, center)
        check_out(spec.xp, out, x, spec.dtype, x)
        if masked is None:
            return spec, w, b, Plan("generic", VARIANT_REASON)
        counted = count_mask(spec.xp, x, masked[0], masked[1])
        return spec, w, b, _masked(x, spec, (w, b), out, (counted, None))
    if type(x) is np.ndarray and type(center) is bool and _plain(weight) and _plain(bias):
        hit = _planned_forward(x, axes, (eps, eps_mode, ddof, center), (weight, bias), out)
        if hit is not None:
            return hit[0], weight, bias, hit[1]
    spec, w, b = validate(x, axes, eps, eps_mode, ddof, weight, bias, center)
    check_out(spec.xp, out, x, spec.dtype, x)
    return spec, w, b, _choose(x, spec, (w, b), out, None)


def _plain(p: Any) -> bool:
    return p is None or type(p) is np.ndarray


def _param_key(p: np.ndarray | None) -> Any:
    return None if p is None else (p.shape, p.dtype)


def _planned_forward(
    x: np.ndarray, axes: Axes, options: tuple[Any, Any, Any, bool], params: Any, out: Any
) -> tuple[Spec, Plan] | None:
    """The small and native paths' calls, validated and planned once per call signature
    (the small calls' budget is microseconds); `out` is checked on every call. None where
    another path (or the general validation) takes the call. `options = (eps, eps_mode,
    ddof, center)` (center a bool), `params = (weight, bias)` (NumPy arrays or None)."""
    flags = x.flags
    if not (flags.c_contiguous and flags.aligned):  # (native jobs view aligned memory)
        return None
    mode = _runtime.kernel_mode()
    if mode not in _PLANNED_MODES:
        return None
    if type(axes) is tuple and any(type(a) is not int for a in axes):
        return None  # (True,) == (1,): keys must not mix what validation tells apart
    eps, eps_mode, ddof, center = options
    key = (x.shape, x.dtype, axes, type(axes), eps, type(eps), eps_mode, ddof, type(ddof),
           center, mode, _param_key(params[0]), _param_key(params[1]))  # fmt: skip
    planned = _runtime.STATE.planned
    try:
        entry = planned[key]
    except KeyError:
        entry = _plan_call(x, axes, options, params, mode)
        if len(planned) >= _runtime.PLANNED_MAX:
            planned.clear()
        planned[key] = entry
    except TypeError:  # unhashable axes (a list): the general path
        return None
    if entry is None:
        return None
    if out is not None:
        if not (type(out) is np.ndarray and out.flags.c_contiguous and out.flags.aligned):
            return None
        check_out(entry[0].xp, out, x, x.dtype, x)
    return entry


def _plan_call(
    x: np.ndarray, axes: Axes, options: tuple[Any, Any, Any, bool], params: Any, mode: str
) -> tuple[Spec, Plan] | None:
    """Validate (raising as the general path would) and plan a cacheable call."""
    eps, eps_mode, ddof, center = options
    spec, _, _ = validate(x, axes, eps, eps_mode, ddof, params[0], params[1], center)
    if _not_kernel_array(x) is not None or _runtime.kernels() is None:
        return None
    plan = _planned(x, spec, mode, params)
    return None if plan is None else (spec, plan)


def _planned(x: np.ndarray, spec: Spec, mode: str, params: Any) -> Plan | None:
    """The small or native plan of a C-contiguous aligned input (checked by the caller)
    whose blocks a reshape gives and whose affine parameters fit them, or None."""
    from .kernels._layout import call_plan, table

    cp = call_plan(x.shape, spec.axes, tuple(p.shape for p in params if p is not None))
    if cp is None or any(table(p, x, cp.layout, True) is None for p in params if p is not None):
        return None
    op = (spec.eps, spec.inside, spec.m, spec.center)
    settings = _runtime.STATE.settings
    small = x.size <= settings.small_max_size
    if (small and mode != "native") or mode == "small":
        return Plan("small", "a C-contiguous input whose blocks a reshape gives", cp, None, op)
    # batch-norm layouts sweep from `sweep_min_bytes`, but not those whose groups are innermost
    # in memory (Rb = 1): their native job runs the sweep's column kernels without Python
    large_sweep = cp.runs_per_group > 1 and not cp.columns and x.nbytes >= settings.sweep_min_bytes
    if mode == "native" or not large_sweep:
        why = "a C-contiguous input whose blocks a reshape gives, above the small size"
        return Plan("native", why, cp, None, op, (cp.nc, cp.threads))
    return None


def _choose(x: Any, spec: Spec, params: tuple[Any, Any], out: Any, dy: Any) -> Plan:
    """The path of a call that the planned calls did not take (forward: `dy` None)."""
    why = _not_kernel_array(x)
    if why is None and dy is not None and type(dy) is not np.ndarray:
        why = "dy is not a NumPy array"
    if why is not None:  # (before the mode: torch.compile traces this, not ContextVar.get)
        return Plan("generic", why)
    mode = _runtime.kernel_mode()
    if mode in KERNEL_OFF:
        return Plan("generic", "the kernels are switched off (use_kernels, NORMGRAD_KERNELS)")
    if _runtime.kernels() is None:
        return Plan("generic", "numba is not available")
    if mode == "auto" and x.size < _runtime.STATE.settings.kernel_min_size:
        return Plan("generic", "below kernel_min_size the generic path is as fast")
    if mode in ("small", "native"):
        why = f"the {mode} kernels take C-contiguous aligned inputs whose blocks a reshape gives"
        return Plan("generic", why)
    return _blocked(x, spec, params, out, mode)


def _blocked(x: np.ndarray, spec: Spec, params: tuple[Any, Any], out: Any, mode: str) -> Plan:
    """The blocked or sweep plan: the block layout, the parameters and the output as block
    views (the generic path where one does not fit)."""
    from .kernels import _layout

    lay = _layout.plan(x, spec.axes, params, columns=mode != "blocked")  # (masked: blocked)
    if lay is None:
        return Plan("generic", "the layout needs more than two blocks of kept or reduced axes")
    w = _layout.table(params[0], x, lay, True)
    b = _layout.table(params[1], x, lay, False)
    if w is None or b is None:
        return Plan("generic", "weight or bias varies over part of a block of merged axes")
    x4 = _layout.view4(x, lay)
    out4 = None if out is None else _layout.view4(out, lay)
    if x4 is None or (out is not None and out4 is None):
        return Plan("generic", "x or out cannot be viewed as blocks without a copy")
    views = (x4, w, b, out4)
    op = (spec.eps, spec.inside, spec.m, spec.center)
    per_group = lay.shape4[1] > 1 and not any(p.varies[1] or p.varies[3] for p in (w, b))
    if per_group and mode != "blocked":
        why = "several runs per group with per-group parameters (batch norm)"
        return Plan("sweep", why, lay, views, op, _layout.sweep_threads(lay.shape4))
    if mode == "sweep":
        return Plan("generic", "the sweep kernels take batch-norm layouts only")
    threads = _layout.threads_for(lay.groups, lay.group_size)
    return Plan("blocked", "the group kernels on the thread pool", lay, views, op, threads)


def _masked(x: Any, spec: Spec, params: tuple[Any, Any], out: Any, arrays: Any) -> Plan:
    """The plan of a masked call (`arrays = (counted elements, dy or None)`): the masked
    group kernels ("small" on one thread up to `small_max_size` elements, "blocked" on the
    pool, `threads` as `_layout.threads_for`: a few large groups split) at every size,
    since the generic path's masked formulas are slower everywhere; the generic path where
    they cannot take the call."""
    mask, dy = arrays
    why = _not_kernel_array(x)
    if why is None and dy is not None and type(dy) is not np.ndarray:
        why = "dy is not a NumPy array"
    mode = _runtime.kernel_mode() if why is None else "0"
    if why is None and (mode in KERNEL_OFF or mode in ("native", "sweep")):
        why = f"{MASK_REASON} with use_kernels({mode!r})"
    if why is None and _runtime.kernels() is None:
        why = "numba is not available"
    plan = _blocked(x, spec, params, out, "blocked") if why is None else Plan("generic", why)
    if plan.path == "generic":
        return plan._replace(reason=f"{plan.reason} ({MASK_REASON})", mask=mask)
    from .kernels import _layout

    lay = plan.layout
    small_size = x.size <= _runtime.STATE.settings.small_max_size
    small = mode == "small" or (mode != "blocked" and small_size)
    # large groups split into chunks (`_layout.threads_for`: a whole tensor on every thread)
    threads = (1, 1) if small else _layout.threads_for(lay.groups, lay.group_size)
    op = (spec.eps, spec.inside, float(spec.ddof), spec.center)
    views = (*plan.views, _mask_view(mask, lay))
    path = "small" if small else "blocked"
    return Plan(path, MASK_KERNEL_REASON, lay, views, op, threads, mask)


def _strided_key(p: np.ndarray | None) -> Any:
    return None if p is None else (p.shape, p.strides, p.dtype)


def _planned_masked(
    x: np.ndarray, axes: Axes, options: tuple[Any, Any, Any, bool], params: Any, masked: Any
) -> tuple[Spec, Plan] | None:
    """A masked NumPy call without `out=`, validated and planned once per call signature, as
    `_planned_forward` does: the key holds the mask's shape, strides and dtype (never its
    values, which no part of the plan depends on), and each call builds only the block views
    of its own arrays. None where the mask is not a NumPy array, or the call takes the
    generic path (the general route then runs, and raises where it should)."""
    mask, omit = masked
    if mask is not None and type(mask) is not np.ndarray:
        return None
    if type(axes) is tuple and any(type(a) is not int for a in axes):
        return None  # (as `_planned_forward`)
    eps, eps_mode, ddof, center = options
    mkey = None if mask is None else (mask.shape, mask.strides, mask.dtype)
    key = ("masked", x.shape, x.strides, x.dtype, axes, type(axes), eps, type(eps), eps_mode,
           ddof, type(ddof), center, _runtime.kernel_mode(), _strided_key(params[0]),
           _strided_key(params[1]), mkey, omit)  # fmt: skip
    planned = _runtime.STATE.planned
    try:
        entry = planned[key]
    except KeyError:
        entry = _plan_masked(x, axes, options, params, masked)
        if len(planned) >= _runtime.PLANNED_MAX:
            planned.clear()
        planned[key] = entry
    except TypeError:  # unhashable axes (a list): the general path
        return None
    if entry is None:
        return None
    counted = mask if mask is not None and mask.shape == x.shape else None
    if counted is None and mask is not None:
        counted = np.broadcast_to(mask, x.shape)
    if omit:
        present = ~np.isnan(x)
        counted = present if counted is None else counted & present
    assert counted is not None  # (a masked call has a mask, or omits NaN)
    return entry[0], _masked_views(x, entry[1], params, counted)


def _plan_masked(
    x: np.ndarray, axes: Axes, options: tuple[Any, Any, Any, bool], params: Any, masked: Any
) -> tuple[Spec, Plan] | None:
    """Validate (raising as the general path would) and plan a cacheable masked call: the
    plan without its arrays, or None for the generic path."""
    eps, eps_mode, ddof, center = options
    spec, w, b = validate(x, axes, eps, eps_mode, ddof, params[0], params[1], center)
    counted = count_mask(spec.xp, x, masked[0], masked[1])
    plan = _masked(x, spec, (w, b), None, (counted, None))
    if plan.path == "generic":
        return None
    return spec, plan._replace(views=None, mask=None)


def _masked_views(x: np.ndarray, plan: Plan, params: Any, counted: np.ndarray) -> Plan:
    """A cached masked plan with this call's block views and counted elements."""
    from .kernels import _layout

    lay = plan.layout
    w = _layout.table(params[0], x, lay, True)
    b = _layout.table(params[1], x, lay, False)
    views = (_layout.view4(x, lay), w, b, None, _mask_view(counted, lay))
    return plan._replace(views=views, mask=counted)


def _mask_view(mask: np.ndarray, lay: Any) -> np.ndarray:
    """The counted elements as a C-contiguous block view: the mask's own memory where it
    is one, else a copy in x's memory order (a broadcast mask's zero strides, or any strided
    mask, keep the kernels' loops from vectorizing, and cost more than the byte per element
    of the copy)."""
    from .kernels import _layout

    m4 = _layout.view4(mask, lay)
    if m4 is None or not m4.flags.c_contiguous:
        buf = np.empty(lay.new_shape, np.bool_).transpose(lay.new_perm)
        buf[...] = mask
        m4 = _layout.view4(buf, lay)
    assert m4 is not None  # (x's memory order merges into its blocks)
    return m4


def _not_kernel_array(x: Any) -> str | None:
    """Why `x` is not for the kernels (None if it is)."""
    if type(x) is not np.ndarray or x.dtype.char not in "fd" or not x.dtype.isnative:
        return "x is not a NumPy float32/float64 array in native byte order"
    return None


# --- backward ------------------------------------------------------------------------------------


def backward(ctx: Any, dy: Any, out: Any) -> Plan:
    """The path of `normalize_backward(ctx, dy, out=out)` (arguments checked)."""
    x = ctx.x
    if ctx.mask is not None:
        saved = ctx.planned  # the forward's masked plan, where nothing it fixed has changed
        if saved is not None and out is None and type(dy) is np.ndarray:
            if saved[0] == _runtime.kernel_mode():
                return saved[1]
        return _masked(x, _spec_of(ctx), (ctx.weight, ctx.bias), out, (ctx.mask, dy))
    if ctx.fixed:
        return Plan("generic", VARIANT_REASON)
    if type(x) is np.ndarray and _plain(ctx.weight) and _plain(ctx.bias):
        plan = _planned_backward(ctx, dy, out)
        if plan is not None:
            return plan
    spec = _spec_of(ctx)
    return _choose(x, spec, (ctx.weight, ctx.bias), out, dy)


def _planned_backward(ctx: Any, dy: Any, out: Any) -> Plan | None:
    """The small or native backward: C-contiguous aligned x, dy (float32/float64) and out;
    native jobs also need dy in x's dtype."""
    x = ctx.x
    if type(dy) is not np.ndarray or _not_kernel_array(x) is not None:
        return None
    xf, df = x.flags, dy.flags  # (each `.flags` makes an object: read them once)
    if not (xf.c_contiguous and xf.aligned and df.c_contiguous and df.aligned):
        return None
    if dy.dtype.char not in "fd" or not dy.dtype.isnative:
        return None
    if out is not None and not (out.flags.c_contiguous and out.flags.aligned):
        return None
    mode = _runtime.kernel_mode()
    if mode not in _PLANNED_MODES:
        return None
    params = (ctx.weight, ctx.bias)
    key = ("backward", x.shape, x.dtype, ctx.axes, ctx.eps, ctx.eps_mode, ctx.ddof, ctx.center,
           mode, _param_key(params[0]), _param_key(params[1]))  # fmt: skip
    planned = _runtime.STATE.planned
    try:
        plan = planned[key]
    except KeyError:
        kernels = _runtime.kernels() is not None
        plan = _planned(x, _spec_of(ctx), mode, params) if kernels else None
        if len(planned) >= _runtime.PLANNED_MAX:
            planned.clear()
        planned[key] = plan
    if plan is None or ctx.mean.shape != plan.layout.stats[1:]:
        return None
    if plan.path == "native" and dy.dtype != x.dtype:
        return None  # (native jobs are compiled for one dtype): the blocked kernels
    return plan


def _spec_of(ctx: Any) -> Spec:
    m = float(ctx.group_size - ctx.ddof)
    inside = ctx.eps_mode == "inside"
    return Spec(
        ctx.xp, ctx.axes, ctx.group_size, ctx.eps, ctx.eps_mode, ctx.ddof, ctx.dtype, m, inside,
        ctx.center,
    )  # fmt: skip
