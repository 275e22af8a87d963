"""The kernels' thread pool: dynamic chunk claiming, and workers that spin between jobs.

A parallel kernel has the signature `kernel(ctl, nchunks, items, slot, *args)` and loops on
`claim(ctl, nchunks, items, slot)` for item ranges until it returns `k = -1`; `run` calls it
on every thread (the caller is slot 0). `ctl` is a fresh int64 array per job: [started,
chunks done, failed threads, workers between GIL-free sections], then one cache line per
thread: its own range of chunks, packed (front, back), and its count of chunks done.

Each thread takes chunks from the front of its own range and, when that is empty, steals
from the back of another's: a thread's claims touch only its own cache line, and from call
to call it processes the same chunks (its data stay in its own cache). Done counts are
published once per thread and job. A kernel with two phases (partial sums, then a pass that
needs all of them) claims its first phase on a second `ctl` from `phase_ctl`, after `begin`,
and waits for it with `wait_done`.

Four things measured on this 2-core virtual machine shape it:

* **A sleeping thread wakes late.** A thread blocked on a futex leaves its virtual CPU idle,
  the hypervisor halts it, and waking it took 10-30 us: most of a 10^6-element pass. So a
  worker spins (atomic loads in a nogil numba loop) for about `SPIN_WAIT` between jobs, and
  the caller spins while it waits for chunks others claimed. OpenMP runtimes do the same.
* **So does a thread that waits for the GIL** (CPython parks it on a condition variable).
  The GIL is needed only to pass a job's arguments, so each side holds it only while the
  other runs GIL-free: a worker starts when the caller's first claim, made inside its kernel,
  marks the job started; the caller, inside its kernel, waits until every chunk is done and
  every worker that joined is back in its GIL-free spin (`ctl[3]`), then returns.
* **A thread may not run at all for a while** (another process holds the core): the caller
  claims chunks too, steals those of a thread that is late, and waits only for chunks
  another thread has claimed, never for a thread that has not started. numba's
  `parallel=True` (a fixed split and a barrier) stalled 16-32 ms per launch here whenever
  that happened.
* **The two cores do not always share a cache.** At times (the host moves the virtual CPUs)
  handing a cache line from one thread to the other took 190 ns instead of 47. One shared
  chunk counter then cost 64 such hand-offs per job (a 10^5-element forward: 17 -> 34 us);
  per-thread ranges cost about one.

**Native jobs** (`run_native`, `run_job`) skip the GIL altogether: the caller writes the
job into the pool's `board` (the address of a compiled part, `cfunc(PART_SIGNATURE)`, and
its arrays as addresses), and a worker in its spin (`_await_job`) calls that part directly
and goes back to spinning. An empty job costs about 1 us instead of 4-7 us, and the worker
never reads the caller's Python objects (in the two-L3 state each such cache line is a
200 ns transfer). `_kernels` uses them for its planned calls.

The pool is per process; a child made by `fork` starts without one (its parent's threads do
not exist there) and makes its own on its first parallel call.
"""

from __future__ import annotations

import functools
import os
import threading
from typing import Any

import numpy as np
from llvmlite import ir
from numba import carray, njit, types
from numba.core import cgutils
from numba.extending import intrinsic

SPIN_WAIT = 1 << 20  # spin iterations before sleeping: about 0.5 ms here (0.5 ns each)
_SLEEP_CHECK = 0.01  # seconds between a sleeping worker's looks at the board
CHUNKS_PER_THREAD = 16  # claims are local atomics: fine chunks balance a late thread
_STARTED, _DONE, _FAILED, _IN_PYTHON = range(4)  # the job's fields of `ctl`
_LINE = 8  # int64 per cache line: thread t's fields start at _LINE * (t + 1)
_RANGE, _COUNT, _BUSY = range(3)  # a thread's fields: (front, back) packed, done, holds one


def _load_acquire_typing(typingctx, arr, i):  # type: ignore[no-untyped-def]
    """`arr[i]` of an int64 array as an atomic acquire load: it is read again on every
    iteration of a spin loop (a plain load may be hoisted out of it)."""

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        a = cgutils.create_struct_proxy(sig.args[0])(context, builder, value=args[0])
        return builder.load_atomic(builder.gep(a.data, [args[1]]), "acquire", 8)

    return types.int64(arr, i), codegen


