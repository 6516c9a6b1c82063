"""Q8_0, Q5_0, Q5_1, Q4_0 and Q4_1: 32-value blocks, mirrors of quantize_row_q{8_0,5_0,5_1,4_0,4_1}_ref
and, with an importance matrix, of quantize_row_q{5,4}_{0,1}_impl (Q8_0 ignores importance, as ggml does).

Block layouts (ggml-common.h), all little-endian:

    Q8_0  | d: f16 | qs: 32 x int8 |                                        34 bytes
    Q5_0  | d: f16 | qh: u32 | qs: 16 bytes |                              22 bytes
    Q5_1  | d: f16 | m: f16 | qh: u32 | qs: 16 bytes |                     24 bytes
    Q4_0  | d: f16 | qs: 16 bytes |                                        18 bytes
    Q4_1  | d: f16 | m: f16 | qs: 16 bytes |                               20 bytes

Value j (0..31) has its low nibble in qs[j % 16] (low nibble for j < 16, high nibble for j >= 16);
Q5_x keeps its fifth bit in bit j of qh.
"""
from __future__ import annotations

import gguf
import torch
from torch import Tensor

from . import _ops, backends, legacy_cpu, searches_cuda
from ._ops import f32
from .registry import QuantType, register
from .searches import make_qkx2_quants, make_qx_quants_rmse1

QK = 32


def _quantize_q8_0(x: Tensor) -> Tensor:
    amax = x.abs().amax(dim=1)
    d = _ops.div(amax, 127.0)  # amax / ((1 << 7) - 1)
    id_ = torch.where(d != 0, _ops.div(1.0, d), torch.zeros_like(d))
    d_bits, _ = _ops.fp16_round(d)
    # roundf (half away from zero), then the float -> int8 conversion as x86 makes it: out of range
    # (an infinite id, for amax below ~4e-37) or NaN gives 0x80000000, so the byte 0 (a GPU's
    # conversion would saturate +inf to 0x7FFFFFFF)
    r = _ops.round_away(x * id_[:, None])
    qs = torch.where((r >= -2.0 ** 31) & (r < 2.0 ** 31), r, torch.zeros_like(r)).to(torch.int32) & 0xFF
    return torch.cat([_ops.le_bytes(d_bits, 2), qs.to(torch.uint8)], dim=1)


quantize_q8_0 = backends.kernel("q8_0_blocks", [
    backends.Impl("numba-blocks", lambda x: x.device.type == "cpu" and legacy_cpu.available(), legacy_cpu.quantize_q8_0),
    backends.Impl("cuda-blocks", lambda x: searches_cuda.available(x.device, "q8_0_blocks"), searches_cuda.quantize_q8_0),
    backends.Impl("torch", backends.anywhere, _quantize_q8_0)])


def dequantize_q8_0(b: Tensor) -> Tensor:
    d = _ops.fp16_bits_to_f32(_ops.from_le_bytes(b[:, 0:2]))
    qs = b[:, 2:].contiguous().view(torch.int8).to(torch.float32)
    return qs * d[:, None]


def _pack_q5(xi: Tensor) -> tuple[Tensor, Tensor]:
    """5-bit codes [n, 32] (int32) -> (qh bytes [n, 4], qs bytes [n, 16])."""
    qs = (xi[:, :16] & 0x0F) | ((xi[:, 16:] & 0x0F) << 4)
    qh = _ops.pack_bits((xi >> 4) & 1)
    return qh, qs.to(torch.uint8)


def _unpack_q5(qh: Tensor, qs: Tensor) -> Tensor:
    qs = qs.to(torch.int32)
    low = torch.cat([qs & 0x0F, qs >> 4], dim=1)
    return low | (_ops.unpack_bits(qh) << 4)


def _symmetric_codes(x: Tensor, nmax: int) -> tuple[Tensor, Tensor]:
    """Q5_0 (nmax 16) and Q4_0 (nmax 8): d = max / -nmax, codes MIN(2*nmax - 1, (int8_t)(x*id + nmax + 0.5f))
    as bytes (int32 0..255: a negative int8 stays 0xF_ in the byte). Returns (d's fp16 bits, codes)."""
    # max = the value with the largest magnitude, the first one on ties (`if (amax < fabsf(v))`);
    # it stays at its initial +0.0f when every |v| is 0 (then d = 0/-nmax = -0.0: fp16 0x8000)
    ax = x.abs()
    idx = ax.argmax(dim=1, keepdim=True)
    max_ = x.gather(1, idx).squeeze(1)
    max_ = torch.where(ax.gather(1, idx).squeeze(1) > 0, max_, torch.zeros_like(max_))
    d = _ops.div(max_, -float(nmax))
    id_ = torch.where(d != 0, _ops.div(1.0, d), torch.zeros_like(d))
    d_bits, _ = _ops.fp16_round(d)
    # truncation toward zero, then a signed 8-bit compare
    xi8 = (((x * id_[:, None] + (nmax + 0.5)).to(torch.int32) & 0xFF) ^ 0x80) - 0x80
    return d_bits, torch.clamp(xi8, max=2 * nmax - 1) & 0xFF


