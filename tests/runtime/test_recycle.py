"""Large kernel outputs reuse the memory of dead ones (`_recycle.Recycler`), safely."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from _kernel_checks import close, dx_scale, kernel_path, y_scale

import normgrad as ng
from normgrad import testing
from normgrad._errors import NormgradError

pytest.importorskip("numba")

PATHS = pytest.mark.parametrize("path", ["small", "planned", "blocked"])


@pytest.fixture
def recycling():
    """Recycle outputs from 64 KiB (not 1 MiB: small, fast tests), keep at most 16 MiB."""
    with testing.recycler(1 << 16, 16 << 20) as rec:
        yield rec


def _address(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


LAYOUTS = pytest.mark.parametrize(
    ("shape", "axes", "pshape"),
    [((300, 400), None, None), ((64, 999), -1, (999,)), ((8, 6, 33, 17), (0, 2, 3), (6, 1, 1))],
    ids=["whole", "rows", "channels"],
)


@PATHS
@LAYOUTS
@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dead_outputs_are_reused(recycling, rng, path, shape, axes, pshape, affine, dtype):
    """Once y and dx die, the next call's outputs take their memory: the same bits, and
    nothing kept while they are in use. The float64 cases write recycled memory with
    streaming stores (from stream_min_bytes, here 0)."""
    stream = 0 if dtype == np.float64 else 1 << 62
    x = (rng.normal(size=shape) * 3 + 40).astype(dtype)
    dy = rng.normal(size=shape).astype(dtype)
    x0, dy0 = x.copy(), dy.copy()
    w = b = None
    if affine and pshape is not None:
        w, b = rng.normal(size=pshape), rng.normal(size=pshape)
    with testing.settings(stream_min_bytes=stream), kernel_path(path):
        y, ctx = ng.normalize_forward(x, axes, weight=w, bias=b)
        dx = ng.normalize_backward(ctx, dy).x
        y1, dx1 = y.copy(), dx.copy()
        used = {_address(y), _address(dx)}
        assert recycling.held == 0
        del y, dx, ctx
        assert recycling.held == 2 * x.nbytes
        y, ctx = ng.normalize_forward(x, axes, weight=w, bias=b)
        dx = ng.normalize_backward(ctx, dy).x
    assert {_address(y), _address(dx)} == used
    assert recycling.held == 0
    np.testing.assert_array_equal(y, y1)
    np.testing.assert_array_equal(dx, dx1)
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(dy, dy0)
    with ng.use_kernels(False):
        yr, cr = ng.normalize_forward(x, axes, weight=w, bias=b)
        dxr = ng.normalize_backward(cr, dy).x
    close(y, yr, 4, y_scale(cr))
    close(dx, dxr, 16, dx_scale(cr, dy))


def test_a_live_view_keeps_its_memory(recycling, rng):
    """A view of an output (even of a view) keeps the output's memory out of reuse."""
    x = rng.normal(size=(300, 400))
    y = ng.normalize(x)
    view = y.T[::2].view(np.int64)
    before = view.copy()
    del y
    assert recycling.held == 0
    y2 = ng.normalize(x + 1.0)
    assert not np.shares_memory(y2, view)
    np.testing.assert_array_equal(view, before)
    del view
    assert recycling.held == x.nbytes
    del y2
    assert recycling.held == 2 * x.nbytes


