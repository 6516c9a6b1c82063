"""kernels/searches.cu, the GPU's scale searches, compiled for this CPU with the system C++
compiler as NVRTC compiles it for the GPU (no multiply-add contraction), and called in place of
searches_cpu's numba functions: what the GPU computes, checked and counted without a GPU.

    searches = compile_searches(tmp_dir)          # None without a C++ compiler
    searches.install(monkeypatch)                 # tests: searches_cpu now runs searches.cu

Used by tests/test_kernels_vs_ggml.py (every ggml byte test runs with it) and launch_count.py.
"""
from __future__ import annotations

import ctypes
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch

from quantkit.kernels import searches_cpu, searches_cuda

CXX_FLAGS = ["-x", "c++", "-std=c++17", "-O2", "-ffp-contract=off", "-fno-fast-math", "-shared", "-fPIC"]


def _ptr(t: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


def _f32(*shape: int) -> torch.Tensor:
    return torch.empty(shape, dtype=torch.float32)


def _params(*values: float) -> torch.Tensor:
    return torch.tensor([*values, 0, 0, 0][:4], dtype=torch.float32)


@dataclass
class HostSearches:
    """searches.cu's entry points with searches_cpu's signatures (CPU tensors in and out)."""
    lib: ctypes.CDLL

    def make_qkx2_quants(self, x, w, nmax, rmin, rdelta, nstep):
        x, w, params = x.contiguous(), w.contiguous(), _params(nmax, rmin, rdelta, nstep)   # alive during the call
        scale, the_min, L = _f32(x.shape[1]), _f32(x.shape[1]), _f32(*x.shape)
        getattr(self.lib, f"qkx2_search_{x.shape[0]}")(_ptr(x), _ptr(w), _ptr(params),
                                                      _ptr(scale), _ptr(the_min), _ptr(L), ctypes.c_int(x.shape[1]))
        return scale, the_min, L

    def make_qx_quants_rmse1(self, x, nmax, qw=None):
        x, params = x.contiguous(), _params(nmax)
        q = x if qw is None else qw.contiguous()
        scale, L = _f32(x.shape[1]), _f32(*x.shape)
        getattr(self.lib, f"qx_rmse1_search_{x.shape[0]}")(_ptr(x), _ptr(q), _ptr(params), _ptr(scale), _ptr(L),
                                                          ctypes.c_int(qw is not None), ctypes.c_int(x.shape[1]))
        return scale, L

    def make_qp_quants(self, x, w, nmax):
        x, w, params = x.contiguous(), w.contiguous(), _params(nmax)
        scale, L = _f32(x.shape[1]), torch.empty(x.shape, dtype=torch.int32)
        getattr(self.lib, f"qp_search_{x.shape[0]}")(_ptr(x), _ptr(w), _ptr(params), _ptr(scale), _ptr(L),
                                                    ctypes.c_int(x.shape[1]))
        return scale, L

    def install(self, patch) -> None:
        """Route searches_cpu to these functions; `patch` is pytest's monkeypatch or _Patch."""
        patch.setattr(searches_cpu, "available", lambda: True)
        for name in ("make_qkx2_quants", "make_qx_quants_rmse1", "make_qp_quants"):
            patch.setattr(searches_cpu, name, getattr(self, name))


class _Patch:
    """monkeypatch's setattr, kept until undo()."""

    def __init__(self):
        self._saved: list[tuple[object, str, object]] = []

    def setattr(self, obj, name: str, value) -> None:
        self._saved.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    def undo(self) -> None:
        while self._saved:
            obj, name, value = self._saved.pop()
            setattr(obj, name, value)


def compile_searches(out_dir: Path) -> HostSearches | None:
    """Build searches.cu as a shared library in out_dir; None where no C++ compiler is found."""
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        return None
    lib_path = Path(out_dir) / "searches_cu.so"
    subprocess.run([cxx, *CXX_FLAGS, "-o", str(lib_path), str(searches_cuda.SOURCE)], check=True)
    return HostSearches(ctypes.CDLL(str(lib_path)))
