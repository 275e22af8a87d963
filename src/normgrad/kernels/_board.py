"""The board: the int64 array through which a native job reaches every thread.

One job at a time. Its header (pool protocol, `_pool.run_job` and the workers' spin):

    [SEQ, SIZE, PART, YIELD, TEAM, THREAD_NUM, ENTRY, ...]
                             job number (odd while a job is open), threads the board
                             serves, the address of the job's part (a `cfunc` called as
                             `part(board address, slot)`), the address of the C library's
                             `sched_yield` (0: none; a spinning worker calls it now and
                             then); on a board of an OpenMP team (`_team.py`; 0 on the
                             pool's), the addresses of its runtime's `GOMP_parallel` and
                             `omp_get_thread_num` and of the entry its threads run
    [JOINED, ...]            workers inside the open job (its own cache line)
    params                   `PARAMS` int64 slots the caller fills (addresses and scalars;
                             `_native.py` names them)
    scratch                  one line of float64 the parts may use (stand-ins)
    ctl 0, ctl 1             the job's claim state and its first phase's (`_pool.claim`)

A worker counts itself in `JOINED` and then checks that the job it saw is still open; the
caller, once every chunk is done, closes it and waits until `JOINED` is 0: a worker never
touches a job's data after its caller has returned.
"""

from __future__ import annotations

import ctypes

import numpy as np
from numba import carray, njit

from ._intrinsics import address

LINE = 8  # int64 per cache line: a claim state's thread t starts at LINE * (t + 1)
SEQ, SIZE, PART, YIELD, TEAM, THREAD_NUM, ENTRY = range(7)
JOINED = LINE
_PARAMS_AT = 2 * LINE
PARAMS = 6 * LINE  # int64 slots for the caller's parameters
_SCRATCH_AT = _PARAMS_AT + PARAMS
_HEAD = _SCRATCH_AT + LINE


def new_board(threads: int) -> np.ndarray:
    board = np.zeros(_HEAD + 2 * LINE * (threads + 1), np.int64)
    board[SIZE] = threads
    board[YIELD] = _YIELD_ADDRESS
    return board


def _yield_address() -> int:
    """The address of the C library's `sched_yield`, or 0 where there is none."""
    try:
        return ctypes.cast(ctypes.CDLL(None).sched_yield, ctypes.c_void_p).value or 0
    except (OSError, AttributeError, TypeError):  # (no C library by that name: Windows)
        return 0


_YIELD_ADDRESS = _yield_address()


@njit(cache=True, inline="always")
def board_at(addr):
    """The board at address `addr` (a part's first argument)."""
    size = carray(address(addr), _HEAD, np.int64)[SIZE]
    return carray(address(addr), _HEAD + 2 * LINE * (size + 1), np.int64)


@njit(cache=True, inline="always")
def board_params(board):
    return board[_PARAMS_AT : _PARAMS_AT + PARAMS]


@njit(cache=True, inline="always")
def board_scratch(board):
    """The board's scratch line as float64 values."""
    return carray(address(board.ctypes.data + 8 * _SCRATCH_AT), LINE, np.float64)


@njit(cache=True, inline="always")
def board_ctl(board, which):
    """The claim state of the open job (`which` 0) or of its first phase (1)."""
    n = LINE * (board[SIZE] + 1)
    at = _HEAD + which * n
    return board[at : at + n]
