"""Bit-exact float32 building blocks shared by the kernels.

ggml's reference quantizers are plain C evaluated in float32 (no FMA contraction, no
reassociation), so every helper here performs exactly one IEEE float32 operation per C
operation. Three torch behaviours are avoided on purpose:
  * on CUDA, dividing by a CPU scalar computes a * reciprocal(b) (div_true_kernel_cuda), and
    on every device `python_scalar / tensor` is `tensor.reciprocal() * scalar`; both round
    differently from a division, so divisions go through `div` with two device tensors;
  * torch.sqrt on float32 CPU tensors is not correctly rounded (`sqrt`);
  * float32 reductions (sum, cumsum) reorder or widen the accumulation: sums whose order
    matters are written as the C loop, one add per position (`seq_sum`).
"""
from __future__ import annotations

import struct

import torch
from torch import Tensor


def f32(v: float) -> float:
    """Round a Python float to the nearest float32 (what a C `float` constant or product holds)."""
    return struct.unpack("<f", struct.pack("<f", v))[0]


def div(a: Tensor | float, b: Tensor | float) -> Tensor:
    """IEEE float32 a / b, never rewritten as a * (1 / b)."""
    ref = a if isinstance(a, Tensor) else b
    # torch.full, not torch.tensor: a fill kernel, where torch.tensor(v, device=gpu) copies from
    # the host and waits for the GPU to drain (the same float32 either way: v rounded once)
    if not isinstance(a, Tensor):
        a = torch.full((), a, dtype=torch.float32, device=ref.device)
    if not isinstance(b, Tensor):
        b = torch.full((), b, dtype=torch.float32, device=ref.device)
    return torch.div(a, b)


def sqrt(v: Tensor) -> Tensor:
    """Correctly rounded float32 sqrtf. torch's float32 CPU sqrt is not (torch 2.13 on an
    AVX512 machine is one ulp off for ~17% of inputs); a float64 sqrt rounded once to
    float32 is (53 >= 2*24 + 2 bits, so the double rounding is harmless)."""
    return torch.sqrt(v.to(torch.float64)).to(torch.float32)


def seq_sum(p: Tensor, from_zero: bool = True) -> Tensor:
    """Sum over dim 0 in index order, like `float s = 0; for (...) s += p[i];`.

    from_zero=False is `float s = p[0]; for (i = 1; ...) s += p[i];` (differs only for -0.0).
    """
    rows = p.unbind(0)  # one call for all the views (indexing p[i] costs a dispatch each)
    s = rows[0] + 0.0 if from_zero else rows[0].clone()
    for r in rows[1:]:
        s += r
    return s


def first_extreme(x: Tensor, dim: int, largest: bool) -> Tensor:
    """`m = x[0]; for (...) if (x[i] > m) m = x[i];` (or `<`): the extreme value, taken from
    its first occurrence, which fixes the sign when it is a zero (amax/amin may return -0.0
    for +0.0 and vice versa). NaN-free input."""
    v = x.amax(dim, keepdim=True) if largest else x.amin(dim, keepdim=True)
    idx = (x == v).to(torch.uint8).argmax(dim, keepdim=True)
    return x.gather(dim, idx).squeeze(dim)


def running_max_from_zero(v: Tensor, dim: int) -> Tensor:
    """`float m = 0; for (...) if (v[i] > m) m = v[i];`: NaNs never win, the result is +0.0
    when nothing is positive."""
    return torch.where(v > 0, v, torch.zeros_like(v)).amax(dim)


def nearest_int(v: Tensor) -> Tensor:
    """ggml's nearest_int: the bits of v + 1.5*2^23, i.e. round-half-even for |v| < 2^22.

    Emulated bit for bit (also for the out-of-range values the C assert would reject in a
    debug build), returned as int32. A NaN gives 0, as x86's default NaN (0xFFC00000, what inf*0
    or inf-inf make there) does in C; a GPU makes 0x7FFFFFFF, whose bits would give 4194303.
    """
    bits = (v + 12582912.0).view(torch.int32)
    return torch.where(v != v, 0, (bits & 0x007FFFFF) - 0x00400000)


def round_away(v: Tensor) -> Tensor:
    """C roundf: round half away from zero (torch.round is half-to-even). Returns float32."""
    t = torch.trunc(v)
    frac = (v - t).abs()  # exact: the fractional part of a float32 is a float32
    return t + torch.where(frac >= 0.5, torch.sign(v), torch.zeros_like(v))


def to_fp16_bits(v: Tensor) -> Tensor:
    """GGML_FP32_TO_FP16: round-to-nearest-even, overflow to inf, NaN -> 0x7E00 with sign.

    Returns the half as int32 in [0, 0xFFFF].
    """
    h = v.to(torch.float16).view(torch.int16).to(torch.int32) & 0xFFFF
    sign = (v.view(torch.int32) >> 16) & 0x8000
    return torch.where(torch.isnan(v), sign | 0x7E00, h)


def fp16_round(v: Tensor) -> tuple[Tensor, Tensor]:
    """(fp16 bit pattern as int32, its value back in float32) for a float32 tensor."""
    bits = to_fp16_bits(v)
    return bits, fp16_bits_to_f32(bits)


def fp16_bits_to_f32(bits: Tensor) -> Tensor:
    return bits.to(torch.int16).view(torch.float16).to(torch.float32)


def le_bytes(v: Tensor, nbytes: int) -> Tensor:
    """Little-endian bytes of an integer tensor [...] -> uint8 [..., nbytes]."""
    v = v.to(torch.int64)
    shifts = torch.arange(0, 8 * nbytes, 8, device=v.device)
    return ((v.unsqueeze(-1) >> shifts) & 0xFF).to(torch.uint8)


def from_le_bytes(b: Tensor) -> Tensor:
    """uint8 [..., n] little-endian -> int64 [...]."""
    shifts = torch.arange(0, 8 * b.shape[-1], 8, device=b.device)
    return (b.to(torch.int64) << shifts).sum(-1)


def pack_bits(bits: Tensor) -> Tensor:
    """[..., 8*m] of 0/1 -> uint8 [..., m], bit k of byte b taken from position 8*b + k."""
    shape = bits.shape[:-1] + (bits.shape[-1] // 8, 8)
    weights = 1 << torch.arange(8, device=bits.device, dtype=torch.int32)
    return (bits.to(torch.int32).reshape(shape) * weights).sum(-1).to(torch.uint8)


def unpack_bits(b: Tensor) -> Tensor:
    """Inverse of pack_bits: uint8 [..., m] -> int32 [..., 8*m]."""
    shifts = torch.arange(8, device=b.device, dtype=torch.int32)
    bits = (b.to(torch.int32).unsqueeze(-1) >> shifts) & 1
    return bits.reshape(b.shape[:-1] + (8 * b.shape[-1],))
