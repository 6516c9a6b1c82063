"""IQ4_NL and IQ4_XS compiled for the CPU with numba: quantize_row_iq4_nl_impl (ntry = 7), super-block
by super-block, with or without quant_weights, as ggml's quantize_iq4_nl / quantize_iq4_xs call it.

The float32 operations are iq4.py's, which are C's in C's order; the byte layouts are in iq4.py's
docstring. In torch the 16 tries of every 32-value group are [32, 16, groups] tensors (a bucketize,
gathers and 64 sequential adds per chunk): about 2 Mvalues/s on 2 cores. Here each super-block is
finished in registers, and tasks of super-blocks run in parallel (prange).

best_index_int8 without its binary search: the table's values are integers, so `values[k] <= al`
is `values[k] <= floor(al)`, and a table indexed by floor(al) gives the search's upper end mu;
C's final comparison then runs as written.

Optional as numba is (see _numba): `available()` is False without it, and iq4.py's torch code runs.
"""
from __future__ import annotations

import numpy as np
import torch

from ._numba import F, numba
from ._numba import available as _numba_available

KVALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.float32)
# MU[f + 127] for f = floor(al) in [-127, 112]: 1 + how many of KVALUES[1..14] are <= f
MU = np.array([1 + int((KVALUES[1:15] <= f).sum()) for f in range(-127, 113)], np.int64)
# the search needs the value, not the code: the two candidates by floor(al), and a select
LO, HI = KVALUES[MU - 1], KVALUES[MU]
GROUP_MAX_EPS = F(1e-15)
NTRY = 7
VALUES_PER_TASK = 1 << 14


def available() -> bool:
    return _numba_available()


