"""kernels/searches.cu, the GPU's scale searches and whole-block kernels, compiled for this CPU with
the system C++ compiler as NVRTC compiles it for the GPU (no multiply-add contraction), and run
through searches_cuda's own wrappers (argument order, output dtypes, parameters) in place of the
numba functions (searches_cpu's searches, legacy_cpu's and kquants_cpu's blocks): what the GPU
computes, checked and counted without a GPU.

    searches = compile_searches(tmp_dir)          # None without a C++ compiler
    searches.install(monkeypatch.setattr)         # tests: the numba kernels now run searches.cu

Used by tests/test_kernels_vs_ggml.py (every ggml byte test runs with it) and launch_count.py.
"""
from __future__ import annotations

import ctypes
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch

from quantkit.kernels import kquants_cpu, legacy_cpu, searches_cpu, searches_cuda

CXX_FLAGS = ["-x", "c++", "-std=c++17", "-O2", "-ffp-contract=off", "-fno-fast-math", "-shared", "-fPIC"]
SEARCHES = ("make_qkx2_quants", "make_qx_quants_rmse1", "make_qp_quants")
BLOCKS = ((legacy_cpu, "quantize_q8_0"), (kquants_cpu, "quantize_k_with_min"), (kquants_cpu, "quantize_q6_k"))


@dataclass
class HostSearches:
    """The host build of searches.cu, whose entry points loop over the columns themselves."""
    lib: ctypes.CDLL

    def kernel(self, name: str):
        """A stand-in for nvrtc.Kernel: same call, the grid and block ignored."""
        fn = getattr(self.lib, name)

        def launch(grid, block, args: list) -> None:
            fn(*[ctypes.c_void_p(a.data_ptr()) if isinstance(a, torch.Tensor) else ctypes.c_int(a) for a in args])
        return launch

    def install(self, setattr) -> None:
        """Route the numba kernels (searches and whole blocks) through searches_cuda's wrappers onto
        this build, as a GPU with NVRTC runs them. `setattr` is pytest's monkeypatch.setattr or
        one that undoes itself (see launch_count)."""
        kernels = {name: self.kernel(name) for name in searches_cuda.KERNELS}
        setattr(searches_cuda, "_kernels", lambda device: kernels)
        setattr(searches_cuda, "_params_on", lambda device, *values: torch.tensor(values, dtype=torch.float32))
        setattr(searches_cpu, "available", lambda: True)
        for name in SEARCHES:
            setattr(searches_cpu, name, getattr(searches_cuda, name))
        setattr(kquants_cpu, "available", lambda: True)
        setattr(legacy_cpu, "available", lambda: True)
        for module, name in BLOCKS:
            setattr(module, name, getattr(searches_cuda, name))


def compile_searches(out_dir: Path) -> HostSearches | None:
    """Build searches.cu as a shared library in out_dir; None where no C++ compiler is found."""
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        return None
    lib_path = Path(out_dir) / "searches_cu.so"
    subprocess.run([cxx, *CXX_FLAGS, "-o", str(lib_path), str(searches_cuda.SOURCE)], check=True)
    return HostSearches(ctypes.CDLL(str(lib_path)))
