"""The kernels' thread pool: dynamic chunk claiming, and workers that spin between jobs.

A parallel kernel has the signature `kernel(claim, *args)`, `claim = (ctl, nchunks, items,
slot)`, and loops on `take(claim)` for item ranges until it returns `k = -1`; `run` calls
it on every thread (the caller is slot 0). `ctl` is a fresh int64 array per job:
[started, chunks done, failed threads, workers between GIL-free sections], then one cache
line per thread: its own range of chunks, packed (front, back), and its count of chunks done.

Each thread takes chunks from the front of its own range and, when that is empty, steals
from the back of another's: a thread's claims touch only its own cache line, and from call
to call it processes the same chunks (its data stay in its own cache). Done counts are
published once per thread and job. A kernel with two phases (partial sums, then a pass that
needs all of them) claims its first phase on a second `ctl` from `phase_ctl` (`on`), after
`begin`, and waits for it with `wait_done`.

Why it is built this way (docs/performance.md, "The thread pool", has the measurements):

* **A sleeping thread wakes late**: a thread blocked on a futex leaves its virtual CPU
  idle, and waking it costs most of a 10^6-element pass. So a worker spins (atomic loads in
  a nogil numba loop) for about `SPIN_WAIT` between jobs, and the caller spins while it
  waits for chunks others claimed, as OpenMP runtimes do.
* **So does a thread that waits for the GIL.** The GIL is needed only to pass a job's
  arguments, so each side holds it only while the other runs GIL-free: a worker starts when
  the caller's first claim, made inside its kernel, marks the job started; the caller,
  inside its kernel, waits until every chunk is done and every worker that joined is back in
  its GIL-free spin (`ctl[3]`), then returns.
* **Another runtime may need the core between jobs** (PyTorch's OpenMP threads between
  the torch adapter's calls): a worker spinning between jobs calls `sched_yield` every
  `YIELD_EVERY` loads, so a thread that wakes on its core runs within a few thousand loads
  instead of at the end of the worker's time slice, and the worker spins on when nobody
  else needs the core. The caller's waits inside a job do not yield: a job's last chunks
  come within microseconds, and a yield could hand the core to another runtime's spinner
  for a whole time slice.
* **A thread may not run at all for a while** (another process holds the core): the caller
  claims chunks too, steals those of a thread that is late, and waits only for chunks
  another thread has claimed, never for a thread that has not started (a fixed split and a
  barrier, as numba's `parallel=True` does, stalls whenever that happens).
* **Two cores do not always share a cache**: handing a cache line between threads can be
  several times slower at times, so each thread claims from its own line (one hand-off per
  job instead of one per chunk).

**Native jobs** (`run_native`, `run_job`) skip the GIL altogether: the caller writes the
job into the pool's board (`_board.py`: the address of a compiled part and its arrays as
addresses), and a worker in its spin (`_await_job`) calls that part directly and goes back
to spinning, never reading the caller's Python objects.

The process's pool and its lock belong to `_runtime` (a child made by `fork` starts without
one and makes its own on its first parallel call).
"""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
from numba import njit

from .. import _runtime
from . import _team
from ._board import ENTRY, JOINED, LINE, PART, SEQ, SIZE, TEAM, YIELD, board_ctl, new_board
from ._intrinsics import call_part, call_plain, call_team, fetch_add, load_acquire, swap_if

SPIN_WAIT = 1 << 20  # spin iterations before sleeping (counted in loads, not time)
YIELD_EVERY = 1 << 11  # a spinning worker's loads between two `sched_yield` calls
SLEEP_CHECK = 0.01  # seconds between a sleeping worker's looks at the board
CHUNKS_PER_THREAD = 16  # claims are local atomics: fine chunks balance a late thread
_STARTED, DONE, _FAILED, _IN_PYTHON = range(4)  # the job's fields of `ctl`
_RANGE, _COUNT, _BUSY = range(3)  # a thread's fields: (front, back) packed, done, holds one


@njit(cache=True, inline="always")
def _all_done(ctl, nchunks):
    return load_acquire(ctl, DONE) >= nchunks or load_acquire(ctl, _FAILED) != 0


@njit(cache=True)
def begin(claim):
    """Mark the job started (slot 0, inside its kernel) before a first claim on another
    `ctl` (a kernel with two phases): workers may join now."""
    ctl, _, _, slot = claim
    if slot == 0 and load_acquire(ctl, _STARTED) == 0:
        fetch_add(ctl, _STARTED, 1)


@njit(cache=True)
def on(claim, ctl):
    """The same thread's claim on another claim state (a two-phase kernel's first phase)."""
    return (ctl, claim[1], claim[2], claim[3])


