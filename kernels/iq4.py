"""IQ4_NL and IQ4_XS: 4-bit codes into a non-linear table of 16 int8 values (kvalues_iq4nl), mirrors
of ggml's quantize_iq4_nl / quantize_iq4_xs, both built on quantize_row_iq4_nl_impl with ntry = 7.

ggml_quantize_chunk calls those two with or without an importance matrix (quant_weights NULL or
not); quantize_row_iq4_nl_ref (ntry = -1) is not what llama-quantize writes and is not mirrored.

Block layouts (ggml-common.h), little-endian:

    IQ4_NL | d: f16 | qs: 16 |                                             18 bytes (32 values)
    IQ4_XS | d: f16 | scales_h: u16 | scales_l: 4 | qs: 128 |             136 bytes (256 values)

Value t of each 32-value group i has its code in qs[16*i + t % 16]: the low nibble for t < 16, the
high one for t >= 16. A value is d * kvalues_iq4nl[code] (IQ4_NL) or d * (ls[i] - 32) *
kvalues_iq4nl[code] (IQ4_XS), the 6-bit ls[i] of group i split as

    scales_l[i / 2] >> 4 * (i % 2) & 0xF     its low four bits
    scales_h >> 2 * i & 3                     its high two bits

The search, per group of 32 with weights w (x^2, or qw * sqrt(sigma2 + x^2) with an importance
matrix, sigma2 = 2 * sum(x^2) / super-block size): the scale d = max/127 (max: the value of largest
magnitude) and the 15 inverse scales (itry - 127)/max, itry = -7..7, each coding every value to its
nearest table entry (best_index_int8) and giving the weighted least-squares scale; the best of the
16 wins. IQ4_XS then writes d = -max_scale/32 per super-block, a 6-bit scale per group, and recodes
the values with the scale it wrote.
"""
from __future__ import annotations

import functools

import gguf
import torch
from torch import Tensor

from . import _ops, backends, iq4_cpu
from ._ops import div, f32, nearest_int, seq_sum
from .registry import QuantType, register
from .searches import GROUP_MAX_EPS

QK4_NL = 32
QK_K = 256
KVALUES_IQ4NL = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
NTRY = 7
# groups searched at once: the tries' [32, 16, groups] intermediates stay near 64 MB each (a GPU chunk
# of 16 M values holds 512 K groups; a CPU chunk, 8 K)
SEARCH_GROUPS = 1 << 15


@functools.lru_cache(maxsize=None)
def _kvalues(device: torch.device) -> Tensor:
    # kept per device: a host-to-device copy per chunk would wait for the GPU to drain
    return torch.tensor(KVALUES_IQ4NL, dtype=torch.float32, device=device)


def best_index(al: Tensor, values: Tensor) -> Tensor:
    """best_index_int8(16, kvalues_iq4nl, al) elementwise, as int64 codes 0..15.

    C's binary search ends with values[mu-1] <= al < values[mu] (mu = 1 + how many of values[1..14]
    are <= al), then takes mu-1 if al - values[mu-1] < values[mu] - al; below values[0] and above
    values[15] that comparison already picks 0 and 15. A NaN fails every comparison: code 15."""
    mu = torch.bucketize(al, values[1:15], right=True) + 1
    lo = values[mu - 1]
    hi = values[mu]
    code = torch.where(al - lo < hi - al, mu - 1, mu)
    return torch.where(al != al, 15, code)


