"""Quantization kernels (pure torch, bit-exact with ggml's reference quantizers).

Importing the package registers every type; look them up with `registry.get`.
This folder is installed as `quantkit.kernels`; as a top-level `kernels` it would stand in for an
unrelated PyPI package that transformers and bitsandbytes import, so it refuses to load as that.
"""
if __name__ == "kernels":
    raise ImportError("this is quantkit's kernels/ folder (quantkit.kernels), not the PyPI package `kernels`: "
                      "the repository root is on sys.path")
from . import floats, kquants, legacy  # noqa: F401  (each module registers its types)
from .registry import QUANT_TYPES, QuantType, dequantize_rows, get, quantize_rows, row_nbytes

__all__ = ["QUANT_TYPES", "QuantType", "dequantize_rows", "get", "quantize_rows", "row_nbytes"]
