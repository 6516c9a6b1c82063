"""ggml's scale searches, vectorized over many (sub-)blocks at once: make_qkx2_quants (also
make_qkx3_quants, the same computation with other weights and steps), make_qx_quants with
rmse_type 1, and make_qp_quants. Each mirrors the C loop operation for operation in float32 (see
_ops), with the blocks laid out position-major: x[i, b] is value i of block b.

Each has compiled versions with the same bytes, since these loops are where the K-quants spend
their time: searches_cpu (numba) for CPU tensors, searches_cuda (searches.cu through NVRTC) for
CUDA ones. The torch code here is the reference form and the fallback; which one runs is the
backends table's choice (backends.py), registered at the end of this module.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import backends, searches_cpu, searches_cuda
from ._ops import div, f32, nearest_int, seq_sum

GROUP_MAX_EPS = f32(1e-15)


def _make_qkx2_quants(x: Tensor, w: Tensor, nmax: int, rmin: float, rdelta: float, nstep: int):
    """make_qkx2_quants (use_mad=false) for many sub-blocks at once.

    x, w: float32 [n, N], position-major (one column per sub-block, n values each).
    Returns (scale [N], the_min [N], L [n, N]); L holds small integers as float32.
    """
    min_ = x.amin(0)
    max_ = x.amax(0)
    sum_w = seq_sum(w, from_zero=False)
    wx = w * x
    sum_x = seq_sum(wx, from_zero=False)
    min_ = torch.where(min_ > 0, torch.zeros_like(min_), min_)
    flat = max_ == min_

    # every [n, N] intermediate lives in one of three preallocated buffers, updated in place:
    # the same float32 operations in the same order, without an allocation per operation
    lbuf, dbuf = torch.empty_like(x), torch.empty_like(x)

    def quant(iscale: Tensor, mn: Tensor, out: Tensor) -> Tensor:
        # nearest_int as torch.round (both round half to even): |iscale*(x - min)| stays
        # below ~nmax + 1 whenever iscale is finite. An infinite iscale (a range below
        # ~1e-37) gives inf/NaN products, which nearest_int maps to 0: zeroing iscale
        # reproduces that without the bit trick on every element of every step.
        iscale = torch.nan_to_num(iscale, nan=0.0, posinf=0.0, neginf=0.0)
        torch.sub(x, mn, out=out)
        return out.mul_(iscale).round_().clamp_(0, nmax)

    def error(scale: Tensor, mn: Tensor, l: Tensor) -> Tensor:
        # sum of w * (scale*l + min - x)^2
        diff = torch.mul(scale, l, out=dbuf).add_(mn).sub_(x)
        return seq_sum(diff.mul_(diff).mul_(w))

    iscale = div(float(nmax), max_ - min_)
    scale = div(1.0, iscale)
    best_error = error(scale, min_, quant(iscale, min_, lbuf))
    # L is a function of (iscale, min) at the step that set it: keep those, rebuild L once
    l_iscale, l_min = iscale, min_

    # the three per-step sums run through one [n, 3, N] buffer: one add per position
    terms = torch.empty((x.shape[0], 3, x.shape[1]), dtype=x.dtype, device=x.device)
    for step in range(nstep + 1):
        # (rmin + rdelta*is + nmax) in float32, then divided by (max - min) with the *current*
        # min: C updates `min` in place when a step wins
        num = f32(f32(rmin + f32(f32(rdelta) * step)) + nmax)
        iscale = div(num, max_ - min_)
        laux = quant(iscale, min_, lbuf)
        wl = torch.mul(w, laux, out=terms[:, 0])
        torch.mul(wl, laux, out=terms[:, 1])  # w*l*l
        torch.mul(wl, x, out=terms[:, 2])  # w*l*x[i]
        sum_l, sum_l2, sum_xl = seq_sum(terms)
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = div(sum_w * sum_xl - sum_x * sum_l, D)
        this_min = div(sum_l2 * sum_x - sum_l * sum_xl, D)
        clip = this_min > 0
        this_min = torch.where(clip, torch.zeros_like(this_min), this_min)
        this_scale = torch.where(clip, div(sum_xl, sum_l2), this_scale)
        cur_error = error(this_scale, this_min, laux)
        better = (D > 0) & (cur_error < best_error) & ~flat
        l_iscale = torch.where(better, iscale, l_iscale)
        l_min = torch.where(better, min_, l_min)
        best_error = torch.where(better, cur_error, best_error)
        scale = torch.where(better, this_scale, scale)
        min_ = torch.where(better, this_min, min_)

    L = quant(l_iscale, l_min, torch.empty_like(x))
    zero = torch.zeros_like(scale)
    L = torch.where(flat, torch.zeros_like(L), L)
    return torch.where(flat, zero, scale), -min_, L


def _make_qx_quants_rmse1(x: Tensor, nmax: int, qw: Tensor | None = None):
    """make_qx_quants(n, nmax, x, L, rmse_type=1, qw) for many sub-blocks at once: the weights
    are qw (an importance matrix) when given, else x*x.

    x, qw: float32 [n, N], position-major. Returns (scale [N], L [n, N]) with L as float32.
    """
    ax = x.abs()
    # `if (ax > amax) { amax = ax; max = x[i]; }`: the first value of largest magnitude
    idx = ax.argmax(0, keepdim=True)
    max_ = x.gather(0, idx)[0]
    all_zero = ax.gather(0, idx)[0] < GROUP_MAX_EPS
    w = x * x if qw is None else qw
    wx = w * x

    lbuf = torch.empty_like(x)

    def quant(iscale: Tensor, out: Tensor | None = None) -> Tensor:
        # torch.round == nearest_int here: |iscale*x| <= ~nmax + 1 (all-zero blocks, where
        # iscale is infinite, are replaced at the end)
        return torch.mul(x, iscale, out=lbuf if out is None else out).round_().clamp_(-nmax, nmax - 1)

    terms = torch.empty((x.shape[0], 2, x.shape[1]), dtype=x.dtype, device=x.device)

    def sums(l: Tensor) -> Tensor:
        torch.mul(wx, l, out=terms[:, 0])  # w*x[i]*l
        torch.mul(torch.mul(w, l, out=terms[:, 1]), l, out=terms[:, 1])  # w*l*l
        return seq_sum(terms)

    iscale = div(float(-nmax), max_)
    sumlx, suml2 = sums(quant(iscale))
    scale = torch.where(suml2 != 0, div(sumlx, suml2), torch.zeros_like(sumlx))
    best = scale * sumlx
    l_iscale = iscale
    for step in (*range(-9, 0), *range(1, 10)):
        iscale = div(-f32(nmax + f32(f32(0.1) * step)), max_)
        sumlx, suml2 = sums(quant(iscale))
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        new_scale = div(sumlx, suml2)
        scale = torch.where(better, new_scale, scale)
        best = torch.where(better, new_scale * sumlx, best)
        l_iscale = torch.where(better, iscale, l_iscale)

    L = quant(l_iscale, torch.empty_like(x)) + nmax
    L = torch.where(all_zero, torch.zeros_like(L), L)
    return torch.where(all_zero, torch.zeros_like(scale), scale), L


def _make_qp_quants(x: Tensor, w: Tensor, nmax: int) -> tuple[Tensor, Tensor]:
    """make_qp_quants(n, nmax, x, L, quant_weights=w) for many rows at once: the super-block
    scale of n sub-block scales (or mins) x >= 0, weighted by w, and their integer codes.

    x, w: float32 [n, N], position-major. Returns (scale [N], L [n, N] int32, as the uint8 stores hold them).
    """
    n = x.shape[0]
    zero = torch.zeros_like(x[0])
    max_ = zero
    for i in range(n):                            # float max = 0; max = MAX(max, x[i]): a NaN x[i] is taken
        max_ = torch.where(max_ > x[i], max_, x[i])
    all_zero = max_ < GROUP_MAX_EPS

    def codes(iscale: Tensor) -> Tensor:          # int l = MIN(nmax, nearest_int(iscale * x[i]))
        return nearest_int(iscale * x).clamp_(max=nmax)

    def mse(scale: Tensor, l: Tensor) -> Tensor:  # sum of w*diff*diff, diff = x - scale*l
        diff = x - scale * l
        return seq_sum(w * diff * diff)

    iscale = div(float(nmax), max_)
    best = mse(div(1.0, iscale), (nearest_int(iscale * x) & 0xFF).float())   # no MIN on this first pass
    for step in (-4, -3, -2, -1, 1, 2, 3, 4):
        iscale_is = div(f32(f32(f32(0.1) * step) + nmax), max_)
        cur = mse(div(1.0, iscale_is), codes(iscale_is).float())
        better = cur < best
        best = torch.where(better, cur, best)
        iscale = torch.where(better, iscale_is, iscale)
    li = codes(iscale)
    lf = li.float()
    wx = w * x
    sumlx = seq_sum(wx * lf)
    suml2 = seq_sum(w * lf * lf)
    L = li & 0xFF
    # up to 5 passes of coordinate descent, each position in order; a pass that changes nothing
    # leaves the state as it was, so running all 5 everywhere equals C's early `break`
    for _ in range(5):
        for i in range(n):
            Li = L[i].float()
            slx = sumlx - wx[i] * Li
            sl2 = suml2 - w[i] * Li * Li
            ok = (slx > 0) & (sl2 > 0)
            new_l = nearest_int(div(x[i] * sl2, slx)).clamp_(max=nmax)
            nl = new_l.float()
            slx = slx + wx[i] * nl
            sl2 = sl2 + w[i] * nl * nl
            take = ok & (new_l != L[i]) & (slx * slx * suml2 > sumlx * sumlx * sl2)
            L[i] = torch.where(take, new_l & 0xFF, L[i])
            sumlx = torch.where(take, slx, sumlx)
            suml2 = torch.where(take, sl2, suml2)
    scale = torch.where(suml2 > 0, div(sumlx, suml2), zero)
    return torch.where(all_zero, zero, scale), torch.where(all_zero[None], torch.zeros_like(L), L)


def on_cpu_with_numba(x, *args) -> bool:
    return x.device.type == "cpu" and searches_cpu.available()


def _on_gpu(search: str):
    # a compiled search exists for this number of values per sub-block
    return lambda x, *args: searches_cuda.available(x.device, f"{search}_{x.shape[0]}")


def _search(name: str, cuda_kernel: str, torch_version):
    return backends.kernel(name, [
        backends.Impl("numba-searches", on_cpu_with_numba, getattr(searches_cpu, name)),
        backends.Impl("cuda-searches", _on_gpu(cuda_kernel), getattr(searches_cuda, name)),
        backends.Impl("torch", backends.anywhere, torch_version)])


make_qkx2_quants = _search("make_qkx2_quants", "qkx2_search", _make_qkx2_quants)
make_qx_quants_rmse1 = _search("make_qx_quants_rmse1", "qx_rmse1_search", _make_qx_quants_rmse1)
make_qp_quants = _search("make_qp_quants", "qp_search", _make_qp_quants)