def _affine_codes(x: Tensor, bits: int) -> tuple[Tensor, Tensor, Tensor]:
    """Q5_1 and Q4_1: d = (max - min) / (2^bits - 1), m = min, codes (int)((x - min)*id + 0.5f) as
    bytes. Returns (d's fp16 bits, m's, codes); Q4_1 then takes MIN(15, (int8_t)code)."""
    # min starts at FLT_MAX, max at -FLT_MAX, both updated on strict < / >
    min_ = _ops.first_extreme(x, 1, largest=False)
    max_ = _ops.first_extreme(x, 1, largest=True)
    d = _ops.div(max_ - min_, float((1 << bits) - 1))
    id_ = torch.where(d != 0, _ops.div(1.0, d), torch.zeros_like(d))
    d_bits, _ = _ops.fp16_round(d)
    m_bits, _ = _ops.fp16_round(min_)
    return d_bits, m_bits, ((x - min_[:, None]) * id_[:, None] + 0.5).to(torch.int32) & 0xFF


def _pack_q4(xi: Tensor) -> Tensor:
    """Codes [n, 32] (bytes as int32) -> qs [n, 16]: qs[j] = xi[j] | xi[j + 16] << 4, unmasked as in C."""
    return ((xi[:, :16] | (xi[:, 16:] << 4)) & 0xFF).to(torch.uint8)


def quantize_q5_0(x: Tensor) -> Tensor:
    d_bits, xi = _symmetric_codes(x, 16)
    qh, qs = _pack_q5(xi)
    return torch.cat([_ops.le_bytes(d_bits, 2), qh, qs], dim=1)


def dequantize_q5_0(b: Tensor) -> Tensor:
    d = _ops.fp16_bits_to_f32(_ops.from_le_bytes(b[:, 0:2]))
    q = _unpack_q5(b[:, 2:6], b[:, 6:22]) - 16
    return q.to(torch.float32) * d[:, None]


def quantize_q5_1(x: Tensor) -> Tensor:
    # (uint8_t)((x - min)*id + 0.5f): truncation
    d_bits, m_bits, xi = _affine_codes(x, 5)
    qh, qs = _pack_q5(xi)
    return torch.cat([_ops.le_bytes(d_bits, 2), _ops.le_bytes(m_bits, 2), qh, qs], dim=1)


def dequantize_q5_1(b: Tensor) -> Tensor:
    d = _ops.fp16_bits_to_f32(_ops.from_le_bytes(b[:, 0:2]))
    m = _ops.fp16_bits_to_f32(_ops.from_le_bytes(b[:, 2:4]))
    q = _unpack_q5(b[:, 4:8], b[:, 8:24])
    return q.to(torch.float32) * d[:, None] + m[:, None]


def quantize_q4_0(x: Tensor) -> Tensor:
    d_bits, xi = _symmetric_codes(x, 8)
    return torch.cat([_ops.le_bytes(d_bits, 2), _pack_q4(xi)], dim=1)


def dequantize_q4_0(b: Tensor) -> Tensor:
    d = _ops.fp16_bits_to_f32(_ops.from_le_bytes(b[:, 0:2]))
    qs = b[:, 2:18].to(torch.int32)
    q = torch.cat([qs & 0x0F, qs >> 4], dim=1) - 8
    return q.to(torch.float32) * d[:, None]


def quantize_q4_1(x: Tensor) -> Tensor:
    # MIN(15, (int8_t)((x - min)*id + 0.5f))
    d_bits, m_bits, xi = _affine_codes(x, 4)
    xi = torch.clamp(((xi ^ 0x80) - 0x80), max=15) & 0xFF
    return torch.cat([_ops.le_bytes(d_bits, 2), _ops.le_bytes(m_bits, 2), _pack_q4(xi)], dim=1)


def dequantize_q4_1(b: Tensor) -> Tensor:
    d = _ops.fp16_bits_to_f32(_ops.from_le_bytes(b[:, 0:2]))
    m = _ops.fp16_bits_to_f32(_ops.from_le_bytes(b[:, 2:4]))
    qs = b[:, 4:20].to(torch.int32)
    q = torch.cat([qs & 0x0F, qs >> 4], dim=1)
    return q.to(torch.float32) * d[:, None] + m[:, None]


