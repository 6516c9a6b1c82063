"""The scale searches of searches.py compiled for the CPU with numba: make_qkx2_quants (Q4_K,
Q5_K), make_qx_quants with rmse_type 1 (Q6_K) and make_qp_quants (Q4_K/Q5_K's super-block scales
with an importance matrix).

Same inputs, outputs and float32 operations as the torch versions, in the same order, so the
bytes are ggml's. What changes is where the work happens: torch runs each elementwise step over
the whole chunk (about 16 passes over memory per search step, 2000 dispatches per chunk); here a
tile of TILE sub-blocks is searched to the end while it sits in the L1 cache, with the loop over
the tile's sub-blocks innermost, so that LLVM vectorizes across sub-blocks (every sub-block still
adds its terms one position after another, as C does: nothing is reassociated, and numba's
default math is IEEE, no FMA contraction). Tiles run in parallel (prange).

Each search is a function of one tile (qkx2_tile, qx_rmse1_tile) or of one super-block's scales
(qp_one): the make_* entry points here run them over the columns they are given (Q5_0/Q5_1 with an
importance matrix call them), and kquants_cpu runs them inside its whole-super-block K-quant kernels.

Optional as numba is (see _numba): `available()` is False without it, and the torch searches run.
"""
from __future__ import annotations

import numpy as np
import torch

from ._numba import F, numba

TILE = 64  # sub-blocks searched together: 32 positions x 64 x 4 bytes = 8 KiB per array
GROUP_MAX_EPS = F(1e-15)


def available() -> bool:
    return numba is not None