if numba is not None:
    from ._numba import fp16_bits, nearest_int_nan0, prange, store_le16
    from ._numba import inline as _inline
    from ._numba import jit_parallel as _jit

    @_inline
    def _best_index(al, vals, mu_of):  # pragma: no cover - compiled
        """best_index_int8(16, kvalues_iq4nl, al), without branches (selects only, so that the
        loops calling it stay free of mispredictions). Below values[0] and above values[15] the
        final comparison of a clamped mu already picks 0 and 15; a NaN fails every comparison of
        C's search, which ends at 15."""
        fl = np.floor(al)
        fl = fl if fl >= F(-127.0) else F(-127.0)
        fl = fl if fl <= F(112.0) else F(112.0)
        mu = mu_of[np.int64(fl) + 127]
        r = mu - np.int64(al - vals[mu - 1] < vals[mu] - al)
        return r if al == al else 15

    @_inline
    def _best_value(al, lo_of, hi_of, top):  # pragma: no cover - compiled
        """kvalues_iq4nl[best_index_int8(16, kvalues_iq4nl, al)], as _best_index picks it."""
        fl = np.floor(al)
        fl = fl if fl >= F(-127.0) else F(-127.0)
        fl = fl if fl <= F(112.0) else F(112.0)
        k = np.int64(fl) + 127
        lo = lo_of[k]
        hi = hi_of[k]
        q = lo if al - lo < hi - al else hi
        return q if al == al else top

    @_inline
    def _impl(x, qw, use_qw, o, sbs, vals, lo_of, hi_of, weight, ids, sumqx, sumq2, scales):  # pragma: no cover - compiled
        """quantize_row_iq4_nl_impl's search for the super-block x[o : o + sbs]: the scales of its
        32-value groups into scales[0 : sbs // 32]; returns max_scale."""
        zero = F(0.0)
        sigma2 = zero
        if use_qw:
            for j in range(sbs):
                sigma2 = sigma2 + x[o + j] * x[o + j]
            sigma2 = sigma2 * F(2.0 / sbs)
        max_scale = zero
        amax_scale = zero
        for ib in range(sbs // 32):
            b = o + 32 * ib
            if use_qw:
                for j in range(32):
                    weight[j] = qw[b + j] * np.sqrt(sigma2 + x[b + j] * x[b + j])
            else:
                for j in range(32):
                    weight[j] = x[b + j] * x[b + j]
            amax = zero
            mx = zero
            for j in range(32):
                ax = abs(x[b + j])
                if ax > amax:
                    amax = ax
                    mx = x[b + j]
            if amax < GROUP_MAX_EPS:
                scales[ib] = zero
                continue
            d = -mx / vals[0]
            # try 0: id = 1/d; tries 1..2*NTRY+1: id = (itry + values[0])/max, itry = -NTRY..NTRY.
            # The tries run side by side, innermost (so that they vectorize), each adding its
            # terms in C's order
            ids[0] = F(1.0) / d
            for t in range(1, 2 * NTRY + 2):
                ids[t] = F(t - 1 - NTRY - 127) / mx
            for t in range(2 * NTRY + 2):
                sumqx[t] = zero
                sumq2[t] = zero
            for j in range(32):
                xj = x[b + j]
                wj = weight[j]
                for t in range(2 * NTRY + 2):
                    q = _best_value(ids[t] * xj, lo_of, hi_of, vals[15])
                    sumqx[t] = sumqx[t] + wj * q * xj
                    sumq2[t] = sumq2[t] + wj * q * q
            d = sumqx[0] / sumq2[0] if sumq2[0] > zero else zero
            best = d * sumqx[0]
            for t in range(1, 2 * NTRY + 2):
                if sumq2[t] > zero and sumqx[t] * sumqx[t] > best * sumq2[t]:
                    d = sumqx[t] / sumq2[t]
                    best = d * sumqx[t]
            scales[ib] = d
            abs_d = abs(d)
            if abs_d > amax_scale:
                amax_scale = abs_d
                max_scale = d
        return max_scale

    @_inline
    def _pack_nibbles(L, n, row, at):  # pragma: no cover - compiled
        for i in range(n // 32):
            for j in range(16):
                row[at + 16 * i + j] = L[32 * i + j] | (L[32 * i + 16 + j] << 4)

    @_jit
    def _iq4_nl_rows(x, qw, use_qw, vals, mu_of, lo_of, hi_of, out):  # pragma: no cover - compiled
        """quantize_iq4_nl for x [nb, 32] (qw: the same shape, read when use_qw); out [nb, 18]."""
        nb = x.shape[0]
        per = VALUES_PER_TASK // 32
        zero = F(0.0)
        for t in prange((nb + per - 1) // per):
            weight = np.empty(32, np.float32)
            ids = np.empty(2 * NTRY + 2, np.float32)
            sumqx = np.empty(2 * NTRY + 2, np.float32)
            sumq2 = np.empty(2 * NTRY + 2, np.float32)
            scales = np.empty(1, np.float32)
            L = np.empty(32, np.int64)
            for i in range(t * per, min(nb, (t + 1) * per)):
                xi = x[i]
                _impl(xi, qw[i], use_qw, 0, 32, vals, lo_of, hi_of, weight, ids, sumqx, sumq2, scales)
                s = scales[0]
                store_le16(out[i], 0, fp16_bits(s))
                id_ = F(1.0) / s if s != zero else zero
                for j in range(32):
                    L[j] = _best_index(id_ * xi[j], vals, mu_of)
                _pack_nibbles(L, 32, out[i], 2)

    @_jit
    def _iq4_xs_rows(x, qw, use_qw, vals, mu_of, lo_of, hi_of, out):  # pragma: no cover - compiled
        """quantize_iq4_xs for x [nb, 256] (qw: the same shape, read when use_qw); out [nb, 136]."""
        nb = x.shape[0]
        per = VALUES_PER_TASK // 256
        zero = F(0.0)
        for t in prange((nb + per - 1) // per):
            weight = np.empty(32, np.float32)
            ids = np.empty(2 * NTRY + 2, np.float32)
            sumqx = np.empty(2 * NTRY + 2, np.float32)
            sumq2 = np.empty(2 * NTRY + 2, np.float32)
            scales = np.empty(8, np.float32)
            L = np.empty(256, np.int64)
            for i in range(t * per, min(nb, (t + 1) * per)):
                xi = x[i]
                max_scale = _impl(xi, qw[i], use_qw, 0, 256, vals, lo_of, hi_of, weight, ids, sumqx, sumq2, scales)
                d = -max_scale / F(32.0)
                store_le16(out[i], 0, fp16_bits(d))
                id_ = F(1.0) / d if d != zero else zero
                scales_h = 0
                scales_l = 0
                for ib in range(8):
                    l = nearest_int_nan0(id_ * scales[ib])
                    l = max(-32, min(31, l))
                    dl = d * F(l)
                    idl = F(1.0) / dl if dl != zero else zero
                    for j in range(32):
                        L[32 * ib + j] = _best_index(idl * xi[32 * ib + j], vals, mu_of)
                    l += 32
                    if ib % 2 == 0:
                        scales_l = l & 0xF
                    else:
                        out[i, 4 + ib // 2] = scales_l | ((l & 0xF) << 4)
                    scales_h |= (l >> 4) << (2 * ib)
                store_le16(out[i], 2, scales_h)
                _pack_nibbles(L, 256, out[i], 8)


def _rows(kernel, x: torch.Tensor, qw: torch.Tensor | None, type_size: int) -> torch.Tensor:
    xn = x.contiguous().numpy()
    qn = xn if qw is None else qw.contiguous().numpy()     # unread without an importance (use_qw)
    out = np.empty((xn.shape[0], type_size), np.uint8)
    kernel(xn, qn, qw is not None, KVALUES, MU, LO, HI, out)
    return torch.from_numpy(out)


def quantize_iq4_nl(x: torch.Tensor, qw: torch.Tensor | None = None) -> torch.Tensor:
    """iq4.quantize_iq4_nl for CPU tensors: x (and qw) float32 [n, 32] -> uint8 [n, 18]."""
    return _rows(_iq4_nl_rows, x, qw, 18)


def quantize_iq4_xs(x: torch.Tensor, qw: torch.Tensor | None = None) -> torch.Tensor:
    """iq4.quantize_iq4_xs for CPU tensors: x (and qw) float32 [n, 256] -> uint8 [n, 136]."""
    return _rows(_iq4_xs_rows, x, qw, 136)
