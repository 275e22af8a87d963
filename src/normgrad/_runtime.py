"""Process-wide state, in one place: its one owner, its one fork handler, its one reset.

Everything normgrad keeps between calls lives in `STATE`:

- `pool`, `pool_lock`: the kernels' thread pool (`kernels/_pool.py` makes it on the first
  parallel call) and the lock a user thread holds while it runs jobs on it;
- `team`: the addresses through which native jobs run on PyTorch's OpenMP team
  (`kernels/_team.py` finds them at the torch adapter's first parallel call; False: none);
- `recycler`: dead outputs' memory kept for reuse (`_recycle.py`);
- `planned`: the planned-call cache of `_dispatch` (validated arguments and chosen paths per
  call signature of small NumPy calls), and the torch adapter's checked calls
  (`_torch_ops.checked_entry`, keys starting with "torch": the checked call and its
  planned kernel calls by kernel mode);
- `env_mode`: `NORMGRAD_KERNELS`, read at the first call that needs it;
- `kernels`: the kernels' runner module once loaded (False when numba is unavailable);
- `numpy_xp`: array_api_compat's NumPy namespace, once seen;
- `settings`: the size thresholds the path rules use (tests change them through
  `normgrad.testing.settings`).

`use_kernels` blocks set `MODE` (a context variable, so threads and tasks each see their
own); the torch adapter sets `ON_TORCH` while it runs the kernels. A child made by `fork`
starts with no pool (its parent's threads do not exist there), no team (libgomp's threads
do not either, and a job on them would wait for them forever) and fresh locks. `reset()`
forgets every cache and reread setting (for tests).
"""

from __future__ import annotations

import os
import threading
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._errors import NormgradError
from ._recycle import Recycler

KERNEL_MODES = ("auto", "0", "1")
PATHS = ("small", "native", "blocked", "sweep", "generic")
MODE: ContextVar[str | None] = ContextVar("normgrad_kernels", default=None)
ON_TORCH: ContextVar[bool] = ContextVar("normgrad_on_torch", default=False)
PLANNED_MAX = 512  # planned-call cache entries (cleared when full)


@dataclass
class Settings:
    """Size thresholds of the path rules (docs/performance.md says how they were chosen) and
    where the torch adapter's native jobs run."""

    kernel_min_size: int = 1 << 14  # blocked kernels from this many elements ("auto")
    small_max_size: int = 1 << 16  # single-call kernels up to this many elements
    sweep_min_bytes: int = 1 << 25  # planned batch-norm layouts sweep from this size
    stream_min_bytes: int = 1 << 24  # outputs this large that cannot stay in cache stream
    # the torch adapter's native jobs run on torch's OpenMP team (NORMGRAD_TORCH_TEAM=0: on
    # normgrad's pool)
    torch_team: bool = field(default_factory=lambda: os.environ.get("NORMGRAD_TORCH_TEAM") != "0")


@dataclass
class State:
    pool: Any = None
    pool_lock: threading.Lock = field(default_factory=threading.Lock)
    team: Any = None
    recycler: Recycler = field(default_factory=Recycler)
    planned: dict[tuple[Any, ...], Any] = field(default_factory=dict)
    env_mode: str | None = None
    kernels: Any = None
    numpy_xp: Any = None
    settings: Settings = field(default_factory=Settings)


STATE = State()


def check_mode(mode: Any, source: str) -> str:
    """A kernel mode or path name, or a clear error naming where it came from."""
    if mode not in KERNEL_MODES and mode not in PATHS:
        raise NormgradError(
            f"{source} must be one of True, False, '1', '0' or 'auto' (fused kernels always, "
            f"never, or for large NumPy inputs), or a path name {PATHS}; got {mode!r}."
        )
    return str(mode)


def kernel_mode() -> str:
    """The mode in force: the innermost `use_kernels` block's, else `NORMGRAD_KERNELS`."""
    mode = MODE.get()
    if mode is not None:
        return mode
    if STATE.env_mode is None:
        env = os.environ.get("NORMGRAD_KERNELS", "auto")
        STATE.env_mode = check_mode(env, "NORMGRAD_KERNELS")
    return STATE.env_mode


def kernels() -> Any:
    """The kernels' runner (`kernels/_run.py`, which imports numba: only here, on first
    use), or None if numba is missing or broken: the generic path still works."""
    if STATE.kernels is None:
        try:
            from .kernels import _run
        except ImportError:
            STATE.kernels = False
        else:
            STATE.kernels = _run
    return STATE.kernels or None


def new_array(shape: tuple[int, ...], dtype: Any, nbytes: int) -> tuple[Any, bool]:
    """An uninitialized C-order array of `nbytes` bytes, in recycled memory from the
    recycler's `min_bytes` (`_recycle.py`), and whether that memory was recycled."""
    recycler = STATE.recycler
    if nbytes < recycler.min_bytes:  # (checked here too: small calls' budget is microseconds)
        return np.empty(shape, dtype), False
    return recycler.empty(shape, dtype)


def release_buffers() -> int:
    """Return the memory normgrad keeps for reuse to the system; the number of bytes.

    The fused kernels keep the memory of dead outputs of 1 MiB or more (up to
    `NORMGRAD_RECYCLE_MB` MiB) and reuse it for the next output of the same size, saving the
    OS's zeroing of new pages. Outputs still alive are not affected."""
    return STATE.recycler.release()


def reset() -> None:
    """Forget the planned calls, the environment's mode and the recycled memory, and go back
    to the default settings (for tests; the pool is kept)."""
    STATE.planned.clear()
    STATE.env_mode = None
    STATE.recycler.release()
    STATE.recycler.limit = None
    STATE.settings = Settings()


def _after_fork_in_child() -> None:
    STATE.pool = None
    STATE.team = False
    STATE.pool_lock = threading.Lock()
    STATE.recycler.after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)
