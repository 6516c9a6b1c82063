"""Q4_K, Q5_K and Q6_K: 256-value super-blocks, mirrors of quantize_row_q{4,5,6}_K_ref and,
with an importance matrix, of quantize_row_q{4,5,6}_K_impl.

ggml_quantize_chunk without an importance matrix calls exactly the _ref functions, with one the
_impl functions (quantize_q4_K / quantize_q5_K / quantize_q6_K branch on `quant_weights == NULL`).

Super-block layouts (ggml-common.h), little-endian:

    Q4_K | d: f16 | dmin: f16 | scales: 12 | qs: 128 |                    144 bytes
    Q5_K | d: f16 | dmin: f16 | scales: 12 | qh: 32 | qs: 128 |           176 bytes
    Q6_K | ql: 128 | qh: 64 | scales: 16 x int8 | d: f16 |                210 bytes

Q4_K/Q5_K: 8 sub-blocks of 32 values, each with a 6-bit scale ls[j] and 6-bit min lm[j]:

    scales[0..3]  = ls[0..3] | (ls[4..7] >> 4) << 6
    scales[4..7]  = lm[0..3] | (lm[4..7] >> 4) << 6
    scales[8..11] = (ls[4..7] & 0xF) | (lm[4..7] & 0xF) << 4

    qs[32*k + t] = L[64*k + t] | L[64*k + 32 + t] << 4        (k = 0..3, t = 0..31)
    Q5_K only: the fifth bit of L[32*j + t] is bit j of qh[t], and qs holds L & 0xF.

Q6_K: 16 sub-blocks of 16 values with an int8 scale each; 6-bit codes L in [0, 63].
For half h = 0, 1 and t = 0..31, with L_g = L[128*h + 32*g + t]:

    ql[64*h + t]      = (L_0 & 0xF) | (L_2 & 0xF) << 4
    ql[64*h + 32 + t] = (L_1 & 0xF) | (L_3 & 0xF) << 4
    qh[32*h + t]      = (L_0 >> 4) | (L_1 >> 4) << 2 | (L_2 >> 4) << 4 | (L_3 >> 4) << 6
"""
from __future__ import annotations

import gguf
import torch
from torch import Tensor

from . import _ops
from ._ops import div, f32, nearest_int, seq_sum
from .registry import QuantType, register

QK_K = 256
GROUP_MAX_EPS = f32(1e-15)