if numba is not None:
    from ._numba import inline as _inline
    from ._numba import jit_parallel as _jit
    from ._numba import jit_tile as _tile
    from ._numba import nearest_int, prange

    @_inline
    def _code(v, lo, hi):  # pragma: no cover - compiled
        """nearest_int(v) clamped to [lo, hi], as float32 (exact for the |v| < 2^22 the searches make)."""
        q = np.rint(v)
        q = lo if q < lo else q
        return hi if q > hi else q

    @_inline
    def _qx_sums(xs, w, wx, iscale, lo, hi, sumlx, suml2):  # pragma: no cover - compiled
        """make_qx_quants' sums for every sub-block of a tile: sumlx += w*x[i]*l, suml2 += w*l*l."""
        for b in range(xs.shape[1]):
            sumlx[b] = F(0.0)
            suml2[b] = F(0.0)
        for i in range(xs.shape[0]):
            for b in range(xs.shape[1]):
                q = _code(iscale[b] * xs[i, b], lo, hi)
                sumlx[b] = sumlx[b] + wx[i, b] * q
                suml2[b] = suml2[b] + w[i, b] * q * q

    @_tile
    def qkx2_tile(xs, ws, nmax, rmin, rdelta, nstep, scale_out, min_out, L_out, b0):  # pragma: no cover - compiled
        """make_qkx2_quants for the m sub-blocks of one tile, xs/ws [n, m] C-contiguous (stride
        1 along b, which lets LLVM vectorize across sub-blocks); results go to column b0 + b."""
        n, m = xs.shape
        fnmax = F(nmax)
        zero = F(0.0)
        mn = xs[0].copy()
        mx = xs[0].copy()
        sum_w = ws[0].copy()
        sum_x = np.empty(m, F)
        for b in range(m):
            sum_x[b] = sum_w[b] * xs[0, b]
        for i in range(1, n):
            for b in range(m):
                v = xs[i, b]
                if v < mn[b]:
                    mn[b] = v
                if v > mx[b]:
                    mx[b] = v
                sum_w[b] = sum_w[b] + ws[i, b]
                sum_x[b] = sum_x[b] + ws[i, b] * v
        flat = np.empty(m, np.bool_)
        for b in range(m):
            if mn[b] > zero:
                mn[b] = zero
            flat[b] = mx[b] == mn[b]

        iscale = np.empty(m, F)
        scale = np.empty(m, F)
        best = np.zeros(m, F)
        l_iscale = np.empty(m, F)
        l_min = mn.copy()
        for b in range(m):
            isc = fnmax / (mx[b] - mn[b])
            scale[b] = F(1.0) / isc
            # an infinite iscale (a range below ~1e-37) makes every C code 0: so does 0
            iscale[b] = isc if np.isfinite(isc) else zero
            l_iscale[b] = iscale[b]
        for i in range(n):
            for b in range(m):
                q = _code(iscale[b] * (xs[i, b] - mn[b]), zero, fnmax)
                diff = scale[b] * q + mn[b] - xs[i, b]
                best[b] = best[b] + ws[i, b] * (diff * diff)

        laux = np.empty((n, m), F)
        sum_l = np.empty(m, F)
        sum_l2 = np.empty(m, F)
        sum_xl = np.empty(m, F)
        this_scale = np.empty(m, F)
        this_min = np.empty(m, F)
        cur = np.empty(m, F)
        D = np.empty(m, F)
        for step in range(nstep + 1):
            num = rmin + rdelta * F(step) + fnmax
            for b in range(m):
                isc = num / (mx[b] - mn[b])
                iscale[b] = isc if np.isfinite(isc) else zero
                sum_l[b] = zero
                sum_l2[b] = zero
                sum_xl[b] = zero
            for i in range(n):
                for b in range(m):
                    q = _code(iscale[b] * (xs[i, b] - mn[b]), zero, fnmax)
                    laux[i, b] = q
                    wl = ws[i, b] * q
                    sum_l[b] = sum_l[b] + wl
                    sum_l2[b] = sum_l2[b] + wl * q
                    sum_xl[b] = sum_xl[b] + wl * xs[i, b]
            for b in range(m):
                d = sum_w[b] * sum_l2[b] - sum_l[b] * sum_l[b]
                D[b] = d
                ts = (sum_w[b] * sum_xl[b] - sum_x[b] * sum_l[b]) / d
                tm = (sum_l2[b] * sum_x[b] - sum_l[b] * sum_xl[b]) / d
                if tm > zero:
                    tm = zero
                    ts = sum_xl[b] / sum_l2[b]
                this_scale[b] = ts
                this_min[b] = tm
                cur[b] = zero
            for i in range(n):
                for b in range(m):
                    diff = this_scale[b] * laux[i, b] + this_min[b] - xs[i, b]
                    cur[b] = cur[b] + ws[i, b] * (diff * diff)
            for b in range(m):
                if D[b] > zero and cur[b] < best[b] and not flat[b]:
                    l_iscale[b] = iscale[b]
                    l_min[b] = mn[b]
                    best[b] = cur[b]
                    scale[b] = this_scale[b]
                    mn[b] = this_min[b]

        for i in range(n):
            for b in range(m):
                q = _code(l_iscale[b] * (xs[i, b] - l_min[b]), zero, fnmax)
                L_out[i, b0 + b] = zero if flat[b] else q
        for b in range(m):
            scale_out[b0 + b] = zero if flat[b] else scale[b]
            min_out[b0 + b] = -mn[b]

    @_jit
    def _qkx2(x, w, nmax, rmin, rdelta, nstep, scale_out, min_out, L_out):  # pragma: no cover - compiled
        N = x.shape[1]
        for t in prange((N + TILE - 1) // TILE):
            b0 = t * TILE
            m = min(N, b0 + TILE) - b0
            qkx2_tile(np.ascontiguousarray(x[:, b0:b0 + m]), np.ascontiguousarray(w[:, b0:b0 + m]),
                      nmax, rmin, rdelta, nstep, scale_out, min_out, L_out, b0)

    @_tile
    def qx_rmse1_tile(xs, qs, use_qw, nmax, scale_out, L_out, b0):  # pragma: no cover - compiled
        """make_qx_quants (rmse_type 1) for the m sub-blocks of one tile, xs (and qs, the
        importance, read only when use_qw) [n, m] C-contiguous; results go to column b0 + b."""
        n, m = xs.shape
        fnmax = F(nmax)
        lo = F(-nmax)
        hi = F(nmax - 1)
        zero = F(0.0)
        # `if (ax > amax) { amax = ax; max = x[i]; }`: the first value of largest magnitude
        amax = np.zeros(m, F)
        mx = np.zeros(m, F)
        for i in range(n):
            for b in range(m):
                ax = abs(xs[i, b])
                if ax > amax[b]:
                    amax[b] = ax
                    mx[b] = xs[i, b]
        w = np.empty((n, m), F)
        wx = np.empty((n, m), F)
        for i in range(n):
            for b in range(m):
                v = xs[i, b]
                wv = qs[i, b] if use_qw else v * v
                w[i, b] = wv
                wx[i, b] = wv * v
        iscale = np.empty(m, F)
        l_iscale = np.empty(m, F)
        sumlx = np.empty(m, F)
        suml2 = np.empty(m, F)
        scale = np.empty(m, F)
        best = np.empty(m, F)
        for b in range(m):
            iscale[b] = -fnmax / mx[b]
            l_iscale[b] = iscale[b]
        _qx_sums(xs, w, wx, iscale, lo, hi, sumlx, suml2)
        for b in range(m):
            scale[b] = sumlx[b] / suml2[b] if suml2[b] != zero else zero
            best[b] = scale[b] * sumlx[b]
        for step in range(-9, 10):
            if step == 0:
                continue
            num = -(fnmax + F(0.1) * F(step))
            for b in range(m):
                iscale[b] = num / mx[b]
            _qx_sums(xs, w, wx, iscale, lo, hi, sumlx, suml2)
            for b in range(m):
                if suml2[b] > zero and sumlx[b] * sumlx[b] > best[b] * suml2[b]:
                    s = sumlx[b] / suml2[b]
                    scale[b] = s
                    best[b] = s * sumlx[b]
                    l_iscale[b] = iscale[b]

        for i in range(n):
            for b in range(m):
                q = _code(l_iscale[b] * xs[i, b], lo, hi)
                L_out[i, b0 + b] = zero if amax[b] < GROUP_MAX_EPS else q + fnmax
        for b in range(m):
            scale_out[b0 + b] = zero if amax[b] < GROUP_MAX_EPS else scale[b]

    @_jit
    def _qx_rmse1(x, qw, use_qw, nmax, scale_out, L_out):  # pragma: no cover - compiled
        N = x.shape[1]
        for t in prange((N + TILE - 1) // TILE):
            b0 = t * TILE
            m = min(N, b0 + TILE) - b0
            xs = np.ascontiguousarray(x[:, b0:b0 + m])
            qs = np.ascontiguousarray(qw[:, b0:b0 + m]) if use_qw else xs   # no imatrix: no second copy
            qx_rmse1_tile(xs, qs, use_qw, nmax, scale_out, L_out, b0)


    @_tile
    def qp_one(x, w, nmax, L):  # pragma: no cover - compiled
        """make_qp_quants(n, nmax, x, L, w) for one set of n values x >= 0 (8 sub-block scales
        or mins): returns the scale, writes the codes (as the uint8 stores hold them) into L."""
        n = x.shape[0]
        fnmax = F(nmax)
        zero = F(0.0)
        mx = zero
        for i in range(n):                  # MAX(mx, x[i]): a NaN x[i] is taken
            mx = mx if mx > x[i] else x[i]
        if mx < GROUP_MAX_EPS:
            for i in range(n):
                L[i] = 0
            return zero
        iscale = fnmax / mx
        scale = F(1.0) / iscale
        best = zero
        for i in range(n):
            li = nearest_int(iscale * x[i]) & 0xFF      # stored in a uint8, no MIN
            diff = x[i] - scale * F(li)
            best = best + w[i] * diff * diff
        for step in (-4, -3, -2, -1, 1, 2, 3, 4):
            iscale_is = (F(0.1) * F(step) + fnmax) / mx
            scale_is = F(1.0) / iscale_is
            mse = zero
            for i in range(n):
                li = min(nmax, nearest_int(iscale_is * x[i]))
                diff = x[i] - scale_is * F(li)
                mse = mse + w[i] * diff * diff
            if mse < best:
                best = mse
                iscale = iscale_is
        sumlx = zero
        suml2 = zero
        for i in range(n):
            li = min(nmax, nearest_int(iscale * x[i]))
            L[i] = li & 0xFF
            sumlx = sumlx + w[i] * x[i] * F(li)
            suml2 = suml2 + w[i] * F(li) * F(li)
        for _ in range(5):
            changed = 0
            for i in range(n):
                wi, xi, Li = w[i], x[i], F(L[i])
                slx = sumlx - wi * xi * Li
                sl2 = suml2 - wi * Li * Li
                if slx > zero and sl2 > zero:
                    new_l = min(nmax, nearest_int(xi * sl2 / slx))
                    if new_l != L[i]:
                        slx = slx + wi * xi * F(new_l)
                        sl2 = sl2 + wi * F(new_l) * F(new_l)
                        if slx * slx * suml2 > sumlx * sumlx * sl2:
                            L[i] = new_l & 0xFF
                            sumlx = slx
                            suml2 = sl2
                            changed += 1
            if changed == 0:
                break
        return sumlx / suml2 if suml2 > zero else zero

    @_jit
    def _qp(x, w, nmax, scale_out, L_out):  # pragma: no cover - compiled
        """make_qp_quants for every column: one after another as in C (8 values each: cheap)."""
        N = x.shape[1]
        for t in prange((N + TILE - 1) // TILE):
            for b in range(t * TILE, min(N, t * TILE + TILE)):
                scale_out[b] = qp_one(np.ascontiguousarray(x[:, b]), np.ascontiguousarray(w[:, b]), nmax, L_out[:, b])


def make_qkx2_quants(x, w, nmax: int, rmin: float, rdelta: float, nstep: int):
    """searches.make_qkx2_quants for CPU tensors: x, w float32 [n, N] position-major."""
    xn, wn = x.contiguous().numpy(), w.contiguous().numpy()
    n, N = xn.shape
    scale, the_min, L = np.empty(N, F), np.empty(N, F), np.empty((n, N), F)
    _qkx2(xn, wn, nmax, F(rmin), F(rdelta), nstep, scale, the_min, L)
    return torch.from_numpy(scale), torch.from_numpy(the_min), torch.from_numpy(L)


def make_qx_quants_rmse1(x, nmax: int, qw=None):
    """searches.make_qx_quants_rmse1 for CPU tensors: x (and qw) float32 [n, N] position-major."""
    xn = x.contiguous().numpy()
    n, N = xn.shape
    qn = xn if qw is None else qw.contiguous().numpy()     # unread without an imatrix (use_qw)
    scale, L = np.empty(N, F), np.empty((n, N), F)
    _qx_rmse1(xn, qn, qw is not None, nmax, scale, L)
    return torch.from_numpy(scale), torch.from_numpy(L)


def make_qp_quants(x, w, nmax: int):
    """searches.make_qp_quants for CPU tensors: x, w float32 [n, N] position-major."""
    xn, wn = x.contiguous().numpy(), w.contiguous().numpy()
    n, N = xn.shape
    scale, L = np.empty(N, F), np.empty((n, N), np.int32)
    _qp(xn, wn, nmax, scale, L)
    return torch.from_numpy(scale), torch.from_numpy(L)
