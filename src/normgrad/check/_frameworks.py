"""PyTorch and JAX callables as the checker's NumPy-level `f`, `vjp`, `jvp`.

`check_gradients(f, x)` with no `vjp` lands here when `f` is a torch callable (a function of
tensors, `SomeFunction.apply`, an `nn.Module`) or a JAX callable. The backward under test is
the framework's own: `torch.autograd.grad` (so a custom `autograd.Function.backward` is what
runs) or `jax.vjp` (so a `custom_vjp` rule is); the jvp is `torch.func.jvp` / `jax.jvp` where f
supports forward mode. Every floating-point leaf is an input, named:

- torch: `x` (one input) or `x[0]`, `x[1]`, ... (or the function's parameter names), and for
  an `nn.Module` its parameters by `named_parameters()` (`layer.weight`); buffers stay as they
  are.
- JAX: pytrees (dicts, tuples, lists, nested) are flattened; a leaf is named by its argument and
  its path, `params['w']`.

The checker then sees a tuple of NumPy arrays. Each call builds fresh tensors from the arrays it
is given, in their dtype: float64 copies for the finite differences, the user's dtype for the
analytic side. Nothing here imports torch or jax unless the object or the input comes from them.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

from .._errors import NormgradError

Fn = Callable[..., Any]


class Converted(NamedTuple):
    """What the checker runs: NumPy-level functions over the flat inputs `xs`, their names."""

    f: Fn
    x: Any  # one array, or a tuple of arrays
    vjp: Fn
    jvp: Fn | None
    names: list[str]
    framework: str
    notes: list[str]


def framework_of(f: Any, x: Any) -> str | None:
    """'torch', 'jax' or None, from the objects themselves (never importing either)."""
    torch, jax = sys.modules.get("torch"), sys.modules.get("jax")
    leaves = _plain_leaves(x)
    if torch is not None:
        if isinstance(f, torch.nn.Module) or any(isinstance(a, torch.Tensor) for a in leaves):
            return "torch"
        owner = getattr(f, "__self__", None)
        if isinstance(owner, type) and issubclass(owner, torch.autograd.Function):
            return "torch"
    if jax is not None:
        if any(isinstance(a, jax.Array) for a in jax.tree_util.tree_leaves(x)):
            return "jax"
        if type(f).__module__.startswith("jax"):  # jit, custom_vjp, custom_jvp objects
            return "jax"
    return _by_result(f, x, torch, jax)


def _plain_leaves(x: Any) -> list[Any]:
    if isinstance(x, (tuple, list)):
        return [leaf for a in x for leaf in _plain_leaves(a)]
    if isinstance(x, dict):
        return [leaf for a in x.values() for leaf in _plain_leaves(a)]
    return [x]


def _by_result(f: Any, x: Any, torch: Any, jax: Any) -> str | None:
    """A plain Python function: what does it return on NumPy input (or on tensors)?"""
    if torch is None and jax is None:
        return None
    args = x if isinstance(x, tuple) else (x,)
    try:
        out = f(*args)
    except Exception:
        out = None
        if torch is not None:
            try:
                out = f(*(torch.as_tensor(np.asarray(a)) for a in args))
            except Exception:
                return None
    if torch is not None and isinstance(out, torch.Tensor):
        return "torch"
    if jax is not None and isinstance(out, jax.Array):
        return "jax"
    return None


def convert(f: Any, x: Any, framework: str) -> Converted:
    if framework == "torch":
        from ._fw_torch import convert as conv
    else:
        from ._fw_jax import convert as conv
    c = conv(f, x)
    setattr(c.f, "input_names", c.names)  # noqa: B010  (read by check_gradients for Target)
    return c


def arg_names(f: Any, count: int) -> list[str]:
    """Names for f's positional arguments: its signature's, else x (one) or x[0], x[1], ..."""
    try:
        params = [
            p.name
            for p in inspect.signature(f).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
    except (TypeError, ValueError):
        params = []
    if len(params) >= count and count > 1:
        return params[:count]
    return ["x"] if count == 1 else [f"x[{i}]" for i in range(count)]


def as_leaf(a: Any, name: str, is_tensor: Callable[[Any], bool]) -> np.ndarray:
    """One input as a NumPy array; integer, complex and non-array inputs refused by name."""
    if not is_tensor(a) and not isinstance(a, (np.ndarray, np.generic, float)):
        raise NormgradError(
            f"input {name} is {type(a).__name__}, not an array or tensor. The checker checks "
            "every floating-point tensor or array input; pass the other values inside f "
            "(e.g. with functools.partial or a lambda)."
        )
    arr = np.array(a.detach().cpu().numpy() if hasattr(a, "detach") else a)
    if not np.issubdtype(arr.dtype, np.floating):
        raise NormgradError(
            f"input {name} has dtype {arr.dtype}; the checker checks real floating-point inputs "
            "(float16/32/64). Convert it (x.double()), or pass it inside f if it is not "
            "differentiated (an index, a mask)."
        )
    return arr


def refuse_structured(out: Any, where: str) -> None:
    """A tuple or dict of outputs is refused clearly (check one output at a time)."""
    if isinstance(out, dict):
        raise NormgradError(
            f"{where} returned a dict of outputs (keys {list(out)}); the checker checks one "
            "output array. Check each one: e.g. lambda *a: f(*a)['"
            + str(next(iter(out), "y"))
            + "']."
        )
    if isinstance(out, (tuple, list)):
        raise NormgradError(
            f"{where} returned a {type(out).__name__} of {len(out)} outputs; the checker checks "
            "one output array. Check each one by position: e.g. lambda *a: f(*a)[0]."
        )


def require_deterministic(fn: Fn, leaves: Sequence[np.ndarray], hint: str) -> None:
    """f twice at x: the same values, or a clear error (and f's own errors as NormgradError)."""
    try:
        y1, y2 = fn(*leaves), fn(*leaves)
    except NormgradError:
        raise
    except Exception as e:
        raise NormgradError(f"f raised {type(e).__name__} on x as given: {e}") from e
    if y1.shape != y2.shape or not np.array_equal(y1, y2, equal_nan=True):
        raise NormgradError(
            "f returned different values for the same input (a nondeterministic f, such as "
            f"dropout in training mode); finite differences need a deterministic f. {hint}"
        )


def pack(leaves: Sequence[np.ndarray]) -> Any:
    """The checker's `x`: one array, or a tuple of arrays."""
    return leaves[0] if len(leaves) == 1 else tuple(leaves)


def unpack(grads: Sequence[np.ndarray]) -> Any:
    return grads[0] if len(grads) == 1 else tuple(grads)


def reject_complex(arrays: Sequence[Any]) -> None:
    """The checker's complex-step probe: refused, since autograd's complex rules differ."""
    if any(np.iscomplexobj(a) for a in arrays):
        raise TypeError("framework functions are differentiated with real finite differences")


def attach_names(report: Any, names: list[str]) -> None:
    """Name the inputs in the report's notes (the wrong ones lead the notes: `_compare`)."""
    if len(names) <= 1:
        return
    report.notes.append("inputs checked, in order: " + ", ".join(names) + ".")
