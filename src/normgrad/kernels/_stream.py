"""Streaming (non-temporal) stores for the kernels' outputs, as numba intrinsics.

An ordinary store first reads the destination's cache line from memory (write-allocate), so
writing `y` costs two passes of memory traffic; a non-temporal store writes the line without
reading it. For outputs much larger than the last-level cache that makes `y = (x - mu) r`
markedly faster (docs/performance.md, "Streaming stores"); for outputs that fit in the cache
it is slower (the line is not kept), so only outputs from `Settings.stream_min_bytes`
(`_runtime`) stream.

`stream_span` finds the 64-byte-aligned part of a contiguous segment; `stream_forward` and
`stream_backward` write it with vector non-temporal stores, computing in float64 with the
same operations in the same order as the kernels' scalar loops (the same bits, tested), and
end with a fence so the stores are visible before the chunk is counted done.

numba caches the kernels that inline these by `_loops.py`'s own time stamp: after editing
this file, `make clean-cache` (`make test` does it when a kernel file changed).
"""

from __future__ import annotations

from typing import Any

from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

VEC_BYTES = 64  # one cache line, and one AVX-512 register


@njit(cache=True, inline="always")
def stream_span(n, out, a, b):
    """`[j0, j1)`: the part of `out[:n]` that starts on a 64-byte boundary and holds whole
    vectors, if `out`, `a` and `b` (the inputs) are contiguous; `(n, n)` otherwise."""
    size = out.itemsize
    addr = out.ctypes.data
    if out.strides[0] != size or a.strides[0] != a.itemsize or b.strides[0] != b.itemsize:
        return n, n
    if addr % size != 0:
        return n, n
    j0 = min(n, ((-addr) % VEC_BYTES) // size)
    width = VEC_BYTES // size
    return j0, j0 + (n - j0) // width * width


def _width(out_type: Any) -> int:
    return VEC_BYTES * 8 // int(out_type.dtype.bitwidth)


def _load(context, builder, aty, arr, idx, width):
    """`arr[idx : idx + width]` as a float64 vector (unaligned load)."""
    data = cgutils.create_struct_proxy(aty)(context, builder, value=arr).data
    elt = context.get_data_type(aty.dtype)
    ptr = builder.bitcast(builder.gep(data, [idx]), ir.VectorType(elt, width).as_pointer())
    v = builder.load(ptr, align=aty.dtype.bitwidth // 8)
    if isinstance(elt, ir.DoubleType):
        return v
    return builder.fpext(v, ir.VectorType(ir.DoubleType(), width))


def _store(context, builder, aty, arr, idx, width, val):
    """Round `val` to the array's dtype and store it at `arr[idx]` (aligned, non-temporal)."""
    data = cgutils.create_struct_proxy(aty)(context, builder, value=arr).data
    elt = context.get_data_type(aty.dtype)
    if not isinstance(elt, ir.DoubleType):
        val = builder.fptrunc(val, ir.VectorType(elt, width))
    ptr = builder.bitcast(builder.gep(data, [idx]), ir.VectorType(elt, width).as_pointer())
    store = builder.store(val, ptr, align=VEC_BYTES)
    hint = builder.module.add_metadata([ir.Constant(ir.IntType(32), 1)])
    store.set_metadata("nontemporal", hint)


def _splat(builder, val, width):
    vec = ir.Constant(ir.VectorType(ir.DoubleType(), width), ir.Undefined)
    for i in range(width):
        vec = builder.insert_element(vec, val, ir.Constant(ir.IntType(32), i))
    return vec


def _vector_loop(builder, j0, j1, width, body):
    """Call `body(idx)` for idx = j0, j0 + width, ... < j1, then fence."""
    step = ir.Constant(j0.type, width)
    count = builder.sdiv(builder.sub(j1, j0), step)
    with cgutils.for_range(builder, count) as loop:
        body(builder.add(j0, builder.mul(loop.index, step)))
    builder.fence("seq_cst")  # non-temporal stores are weakly ordered: publish them


def _stream_forward_typing(typingctx, xs, ys, j0, j1, coef):
    """`ys[j] = (xs[j] - mu) * r` for j in [j0, j1), `coef = (mu, r)`, as
    `_loops._write_y`."""
    width = _width(ys)

    def codegen(context, builder, sig, args):
        xa, ya, lo, hi, pair = args
        mu_v, r_v = (builder.extract_value(pair, i) for i in range(2))
        mus, rs = _splat(builder, mu_v, width), _splat(builder, r_v, width)

        def body(idx):
            xv = _load(context, builder, sig.args[0], xa, idx, width)
            val = builder.fmul(builder.fsub(xv, mus), rs)
            _store(context, builder, sig.args[1], ya, idx, width, val)

        _vector_loop(builder, lo, hi, width, body)
        return context.get_dummy_value()

    sig = types.void(xs, ys, types.intp, types.intp, types.UniTuple(types.float64, 2))
    return sig, codegen


def _stream_backward_typing(typingctx, xs, ds, dxs, j0, j1, coef):
    """`dxs[j] = r * (ds[j] - m) + bt * (xs[j] - mu)` for j in [j0, j1), `coef = (mu, r, m,
    bt)`, as `_loops._write_dx` without a weight."""
    width = _width(dxs)

    def codegen(context, builder, sig, args):
        xa, da, dxa, lo, hi, quad = args
        mu_v, r_v, m_v, bt_v = (builder.extract_value(quad, i) for i in range(4))
        mus, rs, ms, bts = (_splat(builder, v, width) for v in (mu_v, r_v, m_v, bt_v))

        def body(idx):
            xv = _load(context, builder, sig.args[0], xa, idx, width)
            dv = _load(context, builder, sig.args[1], da, idx, width)
            left = builder.fmul(rs, builder.fsub(dv, ms))
            right = builder.fmul(bts, builder.fsub(xv, mus))
            _store(context, builder, sig.args[2], dxa, idx, width, builder.fadd(left, right))

        _vector_loop(builder, lo, hi, width, body)
        return context.get_dummy_value()

    sig = types.void(xs, ds, dxs, types.intp, types.intp, types.UniTuple(types.float64, 4))
    return sig, codegen


# called from jitted code: stream_forward(xs, ys, j0, j1, (mu, r)) and
# stream_backward(xs, ds, dxs, j0, j1, (mu, r, m, bt))
stream_forward: Any = intrinsic(_stream_forward_typing)
stream_backward: Any = intrinsic(_stream_backward_typing)