def _first_max_magnitude(x: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """`amax = 0; for (...) if (|v| > amax) { amax = |v|; max = v; }`: (amax, max), max from the
    first value of largest magnitude; NaNs never win, and both stay 0 when nothing is above 0."""
    ax = x.abs()
    ax = torch.where(ax > 0, ax, torch.zeros_like(ax))
    idx = ax.argmax(dim, keepdim=True)
    amax = ax.gather(dim, idx).squeeze(dim)
    max_ = torch.where(amax > 0, x.gather(dim, idx).squeeze(dim), torch.zeros_like(amax))
    return amax, max_


def _group_scales(xt: Tensor, w: Tensor, values: Tensor) -> Tensor:
    """The search of quantize_row_iq4_nl_impl for many 32-value groups at once.

    xt, w: float32 [32, G], position-major (one column per group). Returns the scales [G]: 0 for a
    group whose largest magnitude is below GROUP_MAX_EPS."""
    if xt.shape[1] > SEARCH_GROUPS:
        return torch.cat([_group_scales(xt[:, i:i + SEARCH_GROUPS].contiguous(), w[:, i:i + SEARCH_GROUPS].contiguous(),
                                        values) for i in range(0, xt.shape[1], SEARCH_GROUPS)])
    amax, max_ = _first_max_magnitude(xt, 0)
    # d = -max/values[0], id = 1/d; then id = (itry + values[0])/max for itry = -NTRY..NTRY
    d0 = div(-max_, float(KVALUES_IQ4NL[0]))
    ids = torch.stack([div(1.0, d0)] + [div(float(itry + KVALUES_IQ4NL[0]), max_) for itry in range(-NTRY, NTRY + 1)])
    al = xt[:, None, :] * ids[None]                       # [32, tries, G]
    q = values[best_index(al, values)]
    wq = w[:, None, :] * q                                # w*q, then *xb[j] and *q: C's left-to-right products
    sumqx = seq_sum(wq * xt[:, None, :])                  # [tries, G]
    sumq2 = seq_sum(wq * q)
    zeros = torch.zeros_like(amax)
    # the first try: d = sumq2 > 0 ? sumqx/sumq2 : 0, best = d*sumqx
    d = torch.where(sumq2[0] > 0, div(sumqx[0], sumq2[0]), zeros)
    best = d * sumqx[0]
    cand = div(sumqx, sumq2)
    better_num = sumqx * sumqx
    for t in range(1, sumqx.shape[0]):
        # if (sumq2 > 0 && sumqx*sumqx > best*sumq2) { d = sumqx/sumq2; best = d*sumqx; }
        upd = (sumq2[t] > 0) & (better_num[t] > best * sumq2[t])
        d = torch.where(upd, cand[t], d)
        best = torch.where(upd, cand[t] * sumqx[t], best)
    return torch.where(amax < GROUP_MAX_EPS, zeros, d)


def _weights(x: Tensor, qw: Tensor | None, super_block: int) -> Tensor:
    """weight[j] for x [n, super_block]: x^2, or qw * sqrtf(sigma2 + x^2) with sigma2 the super-block's
    sum of squares (one add per value) times 2/super_block."""
    if qw is None:
        return x * x
    sigma2 = seq_sum((x * x).T.contiguous()) * f32(2.0 / super_block)
    return qw * _ops.sqrt(sigma2[:, None] + x * x)


def _pack_nibbles(L: Tensor) -> Tensor:
    """Codes [n, 32*k] (int) -> [n, 16*k]: q4[16*i + j] = L[32*i + j] | L[32*i + 16 + j] << 4."""
    L = L.reshape(L.shape[0], -1, 2, 16)
    return (L[:, :, 0] | (L[:, :, 1] << 4)).reshape(L.shape[0], -1).to(torch.uint8)


def _unpack_nibbles(qs: Tensor) -> Tensor:
    qs = qs.to(torch.int64).reshape(qs.shape[0], -1, 1, 16)
    return torch.cat([qs & 0xF, qs >> 4], dim=2).reshape(qs.shape[0], -1)


def _quantize_iq4_nl(x: Tensor, qw: Tensor | None = None) -> Tensor:
    """x float32 [n, 32] (qw: the importance of each value, same shape) -> uint8 [n, 18]."""
    values = _kvalues(x.device)
    xt = x.T.contiguous()
    scale = _group_scales(xt, _weights(x, qw, QK4_NL).T.contiguous(), values)
    d_bits, _ = _ops.fp16_round(scale)
    # the codes again from the unrounded scale: id = scales[0] ? 1/scales[0] : 0
    id_ = torch.where(scale != 0, div(1.0, scale), torch.zeros_like(scale))
    L = best_index(x * id_[:, None], values)
    return torch.cat([_ops.le_bytes(d_bits, 2), _pack_nibbles(L)], dim=1)


quantize_iq4_nl = backends.kernel("iq4_nl_blocks", [
    backends.Impl("numba-blocks", lambda x, qw=None: x.device.type == "cpu" and iq4_cpu.available(), iq4_cpu.quantize_iq4_nl),
    backends.Impl("torch", backends.anywhere, _quantize_iq4_nl)])


def dequantize_iq4_nl(b: Tensor) -> Tensor:
    d = _ops.fp16_bits_to_f32(_ops.from_le_bytes(b[:, 0:2]))
    return d[:, None] * _kvalues(b.device)[_unpack_nibbles(b[:, 2:18])]


def _quantize_iq4_xs(x: Tensor, qw: Tensor | None = None) -> Tensor:
    """x float32 [n, 256] (qw: the importance of each value, same shape) -> uint8 [n, 136]."""
    n = x.shape[0]
    values = _kvalues(x.device)
    w = _weights(x, qw, QK_K)
    scales = _group_scales(x.reshape(n * 8, 32).T.contiguous(), w.reshape(n * 8, 32).T.contiguous(), values)
    scales = scales.view(n, 8)
    _, max_scale = _first_max_magnitude(scales, 1)
    d = div(-max_scale, 32.0)
    d_bits, _ = _ops.fp16_round(d)
    zeros = torch.zeros_like(d)
    id_ = torch.where(d != 0, div(1.0, d), zeros)
    # l = MAX(-32, MIN(31, nearest_int(id*scales[ib]))); the codes from dl = d*l (d unrounded)
    l = nearest_int(id_[:, None] * scales).clamp_(-32, 31)
    dl = d[:, None] * l.to(torch.float32)
    idl = torch.where(dl != 0, div(1.0, dl), torch.zeros_like(dl))
    L = best_index(x.view(n, 8, 32) * idl[:, :, None], values).reshape(n, QK_K)
    ls = (l + 32).to(torch.int64)
    scales_l = (ls[:, 0::2] & 0xF) | ((ls[:, 1::2] & 0xF) << 4)
    scales_h = ((ls >> 4) << torch.arange(0, 16, 2, device=x.device)).sum(1)
    return torch.cat([_ops.le_bytes(d_bits, 2), _ops.le_bytes(scales_h, 2), scales_l.to(torch.uint8),
                      _pack_nibbles(L)], dim=1)


quantize_iq4_xs = backends.kernel("iq4_xs_blocks", [
    backends.Impl("numba-blocks", lambda x, qw=None: x.device.type == "cpu" and iq4_cpu.available(), iq4_cpu.quantize_iq4_xs),
    backends.Impl("torch", backends.anywhere, _quantize_iq4_xs)])


def dequantize_iq4_xs(b: Tensor) -> Tensor:
    n = b.shape[0]
    d = _ops.fp16_bits_to_f32(_ops.from_le_bytes(b[:, 0:2]))
    scales_h = _ops.from_le_bytes(b[:, 2:4])
    scales_l = b[:, 4:8].to(torch.int64)
    ib = torch.arange(8, device=b.device)
    ls = ((scales_l[:, ib // 2] >> (4 * (ib % 2))) & 0xF) | (((scales_h[:, None] >> (2 * ib)) & 3) << 4)
    dl = d[:, None] * (ls - 32).to(torch.float32)          # float dl = d * (ls - 32)
    q = _kvalues(b.device)[_unpack_nibbles(b[:, 8:136])].view(n, 8, 32)
    return (dl[:, :, None] * q).reshape(n, QK_K)


register(QuantType("iq4_nl", gguf.GGMLQuantizationType.IQ4_NL, block_size=QK4_NL,
                   type_size=2 + QK4_NL // 2,  # d, qs
                   quantize=quantize_iq4_nl, dequantize=dequantize_iq4_nl,
                   quantize_weighted=lambda x, qw, sigma2: quantize_iq4_nl(x, qw)))
register(QuantType("iq4_xs", gguf.GGMLQuantizationType.IQ4_XS, block_size=QK_K,
                   type_size=2 + 2 + QK_K // 64 + QK_K // 2,  # d, scales_h, scales_l, qs
                   quantize=quantize_iq4_xs, dequantize=dequantize_iq4_xs,
                   quantize_weighted=lambda x, qw, sigma2: quantize_iq4_xs(x, qw)))