@njit(cache=True, inline="always")
def _take(ctl, at, back):
    """A chunk off the front (or, `back`, the end) of the range at `ctl[at]`, or -1."""
    while True:
        v = load_acquire(ctl, at)
        front, end = v >> 32, v & 0xFFFFFFFF
        if front >= end:
            return -1
        new = ((front << 32) | (end - 1)) if back else (((front + 1) << 32) | end)
        if swap_if(ctl, at, v, new):
            return end - 1 if back else front


# `begin`, `on`, `take` and `wait_done` are not numba-inlined: inlined (`inline="always"`)
# into a kernel whose loop also inlines another function, `take` lost its count updates
# (numba 0.68's IR inliner with a tuple argument); LLVM may still inline them.
@njit(cache=True)
def take(claim, reverse=False):
    """The next chunk `k` for the claim's thread and its item range `(k, i0, i1)`, from the
    front of its range (`reverse`: from the back, so that a second pass starts on the data
    the first pass read last, still in cache); each call also counts the chunk from the
    previous call done (its results are stored). `(-1, 0, 0)` when none is left: the
    thread's count is published, and the caller (slot 0) waits here, GIL-free, until the job
    is finished and every worker that joined it is back in its spin (bounded: `run` checks
    again). Results kept per chunk `k` (not per thread) are deterministic."""
    ctl, nchunks, items, slot = claim
    mine = LINE * (slot + 1)
    begin(claim)  # in the kernel, GIL-free: now workers may join
    if ctl[mine + _BUSY]:
        ctl[mine + _COUNT] += 1
    k = _take(ctl, mine + _RANGE, reverse)
    threads = ctl.size // LINE - 1
    for d in range(1, threads):
        if k >= 0:
            break
        k = _take(ctl, LINE * ((slot + d) % threads + 1) + _RANGE, not reverse)
    if k >= 0:
        ctl[mine + _BUSY] = 1
        return k, items * k // nchunks, items * (k + 1) // nchunks
    ctl[mine + _BUSY] = 0
    fetch_add(ctl, DONE, ctl[mine + _COUNT])  # publishes the chunks' results
    ctl[mine + _COUNT] = 0
    if slot == 0:
        for _ in range(SPIN_WAIT):
            if _all_done(ctl, nchunks) and load_acquire(ctl, _IN_PYTHON) == 0:
                break
    return -1, 0, 0


@njit(cache=True)
def wait_done(phase, claim):
    """Spin until every chunk of `phase` (a `ctl` dealt by `phase_ctl`) is done: the barrier
    between a two-phase kernel's phases. False if a thread of the claim's job failed."""
    while load_acquire(phase, DONE) < claim[1]:
        if load_acquire(claim[0], _FAILED) != 0:
            return False
    return True


def phase_ctl(nchunks: int, nthreads: int) -> np.ndarray:
    """The claim state for the first phase of a two-phase kernel run by `run` with the same
    `nchunks` and `nthreads` (the job's own `ctl` serves the second phase)."""
    return _deal(_new_ctl(max(1, nthreads)), nchunks, max(1, nthreads))


@njit(cache=True, inline="always")
def run_job(board, part, nchunks, nthreads):
    """The caller's side of a native job, its parameters written: fresh claim states dealt to
    `nthreads`, open the job, run `part` as slot 0, wait for every chunk, close the job and
    wait for the workers inside it to leave. On an OpenMP team's board (`_team.py`) the
    team's threads run the part instead, the caller as slot 0."""
    for which in range(2):
        ctl = board_ctl(board, which)
        ctl[:] = 0
        _deal(ctl, nchunks, nthreads)
    board[PART] = part
    if board[TEAM] != 0:
        call_team(board[TEAM], board[ENTRY], board.ctypes.data, nthreads)
        return
    fetch_add(board, SEQ, 1)
    call_part(part, board.ctypes.data, 0)
    ctl = board_ctl(board, 0)
    while not _all_done(ctl, nchunks):
        pass
    fetch_add(board, SEQ, 1)
    while load_acquire(board, JOINED) != 0:
        pass


@njit(cache=True, inline="always")
def _join_native(board, last):
    """The number of the open native job if it is not `last` and the worker is now counted
    in it, else 0."""
    s = load_acquire(board, SEQ)
    if s & 1 == 0 or s == last:
        return 0
    fetch_add(board, JOINED, 1)
    if load_acquire(board, SEQ) == s:
        return s
    fetch_add(board, JOINED, -1)
    return 0


