"""kernels/searches.cu, the GPU's scale searches and whole-block kernels, compiled for this CPU with
the system C++ compiler as NVRTC compiles it for the GPU (no multiply-add contraction), and run
through searches_cuda's own wrappers (argument order, output dtypes, parameters) on CPU tensors:
what the GPU computes, checked and counted without a GPU. Installed, it is two more kernel backends,
host-searches and host-blocks (the CPU twins of cuda-searches and cuda-blocks), picked as any other.

    searches = compile_searches(tmp_dir)          # None without a C++ compiler
    searches.install(monkeypatch.setattr)         # adds the backends host-searches, host-blocks
    with backends.only("host-searches", "host-blocks"): ...

Used by tests/test_kernels_vs_ggml.py (every ggml byte test runs with it) and launch_count.py.
"""
from __future__ import annotations

import ctypes
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch

from quantkit.kernels import backends, searches_cuda

CXX_FLAGS = ["-x", "c++", "-std=c++17", "-O2", "-ffp-contract=off", "-fno-fast-math", "-shared", "-fPIC"]


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
        """Add the backends host-searches and host-blocks: each CUDA implementation of a kernel, run
        on CPU tensors through this build, first in the kernel's list. `setattr` is pytest's
        monkeypatch.setattr or one that undoes itself (see launch_count)."""
        kernels = {name: self.kernel(name) for name in searches_cuda.KERNELS}
        setattr(searches_cuda, "_kernels", lambda device: kernels)
        setattr(searches_cuda, "_params_on", lambda device, *values: torch.tensor(values, dtype=torch.float32))
        table = {}
        for name, impls in backends.IMPLEMENTATIONS.items():
            host = [backends.Impl(i.backend.replace("cuda-", "host-"), _on_cpu, i.run)
                    for i in impls if i.backend.startswith("cuda-")]
            table[name] = host + impls
        setattr(backends, "IMPLEMENTATIONS", table)


def _on_cpu(x, *args) -> bool:
    return x.device.type == "cpu"


def compile_searches(out_dir: Path) -> HostSearches | None:
    """Build searches.cu as a shared library in out_dir; None where no C++ compiler is found."""
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        return None
    lib_path = Path(out_dir) / "searches_cu.so"
    subprocess.run([cxx, *CXX_FLAGS, "-o", str(lib_path), str(searches_cuda.SOURCE)], check=True)
    return HostSearches(ctypes.CDLL(str(lib_path)))