def _fetch_add_typing(typingctx, arr, i, v):  # type: ignore[no-untyped-def]
    """Atomically add `v` to `arr[i]` (int64) and return the old value; sequentially
    consistent, so the stores made before it (a chunk's results) are visible to a thread
    that then reads `arr[i]`."""

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        a = cgutils.create_struct_proxy(sig.args[0])(context, builder, value=args[0])
        return builder.atomic_rmw("add", builder.gep(a.data, [args[1]]), args[2], "seq_cst")

    return types.int64(arr, i, v), codegen


def _swap_if_typing(typingctx, arr, i, old, new):  # type: ignore[no-untyped-def]
    """Atomically set `arr[i]` (int64) to `new` if it holds `old`; True if it did."""

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        a = cgutils.create_struct_proxy(sig.args[0])(context, builder, value=args[0])
        ptr = builder.gep(a.data, [args[1]])
        res = builder.cmpxchg(ptr, args[2], args[3], "seq_cst", "seq_cst")
        return builder.extract_value(res, 1)

    return types.boolean(arr, i, old, new), codegen


def _address_typing(typingctx, addr):  # type: ignore[no-untyped-def]
    """An int64 address (`arr.ctypes.data`, stored in a board) as a `voidptr` for
    `numba.carray`."""

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        return builder.inttoptr(args[0], cgutils.voidptr_t)

    return types.voidptr(addr), codegen


def _float_bits_typing(typingctx, v):  # type: ignore[no-untyped-def]
    """The bits of a float64 as an int64 (or back): floats travel in a board's int64 slots."""
    to = types.float64 if v == types.int64 else types.int64
    lt = ir.DoubleType() if to == types.float64 else ir.IntType(64)

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        return builder.bitcast(args[0], lt)

    return to(v), codegen


def _call_part_typing(typingctx, fn, board_address, slot):  # type: ignore[no-untyped-def]
    """Call the C function at address `fn` as `fn(board_address, slot)` (a native job's part:
    a `cfunc` of `PART_SIGNATURE`)."""

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        i64 = ir.IntType(64)
        fnty = ir.FunctionType(ir.VoidType(), [i64, i64])
        builder.call(builder.inttoptr(args[0], fnty.as_pointer()), [args[1], args[2]])
        return context.get_dummy_value()

    return types.void(fn, board_address, slot), codegen


# numba intrinsics: called from jitted code as `_load_acquire(arr, i)`, `_fetch_add(arr, i, v)`,
# `_swap_if(arr, i, old, new)`
_load_acquire: Any = intrinsic(_load_acquire_typing)
_fetch_add: Any = intrinsic(_fetch_add_typing)
_swap_if: Any = intrinsic(_swap_if_typing)
address: Any = intrinsic(_address_typing)
float_bits: Any = intrinsic(_float_bits_typing)
call_part: Any = intrinsic(_call_part_typing)
PART_SIGNATURE = types.void(types.int64, types.int64)  # (board address, slot)


@njit(cache=True, inline="always")
def _all_done(ctl, nchunks):  # type: ignore[no-untyped-def]
    return _load_acquire(ctl, _DONE) >= nchunks or _load_acquire(ctl, _FAILED) != 0


@njit(cache=True, inline="always")
def begin(ctl, slot):  # type: ignore[no-untyped-def]
    """Mark the job started (slot 0, inside its kernel) before a first claim on another
    `ctl` (a kernel with two phases): workers may join now."""
    if slot == 0 and _load_acquire(ctl, _STARTED) == 0:
        _fetch_add(ctl, _STARTED, 1)


@njit(cache=True, inline="always")
def _take(ctl, at, back):  # type: ignore[no-untyped-def]
    """A chunk off the front (or, `back`, the end) of the range at `ctl[at]`, or -1."""
    while True:
        v = _load_acquire(ctl, at)
        front, end = v >> 32, v & 0xFFFFFFFF
        if front >= end:
            return -1
        new = ((front << 32) | (end - 1)) if back else (((front + 1) << 32) | end)
        if _swap_if(ctl, at, v, new):
            return end - 1 if back else front