def _make_qkx2_quants(x: Tensor, w: Tensor, nmax: int, rmin: float, rdelta: float, nstep: int):
    """make_qkx2_quants (use_mad=false) for many sub-blocks at once.

    x, w: float32 [n, N], position-major (one column per sub-block, n values each).
    Returns (scale [N], the_min [N], L [n, N]); L holds small integers as float32.
    """
    min_ = x.amin(0)
    max_ = x.amax(0)
    sum_w = seq_sum(w, from_zero=False)
    wx = w * x
    sum_x = seq_sum(wx, from_zero=False)
    min_ = torch.where(min_ > 0, torch.zeros_like(min_), min_)
    flat = max_ == min_

    # every [n, N] intermediate lives in one of three preallocated buffers, updated in place:
    # the same float32 operations in the same order, without an allocation per operation
    lbuf, dbuf = torch.empty_like(x), torch.empty_like(x)

    def quant(iscale: Tensor, mn: Tensor, out: Tensor) -> Tensor:
        # nearest_int as torch.round (both round half to even): |iscale*(x - min)| stays
        # below ~nmax + 1 whenever iscale is finite. An infinite iscale (a range below
        # ~1e-37) gives inf/NaN products, which nearest_int maps to 0: zeroing iscale
        # reproduces that without the bit trick on every element of every step.
        iscale = torch.nan_to_num(iscale, nan=0.0, posinf=0.0, neginf=0.0)
        torch.sub(x, mn, out=out)
        return out.mul_(iscale).round_().clamp_(0, nmax)

    def error(scale: Tensor, mn: Tensor, l: Tensor) -> Tensor:
        # sum of w * (scale*l + min - x)^2
        diff = torch.mul(scale, l, out=dbuf).add_(mn).sub_(x)
        return seq_sum(diff.mul_(diff).mul_(w))

    iscale = div(float(nmax), max_ - min_)
    scale = div(1.0, iscale)
    best_error = error(scale, min_, quant(iscale, min_, lbuf))
    # L is a function of (iscale, min) at the step that set it: keep those, rebuild L once
    l_iscale, l_min = iscale, min_

    # the three per-step sums run through one [n, 3, N] buffer: one add per position
    terms = torch.empty((x.shape[0], 3, x.shape[1]), dtype=x.dtype, device=x.device)
    for step in range(nstep + 1):
        # (rmin + rdelta*is + nmax) in float32, then divided by (max - min) with the *current*
        # min: C updates `min` in place when a step wins
        num = f32(f32(rmin + f32(f32(rdelta) * step)) + nmax)
        iscale = div(num, max_ - min_)
        laux = quant(iscale, min_, lbuf)
        wl = torch.mul(w, laux, out=terms[:, 0])
        torch.mul(wl, laux, out=terms[:, 1])  # w*l*l
        torch.mul(wl, x, out=terms[:, 2])  # w*l*x[i]
        sum_l, sum_l2, sum_xl = seq_sum(terms)
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = div(sum_w * sum_xl - sum_x * sum_l, D)
        this_min = div(sum_l2 * sum_x - sum_l * sum_xl, D)
        clip = this_min > 0
        this_min = torch.where(clip, torch.zeros_like(this_min), this_min)
        this_scale = torch.where(clip, div(sum_xl, sum_l2), this_scale)
        cur_error = error(this_scale, this_min, laux)
        better = (D > 0) & (cur_error < best_error) & ~flat
        l_iscale = torch.where(better, iscale, l_iscale)
        l_min = torch.where(better, min_, l_min)
        best_error = torch.where(better, cur_error, best_error)
        scale = torch.where(better, this_scale, scale)
        min_ = torch.where(better, this_min, min_)

    L = quant(l_iscale, l_min, torch.empty_like(x))
    zero = torch.zeros_like(scale)
    L = torch.where(flat, torch.zeros_like(L), L)
    return torch.where(flat, zero, scale), -min_, L


def _make_qx_quants_rmse1(x: Tensor, nmax: int, qw: Tensor | None = None):
    """make_qx_quants(n, nmax, x, L, rmse_type=1, qw) for many sub-blocks at once: the weights
    are qw (an importance matrix) when given, else x*x.

    x, qw: float32 [n, N], position-major. Returns (scale [N], L [n, N]) with L as float32.
    """
    ax = x.abs()
    # `if (ax > amax) { amax = ax; max = x[i]; }`: the first value of largest magnitude
    idx = ax.argmax(0, keepdim=True)
    max_ = x.gather(0, idx)[0]
    all_zero = ax.gather(0, idx)[0] < GROUP_MAX_EPS
    w = x * x if qw is None else qw
    wx = w * x

    lbuf = torch.empty_like(x)

    def quant(iscale: Tensor, out: Tensor | None = None) -> Tensor:
        # torch.round == nearest_int here: |iscale*x| <= ~nmax + 1 (all-zero blocks, where
        # iscale is infinite, are replaced at the end)
        return torch.mul(x, iscale, out=lbuf if out is None else out).round_().clamp_(-nmax, nmax - 1)

    terms = torch.empty((x.shape[0], 2, x.shape[1]), dtype=x.dtype, device=x.device)

    def sums(l: Tensor) -> Tensor:
        torch.mul(wx, l, out=terms[:, 0])  # w*x[i]*l
        torch.mul(torch.mul(w, l, out=terms[:, 1]), l, out=terms[:, 1])  # w*l*l
        return seq_sum(terms)

    iscale = div(float(-nmax), max_)
    sumlx, suml2 = sums(quant(iscale))
    scale = torch.where(suml2 != 0, div(sumlx, suml2), torch.zeros_like(sumlx))
    best = scale * sumlx
    l_iscale = iscale
    for step in (*range(-9, 0), *range(1, 10)):
        iscale = div(-f32(nmax + f32(f32(0.1) * step)), max_)
        sumlx, suml2 = sums(quant(iscale))
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        new_scale = div(sumlx, suml2)
        scale = torch.where(better, new_scale, scale)
        best = torch.where(better, new_scale * sumlx, best)
        l_iscale = torch.where(better, iscale, l_iscale)

    L = quant(l_iscale, torch.empty_like(x)) + nmax
    L = torch.where(all_zero, torch.zeros_like(L), L)
    return torch.where(all_zero, torch.zeros_like(scale), scale), L


