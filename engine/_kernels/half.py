"""float32 → float16 bits as NumPy's cast computes them (``npy_floatbits_to_halfbits``: IEEE
round to nearest, ties to even), without NumPy's per-element underflow flag.

NumPy's cast sets the floating-point underflow status for every value that becomes a float16
subnormal or zero: 170 ms per 128³ map of such values (a sigmoid map's background) against
7 ms for values in range. ``protoseg demo`` stores 60 such maps (issue 15).
"""
from __future__ import annotations

import numpy as np
from numba import njit

__all__: list[str] = []  # private module


@njit(cache=True, nogil=True)
def float16_bits(src, dst):
    """``dst[i]`` = the float16 bits of the float32 whose bits are ``src[i]`` (both 1-D,
    ``src`` uint32, ``dst`` uint16): NumPy's ``npy_floatbits_to_halfbits``, line by line."""
    for i in range(src.shape[0]):
        f = np.uint32(src[i])
        h_sgn = np.uint32((f & np.uint32(0x80000000)) >> np.uint32(16))
        f_exp = f & np.uint32(0x7F800000)
        if f_exp >= np.uint32(0x47800000):  # overflow to ±inf, inf, NaN
            f_sig = f & np.uint32(0x007FFFFF)
            if f_exp == np.uint32(0x7F800000) and f_sig != np.uint32(0):
                ret = np.uint32(0x7C00) + (f_sig >> np.uint32(13))
                if ret == np.uint32(0x7C00):  # keep it a NaN
                    ret += np.uint32(1)
                dst[i] = np.uint16(h_sgn + ret)
            else:
                dst[i] = np.uint16(h_sgn + np.uint32(0x7C00))
        elif f_exp <= np.uint32(0x38000000):  # a float16 subnormal or signed zero
            if f_exp < np.uint32(0x33000000):
                dst[i] = np.uint16(h_sgn)
            else:
                e = f_exp >> np.uint32(23)
                f_sig = np.uint32(0x00800000) + (f & np.uint32(0x007FFFFF))
                f_sig = f_sig >> (np.uint32(113) - e)
                # ties to even: the bits shifted out (up to 11) are checked in ``f`` itself
                if ((f_sig & np.uint32(0x00003FFF)) != np.uint32(0x00001000)
                        or (f & np.uint32(0x000007FF)) != np.uint32(0)):
                    f_sig += np.uint32(0x00001000)
                dst[i] = np.uint16(h_sgn + (f_sig >> np.uint32(13)))
        else:  # a normal float16 (rounding may carry into the exponent, up to inf)
            h_exp = (f_exp - np.uint32(0x38000000)) >> np.uint32(13)
            f_sig = f & np.uint32(0x007FFFFF)
            if (f_sig & np.uint32(0x00003FFF)) != np.uint32(0x00001000):
                f_sig += np.uint32(0x00001000)
            dst[i] = np.uint16(h_sgn + h_exp + (f_sig >> np.uint32(13)))
