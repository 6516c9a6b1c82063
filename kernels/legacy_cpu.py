"""Q8_0 compiled for the CPU with numba: quantize_row_q8_0_ref, block by block, in one pass.

In torch the same code (legacy.py) makes about a dozen passes over the chunk (abs, max, the
scale, roundf's trunc/compare/where, the int8 conversion, the packing); here each 32-value block
is finished in registers, and rows of blocks run in parallel (prange). Same float32 operations as
C: d = amax/127, id = 1/d (0 when d is 0), qs = roundf(x*id).

Optional as numba is (see _numba): `available()` is False without it, and legacy.py's torch code
runs instead.
"""
from __future__ import annotations

import numpy as np
import torch

from ._numba import F, numba
from ._numba import available as _numba_available

QK8_0 = 32
BLOCKS_PER_TASK = 2048      # blocks a parallel task takes: 256 KiB of float32


def available() -> bool:
    return _numba_available()


if numba is not None:
    from ._numba import fp16_bits, jit_parallel, prange, round_away, store_le16

    @jit_parallel
    def _q8_0_rows(x, out):  # pragma: no cover - compiled
        nb = x.shape[0]
        zero = F(0.0)
        for t in prange((nb + BLOCKS_PER_TASK - 1) // BLOCKS_PER_TASK):
            for i in range(t * BLOCKS_PER_TASK, min(nb, (t + 1) * BLOCKS_PER_TASK)):
                amax = zero
                for j in range(QK8_0):                  # amax = MAX(amax, fabsf(v))
                    a = abs(x[i, j])
                    amax = amax if amax > a else a
                d = amax / F(127.0)
                id_ = F(1.0) / d if d != zero else zero
                store_le16(out[i], 0, fp16_bits(d))
                for j in range(QK8_0):
                    v = round_away(x[i, j] * id_)
                    # the float -> int8 store as x86 makes it: out of range (an infinite id_, for amax
                    # below ~4e-37) or NaN gives 0x80000000, so the byte 0
                    out[i, 2 + j] = np.int64(v) & 0xFF if F(-2147483648.0) <= v < F(2147483648.0) else 0


def quantize_q8_0(x: torch.Tensor) -> torch.Tensor:
    """legacy.quantize_q8_0 for CPU tensors: x float32 [n, 32] -> uint8 [n, 34]."""
    xn = x.contiguous().numpy()
    out = np.empty((xn.shape[0], 2 + QK8_0), np.uint8)
    _q8_0_rows(xn, out)
    return torch.from_numpy(out)