def _make_qp_quants(x: Tensor, w: Tensor, nmax: int) -> tuple[Tensor, Tensor]:
    """make_qp_quants(n, nmax, x, L, quant_weights=w) for many rows at once: the super-block
    scale of n sub-block scales (or mins) x >= 0, weighted by w, and their integer codes.

    x, w: float32 [n, N], position-major. Returns (scale [N], L [n, N] int32, as the uint8 stores hold them).
    """
    n = x.shape[0]
    zero = torch.zeros_like(x[0])
    max_ = _ops.running_max_from_zero(x, 0)
    all_zero = max_ < GROUP_MAX_EPS

    def codes(iscale: Tensor) -> Tensor:          # int l = MIN(nmax, nearest_int(iscale * x[i]))
        return nearest_int(iscale * x).clamp_(max=nmax)

    def mse(scale: Tensor, l: Tensor) -> Tensor:  # sum of w*diff*diff, diff = x - scale*l
        diff = x - scale * l
        return seq_sum(w * diff * diff)

    iscale = div(float(nmax), max_)
    best = mse(div(1.0, iscale), (nearest_int(iscale * x) & 0xFF).float())   # no MIN on this first pass
    for step in (-4, -3, -2, -1, 1, 2, 3, 4):
        iscale_is = div(f32(f32(f32(0.1) * step) + nmax), max_)
        cur = mse(div(1.0, iscale_is), codes(iscale_is).float())
        better = cur < best
        best = torch.where(better, cur, best)
        iscale = torch.where(better, iscale_is, iscale)
    li = codes(iscale)
    lf = li.float()
    wx = w * x
    sumlx = seq_sum(wx * lf)
    suml2 = seq_sum(w * lf * lf)
    L = li & 0xFF
    # up to 5 passes of coordinate descent, each position in order; a pass that changes nothing
    # leaves the state as it was, so running all 5 everywhere equals C's early `break`
    for _ in range(5):
        for i in range(n):
            Li = L[i].float()
            slx = sumlx - wx[i] * Li
            sl2 = suml2 - w[i] * Li * Li
            ok = (slx > 0) & (sl2 > 0)
            new_l = nearest_int(div(x[i] * sl2, slx)).clamp_(max=nmax)
            nl = new_l.float()
            slx = slx + wx[i] * nl
            sl2 = sl2 + w[i] * nl * nl
            take = ok & (new_l != L[i]) & (slx * slx * suml2 > sumlx * sumlx * sl2)
            L[i] = torch.where(take, new_l & 0xFF, L[i])
            sumlx = torch.where(take, slx, sumlx)
            suml2 = torch.where(take, sl2, suml2)
    scale = torch.where(suml2 > 0, div(sumlx, suml2), zero)
    return torch.where(all_zero, zero, scale), torch.where(all_zero[None], torch.zeros_like(L), L)


def _pack_scales_k4(ls: Tensor, lm: Tensor) -> Tensor:
    """6-bit ls/lm [n, 8] (int32) -> the 12 scale bytes (layout in the module docstring)."""
    lo = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    mid = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    hi = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    return torch.cat([lo, mid, hi], dim=1).to(torch.uint8)


def _unpack_scales_k4(b: Tensor) -> tuple[Tensor, Tensor]:
    """get_scale_min_k4 for j = 0..7: 12 bytes [n, 12] -> (sc [n, 8], m [n, 8]) int32."""
    b = b.to(torch.int32)
    q0, q4, q8 = b[:, 0:4], b[:, 4:8], b[:, 8:12]
    sc = torch.cat([q0 & 63, (q8 & 0xF) | ((q0 >> 6) << 4)], dim=1)
    m = torch.cat([q4 & 63, (q8 >> 4) | ((q4 >> 6) << 4)], dim=1)
    return sc, m


