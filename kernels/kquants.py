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

from typing import NamedTuple

import gguf
import torch
from torch import Tensor

from . import _ops, backends, kquants_cpu, searches_cuda
from ._ops import div, f32, nearest_int, seq_sum
from .registry import QuantType, register
from .searches import GROUP_MAX_EPS, make_qkx2_quants, make_qp_quants, make_qx_quants_rmse1

QK_K = 256


class KSearch(NamedTuple):
    """make_qkx2_quants' parameters: codes 0..nmax; step s = 0..nstep tries the inverse scale
    (nmax + rmin + rdelta*s) / (max - min). C passes rmin and rdelta as floats: held rounded to
    float32, so that every implementation (torch, numba, CUDA) starts from the same values."""
    nmax: int
    rmin: float
    rdelta: float
    nstep: int


def k_search(nmax: int, weighted: bool) -> KSearch:
    """The one table of Q4_K (nmax 15) and Q5_K (nmax 31) searches: quantize_row_q4_K_ref calls
    make_qkx2_quants(..., -1.0f, 0.1f, 20), _q5_K_ref (..., -0.5f, 0.1f, 15); with an importance
    matrix both _impl functions call make_qkx3_quants(..., -0.9f, 0.05f, 36), the same search."""
    rmin, rdelta, nstep = (-0.9, 0.05, 36) if weighted else {15: (-1.0, 0.1, 20), 31: (-0.5, 0.1, 15)}[nmax]
    return KSearch(nmax, f32(rmin), f32(rdelta), nstep)


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


def _quantize_k_with_min(x: Tensor, search: KSearch):
    """Shared body of quantize_row_q4_K_ref / quantize_row_q5_K_ref.

    Returns (d bits, dmin bits, ls, lm, L [n, 256] int32).
    """
    n = x.shape[0]
    xt = x.reshape(n * 8, 32).T.contiguous()  # [32, sub-blocks]
    sum_x2 = seq_sum(xt * xt)
    av_x = _ops.sqrt(div(sum_x2, 32.0))
    w = av_x + xt.abs()
    scales, mins, l_search = make_qkx2_quants(xt, w, *search)
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
    return d_bits, dmin_bits, ls, lm, _k_codes(x, d, dmin, ls, lm, l_search, search.nmax)


def _k_codes(x: Tensor, d: Tensor, dmin: Tensor, sc: Tensor, m: Tensor, l_search: Tensor, nmax: int) -> Tensor:
    """The final codes from the rounded scales: l = nearest_int((x + dmin*m) / (d*sc)); a
    sub-block whose scale rounds to 0 keeps the codes of the search (`if (!d) continue;`)."""
    n = x.shape[0]
    dq = (d[:, None] * sc)[:, :, None]
    dm = (dmin[:, None] * m)[:, :, None]
    l = nearest_int(div(x.reshape(n, 8, 32) + dm, dq)).clamp_(0, nmax)
    return torch.where(dq == 0, l_search, l).reshape(n, QK_K)


def _quantize_k_with_min_weighted(x: Tensor, qw: Tensor, search: KSearch):
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
    scales, mins, l_search = make_qkx2_quants(xt, w, *search)
    sw, scales, mins = sw.view(n, 8).T, scales.view(n, 8).T, mins.view(n, 8).T  # [8, n]
    d_block, ls = make_qp_quants(scales, sw, 63)
    m_block, lm = make_qp_quants(mins, sw, 63)
    ls, lm = ls.T, lm.T
    if search.nmax == 31:                         # Q5_K only: ls = MIN(63, ls)
        ls, lm = ls.clamp(max=63), lm.clamp(max=63)
    d_bits, d = _ops.fp16_round(d_block)
    dmin_bits, dmin = _ops.fp16_round(m_block)
    sc, m = _unpack_scales_k4(_pack_scales_k4(ls, lm))       # what get_scale_min_k4 reads back
    l_search = l_search.T.reshape(n, 8, 32).to(torch.int32)
    return d_bits, dmin_bits, ls, lm, _k_codes(x, d, dmin, sc, m, l_search, search.nmax)


def _pack_nibbles_k(L: Tensor) -> Tensor:
    """[n, 256] codes (low 4 bits used) -> qs [n, 128]: qs[32k + t] = L[64k + t] | L[64k + 32 + t] << 4."""
    L = (L & 0xF).view(-1, 4, 2, 32)
    return (L[:, :, 0] | (L[:, :, 1] << 4)).reshape(-1, 128).to(torch.uint8)


def _unpack_nibbles_k(qs: Tensor) -> Tensor:
    qs = qs.to(torch.int32).view(-1, 4, 1, 32)
    return torch.cat([qs & 0xF, qs >> 4], dim=2).reshape(-1, QK_K)


