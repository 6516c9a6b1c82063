"""numba building blocks shared by the CPU kernels (searches_cpu, legacy_cpu, kquants_cpu), the
compiled counterparts of _ops: C's float32 semantics bit for bit, as ggml's reference code has them.

numba's default math is IEEE float32 with no FMA contraction and no reassociation, so a C
expression written out the same way rounds the same way. What needs care is done here: bit casts
(nearest_int's trick, the fp16 conversion), roundf, and a NaN coding as x86 codes it.

numba is optional: `available()` is False where it is missing, and the torch kernels run instead
(QUANTKIT_KERNELS=torch, see backends.py, runs them where it is installed).

The kernels are cached on disk (cache=True: compiling them takes ~10 s). numba keys each cache on
the kernel's own file only, so after editing this file or searches_cpu.py in a source checkout,
drop kernels/__pycache__/*.nbi (`make test` does); an installed package gets new files, and new
caches, with each install.
"""
from __future__ import annotations


import numpy as np

try:
    import numba
    import numba.extending
    from numba import prange  # noqa: F401  (re-exported for the kernel modules)
except ImportError:  # pragma: no cover - exercised where numba is absent
    numba = None

F = np.float32

# GGML_FP16_TO_FP32 for every half, as a lookup table (exact; the halves written are never NaN
# but 0x7E00, which the table maps to a quiet NaN as C does)
FP16_TO_F32 = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)
_SCALE_TO_INF = F(2.0 ** 112)
_SCALE_TO_ZERO = F(2.0 ** -110)


def available() -> bool:
    return numba is not None


if numba is not None:
    # error_model="numpy": a float division by zero gives inf/NaN as in C, not ZeroDivisionError
    jit_parallel = numba.njit(parallel=True, cache=True, error_model="numpy", nogil=True)
    inline = numba.njit(inline="always", error_model="numpy")
    # one tile (or one super-block) of work, called from the parallel loops of the kernel modules
    jit_tile = numba.njit(cache=True, error_model="numpy", nogil=True)

    @numba.extending.intrinsic
    def f32_bits(typingctx, v):
        """The int32 bits of a float32 (a bit cast, as C's memcpy)."""
        from llvmlite import ir

        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], ir.IntType(32))
        return numba.types.int32(numba.types.float32), codegen

    @numba.extending.intrinsic
    def bits_f32(typingctx, v):
        """The float32 whose bits are the int32 v."""
        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], context.get_value_type(numba.types.float32))
        return numba.types.float32(numba.types.int32), codegen

    @inline
    def nearest_int(v):  # pragma: no cover - compiled
        """ggml's nearest_int, bit for bit: the low mantissa bits of v + 1.5 * 2^23."""
        return (np.int64(f32_bits(v + F(12582912.0))) & 0x007FFFFF) - 0x00400000

    @inline
    def nearest_int_nan0(v):  # pragma: no cover - compiled
        """nearest_int, with a NaN coding to 0 whatever its bits (as x86's default NaN does in C)."""
        return 0 if v != v else nearest_int(v)

    @inline
    def _u32(f):  # pragma: no cover - compiled
        return np.int64(f32_bits(f)) & 0xFFFFFFFF

    @inline
    def fp16_bits(f):  # pragma: no cover - compiled
        """GGML_FP32_TO_FP16 (ggml_compute_fp32_to_fp16, the portable one): round to nearest
        even, overflow to inf, NaN -> 0x7E00 with the sign. Returns the half's bits."""
        base = (abs(f) * _SCALE_TO_INF) * _SCALE_TO_ZERO
        w = _u32(f)
        shl1_w = (w + w) & 0xFFFFFFFF
        sign = w & 0x80000000
        bias = shl1_w & 0xFF000000
        if bias < 0x71000000:
            bias = 0x71000000
        base = bits_f32(np.int32((bias >> 1) + 0x07800000)) + base
        bits = _u32(base)
        nonsign = ((bits >> 13) & 0x00007C00) + (bits & 0x00000FFF)
        return (sign >> 16) | (0x7E00 if shl1_w > 0xFF000000 else nonsign)

    @inline
    def round_away(v):  # pragma: no cover - compiled
        """C roundf: half away from zero (np.rint is half to even)."""
        t = np.trunc(v)
        if abs(v - t) >= F(0.5):
            t = t + (F(1.0) if v > 0 else F(-1.0))
        return t

    @inline
    def store_le16(row, at, v):  # pragma: no cover - compiled
        row[at] = v & 0xFF
        row[at + 1] = (v >> 8) & 0xFF