def _quantize_k_with_min(x: Tensor, nmax: int, rmin: float, rdelta: float, nstep: int):
    """Shared body of quantize_row_q4_K_ref / quantize_row_q5_K_ref.

    Returns (d bits, dmin bits, ls, lm, L [n, 256] int32).
    """
    n = x.shape[0]
    xt = x.reshape(n * 8, 32).T.contiguous()  # [32, sub-blocks]
    sum_x2 = seq_sum(xt * xt)
    av_x = _ops.sqrt(div(sum_x2, 32.0))
    w = av_x + xt.abs()
    scales, mins, l_search = _make_qkx2_quants(xt, w, nmax, rmin, rdelta, nstep)
    scales, mins = scales.view(n, 8), mins.view(n, 8)
    l_search = l_search.T.reshape(n, 8, 32).to(torch.int32)

    zeros = torch.zeros(n, dtype=torch.float32, device=x.device)
    max_scale = _ops.running_max_from_zero(scales, 1)
    max_min = _ops.running_max_from_zero(mins, 1)
    inv_scale = torch.where(max_scale > 0, div(63.0, max_scale), zeros)
    inv_min = torch.where(max_min > 0, div(63.0, max_min), zeros)
    # uint8_t ls = nearest_int(...); ls = MIN(63, ls)
    ls = (nearest_int(inv_scale[:, None] * scales) & 0xFF).clamp_(max=63)
    lm = (nearest_int(inv_min[:, None] * mins) & 0xFF).clamp_(max=63)
    d_bits, d = _ops.fp16_round(div(max_scale, 63.0))
    dmin_bits, dmin = _ops.fp16_round(div(max_min, 63.0))
    return d_bits, dmin_bits, ls, lm, _k_codes(x, d, dmin, ls, lm, l_search, nmax)


def _k_codes(x: Tensor, d: Tensor, dmin: Tensor, sc: Tensor, m: Tensor, l_search: Tensor, nmax: int) -> Tensor:
    """The final codes from the rounded scales: l = nearest_int((x + dmin*m) / (d*sc)); a
    sub-block whose scale rounds to 0 keeps the codes of the search (`if (!d) continue;`)."""
    n = x.shape[0]
    dq = (d[:, None] * sc)[:, :, None]
    dm = (dmin[:, None] * m)[:, :, None]
    l = nearest_int(div(x.reshape(n, 8, 32) + dm, dq)).clamp_(0, nmax)
    return torch.where(dq == 0, l_search, l).reshape(n, QK_K)


def _quantize_k_with_min_weighted(x: Tensor, qw: Tensor, nmax: int):
    """Shared body of quantize_row_q4_K_impl / quantize_row_q5_K_impl with quant_weights (an
    importance matrix): sub-block weights qw * sqrt(sigma2 + x^2), the search make_qkx3_quants
    (the same computation as make_qkx2_quants, with these weights and steps), and the scales and
    mins quantized by make_qp_quants weighted by each sub-block's total weight.

    Returns (d bits, dmin bits, ls, lm, L [n, 256] int32).
    """
    n = x.shape[0]
    sum_x2 = seq_sum((x * x).T.contiguous())
    sigma2 = div(2 * sum_x2, float(QK_K))
    xt = x.reshape(n * 8, 32).T.contiguous()  # [32, sub-blocks]
    w = qw.reshape(n * 8, 32).T * _ops.sqrt(sigma2.repeat_interleave(8)[None] + xt * xt)
    sw = seq_sum(w)
    scales, mins, l_search = _make_qkx2_quants(xt, w, nmax, f32(-0.9), 0.05, 36)
    sw, scales, mins = sw.view(n, 8).T, scales.view(n, 8).T, mins.view(n, 8).T  # [8, n]
    d_block, ls = _make_qp_quants(scales, sw, 63)
    m_block, lm = _make_qp_quants(mins, sw, 63)
    ls, lm = ls.T, lm.T
    if nmax == 31:                                # Q5_K only: ls = MIN(63, ls)
        ls, lm = ls.clamp(max=63), lm.clamp(max=63)
    d_bits, d = _ops.fp16_round(d_block)
    dmin_bits, dmin = _ops.fp16_round(m_block)
    sc, m = _unpack_scales_k4(_pack_scales_k4(ls, lm))       # what get_scale_min_k4 reads back
    l_search = l_search.T.reshape(n, 8, 32).to(torch.int32)
    return d_bits, dmin_bits, ls, lm, _k_codes(x, d, dmin, sc, m, l_search, nmax)


