"""Explicit SIMD for the two channels-last passes over the features: Numba intrinsics.

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

The projection ``z = F·(P-N)`` (:func:`engine._kernels.channels_last.project_range`) was one
horizontal reduction per position in an order LLVM chose (``reassoc``); :func:`project_rows`
computes eight positions at a time in an order it defines, with ``llvm.fma`` (the same bits on
every machine; ``tests/engine/test_cl_projection_order.py`` checks them against exact
rational arithmetic): 1.3-1.4x at 128³×8 and 128³×16 (``benchmarks/RESULTS.md``, "Issue 15,
sixth session"). :func:`project_count_rows` emits the same sums and counts their decisions
instead of storing them (a tensor on the guide's grid needs no map: 1.4x at 128³×8 against
storing z and counting it in ``decide``).
"""
from __future__ import annotations

from typing import Any

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.core.extending import intrinsic

__all__ = ["LANES", "fmuladd_rows8", "fmuladd_rows16", "fmuladd_rows32", "project_rows", "project_count_rows",
           "transpose8"]

#: Channels per block of :func:`fmuladd_rows8`.
LANES = 8


def _array(t: Any, ndim: int, dtypes: tuple[Any, ...], layout: str | None = "C") -> bool:
    """Whether the Numba type ``t`` is an array of ``ndim`` dimensions, one of ``dtypes``,
    and (unless ``layout`` is None) of that layout."""
    return (isinstance(t, types.Array) and t.ndim == ndim and t.dtype in dtypes
            and (layout is None or t.layout == layout))


_TILE = (types.float32, types.float64)  # the features' dtypes the intrinsics read
_F64 = (types.float64,)


def _splat(builder: Any, x: Any) -> Any:
    """``<8 x double>`` with every lane ``x`` (a double)."""
    undef = ir.Constant(ir.VectorType(ir.DoubleType(), LANES), ir.Undefined)
    i32 = ir.IntType(32)
    return builder.shuffle_vector(builder.insert_element(undef, x, ir.Constant(i32, 0)), undef,
                                  ir.Constant(ir.VectorType(i32, LANES), [0] * LANES))


def _row_vectors(context: Any, Fty: Any) -> tuple[bool, Any, Any, Any]:
    """For a tile of type ``Fty``: whether it is float64 (no widening), the ``<8 x float>`` (or
    double) type of a row's block, ``<8 x double>``, and the item size as an ``intp`` constant."""
    wide = Fty.dtype == types.float64
    f64 = ir.DoubleType()
    item = ir.Constant(context.get_value_type(types.intp), 8 if wide else 4)
    return wide, ir.VectorType(f64 if wide else ir.FloatType(), LANES), ir.VectorType(f64, LANES), item


def _rows_intrinsic(blocks: int) -> Any:
    """The intrinsic for ``blocks`` blocks of eight channels side by side: ``2·blocks``
    independent chains of ``llvm.fmuladd`` in one loop over the positions, so that the adds'
    latency overlaps (one block alone is a single chain per sum: four cycles a position)."""
    width = LANES * blocks

    def typer(typingctx: Any, Ft: Any, n: Any, c0: Any, wf: Any, wb: Any, a: Any, b: Any) -> Any:
        if not (_array(Ft, 2, _TILE) and _array(wf, 1, _F64, None) and _array(wb, 1, _F64, None)
                and _array(a, 1, _F64) and _array(b, 1, _F64)
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
        wide, v8f, v8d, item = _row_vectors(context, Fty)
        fmuladd = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v8d, [v8d, v8d, v8d]),
                                                 "llvm.fmuladd.v8f64")
        row_bytes = cgutils.unpack_tuple(builder, Fa.strides)[0]
        i8p = ir.IntType(8).as_pointer()
        rows = builder.gep(builder.bitcast(Fa.data, i8p), [builder.mul(first, item)])
        sums = []  # per block: (its byte offset in a row, the two sums' pointers and their allocas)
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
        with cgutils.for_range(builder, count) as loop:
            k = loop.index
            row = builder.gep(rows, [builder.mul(k, row_bytes)])
            u = _splat(builder, builder.load(builder.gep(wfa.data, [k])))
            v = _splat(builder, builder.load(builder.gep(wba.data, [k])))
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


