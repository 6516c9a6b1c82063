"""ctypes access to ggml's own quantizers, as built into the installed llama-cpp-python.

This is the oracle the kernel tests compare against: `ggml_quantize_chunk` without an
importance matrix runs the `quantize_row_*_ref` C functions (the ones llama-quantize uses
for Q8_0/Q5_0/Q5_1/Q4_K/Q5_K/Q6_K when no imatrix is given), and the type traits'
`to_float` is the reference dequantizer.
"""
from __future__ import annotations

import ctypes
import functools
import importlib.util
from pathlib import Path

import numpy as np

# libggml-base holds ggml_quantize_chunk and the type traits; the other two are loaded
# first (RTLD_GLOBAL) only so that symbol resolution works the same way as inside llama.cpp.
_LIB_NAMES = ("libggml-base.so", "libggml-cpu.so", "libggml.so")


class _TypeTraits(ctypes.Structure):
    # struct ggml_type_traits in ggml.h (the layout of this llama.cpp version)
    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(ctypes.c_float), ctypes.c_int64)


def _lib_dir() -> Path | None:
    try:
        spec = importlib.util.find_spec("llama_cpp")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        d = Path(loc) / "lib"
        if (d / "libggml-base.so").exists():
            return d
    return None


@functools.lru_cache(maxsize=None)
def _lib() -> ctypes.CDLL:
    d = _lib_dir()
    if d is None:
        raise RuntimeError("llama_cpp (llama-cpp-python) with its ggml shared libraries is not installed")
    base = None
    for name in _LIB_NAMES:
        path = d / name
        if path.exists():
            lib = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
            if name == "libggml-base.so":
                base = lib
    assert base is not None

    base.ggml_quantize_chunk.restype = ctypes.c_size_t
    base.ggml_quantize_chunk.argtypes = [
        ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
        ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
    ]
    base.ggml_quantize_init.restype = None
    base.ggml_quantize_init.argtypes = [ctypes.c_int]
    base.ggml_row_size.restype = ctypes.c_size_t
    base.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    base.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
    base.ggml_get_type_traits.argtypes = [ctypes.c_int]
    return base


def available() -> bool:
    try:
        _lib()
    except (RuntimeError, OSError):
        return False
    return True


def row_size(ggml_type: int, n_per_row: int) -> int:
    return int(_lib().ggml_row_size(int(ggml_type), int(n_per_row)))


def ggml_quantize(x: np.ndarray, ggml_type: int, imatrix: np.ndarray | None = None) -> bytes:
    """Quantize a float32 [rows, cols] array with ggml_quantize_chunk; returns the raw row data."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    assert x.ndim == 2, x.shape
    rows, cols = x.shape
    lib = _lib()
    lib.ggml_quantize_init(int(ggml_type))
    nbytes = rows * row_size(ggml_type, cols)
    dst = np.zeros(nbytes, dtype=np.uint8)
    imat_ptr = None
    if imatrix is not None:
        imatrix = np.ascontiguousarray(imatrix, dtype=np.float32)
        assert imatrix.shape == (cols,), imatrix.shape
        imat_ptr = imatrix.ctypes.data
    written = lib.ggml_quantize_chunk(int(ggml_type), x.ctypes.data, dst.ctypes.data, 0, rows, cols, imat_ptr)
    assert written == nbytes, (written, nbytes)
    return dst.tobytes()


def ggml_dequantize(data: bytes | np.ndarray, ggml_type: int, rows: int, cols: int) -> np.ndarray:
    """Reference to_float of `rows` rows of `cols` values each; returns float32 [rows, cols]."""
    buf = np.frombuffer(bytes(data), dtype=np.uint8).copy()
    assert buf.size == rows * row_size(ggml_type, cols), (buf.size, rows, cols)
    traits = _lib().ggml_get_type_traits(int(ggml_type)).contents
    out = np.empty((rows, cols), dtype=np.float32)
    if not traits.to_float:
        # F32 has no to_float: its row data is the floats themselves
        assert traits.type_size == 4 and traits.blck_size == 1
        out[...] = buf.view(np.float32).reshape(rows, cols)
        return out
    to_float = _TO_FLOAT(traits.to_float)
    to_float(buf.ctypes.data, out.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), rows * cols)
    return out
