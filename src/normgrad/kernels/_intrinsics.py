"""numba intrinsics the pool and the native jobs are built on: atomics on int64 arrays,
addresses as pointers, float bits in int64 slots, and calls of compiled parts by address.

numba caches the kernels that inline these by their own file's time stamp: after editing
this file, `make clean-cache` (`make test` does it when a kernel file changed).
"""

from __future__ import annotations

from typing import Any

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic


def _load_acquire_typing(typingctx, arr, i):
    """`arr[i]` of an int64 array as an atomic acquire load: it is read again on every
    iteration of a spin loop (a plain load may be hoisted out of it)."""

    def codegen(context, builder, sig, args):
        a = cgutils.create_struct_proxy(sig.args[0])(context, builder, value=args[0])
        return builder.load_atomic(builder.gep(a.data, [args[1]]), "acquire", 8)

    return types.int64(arr, i), codegen


def _fetch_add_typing(typingctx, arr, i, v):
    """Atomically add `v` to `arr[i]` (int64) and return the old value; sequentially
    consistent, so the stores made before it (a chunk's results) are visible to a thread
    that then reads `arr[i]`."""

    def codegen(context, builder, sig, args):
        a = cgutils.create_struct_proxy(sig.args[0])(context, builder, value=args[0])
        return builder.atomic_rmw("add", builder.gep(a.data, [args[1]]), args[2], "seq_cst")

    return types.int64(arr, i, v), codegen


def _swap_if_typing(typingctx, arr, i, old, new):
    """Atomically set `arr[i]` (int64) to `new` if it holds `old`; True if it did."""

    def codegen(context, builder, sig, args):
        a = cgutils.create_struct_proxy(sig.args[0])(context, builder, value=args[0])
        ptr = builder.gep(a.data, [args[1]])
        res = builder.cmpxchg(ptr, args[2], args[3], "seq_cst", "seq_cst")
        return builder.extract_value(res, 1)

    return types.boolean(arr, i, old, new), codegen


def _address_typing(typingctx, addr):
    """An int64 address (`arr.ctypes.data`, stored in a board) as a `voidptr` for
    `numba.carray`."""

    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)

    return types.voidptr(addr), codegen


def _float_bits_typing(typingctx, v):
    """The bits of a float64 as an int64 (or back): floats travel in a board's int64 slots."""
    to = types.float64 if v == types.int64 else types.int64
    lt = ir.DoubleType() if to == types.float64 else ir.IntType(64)

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], lt)

    return to(v), codegen


def _call_part_typing(typingctx, fn, board_address, slot):
    """Call the C function at address `fn` as `fn(board_address, slot)` (a native job's part:
    a `cfunc` of `PART_SIGNATURE`)."""

    def codegen(context, builder, sig, args):
        i64 = ir.IntType(64)
        fnty = ir.FunctionType(ir.VoidType(), [i64, i64])
        builder.call(builder.inttoptr(args[0], fnty.as_pointer()), [args[1], args[2]])
        return context.get_dummy_value()

    return types.void(fn, board_address, slot), codegen


def _call_plain_typing(typingctx, fn):
    """Call the C function at address `fn` as `int fn(void)` and return its result (the
    pool's `sched_yield`, the OpenMP runtime's `omp_get_thread_num`)."""

    def codegen(context, builder, sig, args):
        fnty = ir.FunctionType(ir.IntType(32), [])
        res = builder.call(builder.inttoptr(args[0], fnty.as_pointer()), [])
        return builder.sext(res, ir.IntType(64))

    return types.int64(fn), codegen


def _call_team_typing(typingctx, fn, entry, data, nthreads):
    """Call the OpenMP runtime's `GOMP_parallel` at address `fn` as `fn(entry, data,
    nthreads, 0)`: `void entry(void *data)` runs on each thread of a team of up to `nthreads`
    (the calling thread is number 0), and the call returns when every one has returned."""

    def codegen(context, builder, sig, args):
        i64, i32 = ir.IntType(64), ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [i64, i64, i32, i32])
        n = builder.trunc(args[3], i32)
        builder.call(builder.inttoptr(args[0], fnty.as_pointer()), [args[1], args[2], n, i32(0)])
        return context.get_dummy_value()

    return types.void(fn, entry, data, nthreads), codegen


# called from jitted code as `load_acquire(arr, i)`, `fetch_add(arr, i, v)`,
# `swap_if(arr, i, old, new)`, `address(addr)`, `float_bits(v)`, `call_part(fn, board, slot)`,
# `call_plain(fn)`, `call_team(fn, entry, data, nthreads)`
load_acquire: Any = intrinsic(_load_acquire_typing)
fetch_add: Any = intrinsic(_fetch_add_typing)
swap_if: Any = intrinsic(_swap_if_typing)
address: Any = intrinsic(_address_typing)
float_bits: Any = intrinsic(_float_bits_typing)
call_part: Any = intrinsic(_call_part_typing)
call_plain: Any = intrinsic(_call_plain_typing)
call_team: Any = intrinsic(_call_team_typing)
PART_SIGNATURE = types.void(types.int64, types.int64)  # (board address, slot)
