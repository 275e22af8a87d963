"""The fused multi-threaded CPU kernels (numba) for NumPy float32/float64 inputs.

Nothing is imported here: the package is loaded by `_runtime.kernels()` on first use, so
that `import normgrad` never imports numba.

    _run.py         entry points, one per path and direction (`RUNNERS`)
    _loops.py       every numba loop: element loops, spans, groups, splits, sweeps
    _layout.py      plain-Python planning: block views, parameters, threads, statistics
    _native.py      native jobs: the board's parameter slots, the parts, the callers
    _board.py       the board's memory layout
    _pool.py        the thread pool: chunk claims, workers, Python and native jobs
    _stream.py      streaming (non-temporal) stores
    _intrinsics.py  atomics, addresses and calls by address, as numba intrinsics

The path rules (which of these runs) are in `normgrad._dispatch`; the formulas they compile
are `normgrad._formulas`.
"""
