"""The scale searches of searches.py on the GPU, and whole Q8_0 / Q4_K / Q5_K / Q6_K blocks:
searches.cu compiled at run time by NVRTC (nvrtc.py; no compiler or CUDA toolkit needed, NVRTC comes
with CUDA torch), one thread per sub-block (searches) or per block (whole blocks).

Same inputs, outputs and float32 operations as the torch versions, so the bytes are ggml's (the
tests run searches.cu compiled for the host against ggml, and the CUDA tests compare the GPU's
bytes with the CPU's).

`available(device)` compiles on first use and is False where the compilation or loading fails
(a warning says why, once); the torch searches run then. Which of these kernels run at all is
backends.py's choice (QUANTKIT_KERNELS): without cuda-searches and cuda-blocks nothing compiles.
"""
from __future__ import annotations

import warnings
from importlib import resources

import torch

from . import nvrtc

SOURCE = resources.files(__package__).joinpath("searches.cu")
SEARCH_KERNELS = ("qkx2_search_32", "qx_rmse1_search_16", "qx_rmse1_search_32", "qp_search_8")
# whole blocks (backend cuda-blocks; without it the torch code runs around the compiled searches:
# same bytes, ~130 launches a chunk where these take one)
BLOCK_KERNELS = ("q8_0_blocks", "k_with_min_blocks", "q6_k_blocks")
KERNELS = SEARCH_KERNELS + BLOCK_KERNELS
# --fmad=false: no multiply-add contraction (C's float32 semantics); IEEE division and denormals
# are NVRTC's defaults, stated anyway
NVRTC_OPTIONS = ["--fmad=false", "--prec-div=true", "--prec-sqrt=true", "--ftz=false", "--std=c++17"]
THREADS = 128

_loaded: dict[int, dict | str] = {}           # device index → {kernel name: Kernel}, or why not
_params: dict[tuple, torch.Tensor] = {}       # (device index, values) → the kernel's float32 parameters


def _device(device: torch.device) -> torch.device:
    return torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())


def _kernels(device: torch.device) -> dict | str:
    device = _device(device)
    if device.index not in _loaded:
        try:
            arch = "".join(map(str, torch.cuda.get_device_capability(device)))
            _loaded[device.index] = nvrtc.load(nvrtc.cached_cubin(SOURCE.read_text(), arch, NVRTC_OPTIONS,
                                                                  "searches.cu"), list(KERNELS), device)
        except Exception as e:  # noqa: BLE001 - any failure means: use the torch searches
            _loaded[device.index] = str(e)
            warnings.warn(f"quantkit: the GPU scale searches are not available ({e}); using the slower torch "
                          "ones (same bytes)", RuntimeWarning, stacklevel=4)
    return _loaded[device.index]


def available(device: torch.device, kernel: str | None = None) -> bool:
    """Whether the compiled kernels run on `device` (and include `kernel`, e.g. "qx_rmse1_search_16")."""
    return device.type == "cuda" and isinstance(_kernels(device), dict) and (kernel is None or kernel in KERNELS)


def _params_on(device: torch.device, *values: float) -> torch.Tensor:
    """A few float32 parameters on the device, copied there once (a copy per call would wait)."""
    key = (_device(device).index, values)
    if key not in _params:
        _params[key] = torch.tensor(values, dtype=torch.float32).to(device)
    return _params[key]


