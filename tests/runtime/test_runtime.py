"""Process state has one owner (`_runtime`): its reset, its settings, and the kernels'
cache that drops itself when a kernel file changed."""

from __future__ import annotations

import numpy as np
import pytest

import normgrad as ng
from normgrad import _runtime, testing

pytest.importorskip("numba")


def test_reset_forgets_caches_and_settings(rng, monkeypatch):
    x = rng.normal(size=(30, 40))
    ng.normalize(x, -1)
    assert _runtime.STATE.planned
    monkeypatch.setattr(_runtime.STATE, "settings", _runtime.Settings(small_max_size=0))
    monkeypatch.setenv("NORMGRAD_KERNELS", "0")
    assert _runtime.kernel_mode() in ("0", _runtime.STATE.env_mode)
    testing.reset()
    assert not _runtime.STATE.planned and _runtime.STATE.env_mode is None
    assert _runtime.STATE.settings == _runtime.Settings()
    monkeypatch.delenv("NORMGRAD_KERNELS")
    testing.reset()


def test_settings_apply_inside_the_block_only(rng):
    x = rng.normal(size=(30, 40))
    assert ng.plan_forward(x, -1).path == "small"
    with testing.settings(small_max_size=10) as s:
        assert s.small_max_size == 10 and ng.plan_forward(x, -1).path == "native"
    assert ng.plan_forward(x, -1).path == "small"
    with pytest.raises(TypeError):
        with testing.settings(no_such_threshold=1):
            pass


def test_release_buffers_hands_back_the_recycled_memory(rng):
    with testing.recycler(1 << 16, 16 << 20) as rec:
        y = ng.normalize(rng.normal(size=(300, 400)))
        nbytes = y.nbytes
        del y
        assert testing.held_bytes() == nbytes == rec.held
        assert ng.release_buffers() == nbytes and rec.held == 0


def test_a_changed_kernel_file_drops_the_cache(tmp_path):
    """numba keys each cached kernel on its own file only: when any kernel file (or
    _formulas.py) changes, normgrad.kernels drops the whole folder's cache (here on a copy
    of the layout, so the suite's own cache stays)."""
    import os

    from normgrad.kernels import _drop_stale_cache

    here = tmp_path / "kernels"
    (here / "__pycache__").mkdir(parents=True)
    (here / "_loops.py").write_text("# a kernel file\n")
    (tmp_path / "_formulas.py").write_text("# the formulas\n")
    _drop_stale_cache(here)
    fake = here / "__pycache__" / "_loops.kernel-1.py311.nbi"
    fake.write_text("")
    _drop_stale_cache(here)  # nothing changed: kept
    assert fake.exists()
    for changed in (here / "_loops.py", tmp_path / "_formulas.py"):
        st = changed.stat()
        os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        _drop_stale_cache(here)
        assert not fake.exists()
        fake.write_text("")


def test_the_pool_lives_in_the_runtime(rng):
    with ng.use_kernels(True):
        ng.normalize(rng.normal(size=(4, 60_000)), -1)
    assert _runtime.STATE.pool is not None
    with testing.private_pool(2) as pool:
        assert _runtime.STATE.pool is pool
        y = ng.normalize(rng.normal(size=(4, 60_000)), -1)
        assert np.isfinite(y).all()
    assert _runtime.STATE.pool is not pool
