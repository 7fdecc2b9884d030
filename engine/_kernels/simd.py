"""Explicit SIMD for the channels-last prototype sums: one Numba intrinsic.

The prototype sums of a channels-last tile (:func:`engine._kernels.channels_last.sums_range`)
add, for every channel, the terms of the tile's positions one after the other (the order is
fixed so that the prototypes do not depend on the thread count). Written as Numba loops, LLVM
vectorises only the short channel loop inside each position step and keeps the sums in memory
between steps, behind runtime alias checks: about 25 instructions a position at eight channels
(``benchmarks/RESULTS.md``, "Issue 15, fifth session"). Numba has no vector types, so
the intrinsics here emit the loop themselves in LLVM IR: each block of eight channels' two
sums held in two ``<8 x double>`` registers across all the tile's positions, each position
one load-and-widen of the block's eight float32 values and two ``llvm.fmuladd`` with the
broadcast weights (three instructions a position and block with AVX-512; 1.35-1.4x the
Numba loop at 128³×8). One, two or four blocks run in one loop (8, 16 or 32 channels), so
that more channels give more independent chains.

float64 features are loaded as they are, float32 ones widened exactly. Bits: each lane
computes ``s = fmuladd(f[k, c], w[k], s)`` for k in order, the same chain as the Numba loop's
``s += f * w`` under ``fastmath={"contract"}`` (``llvm.fmuladd`` is fused exactly where LLVM
fuses a contracted multiply and add, on the same target), so the sums are bit for bit those
of the scalar kernel (``tests/engine/test_cl_sums_twin.py``). On a CPU without 512-bit
vectors LLVM splits each ``<8 x double>`` into the registers it has.
"""
from __future__ import annotations

from typing import Any

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.core.extending import intrinsic

__all__ = ["LANES", "fmuladd_rows8", "fmuladd_rows16", "fmuladd_rows32"]

#: Channels per block of :func:`fmuladd_rows8`.
LANES = 8


def _rows_intrinsic(blocks: int) -> Any:
    """The intrinsic for ``blocks`` blocks of eight channels side by side: ``2·blocks``
    independent chains of ``llvm.fmuladd`` in one loop over the positions, so that the adds'
    latency overlaps (one block alone is a single chain per sum: four cycles a position)."""
    width = LANES * blocks

    def typer(typingctx: Any, Ft: Any, n: Any, c0: Any, wf: Any, wb: Any, a: Any, b: Any) -> Any:
        f32_2d = (isinstance(Ft, types.Array) and Ft.ndim == 2 and Ft.layout == "C"
                  and Ft.dtype in (types.float32, types.float64))
        f64_1d = all(isinstance(x, types.Array) and x.ndim == 1 and x.dtype == types.float64
                     for x in (wf, wb, a, b))
        if not (f32_2d and f64_1d and a.layout == "C" and b.layout == "C"
                and isinstance(n, types.Integer) and isinstance(c0, types.Integer)):
            return None
        return types.void(Ft, n, c0, wf, wb, a, b), _codegen

    def _codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        Fty, nty, cty, wfty, wbty, aty, bty = signature.args
        intp = context.get_value_type(types.intp)
        Fa = context.make_array(Fty)(context, builder, args[0])
        count = context.cast(builder, args[1], nty, types.intp)
        first = context.cast(builder, args[2], cty, types.intp)
        wfa = context.make_array(wfty)(context, builder, args[3])
        wba = context.make_array(wbty)(context, builder, args[4])
        aa = context.make_array(aty)(context, builder, args[5])
        ba = context.make_array(bty)(context, builder, args[6])
        wide = Fty.dtype == types.float64  # float64 features: no widening
        v8f = ir.VectorType(ir.DoubleType() if wide else ir.FloatType(), LANES)
        v8d = ir.VectorType(ir.DoubleType(), LANES)
        item = ir.Constant(intp, 8 if wide else 4)
        fmuladd = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v8d, [v8d, v8d, v8d]),
                                                 "llvm.fmuladd.v8f64")
        row_bytes = cgutils.unpack_tuple(builder, Fa.strides)[0]
        i8p = ir.IntType(8).as_pointer()
        rows = builder.gep(builder.bitcast(Fa.data, i8p), [builder.mul(first, item)])
        sums = []  # per block: (its float32 offset, the two sums' pointers and their allocas)
        for j in range(blocks):
            c = builder.add(first, ir.Constant(intp, LANES * j))
            ap = builder.bitcast(builder.gep(aa.data, [c]), v8d.as_pointer())
            bp = builder.bitcast(builder.gep(ba.data, [c]), v8d.as_pointer())
            # allocas that LLVM promotes to registers (mem2reg): no memory traffic in the loop
            sa = cgutils.alloca_once(builder, v8d)
            sb = cgutils.alloca_once(builder, v8d)
            builder.store(builder.load(ap, align=8), sa)
            builder.store(builder.load(bp, align=8), sb)
            sums.append((builder.mul(item, ir.Constant(intp, LANES * j)), ap, bp, sa, sb))
        undef = ir.Constant(v8d, ir.Undefined)
        lane0 = ir.Constant(ir.IntType(32), 0)
        splat = ir.Constant(ir.VectorType(ir.IntType(32), LANES), [0] * LANES)
        with cgutils.for_range(builder, count) as loop:
            k = loop.index
            row = builder.gep(rows, [builder.mul(k, row_bytes)])
            u = builder.shuffle_vector(builder.insert_element(undef, builder.load(builder.gep(wfa.data, [k])), lane0),
                                       undef, splat)
            v = builder.shuffle_vector(builder.insert_element(undef, builder.load(builder.gep(wba.data, [k])), lane0),
                                       undef, splat)
            for offset, _, _, sa, sb in sums:
                ptr = builder.bitcast(builder.gep(row, [offset]), v8f.as_pointer())
                f = builder.load(ptr, align=8 if wide else 4)
                if not wide:
                    f = builder.fpext(f, v8d)
                builder.store(builder.call(fmuladd, [f, u, builder.load(sa)]), sa)
                builder.store(builder.call(fmuladd, [f, v, builder.load(sb)]), sb)
        for _, ap, bp, sa, sb in sums:
            builder.store(builder.load(sa), ap, align=8)
            builder.store(builder.load(sb), bp, align=8)
        return context.get_dummy_value()

    typer.__name__ = typer.__qualname__ = f"fmuladd_rows{width}"
    typer.__doc__ = (f"``a[c] = fmuladd(Ft[k, c], wf[k], a[c])`` and ``b[c] = fmuladd(Ft[k, c], wb[k], b[c])``"
                     f" for ``k = 0 .. n-1`` in order, for the {width} channels ``c0 .. c0+{width - 1}`` at once."
                     + _CONTRACT)
    return intrinsic(typer)


_CONTRACT = """

    ``Ft``: 2-D float32 or float64 tile, C-contiguous (a position's channels side by side), with the
    channels from ``c0`` on and at least ``n`` rows; ``wf``, ``wb``: 1-D float64 weights, at
    least ``n``; ``a``, ``b``: 1-D float64 sums, C-contiguous, with the same channels. Nothing
    is checked at run time (the caller's loop bounds are the checks); other array types do
    not compile.
"""

fmuladd_rows8 = _rows_intrinsic(1)
fmuladd_rows16 = _rows_intrinsic(2)
fmuladd_rows32 = _rows_intrinsic(4)