def _importance(x: Tensor, qw: Tensor, sigma2: Tensor) -> Tensor:
    """weight[j] = qw[j] * sqrtf(sigma2 + x[j]*x[j]), sigma2 being the row's mean square."""
    return qw * _ops.sqrt(sigma2[:, None] + x * x)


def _symmetric_weighted(x: Tensor, qw: Tensor, sigma2: Tensor, nmax: int) -> tuple[Tensor, Tensor]:
    """quantize_row_q{5,4}_0_impl: d = make_qx_quants(32, nmax, x, L, 1, weight); (d's fp16 bits, codes)."""
    scale, L = make_qx_quants_rmse1(x.T.contiguous(), nmax, _importance(x, qw, sigma2).T.contiguous())
    d_bits, _ = _ops.fp16_round(scale)
    return d_bits, L.T.to(torch.int32)


def _affine_weighted(x: Tensor, qw: Tensor, sigma2: Tensor, nmax: int) -> tuple[Tensor, Tensor, Tensor]:
    """quantize_row_q{5,4}_1_impl: make_qkx3_quants(32, nmax, x, weight, L, &min, ..., -0.9, 0.05, 36);
    d = scale, m = -min, and the codes of the search are kept. (d's fp16 bits, m's, codes)."""
    scale, the_min, L = make_qkx2_quants(x.T.contiguous(), _importance(x, qw, sigma2).T.contiguous(), nmax,
                                         f32(-0.9), 0.05, 36)
    d_bits, _ = _ops.fp16_round(scale)
    m_bits, _ = _ops.fp16_round(-the_min)
    return d_bits, m_bits, L.T.to(torch.int32)


def quantize_q5_0_weighted(x: Tensor, qw: Tensor, sigma2: Tensor) -> Tensor:
    d_bits, L = _symmetric_weighted(x, qw, sigma2, 16)
    qh, qs = _pack_q5(L)
    return torch.cat([_ops.le_bytes(d_bits, 2), qh, qs], dim=1)


def quantize_q5_1_weighted(x: Tensor, qw: Tensor, sigma2: Tensor) -> Tensor:
    d_bits, m_bits, L = _affine_weighted(x, qw, sigma2, 31)
    qh, qs = _pack_q5(L)
    return torch.cat([_ops.le_bytes(d_bits, 2), _ops.le_bytes(m_bits, 2), qh, qs], dim=1)


def quantize_q4_0_weighted(x: Tensor, qw: Tensor, sigma2: Tensor) -> Tensor:
    d_bits, L = _symmetric_weighted(x, qw, sigma2, 8)
    return torch.cat([_ops.le_bytes(d_bits, 2), _pack_q4(L)], dim=1)


def quantize_q4_1_weighted(x: Tensor, qw: Tensor, sigma2: Tensor) -> Tensor:
    d_bits, m_bits, L = _affine_weighted(x, qw, sigma2, 15)
    return torch.cat([_ops.le_bytes(d_bits, 2), _ops.le_bytes(m_bits, 2), _pack_q4(L)], dim=1)


register(QuantType("q8_0", gguf.GGMLQuantizationType.Q8_0, block_size=QK,
                   type_size=2 + QK,  # d, qs
                   quantize=quantize_q8_0, dequantize=dequantize_q8_0))
register(QuantType("q5_0", gguf.GGMLQuantizationType.Q5_0, block_size=QK,
                   type_size=2 + 4 + QK // 2,  # d, qh, qs
                   quantize=quantize_q5_0, dequantize=dequantize_q5_0, quantize_weighted=quantize_q5_0_weighted,
                   weighted_uses_row_sigma2=True))
register(QuantType("q5_1", gguf.GGMLQuantizationType.Q5_1, block_size=QK,
                   type_size=2 + 2 + 4 + QK // 2,  # d, m, qh, qs
                   quantize=quantize_q5_1, dequantize=dequantize_q5_1, quantize_weighted=quantize_q5_1_weighted,
                   weighted_uses_row_sigma2=True))
register(QuantType("q4_0", gguf.GGMLQuantizationType.Q4_0, block_size=QK,
                   type_size=2 + QK // 2,  # d, qs
                   quantize=quantize_q4_0, dequantize=dequantize_q4_0, quantize_weighted=quantize_q4_0_weighted,
                   weighted_uses_row_sigma2=True))
register(QuantType("q4_1", gguf.GGMLQuantizationType.Q4_1, block_size=QK,
                   type_size=2 + 2 + QK // 2,  # d, m, qs
                   quantize=quantize_q4_1, dequantize=dequantize_q4_1, quantize_weighted=quantize_q4_1_weighted,
                   weighted_uses_row_sigma2=True))
