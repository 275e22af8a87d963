"""JAX callables for the checker: see `_frameworks`. Imported only when jax is in use.

Pytrees of inputs are flattened to leaves named by argument and path (`params['w']`); each call
rebuilds the trees. Calls run with 64-bit types on (`x64`), so float64 copies stay float64."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np

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


class _X64:
    """The one change the checker makes to JAX's process-wide config: 64-bit types on, for
    every thread, while a check runs JAX code, then back as it was.

    `jax.enable_x64` alone is thread-local, but XLA runs a host callback (`pure_callback`) on a
    thread of its own at times; there the default would round the callback's float64 result
    to float32, and JAX refuses it as a dtype mismatch."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.depth = 0
        self.before = False

    @contextlib.contextmanager
    def on(self) -> Iterator[None]:
        with self.lock:
            if self.depth == 0:
                self.before = bool(jax.config.read("jax_enable_x64"))
                jax.config.update("jax_enable_x64", True)
            self.depth += 1
        try:
            with jax.enable_x64(True):  # also over a caller's thread-local `enable_x64(False)`
                yield
        finally:
            with self.lock:
                self.depth -= 1
                if self.depth == 0:
                    jax.config.update("jax_enable_x64", self.before)


x64 = _X64().on


def convert(f: Any, x: Any) -> Converted:
    args = tuple(x) if isinstance(x, tuple) else (x,)
    argn = arg_names(f, len(args))
    with x64():
        pairs, tree = jax.tree_util.tree_flatten_with_path(args)
    names = [argn[p[0].idx] + jax.tree_util.keystr(p[1:]) for p, _ in pairs]
    leaves = [
        as_leaf(v, n, lambda a: isinstance(a, jax.Array))
        for (_, v), n in zip(pairs, names, strict=True)
    ]

    def call(*flat: Any) -> Any:
        out = f(*jax.tree_util.tree_unflatten(tree, list(flat)))
        refuse_structured(out, "f")
        return out

    def guarded(thunk: Any) -> Any:
        try:
            with x64():
                return thunk()
        except NormgradError:
            raise
        except Exception as e:
            if "Tracer" in type(e).__name__:
                raise NormgradError(
                    "f closes over a JAX tracer (a value from inside jit, grad or vmap that "
                    "escaped it); pass that value as an input of f, or compute it outside the "
                    f"transformation. JAX said: {str(e).splitlines()[0]}"
                ) from None
            raise

    def fn(*arrays: Any) -> np.ndarray:
        reject_complex(arrays)
        # Read back inside `guarded`: JAX dispatches asynchronously, and a host callback still
        # running after x64 is off would see 32-bit types (see `_X64`).
        return guarded(lambda: np.asarray(call(*[jax.numpy.asarray(a) for a in arrays])))

    def vjp(*a: Any) -> Any:
        *arrays, dy = a
        reject_complex(arrays)

        def run() -> Any:
            y, back = jax.vjp(call, *[jax.numpy.asarray(v) for v in arrays])
            grads = back(jax.numpy.asarray(np.asarray(dy), dtype=y.dtype).reshape(y.shape))
            return [np.asarray(g) for g in grads]  # read back under x64 (see `fn`)

        return unpack(guarded(run))

    def jvp(*a: Any) -> np.ndarray:
        n = len(a) // 2
        reject_complex(a)

        def run() -> Any:
            prim = [jax.numpy.asarray(v) for v in a[:n]]
            tan = [
                jax.numpy.asarray(np.asarray(t), dtype=p.dtype)
                for p, t in zip(prim, a[n:], strict=True)
            ]
            return np.asarray(jax.jvp(call, prim, tan)[1])  # read back under x64 (see `fn`)

        return guarded(run)

    require_deterministic(fn, leaves, "Fix the PRNG key inside f.")
    notes: list[str] = []
    try:
        jvp(*leaves, *[np.zeros_like(v) for v in leaves])
        has_jvp = True
    except NormgradError:
        raise
    except Exception:  # a custom_vjp rule has no forward mode: nothing to check there
        has_jvp = False
        notes.append("f does not support forward-mode AD (a custom_vjp), so no jvp is checked.")
    return Converted(fn, pack(leaves), vjp, jvp if has_jvp else None, names, "jax", notes)
