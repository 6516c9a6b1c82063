"""Q4_K, Q5_K and Q6_K super-blocks quantized whole on the CPU with numba: the scale search of
searches_cpu, then what kquants.py does in torch after it (the super-block scales, their fp16
rounding, the final codes and the packing), in one compiled pass per tile of super-blocks.

The float32 operations are kquants.py's, which are ggml's quantize_row_q{4,5,6}_K_ref and, with an
importance matrix, quantize_row_q{4,5,6}_K_impl, in C's order; the byte layouts are in kquants.py's
docstring. What changes is the cost: torch runs each step over the whole chunk, with ~20 passes
over memory and a few hundred dispatches per chunk after the search (half the CPU time of Q4_K);
here each tile of 8 super-blocks is finished while it sits in the L1 cache, and tiles run in
parallel (prange).

Optional as numba is (see _numba): `available()` is False without it, and kquants.py's torch code
runs instead.
"""
from __future__ import annotations

import numpy as np
import torch

from . import searches_cpu
from ._numba import FP16_TO_F32, F, numba
from .searches_cpu import GROUP_MAX_EPS

QK_K = 256
SUPER_TILE = searches_cpu.TILE // 8     # super-blocks per tile: 8 Q4_K/Q5_K, 4 Q6_K (16 sub-blocks each)


def available() -> bool:
    return searches_cpu.available()


