"""Quantization kernels (pure torch, bit-exact with ggml's reference quantizers).

Importing the package registers every type; look them up with `registry.get`.
This folder is installed as `quantkit.kernels`. Run from the repository root (python -m / -c put it on
sys.path), it is also found as a top-level `kernels`: the name of an unrelated PyPI package that
transformers depends on and imports. Imported under that name, it hands over to that package (found
on sys.path past the repository root), or, where none is installed, stands aside: it loads nothing
and has no version, so transformers reports the package unavailable.
"""
if __name__ == "quantkit.kernels":
    from . import floats, iq4, kquants, legacy  # noqa: F401  (each module registers its types)
    from .registry import QUANT_TYPES, QuantType, dequantize_rows, get, quantize_rows, row_nbytes

    __all__ = ["QUANT_TYPES", "QuantType", "dequantize_rows", "get", "quantize_rows", "row_nbytes"]
else:
    def _hand_over(name: str) -> None:
        import importlib.machinery
        import importlib.util
        import sys
        from pathlib import Path

        root = Path(__file__).resolve().parent.parent
        spec = importlib.machinery.PathFinder.find_spec(name, [p for p in sys.path if Path(p or ".").resolve() != root])
        if spec is not None and spec.loader is not None:
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module          # what `import kernels` returns
            spec.loader.exec_module(module)

    _hand_over(__name__)