@njit(cache=True, inline="always")
def claim(ctl, nchunks, items, slot, reverse=False):  # type: ignore[no-untyped-def]
    """The next chunk `k` for thread `slot` and its item range `(k, i0, i1)`, from the front
    of its range (`reverse`: from the back, so that a second pass starts on the data the
    first pass read last, still in cache); each call also counts the chunk from the previous
    call done (its results are stored). `(-1, 0, 0)` when none is left: the thread's count
    is published, and the caller (slot 0) waits here, GIL-free, until the job is finished
    and every worker that joined it is back in its spin (bounded: `run` checks again).
    Results kept per chunk `k` (not per thread) are deterministic."""
    mine = _LINE * (slot + 1)
    begin(ctl, slot)  # in the kernel, GIL-free: now workers may join
    if ctl[mine + _BUSY]:
        ctl[mine + _COUNT] += 1
    k = _take(ctl, mine + _RANGE, reverse)
    threads = ctl.size // _LINE - 1
    for d in range(1, threads):
        if k >= 0:
            break
        k = _take(ctl, _LINE * ((slot + d) % threads + 1) + _RANGE, not reverse)
    if k >= 0:
        ctl[mine + _BUSY] = 1
        return k, items * k // nchunks, items * (k + 1) // nchunks
    ctl[mine + _BUSY] = 0
    _fetch_add(ctl, _DONE, ctl[mine + _COUNT])  # publishes the chunks' results
    ctl[mine + _COUNT] = 0
    if slot == 0:
        for _ in range(SPIN_WAIT):
            if _all_done(ctl, nchunks) and _load_acquire(ctl, _IN_PYTHON) == 0:
                break
    return -1, 0, 0


@njit(cache=True, inline="always")
def wait_done(phase, nchunks, ctl):  # type: ignore[no-untyped-def]
    """Spin until every chunk of `phase` (a `ctl` dealt by `phase_ctl`) is done: the barrier
    between a two-phase kernel's phases. False if a thread of the job `ctl` failed."""
    while _load_acquire(phase, _DONE) < nchunks:
        if _load_acquire(ctl, _FAILED) != 0:
            return False
    return True


def phase_ctl(nchunks: int, nthreads: int) -> np.ndarray:
    """The claim state for the first phase of a two-phase kernel run by `run` with the same
    `nchunks` and `nthreads` (the job's own `ctl` serves the second phase)."""
    return _deal(_new_ctl(max(1, nthreads)), nchunks, max(1, nthreads))


# Native jobs. A pool's `board` (an int64 array) carries one job at a time that workers run
# without entering Python: `_SEQ` is odd while a job is open; its part (the address of a
# `cfunc` called with the board's address and the thread's slot), its parameters (the
# caller's `board_params`: addresses and scalars), its claim state (`board_ctl(board, 0)`)
# and a second-phase one (`board_ctl(board, 1)`) follow. A worker counts itself in `_JOINED`
# and then checks that the job it saw is still open; the caller, once every chunk is done,
# closes it and waits until `_JOINED` is 0: a worker never touches a job's data after its
# caller has returned.
_SEQ, _SIZE, _PART = 0, 1, 2  # job number, threads the board serves, the job's part
_JOINED = _LINE  # workers inside the open job
_PARAMS = 2 * _LINE
BOARD_PARAMS = 3 * _LINE  # int64 slots for the caller's parameters
_SCRATCH = _PARAMS + BOARD_PARAMS  # one line the parts may use (stand-ins)
_HEAD = _SCRATCH + _LINE


def new_board(threads: int) -> np.ndarray:
    board = np.zeros(_HEAD + 2 * _LINE * (threads + 1), np.int64)
    board[_SIZE] = threads
    return board


@njit(cache=True, inline="always")
def board_at(addr):  # type: ignore[no-untyped-def]
    """The board at address `addr` (a part's first argument)."""
    size = carray(address(addr), _HEAD, np.int64)[_SIZE]
    return carray(address(addr), _HEAD + 2 * _LINE * (size + 1), np.int64)


@njit(cache=True, inline="always")
def board_params(board):  # type: ignore[no-untyped-def]
    return board[_PARAMS : _PARAMS + BOARD_PARAMS]


@njit(cache=True, inline="always")
def board_scratch(board):  # type: ignore[no-untyped-def]
    """The board's scratch line as float64 values."""
    return carray(address(board.ctypes.data + 8 * _SCRATCH), _LINE, np.float64)


@njit(cache=True, inline="always")
def board_ctl(board, which):  # type: ignore[no-untyped-def]
    """The claim state of the open job (`which` 0) or of its first phase (1)."""
    n = _LINE * (board[_SIZE] + 1)
    at = _HEAD + which * n
    return board[at : at + n]


