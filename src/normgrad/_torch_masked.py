r"""normgrad's masked op on torch tensors (`mask=`, `nan_policy="omit"`): the generic path in
torch ops, on any device.

$$ \mu = \frac{\sum M x}{n_M}, \quad \sigma^2 = \frac{\sum M (x - \mu)^2}{n_M - \text{ddof}},
   \quad y = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}}\,w + b $$

(M the mask of counted elements, $n_M$ their number per group; derived in docs/derivation.md.)
Two entry points run the same functions (`normgrad.normalize_forward` and
`normalize_backward` with `mask=`):

- eager calls, `torch.func` transforms and forward-mode AD go through `MaskedNormalize`, an
  `autograd.Function` with `backward`, `jvp` and `vmap`;
- `torch.compile` goes through the custom ops `normgrad::masked_forward` and
  `normgrad::masked_backward` (`register_fake`, `register_autograd`), which Dynamo keeps in
  its graph (it cannot trace a Function with a custom `jvp`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from ._axes import Axes, normalize_axes
from ._ops import normalize_backward, normalize_forward, normalize_jvp
from ._torch_ops import (
    check_call,
    fake_gradients,
    fold_batch,
    normalize,
    or_empty,
    result_dtype,
)
from ._validate import refuse_nan

Tensor = torch.Tensor


class MaskedCall(NamedTuple):
    """A masked call's options (`mask=` or `nan_policy="omit"`), axes sorted non-negative."""

    axes: tuple[int, ...]
    eps: float
    eps_mode: str
    ddof: float
    nan_policy: str
    center: bool = True


def normalize_masked(
    x: Tensor,
    axes: Axes,
    options: tuple[Any, Any, Any],
    params: Any,
    counted: tuple[Any, str],
    center: bool = True,
) -> Tensor:
    """`normgrad.torch.normalize` with `counted = (mask, nan_policy)`: "raise" is checked
    here (then the unmasked op runs); a mask or "omit" runs the custom op under
    torch.compile and `MaskedNormalize` otherwise."""
    mask, policy = counted
    if policy == "raise":
        refuse_nan(x)
        policy = "propagate"
    if mask is None and policy == "propagate":
        return normalize(x, axes, options, params, center)
    if mask is not None and not isinstance(mask, torch.Tensor):
        mask = torch.as_tensor(mask, device=x.device)
    w, b = params
    if torch.compiler.is_compiling():
        c = check_call(x, axes, options, params, center)
        return masked_forward_op(
            x, w, b, mask, list(c.axes), c.eps, c.eps_mode, c.ddof, policy, c.center
        )
    call = MaskedCall(normalize_axes(axes, x.ndim), *options, policy, center)
    return MaskedNormalize.apply(x, w, b, mask, call)


def _forward(x: Tensor, w: Any, b: Any, mask: Any, call: MaskedCall) -> Any:
    axes, eps, mode, ddof, policy, center = call
    return normalize_forward(
        x, axes, eps=eps, eps_mode=mode, ddof=ddof, weight=w, bias=b, mask=mask,
        nan_policy=policy, center=center,
    )  # fmt: skip


def _backward(x: Tensor, params: Any, mask: Any, dy: Tensor, call: MaskedCall) -> Any:
    """`(dx, dweight, dbias)`, the statistics computed again from x (in torch ops: under grad
    mode the result is differentiable again, for a double backward)."""
    nctx = _forward(x, params[0], params[1], mask, call)[1]
    return normalize_backward(nctx, dy)


