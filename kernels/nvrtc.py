"""CUDA C compiled at run time, without a compiler installed: NVRTC (which CUDA torch depends on,
as the nvidia-cuda-nvrtc wheel) turns the source into a cubin, and the CUDA driver loads and
launches it on torch's current stream. Plain ctypes on the two libraries' C APIs, so it needs
no CUDA toolkit (torch.cuda._compile_kernel asks for CUDA_HOME's headers) and no private torch API.

    cubin = compile_cubin(source, "90", ["--fmad=false"])       # no GPU needed
    kernels = load(cubin, ["my_kernel"], device)                # a CUDA device
    kernels["my_kernel"]((blocks,), (threads,), [tensor, 123])  # tensors and C ints
"""
from __future__ import annotations

import ctypes
import glob
import hashlib
import os
from functools import lru_cache
from pathlib import Path

import torch


class NvrtcError(RuntimeError):
    pass


def _library_candidates() -> list[str]:
    names = []
    major = (torch.version.cuda or "").split(".")[0]
    if major:
        names.append(f"libnvrtc.so.{major}")          # the one torch's own libraries loaded, if any
    try:                                               # the nvidia-cuda-nvrtc wheel's folder
        import nvidia
        for root in nvidia.__path__:
            names += sorted(glob.glob(os.path.join(root, "*", "lib", "libnvrtc.so.*[0-9]")), reverse=True)
    except ImportError:
        pass
    return names + ["libnvrtc.so"]


@lru_cache(maxsize=None)
def _nvrtc() -> ctypes.CDLL:
    for name in _library_candidates():
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    raise NvrtcError("no NVRTC library found (libnvrtc.so, from the nvidia-cuda-nvrtc wheel CUDA torch installs)")


@lru_cache(maxsize=None)
def _driver() -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError as e:
        raise NvrtcError(f"no CUDA driver library ({e})") from None
    _check_cu(lib.cuInit(0), "cuInit", lib)
    return lib


@lru_cache(maxsize=None)
def _primary_context(index: int) -> ctypes.c_void_p:
    """The device's primary context: the one torch's runtime calls use (retained, never released)."""
    dev, ctx = ctypes.c_int(), ctypes.c_void_p()
    _check_cu(_driver().cuDeviceGet(ctypes.byref(dev), index), "cuDeviceGet")
    _check_cu(_driver().cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "cuDevicePrimaryCtxRetain")
    return ctx


class _Current:
    """Make the device's primary context current on this thread for a driver call, whatever the
    thread had (the runtime binds it lazily), and restore what was there."""

    def __init__(self, index: int):
        self._ctx = _primary_context(index)

    def __enter__(self) -> None:
        _check_cu(_driver().cuCtxPushCurrent(self._ctx), "cuCtxPushCurrent")

    def __exit__(self, *exc) -> None:
        popped = ctypes.c_void_p()
        _driver().cuCtxPopCurrent(ctypes.byref(popped))


def _check_nvrtc(lib: ctypes.CDLL, result: int, what: str) -> None:
    if result != 0:
        lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        raise NvrtcError(f"{what}: {lib.nvrtcGetErrorString(result).decode()}")


def _check_cu(result: int, what: str, lib: ctypes.CDLL | None = None) -> None:
    if result != 0:
        msg = ctypes.c_char_p()
        (lib or _driver()).cuGetErrorString(result, ctypes.byref(msg))
        raise NvrtcError(f"{what}: {msg.value.decode() if msg.value else f'CUDA error {result}'} "
                         "(QUANTKIT_KERNELS=numba,torch uses the torch searches instead)")


def compile_cubin(source: str, arch: str, options: list[str], name: str = "quantkit.cu") -> bytes:
    """The cubin of `source` for sm_`arch` (e.g. "90"). Raises NvrtcError with NVRTC's log."""
    lib = _nvrtc()
    prog = ctypes.c_void_p()
    _check_nvrtc(lib, lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(), 0, None, None),
                 "nvrtcCreateProgram")
    try:
        opts = [f"--gpu-architecture=sm_{arch}".encode()] + [o.encode() for o in options]
        result = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
        if result != 0:
            size = ctypes.c_size_t()
            lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value)
            lib.nvrtcGetProgramLog(prog, log)
            raise NvrtcError(f"{name} did not compile for sm_{arch}:\n{log.value.decode(errors='replace').strip()}")
        size = ctypes.c_size_t()
        _check_nvrtc(lib, lib.nvrtcGetCUBINSize(prog, ctypes.byref(size)), "nvrtcGetCUBINSize")
        cubin = ctypes.create_string_buffer(size.value)
        _check_nvrtc(lib, lib.nvrtcGetCUBIN(prog, cubin), "nvrtcGetCUBIN")
        return cubin.raw
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def _nvrtc_version() -> tuple[int, int]:
    lib = _nvrtc()
    major, minor = ctypes.c_int(), ctypes.c_int()
    _check_nvrtc(lib, lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "nvrtcVersion")
    return major.value, minor.value