@njit(cache=True, inline="always")
def run_job(board, part, nchunks, nthreads):  # type: ignore[no-untyped-def]
    """The caller's side of a native job, its parameters written: fresh claim states dealt to
    `nthreads`, open the job, run `part` as slot 0, wait for every chunk, close the job and
    wait for the workers inside it to leave."""
    for which in range(2):
        ctl = board_ctl(board, which)
        ctl[:] = 0
        _deal(ctl, nchunks, nthreads)
    board[_PART] = part
    _fetch_add(board, _SEQ, 1)
    call_part(part, board.ctypes.data, 0)
    ctl = board_ctl(board, 0)
    while not _all_done(ctl, nchunks):
        pass
    _fetch_add(board, _SEQ, 1)
    while _load_acquire(board, _JOINED) != 0:
        pass


@njit(cache=True, inline="always")
def _join_native(board, last):  # type: ignore[no-untyped-def]
    """The number of the open native job if it is not `last` and the worker is now counted
    in it, else 0."""
    s = _load_acquire(board, _SEQ)
    if s & 1 == 0 or s == last:
        return 0
    _fetch_add(board, _JOINED, 1)
    if _load_acquire(board, _SEQ) == s:
        return s
    _fetch_add(board, _JOINED, -1)
    return 0


@njit(cache=True, nogil=True)
def _await_job(ctl, prev, board, slot, iters):  # type: ignore[no-untyped-def]
    """A worker, back from Python job `prev`, spins until Python job `ctl` starts (True: it
    is counted in the job's `ctl[_IN_PYTHON]`) or `iters` loads have passed without any job
    (False), running its part of every native job opened on `board` meanwhile."""
    _fetch_add(prev, _IN_PYTHON, -1)
    last = 0
    i = 0
    while i < iters:
        if _load_acquire(ctl, _STARTED) != 0:
            _fetch_add(ctl, _IN_PYTHON, 1)
            return True
        s = _join_native(board, last)
        if s != 0:
            call_part(board[_PART], board.ctypes.data, slot)
            _fetch_add(board, _JOINED, -1)
            last = s
            i = 0
        i += 1
    return False


@njit(cache=True, nogil=True)
def _await_done(ctl, nchunks, iters):  # type: ignore[no-untyped-def]
    for _ in range(iters):
        if _all_done(ctl, nchunks):
            return True
    return False


@njit(cache=True)
def _add(ctl, i, v):  # type: ignore[no-untyped-def]
    _fetch_add(ctl, i, v)


def _new_ctl(threads: int) -> np.ndarray:
    return np.zeros(_LINE * (threads + 1), np.int64)


@njit(cache=True)
def _deal(ctl, nchunks, nthreads):  # type: ignore[no-untyped-def]
    """Give threads 0..nthreads-1 equal ranges of the `nchunks` chunks (others none)."""
    for t in range(nthreads):
        ctl[_LINE * (t + 1) + _RANGE] = (t * nchunks // nthreads) << 32 | (
            t + 1
        ) * nchunks // nthreads
    return ctl


class _Job:
    def __init__(
        self, kernel: Any, items: int, nchunks: int, nthreads: int, args: tuple, ctl: Any
    ) -> None:
        self.kernel, self.items, self.nchunks, self.nthreads = kernel, items, nchunks, nthreads
        self.args: tuple | None = args  # None once the caller has returned
        self.ctl = ctl
        self.cond = threading.Condition()
        self.sleeping = False
        self.error: BaseException | None = None

    def work(self, slot: int) -> None:
        args = self.args  # (a late worker finds None: nothing left to claim)
        if slot < self.nthreads and args is not None:  # else a bigger pool than this job asked for
            try:
                self.kernel(self.ctl, self.nchunks, self.items, slot, *args)
            except BaseException as e:  # re-raised by the caller
                self.error = e
                _add(self.ctl, _FAILED, 1)
        if self.sleeping:
            with self.cond:
                self.cond.notify_all()

    def finished(self) -> bool:
        return bool(self.ctl[_DONE] >= self.nchunks or self.ctl[_FAILED] != 0)

    def wait(self) -> None:
        if not self.finished() and not _await_done(self.ctl, self.nchunks, SPIN_WAIT):
            with self.cond:
                self.sleeping = True
                self.cond.wait_for(self.finished)
        if self.error is not None:
            raise self.error