def _launch(name: str, N: int, args: list) -> None:
    if N == 0:
        return
    if N >= 1 << 31:
        raise ValueError(f"{name}: {N} columns do not fit the kernel's int")
    _kernels(args[0].device)[name](((N + THREADS - 1) // THREADS,), (THREADS,), args)


def _inputs(*ts):
    """Contiguous float32 copies where needed: the kernels read raw float32 pointers."""
    for t in ts:
        if t.dtype != torch.float32:
            raise TypeError(f"the GPU searches take float32, not {t.dtype}")
    return [t.contiguous() for t in ts]


def _out(*shape, like, dtype=torch.float32):
    return torch.empty(shape, dtype=dtype, device=like.device)   # never the (global) default dtype


def make_qkx2_quants(x, w, nmax: int, rmin: float, rdelta: float, nstep: int):
    """searches.make_qkx2_quants for CUDA tensors: x, w float32 [n, N] position-major (n = 32)."""
    x, w = _inputs(x, w)
    n, N = x.shape
    scale, the_min, L = _out(N, like=x), _out(N, like=x), _out(n, N, like=x)
    _launch(f"qkx2_search_{n}", N, [x, w, _params_on(x.device, nmax, rmin, rdelta, nstep), scale, the_min, L, N])
    return scale, the_min, L


def make_qx_quants_rmse1(x, nmax: int, qw=None):
    """searches.make_qx_quants_rmse1 for CUDA tensors: x (and qw) float32 [n, N] position-major (n = 16, 32)."""
    use_qw = qw is not None
    x, qw = _inputs(x, qw if use_qw else x)          # without an imatrix qw is x, unread
    n, N = x.shape
    scale, L = _out(N, like=x), _out(n, N, like=x)
    _launch(f"qx_rmse1_search_{n}", N, [x, qw, _params_on(x.device, nmax), scale, L, int(use_qw), N])
    return scale, L


def make_qp_quants(x, w, nmax: int):
    """searches.make_qp_quants for CUDA tensors: x, w float32 [n, N] position-major (n = 8)."""
    x, w = _inputs(x, w)
    n, N = x.shape
    scale, L = _out(N, like=x), _out(n, N, like=x, dtype=torch.int32)
    _launch(f"qp_search_{n}", N, [x, w, _params_on(x.device, nmax), scale, L, N])
    return scale, L


def _check_blocks(x, qw, width: int) -> None:
    """The kernels read width values a block (and as many importances): a wrong shape would read
    past the buffer, which on a GPU ruins the CUDA context for the rest of the process."""
    if x.dim() != 2 or x.shape[1] != width:
        raise ValueError(f"the GPU block kernels take float32 [n, {width}], not {tuple(x.shape)}")
    if qw is not None and qw.shape != x.shape:
        raise ValueError(f"importance of shape {tuple(qw.shape)} for blocks of shape {tuple(x.shape)}")


def quantize_q8_0(x):
    """legacy.quantize_q8_0 for CUDA tensors: x float32 [n, 32] -> uint8 [n, 34], one launch."""
    _check_blocks(x, None, 32)
    (x,) = _inputs(x)
    out = _out(x.shape[0], 34, like=x, dtype=torch.uint8)
    _launch("q8_0_blocks", x.shape[0], [x, out, x.shape[0]])
    return out


def quantize_k_with_min(x, qw, search):
    """kquants.quantize_q4_k (search.nmax 15) or _q5_k (31) for CUDA tensors: x (and qw) float32
    [n, 256] -> uint8 [n, 144] or [n, 176], one launch; search: kquants.k_search's parameters."""
    _check_blocks(x, qw, 256)
    type_size = {15: 144, 31: 176}[search.nmax]
    use_qw = qw is not None
    x, qw = _inputs(x, qw if use_qw else x)          # without an imatrix qw is x, unread
    out = _out(x.shape[0], type_size, like=x, dtype=torch.uint8)
    _launch("k_with_min_blocks", x.shape[0], [x, qw, _params_on(x.device, *search), out, int(use_qw), type_size,
                                          x.shape[0]])
    return out


def quantize_q6_k(x, qw=None):
    """kquants.quantize_q6_k for CUDA tensors: x (and qw) float32 [n, 256] -> uint8 [n, 210], one launch."""
    _check_blocks(x, qw, 256)
    use_qw = qw is not None
    x, qw = _inputs(x, qw if use_qw else x)
    out = _out(x.shape[0], 210, like=x, dtype=torch.uint8)
    _launch("q6_k_blocks", x.shape[0], [x, qw, out, int(use_qw), x.shape[0]])
    return out