# --------------------------------------------------------------------------- the projection
def _hsum_tree(builder: Any, v: Any) -> Any:
    """``((v0+v4) + (v2+v6)) + ((v1+v5) + (v3+v7))`` of one ``<8 x double>`` (the order of
    :func:`project_rows`' eight-position tree, for a position alone)."""
    i32 = ir.IntType(32)

    def half(x: Any, lo: list[int], hi: list[int]) -> Any:
        undef = ir.Constant(x.type, ir.Undefined)
        return builder.fadd(builder.shuffle_vector(x, undef, ir.Constant(ir.VectorType(i32, len(lo)), lo)),
                            builder.shuffle_vector(x, undef, ir.Constant(ir.VectorType(i32, len(hi)), hi)))

    a = half(v, [0, 1, 2, 3], [4, 5, 6, 7])  # a_i = v_i + v_{i+4}
    b = half(a, [0, 1], [2, 3])  # b_i = a_i + a_{i+2}
    return builder.fadd(builder.extract_element(b, ir.Constant(i32, 0)), builder.extract_element(b, ir.Constant(i32, 1)))


def _tree8(builder: Any, vs: list[Any]) -> Any:
    """The eight positions' sums of :func:`_hsum_tree`, as one ``<8 x double>`` (lane p is
    ``vs[p]``'s), with the same pairs added: a transpose of the three halving steps."""
    i32 = ir.IntType(32)

    def pair(x: Any, y: Any, lo: list[int], hi: list[int]) -> Any:
        return builder.fadd(builder.shuffle_vector(x, y, ir.Constant(ir.VectorType(i32, 8), lo)),
                            builder.shuffle_vector(x, y, ir.Constant(ir.VectorType(i32, 8), hi)))

    # (p.lo4, q.lo4) + (p.hi4, q.hi4): lanes 0-3 hold p's a_i, lanes 4-7 q's
    A = [pair(vs[2 * j], vs[2 * j + 1], [0, 1, 2, 3, 8, 9, 10, 11], [4, 5, 6, 7, 12, 13, 14, 15]) for j in range(4)]
    # b_i = a_i + a_{i+2}: lanes (p0 b0, p0 b1, p1 b0, p1 b1, p2 b0, ...)
    Bv = [pair(A[2 * j], A[2 * j + 1], [0, 1, 4, 5, 8, 9, 12, 13], [2, 3, 6, 7, 10, 11, 14, 15]) for j in range(2)]
    # t = b0 + b1: lane p is position p's sum
    return pair(Bv[0], Bv[1], [0, 2, 4, 6, 8, 10, 12, 14], [1, 3, 5, 7, 9, 11, 13, 15])