@njit(cache=True, nogil=True)
def _await_job(ctl, prev, board, slot, iters, last):
    """A worker, back from Python job `prev`, spins until Python job `ctl` starts (-1: it is
    counted in the job's `ctl[_IN_PYTHON]`) or `iters` loads have passed without any job,
    running its part of every native job opened on `board` meanwhile but native job `last`
    (the one it ran last); returns the number of the native job it ran last."""
    fetch_add(prev, _IN_PYTHON, -1)
    i = 0
    while i < iters:
        if load_acquire(ctl, _STARTED) != 0:
            fetch_add(ctl, _IN_PYTHON, 1)
            return -1
        s = _join_native(board, last)
        if s != 0:
            call_part(board[PART], board.ctypes.data, slot)
            fetch_add(board, JOINED, -1)
            last = s
            i = 0
        i += 1
        if i % YIELD_EVERY == 0 and board[YIELD] != 0:  # (another thread may need the core)
            call_plain(board[YIELD])
    return last


@njit(cache=True, nogil=True)
def _await_done(ctl, nchunks, iters):
    for _ in range(iters):
        if _all_done(ctl, nchunks):
            return True
    return False


@njit(cache=True)
def _add(ctl, i, v):
    fetch_add(ctl, i, v)


def _new_ctl(threads: int) -> np.ndarray:
    return np.zeros(LINE * (threads + 1), np.int64)


@njit(cache=True)
def _deal(ctl, nchunks, nthreads):
    """Give threads 0..nthreads-1 equal ranges of the `nchunks` chunks (others none)."""
    for t in range(nthreads):
        lo, hi = t * nchunks // nthreads, (t + 1) * nchunks // nthreads
        ctl[LINE * (t + 1) + _RANGE] = lo << 32 | hi
    return ctl


class _Job:
    def __init__(self, kernel: Any, claim: tuple[Any, int, int], nthreads: int, args: tuple):
        self.kernel, self.nthreads = kernel, nthreads
        self.ctl, self.nchunks, self.items = claim
        self.args: tuple | None = args  # None once the caller has returned
        self.cond = threading.Condition()
        self.sleeping = False
        self.error: BaseException | None = None

    def work(self, slot: int) -> None:
        args = self.args  # (a late worker finds None: nothing left to claim)
        if slot < self.nthreads and args is not None:  # else a bigger pool than this job asked for
            try:
                self.kernel((self.ctl, self.nchunks, self.items, slot), *args)
            except BaseException as e:  # re-raised by the caller
                self.error = e
                _add(self.ctl, _FAILED, 1)
        if self.sleeping:
            with self.cond:
                self.cond.notify_all()

    def finished(self) -> bool:
        return bool(self.ctl[DONE] >= self.nchunks or self.ctl[_FAILED] != 0)

    def wait(self) -> None:
        if not self.finished() and not _await_done(self.ctl, self.nchunks, SPIN_WAIT):
            with self.cond:
                self.sleeping = True
                self.cond.wait_for(self.finished)
        if self.error is not None:
            raise self.error


class Pool:
    """`size - 1` daemon workers. A spinning worker watches the `ctl` of the next job; a
    sleeping one waits for `count` (jobs published) to change, or for a native job it has
    not run to be open on the board (looked at before it sleeps and every `sleep_check`
    seconds: a wake-up that never comes costs at most that)."""

    def __init__(self, size: int, sleep_check: float = SLEEP_CHECK) -> None:
        self.size = size
        self.sleep_check = sleep_check
        self.next_ctl = _new_ctl(size)
        self.count = 0
        self.announced = 0  # the number the native job `wake` announced will open with
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
        ran = 0  # the number of the native job this worker ran last
        while True:
            ctl, count, last = self.next_ctl, self.count, self.job
            got = _await_job(ctl, prev, self.board, slot, SPIN_WAIT, ran)
            joined = got < 0  # counted in ctl
            if not joined:
                ran = got
                self._sleep(count, ran)
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

    def _sleep(self, count: int, ran: int) -> None:
        """Sleep until a job is published after `count`, or while a native job other than
        `ran` (the one this worker ran last) is open on the board or announced and not yet
        open: looked at before the first wait and every `sleep_check` seconds. (A caller
        can lose its CPU between `wake` and opening the job, for longer than a worker's
        spin: the worker, which saw `count` change, must not sleep through the job then.)"""
        with self.cond:
            self.sleepers += 1
            while not self._ready(count, ran):  # (the board changes without a notify)
                self.cond.wait(self.sleep_check)
            self.sleepers -= 1

    def _ready(self, count: int, ran: int) -> bool:
        seq = int(self.board[SEQ])
        return self.count != count or (seq % 2 == 1 and seq != ran) or seq < self.announced

    def wake(self) -> None:
        """Announce a native job and wake sleeping workers (they spin again and join it).
        `count` changes even with no sleeper: a worker whose spin has just ended may be
        waiting for the GIL to go to sleep, and must find it changed then, or it sleeps
        through the job; `announced` keeps it spinning until the job opens."""
        self.announced = int(self.board[SEQ]) + 1  # (SEQ is even between native jobs)
        self.count += 1
        if self.sleepers:
            with self.cond:
                self.cond.notify_all()

    def run(self, kernel: Any, items: int, nchunks: int, nthreads: int, args: tuple) -> None:
        ctl = _deal(self.next_ctl, nchunks, nthreads)
        job = _Job(kernel, (ctl, nchunks, items), nthreads, args)
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


