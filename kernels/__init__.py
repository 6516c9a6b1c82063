"""Quantization kernels (pure torch, bit-exact with ggml's reference quantizers).

Importing the package registers every type; look them up with `registry.get`.
This folder is installed as `quantkit.kernels`. Run from the repository root (python -m / -c put it on
sys.path), it is also importable as a top-level `kernels`, the name of an unrelated PyPI package that
transformers and bitsandbytes probe: imported under that name it stands aside, loading nothing and
carrying no version, so transformers reports that package as unavailable.
"""
if __name__ == "quantkit.kernels":
    from . import floats, kquants, legacy  # noqa: F401  (each module registers its types)
    from .registry import QUANT_TYPES, QuantType, dequantize_rows, get, quantize_rows, row_nbytes

    __all__ = ["QUANT_TYPES", "QuantType", "dequantize_rows", "get", "quantize_rows", "row_nbytes"]
