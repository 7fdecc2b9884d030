"""Elementary functions that LLVM can vectorise inside a Numba loop: the natural logarithm.

Numba calls the C library's ``log`` for ``np.log`` (this build of llvmlite has no SVML), one
scalar call per value, so a loop over a volume that takes two logarithms a position (the mean
binary entropy of :mod:`engine._kernels.baseline`) runs at one position at a time: about 12 ns
a position, 25 ms a 128³ volume on one thread. :func:`log` is fdlibm's ``__ieee754_log``
(the algorithm of most C libraries) written without branches: the exponent and mantissa are
taken from the bits (:func:`f64_bits`, :func:`bits_f64`, LLVM ``bitcast``), subnormal inputs
are scaled by 2⁵⁴ first, and the polynomial is evaluated for every lane. Inlined into a loop
compiled with ``error_model="numpy"`` (so the division carries no zero check and branch),
LLVM turns it into vector instructions: 4.8 ms instead of 25 ms for the 2 M entropy terms
above (``benchmarks/RESULTS.md``, "Issue 15, eighth session").

Accuracy: within 1 ulp of ``np.log`` on positive finite doubles, subnormals included
(``tests/engine/test_vmath.py``); ``log(1) = 0`` exactly. Only positive finite inputs are
defined; the caller selects them (the baselines pass 0.5 for the others and discard it).
"""
from __future__ import annotations

from typing import Any

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core.extending import intrinsic

__all__: list[str] = []  # private module


@intrinsic
def f64_bits(typingctx: Any, x: Any) -> Any:
    """The IEEE 754 bits of a float64 as an int64 (a ``bitcast``, no conversion)."""
    if x != types.float64:
        return None

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.bitcast(args[0], ir.IntType(64))

    return types.int64(types.float64), codegen


@intrinsic
def bits_f64(typingctx: Any, i: Any) -> Any:
    """The float64 whose IEEE 754 bits are the int64 ``i`` (a ``bitcast``)."""
    if i != types.int64:
        return None

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.bitcast(args[0], ir.DoubleType())

    return types.float64(types.int64), codegen


# fdlibm e_log.c: ln 2 split in two (the high part has 32 trailing zero bits, so k·LN2_HI is
# exact for every exponent), and the coefficients of its polynomial in s² on
# [-0.1716, 0.1716] (log(1+f) = 2s + 2/3 s³ + 2/5 s⁵ + ..., s = f/(2+f)).
_LN2_HI = 6.93147180369123816490e-01
_LN2_LO = 1.90821492927058770002e-10
_LG1 = 6.666666666666735130e-01
_LG2 = 3.999999999940941908e-01
_LG3 = 2.857142874366239149e-01
_LG4 = 2.222219843214978396e-01
_LG5 = 1.818357216161805012e-01
_LG6 = 1.531383769920937332e-01
_LG7 = 1.479819860511658591e-01
_SQRT2 = 1.4142135623730951
_TWO54 = 18014398509481984.0
_MIN_NORMAL = 2.2250738585072014e-308
_MANTISSA = 0x000FFFFFFFFFFFFF
_ONE_BITS = 0x3FF0000000000000


@njit(inline="always", error_model="numpy")
def log(x):  # pragma: no cover - compiled
    """Natural logarithm of a positive finite float64, branch-free (see the module's notes)."""
    sub = x < _MIN_NORMAL
    xs = x * _TWO54 if sub else x
    b = f64_bits(xs)
    k = (b >> 52) - (1077 if sub else 1023)
    m = bits_f64((b & _MANTISSA) | _ONE_BITS)  # in [1, 2)
    big = m > _SQRT2
    m = m * 0.5 if big else m  # in [sqrt(2)/2, sqrt(2)]
    k = k + 1 if big else k
    f = m - 1.0
    s = f / (2.0 + f)
    z = s * s
    w = z * z
    r = z * (_LG1 + w * (_LG3 + w * (_LG5 + w * _LG7))) + w * (_LG2 + w * (_LG4 + w * _LG6))
    hfsq = 0.5 * f * f
    dk = np.float64(k)
    return dk * _LN2_HI - ((hfsq - (s * (hfsq + r) + dk * _LN2_LO)) - f)


@njit(nogil=True, cache=True, error_model="numpy")
def log_into(x, out):  # pragma: no cover - compiled
    """``out[i] = log(x[i])`` for 1-D float64 arrays (the entry ``tests/engine/test_vmath.py`` calls)."""
    for i in range(x.shape[0]):
        out[i] = log(x[i])