def test_limit_drops_the_oldest(recycling, rng):
    """The free list keeps at most the limit, dropping the oldest buffers first; a buffer
    over the limit is never kept; `release_buffers` empties it and says how much."""
    recycling.limit = 3 * (1 << 20)
    sizes = [1 << 20, (1 << 20) + 8, (1 << 20) + 16, (1 << 20) + 24]  # bytes of float64 output
    for nbytes in sizes:
        y = ng.normalize(rng.normal(size=nbytes // 8))
        del y
    assert recycling.held <= 3 * (1 << 20)
    assert [raw.nbytes for raw in recycling.order.values()] == sizes[-2:]
    big = ng.normalize(rng.normal(size=(1 << 20) // 2))  # 4 MiB: over the limit
    del big
    assert [raw.nbytes for raw in recycling.order.values()] == sizes[-2:]
    assert ng.release_buffers() == sum(sizes[-2:])
    assert recycling.held == 0 and not recycling.free and not recycling.order
    alive = [ng.normalize(rng.normal(size=(1 << 20) // 8)) for _ in range(4)]  # one size
    del alive
    kept = list(recycling.order.values())
    assert len(kept) == 3 and recycling.held == 3 << 20
    assert all(a is b for a, b in zip(recycling.free[1 << 20], kept, strict=True))


def test_environment_variable(monkeypatch, rng):
    """`NORMGRAD_RECYCLE_MB`: 0 keeps nothing; anything but a whole number >= 0 is a clear
    error naming the variable and the value."""
    x = rng.normal(size=(300, 400))
    for bad in ("lots", "-1", "1.5"):
        monkeypatch.setenv("NORMGRAD_RECYCLE_MB", bad)
        with testing.recycler(1 << 16), pytest.raises(NormgradError, match=rf"RECYCLE_MB.*{bad!r}"):
            ng.normalize(x)
    monkeypatch.setenv("NORMGRAD_RECYCLE_MB", "0")
    with testing.recycler(1 << 16) as rec:
        y = ng.normalize(x)
        del y
        assert rec.held == 0
    monkeypatch.delenv("NORMGRAD_RECYCLE_MB")
    with testing.recycler(1 << 16) as rec:
        assert 0 < rec.limit_bytes() <= 1 << 30
    monkeypatch.setenv("NORMGRAD_RECYCLE_MB", "5")
    with testing.recycler(1 << 16) as rec:
        assert rec.limit_bytes() == 5 << 20


def test_paused_maps_every_output(recycling, rng):
    """Inside `recycling_paused()` (the benchmark's `fused_mapped`) no output takes or leaves memory
    for reuse; afterwards recycling goes on with the same limit."""
    x = rng.normal(size=(300, 400))
    y = ng.normalize(x)
    del y
    assert recycling.held == x.nbytes
    with testing.recycling_paused():
        y = ng.normalize(x)
        assert recycling.held == x.nbytes  # not taken
        del y
        assert recycling.held == x.nbytes  # not given back
    assert recycling.limit_bytes() == 16 << 20
    kept = ng.normalize(x)
    assert recycling.held == 0 and kept.shape == x.shape


def test_threads_share_the_free_list(recycling, rng):
    """Four threads normalizing at once, their outputs dying in any order: every result is
    right and no buffer is handed to two live outputs."""
    xs = [rng.normal(size=(200, 300)) * (k + 1) + k for k in range(4)]
    with ng.use_kernels(False):
        refs = [ng.normalize(x) for x in xs]
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            kept = []
            for i in range(30):
                y = ng.normalize(xs[k])
                np.testing.assert_allclose(y, refs[k], rtol=0, atol=1e-12)
                kept.append(y)
                if i % 3 == 2:
                    addresses = [_address(a) for a in kept]
                    assert len(set(addresses)) == len(addresses)
                    kept.clear()
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_full_shaped_parameters_take_recycled_memory(recycling, rng, monkeypatch, dtype):
    """Weight and bias as large as x: besides y and dx, their gradient sums come from the
    recycler, and are dweight and dbias themselves (per element, in the parameters' dtype);
    the parameters are their own tables (no copy). So the second call maps no new memory
    for them; the gradients are the generic path's."""
    x = (rng.normal(size=(300, 400)) * 3 + 40).astype(dtype)
    dy = rng.normal(size=x.shape).astype(dtype)
    w, b = (1 + rng.normal(size=x.shape)).astype(dtype), rng.normal(size=x.shape).astype(dtype)
    taken: list[bool] = []
    real = recycling.empty

    def empty(shape, dt):
        out = real(shape, dt)
        taken.append(out[1])
        return out

    monkeypatch.setattr(recycling, "empty", empty)
    for _ in range(2):
        taken.clear()
        y, ctx = ng.normalize_forward(x, None, weight=w, bias=b)
        got = ng.normalize_backward(ctx, dy)
        del y, ctx
        got = tuple(np.array(g) for g in got)  # (copies: the outputs' memory is freed)
    assert len(taken) == 4 and all(taken), taken  # y, dx, and the sums of dweight and dbias
    with ng.use_kernels(False):
        _, ref_ctx = ng.normalize_forward(x, None, weight=w, bias=b)
        ref = ng.normalize_backward(ref_ctx, dy)
    for g, r in zip(got, ref, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-5 if dtype == np.float32 else 1e-12, atol=1e-5)
