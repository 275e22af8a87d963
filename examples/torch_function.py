"""A custom `torch.autograd.Function` checked as it is: the problem's chain-rule backward
(wrong) and the corrected one (right).

    python examples/torch_function.py
    normgrad check --forward examples/torch_function.py:wrong --shape 6x6   # names the mistake
    normgrad check --forward examples/torch_function.py:right --shape 6x6   # passes
"""

from __future__ import annotations

import torch

EPS = 1e-5


def _stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = x.mean()
    return mean, torch.sqrt(((x - mean) ** 2).mean() + EPS)


class ChainRule(torch.autograd.Function):
    """Whole-tensor normalization with the problem's backward: only the diagonal path
    dy/dx_i (through x_i itself and through its own share of the variance)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor) -> torch.Tensor:
        mean, s = _stats(x)
        ctx.save_for_backward(x)
        return (x - mean) / s

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, dy: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors  # type: ignore[attr-defined]
        mean, s = _stats(x)
        n = x.numel()
        return dy * (1 / s - 0.5 * (x - mean) / s**3 * 2 * (x - mean) / n)


class Corrected(torch.autograd.Function):
    """The same forward; dx = (dy - mean(dy) - y mean(dy y)) / s."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor) -> torch.Tensor:
        mean, s = _stats(x)
        y = (x - mean) / s
        ctx.save_for_backward(y, s)
        return y

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, dy: torch.Tensor) -> torch.Tensor:
        y, s = ctx.saved_tensors  # type: ignore[attr-defined]
        return (dy - dy.mean() - y * (dy * y).mean()) / s


wrong = ChainRule.apply
right = Corrected.apply

if __name__ == "__main__":
    from normgrad.check import check_gradients

    x = torch.randn(6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for name, fn in (("wrong", wrong), ("right", right)):
        report = check_gradients(fn, x)
        print(f"{name}: ok={report.ok}, findings: {[f.kind for f in report.diagnosis]}")
