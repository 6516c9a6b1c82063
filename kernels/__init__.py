"""Quantization kernels (pure torch, bit-exact with ggml's reference quantizers).

Importing the package registers every type; look them up with `registry.get`.
"""
from . import floats, kquants, legacy  # noqa: F401  (each module registers its types)
from .registry import QUANT_TYPES, QuantType, dequantize_rows, get, quantize_rows, row_nbytes

__all__ = ["QUANT_TYPES", "QuantType", "dequantize_rows", "get", "quantize_rows", "row_nbytes"]
