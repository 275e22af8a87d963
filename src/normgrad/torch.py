r"""PyTorch adapter: `normalize` (on `_torch_ops`) and `MeanVarNorm` as an `nn.Module`.

Both run normgrad's op: CPU float32/float64 tensors on the NumPy kernels through zero-copy
views (their parallel jobs on torch's own OpenMP threads, `kernels/_team.py`), other devices
in torch ops (`_torch_ops.py` says which and how):

$$ y = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}}\,w + b, \qquad
   dx = r\,(g - \bar g) - \frac{c}{m}\,\hat x \sum g\,\hat x,\quad g = dy\,w $$

Under grad mode the backward is that derivation written in torch ops, so it is itself
differentiable (double backward, `gradgradcheck`, Hessian-vector products); `torch.compile`
(`fullgraph=True`) and `torch.func` transforms work. Install with `normgrad[torch]`;
`import normgrad` alone never imports torch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from . import _torch_masked, _torch_ops
from ._axes import Axes, normalize_axes
from ._errors import NormgradError
from ._moments import Moments
from ._ops import normalize_forward
from ._validate import EPS_MODES, _check_center, check_nan_policy

__all__ = ["MeanVarNorm", "gradcheck", "normalize"]


def normalize(
    x: torch.Tensor,
    axes: Axes = None,
    *,
    eps: float = 1e-5,
    eps_mode: str = "inside",
    ddof: float = 0,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    center: bool = True,
    stats: Moments | None = None,
    mask: torch.Tensor | None = None,
    nan_policy: str = "propagate",
) -> torch.Tensor:
    r"""Differentiable `normgrad.normalize` for torch tensors (CPU or CUDA).

    $$ y = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}}\,w + b $$

    over `axes` (all axes when `None`). Gradients flow to `x`, `weight` and `bias`; the
    backward is differentiable again (`create_graph=True`). On CPU the statistics are
    computed in float64 whatever the input dtype; the result has the input's dtype
    (float64 for integers). Works under `torch.compile` and `torch.func` transforms.

    `center=False` is RMS normalization, $y = x / \sqrt{\overline{x^2} + \epsilon}\,w + b$
    over any axes (`F.rms_norm` where its trailing axes apply; `ddof` must be 0), on the
    same paths.

    `stats`: given `Moments` (`normgrad.moments` of training data, NumPy or torch arrays)
    to normalize with (inference), $\sigma^2$ = `stats.var(ddof)`. y is then affine in x
    with constant statistics: it runs in torch ops (the generic path), which autograd and
    `torch.func` differentiate themselves; no gradient flows into the statistics.

    `mask` (boolean, broadcastable to x) and `nan_policy` as in `normgrad.normalize`:
    masked calls (`mask=`, `nan_policy="omit"`) run the generic path in torch ops (an
    `autograd.Function` whose backward and forward mode are normgrad's masked derivation,
    differentiable again, with a `torch.func.vmap` rule; under `torch.compile` the custom
    ops `normgrad::masked_forward` / `masked_backward`).
    """
    if not isinstance(x, torch.Tensor):
        raise NormgradError(
            f"normgrad.torch.normalize needs a torch.Tensor; got {type(x).__name__}. "
            "Use torch.as_tensor(x), or normgrad.normalize for NumPy/JAX/Dask arrays."
        )
    if stats is not None:
        options = (eps, eps_mode, ddof, center, mask, nan_policy)
        return _with_statistics(x, axes, options, (weight, bias), stats)
    if mask is not None or nan_policy != "propagate":
        policy = check_nan_policy(nan_policy)
        return _torch_masked.normalize_masked(
            x, axes, (eps, eps_mode, ddof), (weight, bias), (mask, policy), center=center
        )
    return _torch_ops.normalize(x, axes, (eps, eps_mode, ddof), (weight, bias), center=center)


def _with_statistics(
    x: torch.Tensor, axes: Axes, options: tuple[Any, ...], params: Any, stats: Any
) -> torch.Tensor:
    """`normgrad.normalize(x, stats=...)` in torch ops, the statistics as detached tensors
    on x's device; `options = (eps, eps_mode, ddof, center, mask, nan_policy)` (normgrad's
    validation names what is wrong: a bad `stats`, a mask with stats, center=False)."""
    fields = ("count", "mean", "m2")
    if all(hasattr(stats, f) for f in fields):
        stats = Moments(*(torch.as_tensor(getattr(stats, f), device=x.device).detach()
                          for f in fields))  # fmt: skip
    eps, eps_mode, ddof, center, mask, nan_policy = options
    return normalize_forward(
        x, axes, eps=eps, eps_mode=eps_mode, ddof=ddof, weight=params[0], bias=params[1],
        center=center, stats=stats, mask=mask, nan_policy=nan_policy,
    )[0]  # fmt: skip


def _update_running_stats(
    x: torch.Tensor,
    mask: torch.Tensor | None,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    num_batches_tracked: torch.Tensor,
    axes: list[int],
    momentum: float | None,
    nan_policy: str,
) -> None:
    r"""BatchNorm's update of the running statistics from a batch's `normgrad.moments`
    (float64 on CPU): $s \leftarrow (1-f)\,s + f\,s_{batch}$ with the unbiased batch variance
    and $f$ = momentum, or $1/\text{num\_batches\_tracked}$ for None."""
    from ._moments import moments

    with torch.no_grad():
        st = moments(x, tuple(axes), mask=mask, nan_policy=nan_policy)
        if st.mean.numel() != running_mean.numel():
            raise NormgradError(
                f"track_running_stats keeps one value per group, shape "
                f"{tuple(running_mean.shape)}; this input (shape {tuple(x.shape)}, axes "
                f"{tuple(axes)}) has {st.mean.numel()} groups. Use param_shape with one entry "
                "per group, e.g. (C, 1, 1) with axes=(0, 2, 3)."
            )
        fewest = int(st.count.min())
        if fewest < 2:
            raise NormgradError(
                "track_running_stats needs more than one counted element per group in "
                f"training (the running variance is unbiased); got input shape "
                f"{tuple(x.shape)}, at least {fewest} counted in a group."
            )
        num_batches_tracked.add_(1)
        f = 1.0 / float(num_batches_tracked) if momentum is None else momentum
        for buf, new in ((running_mean, st.mean), (running_var, st.var(1))):
            buf.mul_(1 - f).add_(f * new.reshape(buf.shape).to(buf.dtype))


# torch.compile keeps this one op in its graph (the checks above look at data, which Dynamo
# cannot guard on); eager calls run the function itself, without the op's dispatch.
_UPDATE_RUNNING_STATS_OP = torch.library.custom_op(
    "normgrad::update_running_stats",
    _update_running_stats,
    mutates_args=("running_mean", "running_var", "num_batches_tracked"),
)


class MeanVarNorm(nn.Module):
    r"""Mean-variance normalization over `axes` with a learnable per-element affine map.

    $$ y = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}}\,w + b $$

    `weight` (init 1) and `bias` (init 0) have shape `param_shape` and broadcast against the
    input: `MeanVarNorm(D)` with `axes=-1` is a layer norm over the last axis,
    `MeanVarNorm((C, 1, 1), axes=(0, 2, 3))` a batch norm without running statistics,
    `MeanVarNorm((C, 1, 1), axes=(2, 3))` an instance norm with affine.
    `center=False` normalizes by the root mean square instead (no mean):
    `MeanVarNorm(D, center=False, bias=False)` is `torch.nn.RMSNorm(D)` (the same
    parameters, so it loads its state dict), over any `axes`. `bias=False` drops the bias
    (as `nn.LayerNorm(bias=False)`).

    `track_running_stats=True` keeps `running_mean` and `running_var` (shape `param_shape`,
    one value per group, as BatchNorm's) and `num_batches_tracked`, updated in training
    exactly as `torch.nn.BatchNorm2d` does: $s \leftarrow (1-\text{momentum})\,s +
    \text{momentum}\,s_{batch}$ with the unbiased batch variance ($\text{momentum}=$ None:
    the cumulative average, factor $1/\text{num\_batches\_tracked}$). In `eval()` the
    module normalizes with them, as constants for the gradient.

    `forward(x, mask=None)`: a boolean mask (broadcastable to x) of the elements that count,
    and `nan_policy` as in `normgrad.normalize`; the running statistics then come from the
    counted elements only (their unbiased variance).
    """

    def __init__(
        self,
        param_shape: int | tuple[int, ...],
        axes: Axes = -1,
        *,
        eps: float = 1e-5,
        eps_mode: str = "inside",
        ddof: float = 0,
        elementwise_affine: bool = True,
        bias: bool = True,
        center: bool = True,
        track_running_stats: bool = False,
        momentum: float | None = 0.1,
        nan_policy: str = "propagate",
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        self.nan_policy = check_nan_policy(nan_policy)
        shape = (param_shape,) if isinstance(param_shape, int) else tuple(param_shape)
        if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in shape):
            raise NormgradError(
                f"param_shape must be a positive int or a tuple of positive ints (the shape "
                f"of weight and bias, e.g. (D,) or (C, 1, 1)); got {param_shape!r}."
            )
        if eps_mode not in EPS_MODES:
            raise NormgradError(f"eps_mode must be 'inside' or 'outside'; got {eps_mode!r}.")
        _check_center(center, ddof)
        if not center and track_running_stats:
            raise NormgradError(
                "track_running_stats with center=False: the running statistics are a mean and "
                "a variance (BatchNorm's), which RMS normalization does not use; drop "
                "track_running_stats or use center=True."
            )
        self.center = center
        self.param_shape = shape
        self.axes = axes
        self.eps = eps
        self.eps_mode = eps_mode
        self.ddof = ddof
        self.elementwise_affine = elementwise_affine
        self.weight: nn.Parameter | None
        self.bias: nn.Parameter | None
        if elementwise_affine:
            kw = {"device": device, "dtype": dtype}
            self.weight = nn.Parameter(torch.ones(shape, **kw))
            if bias:
                self.bias = nn.Parameter(torch.zeros(shape, **kw))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self._init_running_stats(track_running_stats, momentum, device, dtype)

    def _init_running_stats(
        self, track: bool, momentum: float | None, device: Any, dtype: Any
    ) -> None:
        if momentum is not None and not (
            isinstance(momentum, (int, float)) and not isinstance(momentum, bool)
            and 0 <= momentum <= 1
        ):  # fmt: skip
            raise NormgradError(
                f"momentum must be a number in [0, 1] (the weight of each new batch) or None "
                f"(a cumulative average); got {momentum!r}."
            )
        self.track_running_stats = bool(track)
        self.momentum = momentum
        self.running_mean: torch.Tensor | None
        self.running_var: torch.Tensor | None
        self.num_batches_tracked: torch.Tensor | None
        if not track:
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                self.register_buffer(name, None)
            return
        kw = {"device": device, "dtype": dtype}
        self.register_buffer("running_mean", torch.zeros(self.param_shape, **kw))
        self.register_buffer("running_var", torch.ones(self.param_shape, **kw))
        self.register_buffer(
            "num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device)
        )

    def reset_running_stats(self) -> None:
        if self.running_mean is not None and self.running_var is not None:
            self.running_mean.zero_()
            self.running_var.fill_(1.0)
        if self.num_batches_tracked is not None:
            self.num_batches_tracked.zero_()

    def _update_running_stats(self, x: torch.Tensor, mask: Any) -> None:
        """BatchNorm's update (`_update_running_stats`; under torch.compile its custom op
        `normgrad::update_running_stats`)."""
        assert self.running_mean is not None and self.running_var is not None
        assert self.num_batches_tracked is not None
        if mask is not None and not isinstance(mask, torch.Tensor):
            mask = torch.as_tensor(mask, device=x.device)
        stats = (self.running_mean, self.running_var, self.num_batches_tracked)
        axes = list(normalize_axes(self.axes, x.ndim))
        compiling = torch.compiler.is_compiling()
        update = _UPDATE_RUNNING_STATS_OP if compiling else _update_running_stats
        update(x.detach(), mask, *stats, axes, self.momentum, self.nan_policy)

    def _normalize_with_running_stats(self, x: torch.Tensor) -> torch.Tensor:
        """eval(): `(x - running_mean) r w + b`, the running statistics as constants."""
        assert self.running_mean is not None and self.running_var is not None
        mean, var = self.running_mean, self.running_var
        if self.eps_mode == "inside":
            y = (x - mean) * torch.rsqrt(var + self.eps)
        else:
            y = (x - mean) / (torch.sqrt(var) + self.eps)
        if self.weight is not None:
            y = y * self.weight
        if self.bias is not None:
            y = y + self.bias
        return y

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.track_running_stats:
            if not self.training:
                return self._normalize_with_running_stats(x)
            self._update_running_stats(x, mask)
        return normalize(
            x, self.axes, eps=self.eps, eps_mode=self.eps_mode, ddof=self.ddof,
            weight=self.weight, bias=self.bias, center=self.center, mask=mask,
            nan_policy=self.nan_policy,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return (
            f"{self.param_shape}, axes={self.axes}, eps={self.eps}, eps_mode={self.eps_mode!r}, "
            f"ddof={self.ddof}, elementwise_affine={self.elementwise_affine}, "
            f"center={self.center}, "
            f"track_running_stats={self.track_running_stats}, momentum={self.momentum}, "
            f"nan_policy={self.nan_policy!r}"
        )


# --- gradcheck (checker) ---


def gradcheck(
    fn: Any,
    inputs: Any,
    *,
    rtol: float | None = None,
    atol: float | None = None,
    raise_exception: bool = True,
    seed: int = 0,
) -> bool:
    """`torch.autograd.gradcheck`'s drop-in: True, or `AssertionError` with normgrad's diagnosis.

    `fn(*inputs)` returns one tensor; as in torch, only the inputs that require grad are checked
    (the others are held fixed). Finite differences run in float64 on copies, so float32 inputs
    are fine. With `raise_exception=False` a failed check returns False.
    """
    from .check import check_gradients

    args = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    free = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.requires_grad]
    if not free:
        raise NormgradError(
            "gradcheck: no input requires grad, so there is nothing to check; set "
            "requires_grad=True on the tensors to check (or use normgrad.check_gradients, which "
            "checks every floating-point input)."
        )

    def of_free(*ts: torch.Tensor) -> Any:
        full = list(args)
        for i, t in zip(free, ts, strict=True):
            full[i] = t
        return fn(*full)

    x = tuple(args[i].detach() for i in free)
    report = check_gradients(of_free, x[0] if len(x) == 1 else x, rtol=rtol, atol=atol, seed=seed)
    if not report.ok and raise_exception:
        raise AssertionError(str(report))
    return bool(report.ok)
