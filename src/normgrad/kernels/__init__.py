"""The fused multi-threaded CPU kernels (numba) for NumPy float32/float64 inputs.

Loaded by `_runtime.kernels()` on first use, so that `import normgrad` never imports numba.

    _run.py         entry points, one per path and direction (`RUNNERS`)
    _loops.py       every numba loop: element loops, spans, groups, splits, sweeps
    _layout.py      plain-Python planning: block views, parameters, threads, statistics
    _native.py      native jobs: the board's parameter slots, the parts, the callers
    _board.py       the board's memory layout
    _pool.py        the thread pool: chunk claims, workers, Python and native jobs
    _team.py        the torch adapter's native jobs on PyTorch's OpenMP team
    _stream.py      streaming (non-temporal) stores
    _intrinsics.py  atomics, addresses and calls by address, as numba intrinsics

The path rules (which of these runs) are in `normgrad._dispatch`; the formulas they compile
are `normgrad._formulas`.

numba caches each compiled function by its own file's time stamp only, but the kernels
compile code from the other files here (and `_formulas.py`) into themselves: after an edit
of any of them, cached kernels would silently run the old code. So the cache in this folder
is dropped whenever one of these files changed (`_drop_stale_cache`, a few `stat` calls).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

_HERE = Path(__file__).resolve().parent


def _drop_stale_cache(here: Path = _HERE) -> None:
    """Drop `here`'s numba cache unless it was made from these very sources."""
    sources = [*sorted(here.glob("*.py")), here.parent / "_formulas.py"]
    digest = hashlib.sha256()
    for path in sources:
        st = path.stat()
        digest.update(f"{path.name}:{st.st_mtime_ns}:{st.st_size};".encode())
    stamp = digest.hexdigest()
    cache = here / "__pycache__"
    mark = cache / "normgrad-kernels.stamp"
    try:
        if mark.read_text() == stamp:
            return
    except OSError:
        pass
    try:
        cache.mkdir(exist_ok=True)
        for stale in [*cache.glob("*.nbi"), *cache.glob("*.nbc")]:
            stale.unlink(missing_ok=True)
        mark.write_text(stamp)
    except OSError:  # a read-only install: numba keeps its cache elsewhere
        pass


_drop_stale_cache()
