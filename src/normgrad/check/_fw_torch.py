"""torch callables for the checker: see `_frameworks`. Imported only when torch is in use."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .._errors import NormgradError
from ._frameworks import (
    Converted,
    arg_names,
    as_leaf,
    pack,
    refuse_structured,
    reject_complex,
    require_deterministic,
    unpack,
)

_EVAL_HINT = "Call module.eval() before checking it, or fix the seed inside f (torch.manual_seed)."


def convert(f: Any, x: Any) -> Converted:
    args = list(x) if isinstance(x, tuple) else [x]
    names = arg_names(f, len(args))
    leaves = [as_leaf(a, n, torch.is_tensor) for a, n in zip(args, names, strict=True)]
    k = len(leaves)
    notes: list[str] = []
    if isinstance(f, torch.nn.Module):
        _refuse_train_dropout(f)
        params = dict(f.named_parameters())
        for pname, p in params.items():
            leaves.append(as_leaf(p, pname, torch.is_tensor))
        names += list(params)
        call = _module_call(f, k, list(params))
    else:
        call = f

    def run(arrays: tuple[Any, ...], grad: bool) -> tuple[list[torch.Tensor], torch.Tensor]:
        reject_complex(arrays)
        ts = [torch.tensor(np.asarray(a)).requires_grad_(grad) for a in arrays]
        out = call(*ts)
        refuse_structured(out, "f")
        if not torch.is_tensor(out):
            raise NormgradError(f"f must return a tensor; got {type(out).__name__}.")
        return ts, out

    def fn(*arrays: Any) -> np.ndarray:
        with torch.no_grad():
            return _np(run(arrays, False)[1])

    def vjp(*args: Any) -> Any:
        *arrays, dy = args
        ts, out = run(tuple(arrays), True)
        cot = torch.tensor(np.asarray(dy), dtype=out.dtype).reshape(out.shape)
        gs = torch.autograd.grad(out, ts, cot, allow_unused=True)
        return unpack(
            [_np(g) if g is not None else np.zeros_like(a) for g, a in zip(gs, arrays, strict=True)]
        )

    def jvp(*args: Any) -> np.ndarray:
        n = len(args) // 2
        reject_complex(args)
        prim = tuple(torch.tensor(np.asarray(a)) for a in args[:n])
        tan = tuple(
            torch.tensor(np.asarray(t), dtype=p.dtype) for p, t in zip(prim, args[n:], strict=True)
        )
        return _np(torch.func.jvp(call, prim, tan)[1])

    require_deterministic(fn, leaves, _EVAL_HINT)
    has_jvp = _try(jvp, *leaves, *[np.zeros_like(a) for a in leaves])
    if not has_jvp:
        notes.append("f does not support forward-mode AD (torch.func.jvp), so no jvp is checked.")
    return Converted(fn, pack(leaves), vjp, jvp if has_jvp else None, names, "torch", notes)


def _module_call(module: torch.nn.Module, k: int, pnames: list[str]) -> Any:
    """The module as a function of (inputs..., parameters...); buffers stay the module's."""

    def call(*ts: torch.Tensor) -> Any:
        params = dict(zip(pnames, ts[k:], strict=True))
        return torch.func.functional_call(module, params, tuple(ts[:k]), strict=False)

    return call


def _refuse_train_dropout(module: torch.nn.Module) -> None:
    drop = [
        n or type(m).__name__
        for n, m in module.named_modules()
        if isinstance(m, torch.nn.modules.dropout._DropoutNd)
    ]
    if module.training and drop:
        raise NormgradError(
            f"the module is in training mode with dropout ({', '.join(drop)}): a nondeterministic "
            f"f that finite differences cannot check. {_EVAL_HINT}"
        )


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy().copy()


def _try(fn: Any, *args: Any) -> bool:
    try:
        fn(*args)
    except Exception:  # any refusal of forward mode means: no jvp to check
        return False
    return True