def _emit_projection(context: Any, builder: Any, Fty: Any, F: Any, count: Any, Dty: Any, D: Any,
                     group: Any, one_position: Any) -> None:
    """Emit :func:`project_rows`' loops over the ``count`` rows of the tile ``F`` (type ``Fty``)
    with ``D``: ``group(k0, T)`` receives the ``<8 x double>`` sums of rows ``k0 .. k0+7``,
    ``one_position(k, t)`` the sum of each of the last rows (fewer than eight)."""
    intp = context.get_value_type(types.intp)
    Fa = context.make_array(Fty)(context, builder, F)
    Da = context.make_array(Dty)(context, builder, D)
    wide, v8f, v8d, item = _row_vectors(context, Fty)
    f64 = ir.DoubleType()
    ft = v8f.element
    fma_v = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v8d, [v8d] * 3), "llvm.fma.v8f64")
    fma_s = cgutils.get_or_insert_function(builder.module, ir.FunctionType(f64, [f64] * 3), "llvm.fma.f64")
    shape = cgutils.unpack_tuple(builder, Fa.shape)
    C = shape[1]
    row_bytes = cgutils.unpack_tuple(builder, Fa.strides)[0]
    lanes = ir.Constant(intp, LANES)
    blocks = builder.udiv(C, lanes)
    whole = builder.mul(blocks, lanes)
    base = builder.bitcast(Fa.data, ir.IntType(8).as_pointer())
    i32 = ir.IntType(32)

    def row_ptr(k: Any) -> Any:
        return builder.gep(base, [builder.mul(k, row_bytes)])

    def block(row: Any, j: Any) -> Any:  # <8 x double> of the row's block j
        p = builder.gep(row, [builder.mul(builder.mul(j, lanes), item)])
        x = builder.load(builder.bitcast(p, v8f.as_pointer()), align=8 if wide else 4)
        return x if wide else builder.fpext(x, v8d)

    def scalar(row: Any, c: Any) -> Any:  # Ft[k, c] as double
        x = builder.load(builder.bitcast(builder.gep(row, [builder.mul(c, item)]), ft.as_pointer()))
        return x if wide else builder.fpext(x, f64)

    def dblock(j: Any) -> Any:
        return builder.load(builder.bitcast(builder.gep(Da.data, [builder.mul(j, lanes)]), v8d.as_pointer()), align=8)

    one = ir.Constant(intp, 1)
    acc = [cgutils.alloca_once(builder, v8d) for _ in range(LANES)]
    tacc = cgutils.alloca_once(builder, v8d)
    groups = builder.udiv(count, lanes)
    d0 = dblock(ir.Constant(intp, 0))
    with cgutils.for_range(builder, groups) as g:
        k0 = builder.mul(g.index, lanes)
        rows = [row_ptr(builder.add(k0, ir.Constant(intp, p))) for p in range(LANES)]
        for p in range(LANES):
            builder.store(builder.fmul(block(rows[p], ir.Constant(intp, 0)), d0), acc[p])
        with cgutils.for_range(builder, builder.sub(blocks, one)) as jl:
            j = builder.add(jl.index, one)
            dj = dblock(j)
            for p in range(LANES):
                builder.store(builder.call(fma_v, [block(rows[p], j), dj, builder.load(acc[p])]), acc[p])
        builder.store(_tree8(builder, [builder.load(a) for a in acc]), tacc)
        with cgutils.for_range(builder, builder.sub(C, whole)) as cl:
            c = builder.add(whole, cl.index)
            fv = ir.Constant(v8d, ir.Undefined)
            for p in range(LANES):
                fv = builder.insert_element(fv, scalar(rows[p], c), ir.Constant(i32, p))
            ds = _splat(builder, builder.load(builder.gep(Da.data, [c])))
            builder.store(builder.call(fma_v, [fv, ds, builder.load(tacc)]), tacc)
        group(k0, builder.load(tacc))
    # the last positions (fewer than eight), one at a time, in the same order
    sacc = cgutils.alloca_once(builder, f64)
    with cgutils.for_range(builder, builder.sub(count, builder.mul(groups, lanes))) as r:
        k = builder.add(builder.mul(groups, lanes), r.index)
        row = row_ptr(k)
        builder.store(builder.fmul(block(row, ir.Constant(intp, 0)), d0), acc[0])
        with cgutils.for_range(builder, builder.sub(blocks, one)) as jl:
            j = builder.add(jl.index, one)
            builder.store(builder.call(fma_v, [block(row, j), dblock(j), builder.load(acc[0])]), acc[0])
        builder.store(_hsum_tree(builder, builder.load(acc[0])), sacc)
        with cgutils.for_range(builder, builder.sub(C, whole)) as cl:
            c = builder.add(whole, cl.index)
            dc = builder.load(builder.gep(Da.data, [c]))
            builder.store(builder.call(fma_s, [scalar(row, c), dc, builder.load(sacc)]), sacc)
        one_position(k, builder.load(sacc))