def cache_dir() -> Path:
    """Where compiled cubins are kept: QUANTKIT_CACHE_DIR, else $QUANTKIT_CACHE/cuda (where quantkit's
    other caches live), else $XDG_CACHE_HOME/quantkit or ~/.cache/quantkit."""
    if os.environ.get("QUANTKIT_CACHE_DIR"):
        return Path(os.environ["QUANTKIT_CACHE_DIR"])
    if os.environ.get("QUANTKIT_CACHE"):
        return Path(os.environ["QUANTKIT_CACHE"]).expanduser() / "cuda"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "quantkit"


def cached_cubin(source: str, arch: str, options: list[str], name: str = "quantkit.cu") -> bytes:
    """compile_cubin, kept on disk between processes: NVRTC takes ~1.4 s for searches.cu, which an
    export would pay each run. The file name holds a hash of the source, the architecture, the
    options and NVRTC's version; it is written under a temporary name and renamed. A cache folder
    that cannot be read or written only means compiling."""
    key = hashlib.sha256(repr((source, arch, sorted(options), _nvrtc_version())).encode()).hexdigest()[:32]
    path = cache_dir() / f"{name}-sm_{arch}-{key}.cubin"
    try:
        return path.read_bytes()
    except OSError:
        pass
    cubin = compile_cubin(source, arch, options, name)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
        tmp.write_bytes(cubin)
        os.replace(tmp, path)
    except OSError:
        pass
    return cubin


class Kernel:
    """A loaded kernel: call it with the grid, the block and its arguments (tensors → their device
    pointers, ints → C int), launched on torch's current stream of the tensors' device."""

    def __init__(self, module: ctypes.c_void_p, func: ctypes.c_void_p, name: str, device: torch.device):
        self._module, self._func, self.name, self.device = module, func, name, device

    def __call__(self, grid: tuple[int, ...], block: tuple[int, ...], args: list) -> None:
        holders = []
        for a in args:
            if isinstance(a, torch.Tensor):
                if a.device != self.device:
                    raise ValueError(f"{self.name}: a tensor on {a.device}, the kernel is loaded on {self.device}")
                holders.append(ctypes.c_void_p(a.data_ptr()))
            elif isinstance(a, int):
                holders.append(ctypes.c_int(a))
            else:
                raise TypeError(f"{self.name}: unsupported kernel argument {type(a).__name__}")
        params = (ctypes.c_void_p * len(holders))(*[ctypes.cast(ctypes.byref(h), ctypes.c_void_p) for h in holders])
        gx, gy, gz = (*grid, 1, 1)[:3]
        bx, by, bz = (*block, 1, 1)[:3]
        stream = ctypes.c_void_p(torch.cuda.current_stream(self.device).cuda_stream)
        with _Current(self.device.index):
            _check_cu(_driver().cuLaunchKernel(self._func, gx, gy, gz, bx, by, bz, 0, stream, params, None),
                      f"launching {self.name}")


def load(cubin: bytes, names: list[str], device: torch.device) -> dict[str, Kernel]:
    """Load a cubin into the device's primary context (torch's); its extern "C" kernels by name.
    `device` has an index (cuda:0, not cuda)."""
    driver = _driver()
    module = ctypes.c_void_p()
    with _Current(device.index):
        _check_cu(driver.cuModuleLoadData(ctypes.byref(module), cubin), "cuModuleLoadData")
        kernels = {}
        for name in names:
            func = ctypes.c_void_p()
            _check_cu(driver.cuModuleGetFunction(ctypes.byref(func), module, name.encode()),
                      f"cuModuleGetFunction({name})")
            kernels[name] = Kernel(module, func, name, device)
    return kernels