def _pack_nibbles_k(L: Tensor) -> Tensor:
    """[n, 256] codes (low 4 bits used) -> qs [n, 128]: qs[32k + t] = L[64k + t] | L[64k + 32 + t] << 4."""
    L = (L & 0xF).view(-1, 4, 2, 32)
    return (L[:, :, 0] | (L[:, :, 1] << 4)).reshape(-1, 128).to(torch.uint8)


def _unpack_nibbles_k(qs: Tensor) -> Tensor:
    qs = qs.to(torch.int32).view(-1, 4, 1, 32)
    return torch.cat([qs & 0xF, qs >> 4], dim=2).reshape(-1, QK_K)


def quantize_q4_k(x: Tensor, qw: Tensor | None = None) -> Tensor:
    d, dmin, ls, lm, L = _quantize_k_with_min(x, 15, rmin=-1.0, rdelta=0.1, nstep=20) if qw is None else \
        _quantize_k_with_min_weighted(x, qw, 15)
    return torch.cat([_ops.le_bytes(d, 2), _ops.le_bytes(dmin, 2), _pack_scales_k4(ls, lm),
                      _pack_nibbles_k(L)], dim=1)


def _dequantize_k_with_min(b: Tensor, q: Tensor) -> Tensor:
    """y = (d*sc)*q - dmin*m, q: int32 codes [n, 256]."""
    d = _ops.fp16_bits_to_f32(_ops.from_le_bytes(b[:, 0:2]))
    dmin = _ops.fp16_bits_to_f32(_ops.from_le_bytes(b[:, 2:4]))
    sc, m = _unpack_scales_k4(b[:, 4:16])
    d1 = (d[:, None] * sc)[:, :, None]
    m1 = (dmin[:, None] * m)[:, :, None]
    return (d1 * q.view(-1, 8, 32) - m1).reshape(-1, QK_K)


def dequantize_q4_k(b: Tensor) -> Tensor:
    return _dequantize_k_with_min(b, _unpack_nibbles_k(b[:, 16:144]))


def quantize_q5_k(x: Tensor, qw: Tensor | None = None) -> Tensor:
    d, dmin, ls, lm, L = _quantize_k_with_min(x, 31, rmin=-0.5, rdelta=0.1, nstep=15) if qw is None else \
        _quantize_k_with_min_weighted(x, qw, 31)
    # bit j of qh[t] is the fifth bit of L[32j + t]
    hb = (L.view(-1, 8, 32) >> 4) & 1
    qh = (hb << torch.arange(8, device=x.device, dtype=torch.int32)[:, None]).sum(1)
    return torch.cat([_ops.le_bytes(d, 2), _ops.le_bytes(dmin, 2), _pack_scales_k4(ls, lm),
                      qh.to(torch.uint8), _pack_nibbles_k(L)], dim=1)


def dequantize_q5_k(b: Tensor) -> Tensor:
    qh = b[:, 16:48].to(torch.int32)[:, None, :]
    hb = (qh >> torch.arange(8, device=b.device, dtype=torch.int32)[:, None]) & 1  # [n, 8, 32]
    q = _unpack_nibbles_k(b[:, 48:176]) | (hb.reshape(-1, QK_K) << 4)
    return _dequantize_k_with_min(b, q)


