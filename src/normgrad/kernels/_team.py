"""PyTorch's OpenMP team as the threads of the torch adapter's native jobs.

After a parallel torch op on the CPU, libgomp's threads spin for milliseconds. normgrad's
pool workers spinning beside them need the same cores, so between torch ops each runtime's
threads wait for the other's time slices, and normgrad's jobs run on the caller alone.
Where torch runs on OpenMP (libgomp's ABI), the adapter's native jobs run on torch's team
instead: `GOMP_parallel` hands the job's `_entry` to the team's threads (still spinning
since the last torch op), each runs the job's part with its thread number as its slot, and
the call returns when all have. Like torch's own ops, a job then waits for a team thread
that another process keeps off its core; normgrad's pool, which never waits for a thread
that has not started, keeps every other call.
"""

from __future__ import annotations

import ctypes
import sys
from typing import Any

import numpy as np
from numba import cfunc
from numba import types as nbtypes

from .. import _runtime
from ._board import ENTRY, PART, SIZE, TEAM, THREAD_NUM, board_at, new_board
from ._intrinsics import call_part, call_plain


def _entry(addr):
    """What each team thread runs: the part of the job on the board at `addr`, its slot the
    thread's number in the team."""
    board = board_at(addr)
    slot = call_plain(board[THREAD_NUM])
    if slot < board[SIZE]:  # (never otherwise: the team has at most SIZE threads)
        call_part(board[PART], addr, slot)


def _find(torch: Any) -> tuple[int, int, int] | bool:
    """`(GOMP_parallel, omp_get_thread_num, the compiled entry)` as addresses, or False
    where torch's ops do not run on OpenMP, its runtime lacks libgomp's entry points, or the
    entry cannot be compiled (the pool then takes the jobs)."""
    try:
        if "ATen parallel backend: OpenMP" not in torch.__config__.parallel_info():
            return False
        lib = ctypes.CDLL(torch._C.__file__)  # (dlsym searches its dependencies: torch's OpenMP)
        functions = (lib.GOMP_parallel, lib.omp_get_thread_num)
        run, num = (ctypes.cast(f, ctypes.c_void_p).value for f in functions)
        if not run or not num:
            return False
        entry: Any = cfunc(nbtypes.void(nbtypes.int64), cache=True)(_entry)
    except Exception:  # (any failure here leaves the jobs on normgrad's pool, as before)
        return False
    _COMPILED.append(entry)
    return run, num, int(entry.address)


_COMPILED: list[Any] = []  # kept alive: the team's threads call it by address


def board(nthreads: int) -> np.ndarray | None:
    """A board for a job of up to `nthreads` threads on torch's OpenMP team (no more than
    torch uses, `torch.get_num_threads()`: a board of one thread runs the job on the caller
    alone), or None where the job runs on normgrad's pool: not the torch adapter's job,
    `Settings.torch_team` off, or no OpenMP team."""
    state = _runtime.STATE
    if not _runtime.ON_TORCH.get() or not state.settings.torch_team or state.team is False:
        return None
    torch = sys.modules["torch"]  # (the adapter imported it)
    if state.team is None:
        state.team = _find(torch)
        if state.team is False:
            return None
    n = min(nthreads, torch.get_num_threads())
    b = new_board(n)
    if n > 1:
        b[TEAM], b[THREAD_NUM], b[ENTRY] = state.team
    return b