class MaskedNormalize(torch.autograd.Function):
    """A masked call, differentiable in every mode: `normalize_backward` for the gradient,
    `normalize_jvp` for forward mode, a batching rule for `torch.func.vmap`."""

    @staticmethod
    def forward(x: Tensor, w: Any, b: Any, mask: Any, call: MaskedCall) -> Any:
        return _forward(x, w, b, mask, call)[0]

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        x, w, b, mask, call = inputs
        ctx.save_for_backward(x, w, b, mask)
        ctx.save_for_forward(x, w, b, mask)
        ctx.call = call

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> Any:
        x, w, b, mask = ctx.saved_tensors
        return (*_backward(x, (w, b), mask, dy, ctx.call), None, None)

    @staticmethod
    def jvp(ctx: Any, tx: Any, tw: Any, tb: Any, _tmask: Any, _call: Any) -> Any:
        x, w, b, mask = ctx.saved_tensors
        axes, eps, mode, ddof, policy, center = ctx.call
        tx = torch.zeros_like(x) if tx is None else tx
        return normalize_jvp(
            x, tx, axes, eps=eps, eps_mode=mode, ddof=ddof, weight=w, bias=b, tweight=tw,
            tbias=tb, mask=mask, nan_policy=policy, center=center,
        )[1]  # fmt: skip

    @staticmethod
    def vmap(
        info: Any, in_dims: tuple[Any, ...], x: Tensor, w: Any, b: Any, mask: Any, call: Any
    ) -> Any:
        """One call over `(B, *shape)`, as `Normalize.vmap` (an unbatched mask broadcasts)."""
        xb, wb, bb, call = fold_batch(info.batch_size, in_dims, (x, w, b), call)
        if mask is not None and in_dims[3] is not None:
            mask = mask.movedim(in_dims[3], 0)
            mask = mask.reshape(mask.shape[0], *([1] * (xb.ndim - mask.ndim)), *mask.shape[1:])
        return MaskedNormalize.apply(xb, wb, bb, mask, call), 0


# --- torch.compile: the custom ops ---------------------------------------------------------------


def _op_call(
    axes: list[int], eps: float, eps_mode: str, ddof: float, nan_policy: str, center: bool
) -> MaskedCall:
    return MaskedCall(tuple(axes), eps, eps_mode, ddof, nan_policy, center)


@torch.library.custom_op("normgrad::masked_forward", mutates_args=())
def masked_forward_op(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mask: Tensor | None,
    axes: list[int],
    eps: float,
    eps_mode: str,
    ddof: float,
    nan_policy: str,
    center: bool,
) -> Tensor:
    """y of a masked `normalize` (C-contiguous, as the fake says)."""
    call = _op_call(axes, eps, eps_mode, ddof, nan_policy, center)
    return _forward(x, weight, bias, mask, call)[0].contiguous()


@torch.library.custom_op("normgrad::masked_backward", mutates_args=())
def masked_backward_op(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mask: Tensor | None,
    dy: Tensor,
    axes: list[int],
    eps: float,
    eps_mode: str,
    ddof: float,
    nan_policy: str,
    center: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """`(dx, dweight, dbias)`; an absent parameter's gradient is an empty tensor."""
    call = _op_call(axes, eps, eps_mode, ddof, nan_policy, center)
    dx, dw, db = _backward(x, (weight, bias), mask, dy, call)
    return dx.contiguous(), or_empty(dw, x), or_empty(db, x)


@masked_forward_op.register_fake
def _forward_fake(x: Tensor, *_: Any) -> Tensor:
    return x.new_empty(x.shape, dtype=result_dtype(x))


@masked_backward_op.register_fake
def _backward_fake(x: Tensor, weight: Any, bias: Any, *_: Any) -> tuple[Tensor, Tensor, Tensor]:
    return fake_gradients(x, weight, bias)


def _op_setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    x, w, b, mask, *options = inputs
    ctx.save_for_backward(x, w, b, mask)
    ctx.options = options


def _op_backward(ctx: Any, dy: Tensor) -> Any:
    x, w, b, mask = ctx.saved_tensors
    dx, dw, db = masked_backward_op(x, w, b, mask, dy, *ctx.options)
    options = (None,) * len(ctx.options)
    return dx, None if w is None else dw, None if b is None else db, None, *options


masked_forward_op.register_autograd(_op_backward, setup_context=_op_setup_context)