def quantize_q6_k(x: Tensor, qw: Tensor | None = None) -> Tensor:
    n = x.shape[0]
    xt = x.reshape(n * 16, 16).T.contiguous()  # [16, sub-blocks]
    scales, l_search = _make_qx_quants_rmse1(xt, 32, None if qw is None else qw.reshape(n * 16, 16).T.contiguous())
    scales = scales.view(n, 16)
    l_search = l_search.T.reshape(n, 16, 16).to(torch.int32)

    # max_scale: the first scale of largest magnitude (`if (abs_scale > max_abs_scale)` from 0,
    # so NaN scales, which overflowing inputs produce, never win)
    abs_scale = scales.abs()
    abs_scale = torch.where(abs_scale > 0, abs_scale, torch.zeros_like(abs_scale))
    idx = abs_scale.argmax(1, keepdim=True)
    max_abs_scale = abs_scale.gather(1, idx)[:, 0]
    max_scale = torch.where(max_abs_scale > 0, scales.gather(1, idx)[:, 0], torch.zeros_like(max_abs_scale))
    all_zero = max_abs_scale < GROUP_MAX_EPS
    iscale = div(-128.0, max_scale)
    d_bits, d = _ops.fp16_round(div(1.0, iscale))
    # int8 scales[ib] = MIN(127, nearest_int(iscale*scales[ib]))
    sc = ((nearest_int(iscale[:, None] * scales).clamp_(max=127) & 0xFF) ^ 0x80) - 0x80
    dq = (d[:, None] * sc)[:, :, None]
    l = nearest_int(div(x.reshape(n, 16, 16), dq)).clamp_(-32, 31) + 32
    L = torch.where(dq == 0, l_search, l).reshape(n, 2, 4, 32)  # [half, group, t]

    ql = torch.cat([(L[:, :, 0] & 0xF) | ((L[:, :, 2] & 0xF) << 4),
                    (L[:, :, 1] & 0xF) | ((L[:, :, 3] & 0xF) << 4)], dim=2).reshape(n, 128)
    shifts = torch.arange(0, 8, 2, device=x.device, dtype=torch.int32)[:, None]
    qh = ((L >> 4) << shifts).sum(2).reshape(n, 64)
    out = torch.cat([ql.to(torch.uint8), qh.to(torch.uint8), (sc & 0xFF).to(torch.uint8),
                     _ops.le_bytes(d_bits, 2)], dim=1)
    # a super-block whose scales are all ~0 is written as all-zero bytes (memset)
    return torch.where(all_zero[:, None], torch.zeros_like(out), out)


def dequantize_q6_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    ql = b[:, 0:128].to(torch.int32).view(n, 2, 2, 32)  # [half, ql half, t]
    qh = b[:, 128:192].to(torch.int32).view(n, 2, 1, 32)
    sc = b[:, 192:208].contiguous().view(torch.int8).to(torch.int32)
    d = _ops.fp16_bits_to_f32(_ops.from_le_bytes(b[:, 208:210]))
    low = torch.cat([ql & 0xF, ql >> 4], dim=2)  # groups 0, 1, 2, 3
    shifts = torch.arange(0, 8, 2, device=b.device, dtype=torch.int32)[:, None]
    q = (low | (((qh >> shifts) & 3) << 4)) - 32
    # y = d * sc * q, evaluated left to right
    dsc = (d[:, None] * sc)[:, :, None]
    return (dsc * q.reshape(n, 16, 16)).reshape(n, QK_K)


register(QuantType("q4_k", gguf.GGMLQuantizationType.Q4_K, block_size=QK_K,
                   type_size=2 + 2 + 12 + QK_K // 2,  # d, dmin, scales, qs
                   quantize=quantize_q4_k, dequantize=dequantize_q4_k, weighted=True))
register(QuantType("q5_k", gguf.GGMLQuantizationType.Q5_K, block_size=QK_K,
                   type_size=2 + 2 + 12 + QK_K // 8 + QK_K // 2,  # d, dmin, scales, qh, qs
                   quantize=quantize_q5_k, dequantize=dequantize_q5_k, weighted=True))
register(QuantType("q6_k", gguf.GGMLQuantizationType.Q6_K, block_size=QK_K,
                   type_size=QK_K // 2 + QK_K // 4 + QK_K // 16 + 2,  # ql, qh, scales, d
                   quantize=quantize_q6_k, dequantize=dequantize_q6_k, weighted=True))
