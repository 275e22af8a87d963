"""The torch adapter's native jobs on PyTorch's OpenMP team (src/normgrad/kernels/_team.py):
every chunk once, on torch's threads and not normgrad's pool, the same bits as on the pool,
as many threads as torch uses, and never in a forked child."""

import ctypes
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

pytest.importorskip("numba")
pytest.importorskip("torch")
import torch
from numba import carray, cfunc, njit

import normgrad.torch as nt
from normgrad import _runtime, testing
from normgrad.kernels import _layout, _pool, _team
from normgrad.kernels._board import SIZE, TEAM, board_at, board_ctl, board_params
from normgrad.kernels._intrinsics import address, call_plain
from normgrad.kernels._native import PART_SIGNATURE
from normgrad.kernels._pool import run_job, take

_GETTID = getattr(ctypes.CDLL(None), "gettid", None) if sys.platform.startswith("linux") else None
pytestmark = pytest.mark.skipif(_GETTID is None, reason="no gettid (glibc 2.30, Linux)")


@pytest.fixture(autouse=True)
def two_torch_threads():
    """torch's ops on a team of two threads, and the adapter's jobs allowed on it (whatever
    NORMGRAD_TORCH_TEAM and OMP_NUM_THREADS say)."""
    if not _team._find(torch) or _layout.max_threads() < 2:
        pytest.skip("torch's ops not on libgomp's OpenMP, or NUMBA_NUM_THREADS=1")
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with testing.settings(torch_team=True):
            yield
    finally:
        torch.set_num_threads(saved)


# A native job for the tests: each slot notes the OS thread it ran on, then marks its items.
def _note_part_py(addr, slot):
    board = board_at(addr)
    p = board_params(board)
    hits = carray(address(p[2]), p[1], np.int64)
    if slot < p[5]:  # (a pool larger than the job's threads: its other workers join too)
        carray(address(p[3]), p[5], np.int64)[slot] = call_plain(p[4])
    claim = (board_ctl(board, 0), p[0], p[1], slot)
    while True:
        k, i0, i1 = take(claim)
        if k < 0:
            return
        for i in range(i0, i1):
            hits[i] += 1


_note_part = cfunc(PART_SIGNATURE)(_note_part_py)


@njit(nogil=True)
def _note_native(board, nthreads, part, nchunks, hits, tids, gettid):
    p = board_params(board)
    p[0], p[1], p[2], p[3], p[4] = nchunks, hits.size, hits.ctypes.data, tids.ctypes.data, gettid
    p[5] = tids.size
    run_job(board, part, nchunks, nthreads)


def _noted_job(items, on_torch, threads=2):
    """Every item's hit count and each slot's OS thread (-1: that slot never ran) of a native
    job of `threads` threads, issued as the torch adapter issues them where `on_torch`."""
    hits, tids = np.zeros(items, np.int64), np.full(threads, -1, np.int64)
    gettid = ctypes.cast(_GETTID, ctypes.c_void_p).value
    args = (_note_part.address, _pool.chunks(items, threads), hits, tids, gettid)
    token = _runtime.ON_TORCH.set(on_torch)
    try:
        _pool.run_native(_note_native, threads, args)
    finally:
        _runtime.ON_TORCH.reset(token)
    return hits, tids


def _pool_thread_ids():
    return {t.native_id for t in threading.enumerate() if t.name.startswith("normgrad-")}


def test_the_adapters_jobs_run_on_torchs_openmp_threads():
    """`GOMP_parallel` returns once every team thread has run the entry, so both slots ran:
    the caller as slot 0, and as slot 1 a thread of this process that is neither the caller
    nor one of normgrad's pool workers (libgomp's)."""
    torch.ones(1 << 16).sum()  # (torch's team exists)
    for items in (1, 7, 500):
        hits, tids = _noted_job(items, on_torch=True)
        np.testing.assert_array_equal(hits, 1)
        assert tids[0] == threading.get_native_id()
        assert tids[1] not in (-1, tids[0]) and tids[1] not in _pool_thread_ids()
        assert os.path.exists(f"/proc/self/task/{tids[1]}")