def _quantize_k_with_min_torch(x: Tensor, qw: Tensor | None, search: KSearch, pack) -> Tensor:
    d, dmin, ls, lm, L = _quantize_k_with_min(x, search) if qw is None else \
        _quantize_k_with_min_weighted(x, qw, search)
    return pack(_ops.le_bytes(d, 2), _ops.le_bytes(dmin, 2), _pack_scales_k4(ls, lm), L)


# Q4_K (search.nmax 15) or Q5_K (31) blocks; the compiled ones know the packing from nmax
_quantize_k_with_min_blocks = backends.kernel("k_with_min_blocks", [
    backends.Impl("numba-blocks", lambda x, *a: x.device.type == "cpu" and kquants_cpu.available(),
                  lambda x, qw, search, pack: kquants_cpu.quantize_k_with_min(x, qw, search)),
    backends.Impl("cuda-blocks", lambda x, *a: searches_cuda.available(x.device, "k_with_min_blocks"),
                  lambda x, qw, search, pack: searches_cuda.quantize_k_with_min(x, qw, search)),
    backends.Impl("torch", backends.anywhere, _quantize_k_with_min_torch)])


def _quantize_k_with_min_any(x: Tensor, qw: Tensor | None, nmax: int, pack) -> Tensor:
    """Q4_K (nmax 15) or Q5_K (31) bytes, packed by `pack` where the torch code runs."""
    return _quantize_k_with_min_blocks(x, qw, k_search(nmax, qw is not None), pack)


def _pack_q4_k(d: Tensor, dmin: Tensor, scales: Tensor, L: Tensor) -> Tensor:
    return torch.cat([d, dmin, scales, _pack_nibbles_k(L)], dim=1)


def quantize_q4_k(x: Tensor, qw: Tensor | None = None) -> Tensor:
    return _quantize_k_with_min_any(x, qw, 15, _pack_q4_k)


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


def _pack_q5_k(d: Tensor, dmin: Tensor, scales: Tensor, L: Tensor) -> Tensor:
    # bit j of qh[t] is the fifth bit of L[32j + t]
    hb = (L.view(-1, 8, 32) >> 4) & 1
    qh = (hb << torch.arange(8, device=L.device, dtype=torch.int32)[:, None]).sum(1)
    return torch.cat([d, dmin, scales, qh.to(torch.uint8), _pack_nibbles_k(L)], dim=1)


def quantize_q5_k(x: Tensor, qw: Tensor | None = None) -> Tensor:
    return _quantize_k_with_min_any(x, qw, 31, _pack_q5_k)


def dequantize_q5_k(b: Tensor) -> Tensor:
    qh = b[:, 16:48].to(torch.int32)[:, None, :]
    hb = (qh >> torch.arange(8, device=b.device, dtype=torch.int32)[:, None]) & 1  # [n, 8, 32]
    q = _unpack_nibbles_k(b[:, 48:176]) | (hb.reshape(-1, QK_K) << 4)
    return _dequantize_k_with_min(b, q)


def _quantize_q6_k(x: Tensor, qw: Tensor | None = None) -> Tensor:
    n = x.shape[0]
    xt = x.reshape(n * 16, 16).T.contiguous()  # [16, sub-blocks]
    scales, l_search = make_qx_quants_rmse1(xt, 32, None if qw is None else qw.reshape(n * 16, 16).T.contiguous())
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


_quantize_q6_k_blocks = backends.kernel("q6_k_blocks", [
    backends.Impl("numba-blocks", lambda x, qw: x.device.type == "cpu" and kquants_cpu.available(),
                  kquants_cpu.quantize_q6_k),
    backends.Impl("cuda-blocks", lambda x, qw: searches_cuda.available(x.device, "q6_k_blocks"),
                  searches_cuda.quantize_q6_k),
    backends.Impl("torch", backends.anywhere, _quantize_q6_k)])


def quantize_q6_k(x: Tensor, qw: Tensor | None = None) -> Tensor:
    return _quantize_q6_k_blocks(x, qw)


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
                   quantize=quantize_q4_k, dequantize=dequantize_q4_k,
                   quantize_weighted=lambda x, qw, sigma2: quantize_q4_k(x, qw)))
register(QuantType("q5_k", gguf.GGMLQuantizationType.Q5_K, block_size=QK_K,
                   type_size=2 + 2 + 12 + QK_K // 8 + QK_K // 2,  # d, dmin, scales, qh, qs
                   quantize=quantize_q5_k, dequantize=dequantize_q5_k,
                   quantize_weighted=lambda x, qw, sigma2: quantize_q5_k(x, qw)))
register(QuantType("q6_k", gguf.GGMLQuantizationType.Q6_K, block_size=QK_K,
                   type_size=QK_K // 2 + QK_K // 4 + QK_K // 16 + 2,  # ql, qh, scales, d
                   quantize=quantize_q6_k, dequantize=dequantize_q6_k,
                   quantize_weighted=lambda x, qw, sigma2: quantize_q6_k(x, qw)))