@intrinsic
def project_rows(typingctx: Any, Ft: Any, n: Any, D: Any, zt: Any) -> Any:
    """``zt[k] = Σ_c Ft[k, c]·D[c]`` for ``k = 0 .. n-1``, for a tile of at least eight channels,
    in this order (machine-independent: ``llvm.fma`` is always fused):

    - per position, the eight lanes ``v_i = Ft[k, i]·D[i]`` of the first block of eight channels,
      then ``v_i = fma(Ft[k, 8j+i], D[8j+i], v_i)`` for the further whole blocks j in order;
    - ``t = ((v0+v4) + (v2+v6)) + ((v1+v5) + (v3+v7))``;
    - ``t = fma(Ft[k, c], D[c], t)`` for the channels c after the last whole block, in order.

    Eight positions at a time: eight rows' blocks as eight vectors, their sums by a transposed
    tree of shuffles and adds (14 shuffles and 7 adds for eight positions, instead of a
    horizontal reduction each). ``Ft``: 2-D float32 or float64, C-contiguous, ``C >= 8``
    channels (not checked); ``D``: 1-D float64 of ``C``; ``zt``: 1-D float64, at least ``n``.
    """
    if not (_array(Ft, 2, _TILE) and isinstance(n, types.Integer) and _array(D, 1, _F64) and _array(zt, 1, _F64)):
        return None
    sig = types.void(Ft, n, D, zt)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        Fty, nty, Dty, zty = signature.args
        za = context.make_array(zty)(context, builder, args[3])
        v8d = ir.VectorType(ir.DoubleType(), LANES)

        def group(k0: Any, T: Any) -> None:
            builder.store(T, builder.bitcast(builder.gep(za.data, [k0]), v8d.as_pointer()), align=8)

        def one(k: Any, t: Any) -> None:
            builder.store(t, builder.gep(za.data, [k]))

        _emit_projection(context, builder, Fty, args[0], context.cast(builder, args[1], nty, types.intp), Dty, args[2],
                         group, one)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def project_count_rows(typingctx: Any, Ft: Any, n: Any, D: Any, mid: Any, ref: Any, cnt: Any) -> Any:
    """The decisions ``z[k] > mid`` of :func:`project_rows`' sums (the same values, not stored),
    counted: ``cnt[0] += Σ_k [z[k] > mid]`` and ``cnt[1] += Σ_k [z[k] > mid and ref[k] != 0]``.

    Eight positions at a time the comparison is one vector compare, the reference's eight bytes
    one vector load, and each count a population count of an eight-bit mask. ``ref``: 1-D
    uint8, C-contiguous, at least ``n``; ``cnt``: 1-D int64 of at least 2; ``mid``: float64;
    the rest as :func:`project_rows`.
    """
    if not (_array(Ft, 2, _TILE) and isinstance(n, types.Integer) and _array(D, 1, _F64) and mid == types.float64
            and _array(ref, 1, (types.uint8,)) and _array(cnt, 1, (types.int64,))):
        return None
    sig = types.void(Ft, n, D, mid, ref, cnt)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        Fty, nty, Dty = signature.args[:3]
        ra = context.make_array(signature.args[4])(context, builder, args[4])
        ca = context.make_array(signature.args[5])(context, builder, args[5])
        m = args[3]
        i8, i64 = ir.IntType(8), ir.IntType(64)
        v8b = ir.VectorType(i8, LANES)
        ctpop = cgutils.get_or_insert_function(builder.module, ir.FunctionType(i8, [i8]), "llvm.ctpop.i8")
        mids = _splat(builder, m)
        npos = cgutils.alloca_once_value(builder, ir.Constant(i64, 0))
        ntp = cgutils.alloca_once_value(builder, ir.Constant(i64, 0))

        def add(slot: Any, bits: Any) -> None:
            builder.store(builder.add(builder.load(slot), builder.zext(bits, i64)), slot)

        def group(k0: Any, T: Any) -> None:
            pos = builder.fcmp_ordered(">", T, mids)  # <8 x i1>, NaN: not a positive
            r = builder.load(builder.bitcast(builder.gep(ra.data, [k0]), v8b.as_pointer()), align=1)
            inref = builder.icmp_unsigned("!=", r, ir.Constant(v8b, [0] * LANES))
            add(npos, builder.call(ctpop, [builder.bitcast(pos, i8)]))
            add(ntp, builder.call(ctpop, [builder.bitcast(builder.and_(pos, inref), i8)]))

        def one(k: Any, t: Any) -> None:
            pos = builder.fcmp_ordered(">", t, m)
            inref = builder.icmp_unsigned("!=", builder.load(builder.gep(ra.data, [k])), ir.Constant(i8, 0))
            add(npos, pos)
            add(ntp, builder.and_(pos, inref))

        _emit_projection(context, builder, Fty, args[0], context.cast(builder, args[1], nty, types.intp), Dty, args[2],
                         group, one)
        for slot, i in ((npos, 0), (ntp, 1)):
            ptr = builder.gep(ca.data, [ir.Constant(context.get_value_type(types.intp), i)])
            builder.store(builder.add(builder.load(ptr), builder.load(slot)), ptr)
        return context.get_dummy_value()

    return sig, codegen


# --------------------------------------------------------------------------- 8×8 transpose
_SIGNED = (types.int8, types.int16, types.int32, types.int64)


def _cast_vector(builder: Any, v: Any, src: Any, dst: Any, vty: Any) -> Any:
    """The vector ``v`` of Numba scalar type ``src`` cast lane by lane to ``vty`` (of ``dst``),
    as NumPy's ``astype`` casts a value that fits: to float rounding to nearest, between
    integers by truncation or extension."""
    if src == dst:
        return v
    to_float = isinstance(dst, types.Float)
    if isinstance(src, types.Float):
        if not to_float:
            return builder.fptoui(v, vty)
        return builder.fpext(v, vty) if dst.bitwidth > src.bitwidth else builder.fptrunc(v, vty)
    signed = src in _SIGNED
    if to_float:
        return builder.sitofp(v, vty) if signed else builder.uitofp(v, vty)
    if dst.bitwidth == src.bitwidth:  # int16 -> uint16: the same bits
        return v
    if dst.bitwidth < src.bitwidth:
        return builder.trunc(v, vty)
    return builder.sext(v, vty) if signed else builder.zext(v, vty)