class _Pool:
    """`size - 1` daemon workers. A spinning worker watches the `ctl` of the next job; a
    sleeping one waits for `count` (jobs published) to change."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.next_ctl = _new_ctl(size)
        self.count = 0
        self.job: _Job | None = None
        self.cond = threading.Condition()
        self.sleepers = 0
        self.board = new_board(size)
        for slot in range(1, size):
            threading.Thread(
                target=self._loop, args=(slot,), name=f"normgrad-{slot}", daemon=True
            ).start()

    def _loop(self, slot: int) -> None:
        prev = _new_ctl(self.size)
        prev[_IN_PYTHON] = 1
        while True:
            ctl, count, last = self.next_ctl, self.count, self.job
            joined = _await_job(ctl, prev, self.board, slot, SPIN_WAIT)  # True: counted in ctl
            if not joined:
                with self.cond:
                    self.sleepers += 1
                    published = functools.partial(self._published_since, count)
                    # every 10 ms, also look for an open native job: a wakeup that never
                    # comes (none is known to be lost) costs at most that much
                    while not self.cond.wait_for(published, _SLEEP_CHECK):
                        if self.board[_SEQ] & 1:
                            break
                    self.sleepers -= 1
                if self.job is last:  # woken for a native job: back to the spin
                    prev = _new_ctl(self.size)
                    prev[_IN_PYTHON] = 1
                    continue
            job = self.job  # the job that started, or a later one: either is fine
            assert job is not None  # set before `count` or a `ctl` changes
            if not joined or job.ctl is not ctl:  # count us in the job we work on
                if joined:
                    _add(ctl, _IN_PYTHON, -1)
                _add(job.ctl, _IN_PYTHON, 1)
            job.work(slot)
            prev = job.ctl

    def _published_since(self, count: int) -> bool:
        return self.count != count

    def wake(self) -> None:
        """Wake sleeping workers for a native job (they spin again and join it). `count`
        changes even with no sleeper: a worker whose spin has just ended may be waiting for
        the GIL to go to sleep, and must find it changed then (else it sleeps through the
        job: the caller ran a 10^7-element forward alone, 4.1 -> 7.0 ms)."""
        self.count += 1
        if self.sleepers:
            with self.cond:
                self.cond.notify_all()

    def run(self, kernel: Any, items: int, nchunks: int, nthreads: int, args: tuple) -> None:
        job = _Job(kernel, items, nchunks, nthreads, args, _deal(self.next_ctl, nchunks, nthreads))
        self.next_ctl = _new_ctl(self.size)  # a stale thread can only claim from its own job's
        self.job = job
        self.count += 1
        if self.sleepers:
            with self.cond:
                self.cond.notify_all()
        job.work(0)
        try:
            job.wait()
        finally:
            job.args = None  # the pool must not keep the caller's arrays alive


_pool: _Pool | None = None
_pool_lock = threading.Lock()


def chunks(items: int, nthreads: int, per_thread: int = CHUNKS_PER_THREAD) -> int:
    """How many chunks `run` should cut `items` into for `nthreads` threads."""
    return 1 if nthreads <= 1 else max(1, min(items, per_thread * nthreads))


def run(kernel: Any, items: int, nthreads: int, args: tuple, nchunks: int | None = None) -> None:
    """Run `kernel(ctl, nchunks, items, slot, *args)` on up to `nthreads` threads (see the
    module docstring), with `chunks(items, nthreads)` chunks unless given. While one user
    thread uses the pool, another runs its call alone (the same chunks, the same results)."""
    global _pool
    if nchunks is None:
        nchunks = chunks(items, nthreads)
    if nthreads <= 1 or nchunks <= 1 or not _pool_lock.acquire(blocking=False):
        kernel(_deal(_new_ctl(1), nchunks, 1), nchunks, items, 0, *args)
        return
    try:
        if _pool is None or _pool.size < nthreads:
            _pool = _Pool(nthreads)  # an older, smaller pool's workers just sleep
        _pool.run(kernel, items, nchunks, nthreads, args)
    finally:
        _pool_lock.release()


def run_native(caller: Any, nthreads: int, args: tuple) -> None:
    """Run a native job: `caller(board, nthreads, *args)` (GIL-free jitted code) writes its
    parameters into `board_params(board)` and calls `run_job`; workers spinning between jobs
    run their parts without entering Python. On one thread, or while another user thread
    holds the pool, the caller runs alone on a board of its own."""
    global _pool
    if nthreads <= 1 or not _pool_lock.acquire(blocking=False):
        caller(new_board(1), 1, *args)
        return
    try:
        if _pool is None or _pool.size < nthreads:
            _pool = _Pool(nthreads)
        _pool.wake()
        caller(_pool.board, nthreads, *args)
    finally:
        _pool_lock.release()


def _forget_pool() -> None:
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_pool)