def test_other_jobs_run_on_normgrads_pool(monkeypatch):
    """Without the adapter's mark, or with `Settings.torch_team` off, a job gets no team's
    board, and its second slot (if it ran: a busy worker may leave every chunk to the
    caller) is a pool worker."""
    boards = []
    board = _team.board
    monkeypatch.setattr(_team, "board", lambda n: boards.append(board(n)) or boards[-1])
    for on_torch, team in ((False, True), (True, False)):
        with testing.settings(torch_team=team):
            seen = set()
            for _ in range(50):
                hits, tids = _noted_job(500, on_torch)
                np.testing.assert_array_equal(hits, 1)
                assert tids[0] == threading.get_native_id()
                seen |= {int(t) for t in tids[1:] if t != -1}
            assert seen <= _pool_thread_ids()
    assert len(boards) == 100 and all(bd is None for bd in boards)


def test_a_job_uses_as_many_threads_as_torch():
    """With `torch.set_num_threads(1)` the adapter's job runs on the caller alone."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        token = _runtime.ON_TORCH.set(True)
        try:
            board = _team.board(2)
        finally:
            _runtime.ON_TORCH.reset(token)
        assert board is not None and board[SIZE] == 1 and board[TEAM] == 0
        hits, tids = _noted_job(100, on_torch=True)
    finally:
        torch.set_num_threads(saved)
    np.testing.assert_array_equal(hits, 1)
    assert tids.tolist() == [threading.get_native_id(), -1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    ("shape", "axes", "pshape"),
    [
        pytest.param((256, 1024), -1, (1024,), id="layer-norm"),
        pytest.param((8, 64, 28, 28), (2, 3), (1, 64, 1, 1), id="instance-norm"),
        pytest.param((4, 70_000), None, (4, 70_000), id="whole-split"),
    ],
)
def test_the_same_bits_on_torchs_team_and_on_the_pool(shape, axes, pshape, dtype, monkeypatch):
    """y, dx, dweight and dbias through `normgrad.torch` (native path, whole groups and split
    ones): bit for bit what normgrad's pool gives (partial sums are kept per chunk, and the
    chunks do not depend on the threads), and the jobs did run on torch's team."""
    g = torch.Generator().manual_seed(3)
    x, dy = (torch.randn(shape, generator=g, dtype=dtype) for _ in range(2))
    w, b = (torch.randn(pshape, generator=g, dtype=dtype) for _ in range(2))
    boards = []
    board = _team.board
    monkeypatch.setattr(_team, "board", lambda n: boards.append(board(n)) or boards[-1])

    def layer():
        xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
        y = nt.normalize(xs, axes=axes, weight=ws, bias=bs)
        return (y, *torch.autograd.grad(y, (xs, ws, bs), dy))

    with testing.record_paths() as paths:
        on_team = layer()
    assert {p for _, p in paths} == {"native"}
    assert len(boards) == 2 and all(bd is not None and bd[TEAM] != 0 for bd in boards)
    with testing.settings(torch_team=False):
        on_pool = layer()
    for a, c in zip(on_team, on_pool, strict=True):
        assert torch.equal(a, c)


FORK_SCRIPT = """
import os, signal, torch, normgrad.torch as nt
from normgrad import _runtime
torch.set_num_threads(2)
x = torch.randn(256, 1024)
y = nt.normalize(x, axes=-1)  # on torch's team: libgomp's threads exist now
assert _runtime.STATE.team not in (None, False)
pid = os.fork()
if pid == 0:
    signal.alarm(60)  # (a hung child would outlive the test's timeout)
    y2 = nt.normalize(x, axes=-1).numpy()  # (no torch op here: those would hang)
    ok = _runtime.STATE.team is False and (y2 == y.numpy()).all()
    os._exit(0 if ok else 3)
_, status = os.waitpid(pid, 0)
print(os.waitstatus_to_exitcode(status))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork is POSIX only")
def test_a_forked_child_runs_the_adapters_jobs_on_its_own_pool():
    """libgomp's threads are gone in a child made by `fork` (a job on them would wait for
    them forever, as a parallel torch op there does): the child's jobs take normgrad's pool."""
    env = {**os.environ, "NORMGRAD_TORCH_TEAM": "1"}
    out = subprocess.run(
        [sys.executable, "-c", FORK_SCRIPT], capture_output=True, text=True, timeout=120, env=env
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "0"
