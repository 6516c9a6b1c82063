"""F32, F16 and BF16 as one-value "blocks", so they go through the same registry path."""
from __future__ import annotations

import gguf
import torch
from torch import Tensor

from . import _ops
from .registry import QuantType, register


def quantize_f32(x: Tensor) -> Tensor:
    return x.contiguous().view(torch.uint8)


def dequantize_f32(b: Tensor) -> Tensor:
    return b.contiguous().view(torch.float32)


def quantize_f16(x: Tensor) -> Tensor:
    # ggml_fp32_to_fp16_row: round-to-nearest-even, NaN -> quiet 0x7E00
    return _ops.le_bytes(_ops.to_fp16_bits(x[:, 0]), 2)


def dequantize_f16(b: Tensor) -> Tensor:
    return b.contiguous().view(torch.float16).to(torch.float32)


def quantize_bf16(x: Tensor) -> Tensor:
    # ggml_compute_fp32_to_bf16: round-to-nearest-even on the bits; a NaN keeps its top
    # 16 bits and is forced quiet (bit 6 of the half)
    u = x[:, 0].contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    rounded = (u + (0x7FFF + ((u >> 16) & 1))) >> 16
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    h = torch.where(nan, (u >> 16) | 64, rounded) & 0xFFFF
    return _ops.le_bytes(h, 2)


def dequantize_bf16(b: Tensor) -> Tensor:
    return (b.contiguous().view(torch.int16).to(torch.int32) << 16).view(torch.float32)


register(QuantType("f32", gguf.GGMLQuantizationType.F32, block_size=1, type_size=4,
                   quantize=quantize_f32, dequantize=dequantize_f32))
register(QuantType("f16", gguf.GGMLQuantizationType.F16, block_size=1, type_size=2,
                   quantize=quantize_f16, dequantize=dequantize_f16))
register(QuantType("bf16", gguf.GGMLQuantizationType.BF16, block_size=1, type_size=2,
                   quantize=quantize_bf16, dequantize=dequantize_bf16))