if numba is not None:
    from ._numba import fp16_bits, nearest_int, prange, store_le16
    from ._numba import inline as _inline
    from ._numba import jit_parallel as _jit
    from ._numba import nearest_int_nan0 as _final_code
    from .searches_cpu import qkx2_tile, qp_one, qx_rmse1_tile

    @_inline
    def _gather(x, s0, ns, n, xs):  # pragma: no cover - compiled
        """xs[i, b] = value i of sub-block b of super-blocks s0 .. s0 + ns (n values a sub-block)."""
        per = QK_K // n
        for s in range(ns):
            for j in range(per):
                for i in range(n):
                    xs[i, s * per + j] = x[s0 + s, n * j + i]

    @_jit
    def _k_with_min_rows(x, qw, use_qw, nmax, rmin, rdelta, nstep, fp16_to_f32, out):  # pragma: no cover
        """quantize_row_q4_K_ref / _q5_K_ref (use_qw False) or _impl with quant_weights (True),
        for every super-block of x [nb, 256]; out [nb, 144 or 176] uint8. nmax, rmin, rdelta,
        nstep: the search (kquants.k_search)."""
        nb = x.shape[0]
        q5 = nmax == 31
        qs_at = 48 if q5 else 16
        zero = F(0.0)
        for t in prange((nb + SUPER_TILE - 1) // SUPER_TILE):
            s0 = t * SUPER_TILE
            ns = min(nb, s0 + SUPER_TILE) - s0
            m = 8 * ns
            xs = np.empty((32, m), F)
            ws = np.empty((32, m), F)
            _gather(x, s0, ns, 32, xs)
            sw = np.zeros(m, F)
            if use_qw:
                _gather(qw, s0, ns, 32, ws)
                for s in range(ns):
                    sum_x2 = zero                       # over the whole super-block, in order
                    for j in range(8):
                        for i in range(32):
                            sum_x2 = sum_x2 + xs[i, 8 * s + j] * xs[i, 8 * s + j]
                    sigma2 = F(2.0) * sum_x2 / F(QK_K)
                    for j in range(8):
                        b = 8 * s + j
                        for i in range(32):
                            ws[i, b] = ws[i, b] * np.sqrt(sigma2 + xs[i, b] * xs[i, b])
                            sw[b] = sw[b] + ws[i, b]
            else:
                sub_x2 = np.zeros(m, F)                 # over each sub-block, in order
                for i in range(32):
                    for b in range(m):
                        sub_x2[b] = sub_x2[b] + xs[i, b] * xs[i, b]
                for b in range(m):
                    av_x = np.sqrt(sub_x2[b] / F(32.0))
                    for i in range(32):
                        ws[i, b] = av_x + abs(xs[i, b])
            scales = np.empty(m, F)
            mins = np.empty(m, F)
            L = np.empty((32, m), F)
            qkx2_tile(xs, ws, nmax, rmin, rdelta, nstep, scales, mins, L, 0)

            ls = np.empty(8, np.int64)
            lm = np.empty(8, np.int64)
            Lq = np.empty(8, np.int32)
            for s in range(ns):
                row = out[s0 + s]
                if use_qw:
                    d_block = qp_one(scales[8 * s:8 * s + 8], sw[8 * s:8 * s + 8], 63, Lq)
                    for j in range(8):
                        ls[j] = Lq[j]
                    m_block = qp_one(mins[8 * s:8 * s + 8], sw[8 * s:8 * s + 8], 63, Lq)
                    for j in range(8):
                        lm[j] = Lq[j]
                        if q5:                          # Q5_K only: MIN(63, ...)
                            ls[j] = min(63, ls[j])
                            lm[j] = min(63, lm[j])
                else:
                    max_scale = zero
                    max_min = zero
                    for j in range(8):
                        if scales[8 * s + j] > max_scale:
                            max_scale = scales[8 * s + j]
                        if mins[8 * s + j] > max_min:
                            max_min = mins[8 * s + j]
                    inv_scale = F(63.0) / max_scale if max_scale > zero else zero
                    inv_min = F(63.0) / max_min if max_min > zero else zero
                    for j in range(8):
                        ls[j] = min(63, nearest_int(inv_scale * scales[8 * s + j]) & 0xFF)
                        lm[j] = min(63, nearest_int(inv_min * mins[8 * s + j]) & 0xFF)
                    d_block = max_scale / F(63.0)
                    m_block = max_min / F(63.0)
                d_bits = fp16_bits(d_block)
                dmin_bits = fp16_bits(m_block)
                store_le16(row, 0, d_bits)
                store_le16(row, 2, dmin_bits)
                for j in range(4):                      # the 12 scale bytes, uint8 stores
                    row[4 + j] = (ls[j] | ((ls[j + 4] >> 4) << 6)) & 0xFF
                    row[8 + j] = (lm[j] | ((lm[j + 4] >> 4) << 6)) & 0xFF
                    row[12 + j] = ((ls[j + 4] & 0xF) | ((lm[j + 4] & 0xF) << 4)) & 0xFF
                d = fp16_to_f32[d_bits]
                dmin = fp16_to_f32[dmin_bits]
                for j in range(8):
                    b = 8 * s + j
                    if j < 4:                           # get_scale_min_k4: what the bytes hold
                        sc = row[4 + j] & 63
                        mm = row[8 + j] & 63
                    else:
                        sc = (row[8 + j] & 0xF) | ((row[j] >> 6) << 4)
                        mm = (row[8 + j] >> 4) | ((row[4 + j] >> 6) << 4)
                    dq = d * F(sc)
                    if dq == zero:                      # `if (!d) continue;`: the search's codes stay
                        continue
                    dm = dmin * F(mm)
                    for i in range(32):
                        L[i, b] = max(0, min(nmax, _final_code((xs[i, b] + dm) / dq)))
                if q5:
                    for i in range(32):                 # bit j of qh[i]: the fifth bit of L[32j + i]
                        h = 0
                        for j in range(8):
                            h |= ((np.int64(L[i, 8 * s + j]) >> 4) & 1) << j
                        row[16 + i] = h
                for k in range(4):                      # qs[32k + i] = L[64k + i] | L[64k + 32 + i] << 4
                    for i in range(32):
                        lo = np.int64(L[i, 8 * s + 2 * k]) & 0xF
                        hi = np.int64(L[i, 8 * s + 2 * k + 1]) & 0xF
                        row[qs_at + 32 * k + i] = lo | (hi << 4)

    @_jit
    def _q6_k_rows(x, qw, use_qw, fp16_to_f32, out):  # pragma: no cover - compiled
        """quantize_row_q6_K_ref (use_qw False) or _impl with quant_weights, for every
        super-block of x [nb, 256]; out [nb, 210] uint8."""
        nb = x.shape[0]
        per_tile = 2 * SUPER_TILE                       # 16 sub-blocks of 16 a super-block
        zero = F(0.0)
        for t in prange((nb + per_tile - 1) // per_tile):
            s0 = t * per_tile
            ns = min(nb, s0 + per_tile) - s0
            m = 16 * ns
            xs = np.empty((16, m), F)
            _gather(x, s0, ns, 16, xs)
            if use_qw:
                qs = np.empty((16, m), F)
                _gather(qw, s0, ns, 16, qs)
            else:
                qs = xs
            scales = np.empty(m, F)
            L = np.empty((16, m), F)
            qx_rmse1_tile(xs, qs, use_qw, 32, scales, L, 0)

            sc = np.empty(16, np.int64)
            lg = np.empty(4, np.int64)
            for s in range(ns):
                row = out[s0 + s]
                max_scale = zero
                max_abs_scale = zero
                for j in range(16):                     # the first scale of largest magnitude
                    a = abs(scales[16 * s + j])
                    if a > max_abs_scale:
                        max_abs_scale = a
                        max_scale = scales[16 * s + j]
                if max_abs_scale < GROUP_MAX_EPS:       # memset: all-zero bytes
                    row[:] = 0
                    continue
                iscale = F(-128.0) / max_scale
                d_bits = fp16_bits(F(1.0) / iscale)
                d = fp16_to_f32[d_bits]
                for j in range(16):                     # int8 scales = MIN(127, nearest_int(...))
                    v = min(127, nearest_int(iscale * scales[16 * s + j])) & 0xFF
                    row[192 + j] = v
                    sc[j] = v - 256 if v > 127 else v
                store_le16(row, 208, d_bits)
                for j in range(16):
                    b = 16 * s + j
                    dq = d * F(sc[j])
                    if dq == zero:
                        continue
                    for i in range(16):
                        L[i, b] = max(-32, min(31, _final_code(xs[i, b] / dq))) + 32
                for h in range(2):                      # L_g = L[128h + 32g + i]: sub-blocks 8h + 2g, 8h + 2g + 1
                    for i in range(32):
                        for g in range(4):
                            b = 16 * s + 8 * h + 2 * g + i // 16
                            lg[g] = np.int64(L[i % 16, b])
                        row[64 * h + i] = (lg[0] & 0xF) | ((lg[2] & 0xF) << 4)
                        row[64 * h + 32 + i] = (lg[1] & 0xF) | ((lg[3] & 0xF) << 4)
                        row[128 + 32 * h + i] = (lg[0] >> 4) | ((lg[1] >> 4) << 2) | ((lg[2] >> 4) << 4) | \
                            ((lg[3] >> 4) << 6)


def _rows(x: torch.Tensor, qw: torch.Tensor | None, type_size: int):
    xn = x.contiguous().numpy()
    qn = xn if qw is None else qw.contiguous().numpy()     # unread without an importance (use_qw)
    return xn, qn, np.empty((xn.shape[0], type_size), np.uint8)


def quantize_k_with_min(x: torch.Tensor, qw: torch.Tensor | None, search) -> torch.Tensor:
    """kquants.quantize_q4_k (search.nmax 15) or _q5_k (31) for CPU tensors: x (and qw) float32
    [n, 256] -> uint8 [n, 144] or [n, 176]; search: kquants.k_search's parameters."""
    xn, qn, out = _rows(x, qw, {15: 144, 31: 176}[search.nmax])
    _k_with_min_rows(xn, qn, qw is not None, search.nmax, F(search.rmin), F(search.rdelta), search.nstep,
                     FP16_TO_F32, out)
    return torch.from_numpy(out)


def quantize_q6_k(x: torch.Tensor, qw: torch.Tensor | None = None) -> torch.Tensor:
    """kquants.quantize_q6_k for CPU tensors: x (and qw) float32 [n, 256] -> uint8 [n, 210]."""
    xn, qn, out = _rows(x, qw, 210)
    _q6_k_rows(xn, qn, qw is not None, FP16_TO_F32, out)
    return torch.from_numpy(out)