def chunks(items: int, nthreads: int, per_thread: int = CHUNKS_PER_THREAD) -> int:
    """How many chunks `run` should cut `items` into for `nthreads` threads."""
    return 1 if nthreads <= 1 else max(1, min(items, per_thread * nthreads))


def _pool_for(nthreads: int) -> Pool:
    """The process's pool (`_runtime` owns it), made or grown to `nthreads` threads (an
    older, smaller pool's workers just sleep). Called with the pool lock held."""
    state = _runtime.STATE
    if state.pool is None or state.pool.size < nthreads:
        state.pool = Pool(nthreads)
    pool: Pool = state.pool
    return pool


def run(kernel: Any, items: int, nthreads: int, args: tuple, nchunks: int | None = None) -> None:
    """Run `kernel((ctl, nchunks, items, slot), *args)` on up to `nthreads` threads (see the
    module docstring), with `chunks(items, nthreads)` chunks unless given. While one user
    thread uses the pool, another runs its call alone (the same chunks, the same results)."""
    if nchunks is None:
        nchunks = chunks(items, nthreads)
    lock = _runtime.STATE.pool_lock
    if nthreads <= 1 or nchunks <= 1 or not lock.acquire(blocking=False):
        kernel((_deal(_new_ctl(1), nchunks, 1), nchunks, items, 0), *args)
        return
    try:
        _pool_for(nthreads).run(kernel, items, nchunks, nthreads, args)
    finally:
        lock.release()


def run_native(caller: Any, nthreads: int, args: tuple) -> None:
    """Run a native job: `caller(board, nthreads, *args)` (GIL-free jitted code) writes its
    parameters into `board_params(board)` and calls `run_job`; workers spinning between jobs
    run their parts without entering Python. On one thread, or while another user thread
    holds the pool, the caller runs alone on a board of its own. The torch adapter's jobs
    run on torch's OpenMP team where there is one (`_team.py`)."""
    team = _team.board(nthreads) if nthreads > 1 else None
    if team is not None:  # (the torch adapter's job: on torch's OpenMP team)
        caller(team, int(team[SIZE]), *args)
        return
    lock = _runtime.STATE.pool_lock
    if nthreads <= 1 or not lock.acquire(blocking=False):
        caller(new_board(1), 1, *args)
        return
    try:
        pool = _pool_for(nthreads)
        pool.wake()
        try:
            caller(pool.board, nthreads, *args)
        finally:
            pool.announced = 0  # (opened and closed, or never opened: nothing to wait for)
    finally:
        lock.release()


@njit(cache=True, nogil=True)
def _pingpong(claim, counter, turns, done):
    """Two threads take turns on an atomic counter, `turns` times each (bounded: the other
    side may never come); `done[k]` counts the turns chunk `k` made."""
    while True:
        k, _, _ = take(claim)
        if k < 0:
            return
        made = 0
        for _ in range(1 << 27):
            if made == turns:
                break
            if load_acquire(counter, 0) % 2 == k:
                fetch_add(counter, 0, 1)
                made += 1
        done[k] = made


def handoff_ns(turns: int) -> float | None:
    """Nanoseconds for a cache line to pass from one pool thread to the other and back, the
    best of 4 tries (the worker may be asleep or late), or None without a second thread or
    when the two threads never ran at once."""
    from ._layout import max_threads

    if max_threads() < 2:
        return None
    best = None
    for _ in range(4):
        counter, done = np.zeros(1, np.int64), np.zeros(2, np.int64)
        t = time.perf_counter()
        run(_pingpong, 2, 2, (counter, turns, done), 2)
        took = (time.perf_counter() - t) / (2 * turns) * 1e9
        if done.min() == turns and (best is None or took < best):
            best = took
    return best