def _transpose_rows(builder: Any, rows: list[Any]) -> list[Any]:
    """The columns of the 8×8 matrix whose rows are the eight vectors ``rows``: three rounds
    of pairwise shuffles (distance 1, 2 and 4), 24 in all."""
    i32 = ir.IntType(32)

    def shuf(x: Any, y: Any, lanes: list[int]) -> Any:
        return builder.shuffle_vector(x, y, ir.Constant(ir.VectorType(i32, LANES), lanes))

    lo1, hi1 = [0, 8, 2, 10, 4, 12, 6, 14], [1, 9, 3, 11, 5, 13, 7, 15]
    a: list[Any] = []
    for j in range(0, LANES, 2):  # a[j]: even columns of rows j, j+1; a[j+1]: odd ones
        a += [shuf(rows[j], rows[j + 1], lo1), shuf(rows[j], rows[j + 1], hi1)]
    lo2, hi2 = [0, 1, 8, 9, 4, 5, 12, 13], [2, 3, 10, 11, 6, 7, 14, 15]
    b: list[Any] = [None] * LANES
    for base in (0, 4):  # rows 0-3, rows 4-7: b[base + col % 4] holds columns col and col + 4
        b[base + 0] = shuf(a[base + 0], a[base + 2], lo2)
        b[base + 2] = shuf(a[base + 0], a[base + 2], hi2)
        b[base + 1] = shuf(a[base + 1], a[base + 3], lo2)
        b[base + 3] = shuf(a[base + 1], a[base + 3], hi2)
    lo3, hi3 = [0, 1, 2, 3, 8, 9, 10, 11], [4, 5, 6, 7, 12, 13, 14, 15]
    cols: list[Any] = [None] * LANES
    for c in range(4):
        cols[c] = shuf(b[c], b[4 + c], lo3)
        cols[c + 4] = shuf(b[c], b[4 + c], hi3)
    return cols


_TRANSPOSE_SOURCES = (types.uint8, types.int8, types.uint16, types.int16, types.int32, types.uint32,
                      types.float32, types.float64)
_TRANSPOSE_TARGETS = (types.float32, types.uint8, types.uint16)


@intrinsic
def transpose8(typingctx: Any, m: Any, out: Any, c0: Any, b: Any, a0: Any) -> Any:
    """``out[a0 + i, b, c0 + j] = m[c0 + j, b, a0 + i]`` for ``i, j`` in ``0 .. 7``, cast to
    ``out``'s dtype (:func:`_cast_vector`): eight vector loads of a row each, the casts, a
    transpose in registers and eight vector stores. ``m`` and ``out`` are C-contiguous 3-D
    arrays; the caller keeps the block inside both (no bounds are checked)."""
    if not (_array(m, 3, _TRANSPOSE_SOURCES) and _array(out, 3, _TRANSPOSE_TARGETS)
            and all(isinstance(x, types.Integer) for x in (c0, b, a0))):
        return None

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        mty, oty, cty, bty, aty = signature.args
        ma = context.make_array(mty)(context, builder, args[0])
        oa = context.make_array(oty)(context, builder, args[1])
        c, bb, a = (context.cast(builder, v, t, types.intp) for v, t in zip(args[2:], (cty, bty, aty)))
        src_t = context.get_value_type(mty.dtype)
        dst_t = context.get_value_type(oty.dtype)
        vsrc, vdst = ir.VectorType(src_t, LANES), ir.VectorType(dst_t, LANES)
        ms = cgutils.unpack_tuple(builder, ma.strides)
        os_ = cgutils.unpack_tuple(builder, oa.strides)
        intp = context.get_value_type(types.intp)
        i8p = ir.IntType(8).as_pointer()

        def at(arr: Any, strides: list[Any], item: int, i0: Any, i1: Any, i2: Any) -> Any:
            off = builder.add(builder.add(builder.mul(i0, strides[0]), builder.mul(i1, strides[1])),
                              builder.mul(i2, ir.Constant(intp, item)))
            return builder.gep(builder.bitcast(arr.data, i8p), [off])

        src_item, dst_item = mty.dtype.bitwidth // 8, oty.dtype.bitwidth // 8
        rows = []
        for j in range(LANES):
            p = at(ma, ms, src_item, builder.add(c, ir.Constant(intp, j)), bb, a)
            v = builder.load(builder.bitcast(p, vsrc.as_pointer()), align=src_item)
            rows.append(_cast_vector(builder, v, mty.dtype, oty.dtype, vdst))
        for i, col in enumerate(_transpose_rows(builder, rows)):
            p = at(oa, os_, dst_item, builder.add(a, ir.Constant(intp, i)), bb, c)
            builder.store(col, builder.bitcast(p, vdst.as_pointer()), align=dst_item)
        return context.get_dummy_value()

    return types.void(m, out, c0, b, a0), codegen
