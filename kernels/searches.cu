// The scale searches of searches.py for the GPU, as CUDA C compiled at run time by NVRTC
// (searches_cuda.py; no compiler is needed at install time): make_qkx2_quants (Q4_K, Q5_K, and
// with an importance matrix make_qkx3_quants' steps), make_qx_quants with rmse_type 1 (Q6_K) and
// make_qp_quants (the super-block scales of Q4_K/Q5_K with an importance matrix).
//
// One thread searches one sub-block from start to end in registers, as the C loop does, instead
// of the ~2000 whole-chunk torch launches of the vectorized search. The data stay position-major,
// x[i * N + b] = value i of sub-block b, so the threads of a warp read consecutive addresses.
//
// Bit-exact with ggml's C: float32 operations in the C order, compiled with --fmad=false (no
// multiply-add contraction) and IEEE division and rounding (NVRTC's defaults). The same source
// compiles for the host with a C++ compiler (-ffp-contract=off) so the tests check it against
// ggml's bytes on a machine without a GPU (tests/test_kernels_vs_ggml.py).
#ifdef __CUDACC__
#define QK_FN static __device__ __forceinline__
QK_FN int f32_bits(float v) { return __float_as_int(v); }
#else
#include <math.h>
#include <string.h>
#define QK_FN static inline
QK_FN int f32_bits(float v) { int i; memcpy(&i, &v, sizeof i); return i; }
#endif

#define GROUP_MAX_EPS 1e-15f

// ggml's nearest_int: the low mantissa bits of v + 1.5 * 2^23 (round half to even for |v| < 2^22).
// A NaN gives 0 as x86's default NaN (0xFFC00000) does there; the GPU's (0x7FFFFFFF) would not.
QK_FN int nearest_int(float v) {
    if (v != v) return 0;
    return (f32_bits(v + 12582912.f) & 0x007fffff) - 0x00400000;
}

QK_FN int clamp_int(int l, int lo, int hi) { return l < lo ? lo : (l > hi ? hi : l); }

// make_qkx2_quants(n, nmax, x, w, L, &the_min, Laux, rmin, rdelta, nstep, use_mad=false) for sub-block b
template <int n>
QK_FN void qkx2_one(const float *x, const float *w, long long N, long long b, int nmax, float rmin,
                    float rdelta, int nstep, float *scale_out, float *min_out, float *L_out) {
    float xs[n], ws[n];
    unsigned char L[n], Laux[n];
#pragma unroll
    for (int i = 0; i < n; ++i) {
        xs[i] = x[i * N + b];
        ws[i] = w[i * N + b];
    }
    float min = xs[0], max = xs[0];
    float sum_w = ws[0];
    float sum_x = sum_w * xs[0];
#pragma unroll
    for (int i = 1; i < n; ++i) {
        if (xs[i] < min) min = xs[i];
        if (xs[i] > max) max = xs[i];
        sum_w += ws[i];
        sum_x += ws[i] * xs[i];
    }
    if (min > 0) min = 0;
    if (max == min) {
        for (int i = 0; i < n; ++i) L_out[i * N + b] = 0.f;
        scale_out[b] = 0.f;
        min_out[b] = -min;
        return;
    }
    float iscale = nmax / (max - min);
    float scale = 1 / iscale;
    float best_error = 0;
#pragma unroll
    for (int i = 0; i < n; ++i) {
        L[i] = (unsigned char)clamp_int(nearest_int(iscale * (xs[i] - min)), 0, nmax);
        float diff = scale * L[i] + min - xs[i];
        best_error += ws[i] * (diff * diff);
    }
    for (int is = 0; is <= nstep; ++is) {
        iscale = (rmin + rdelta * is + nmax) / (max - min);
        float sum_l = 0, sum_l2 = 0, sum_xl = 0;
#pragma unroll
        for (int i = 0; i < n; ++i) {
            int l = clamp_int(nearest_int(iscale * (xs[i] - min)), 0, nmax);
            Laux[i] = (unsigned char)l;
            float wl = ws[i] * l;
            sum_l += wl;
            sum_l2 += wl * l;
            sum_xl += wl * xs[i];
        }
        float D = sum_w * sum_l2 - sum_l * sum_l;
        if (D > 0) {
            float this_scale = (sum_w * sum_xl - sum_x * sum_l) / D;
            float this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D;
            if (this_min > 0) {
                this_min = 0;
                this_scale = sum_xl / sum_l2;
            }
            float cur_error = 0;
#pragma unroll
            for (int i = 0; i < n; ++i) {
                float diff = this_scale * Laux[i] + this_min - xs[i];
                cur_error += ws[i] * (diff * diff);
            }
            if (cur_error < best_error) {
#pragma unroll
                for (int i = 0; i < n; ++i) L[i] = Laux[i];
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    for (int i = 0; i < n; ++i) L_out[i * N + b] = (float)L[i];
    scale_out[b] = scale;
    min_out[b] = -min;
}

// make_qx_quants(n, nmax, x, L, rmse_type=1, qw) for sub-block b: weights qw when given, else x*x.
// L is stored as l + nmax, the scale as returned.
template <int n>
QK_FN void qx_rmse1_one(const float *x, const float *qw, int use_qw, long long N, long long b, int nmax,
                        float *scale_out, float *L_out) {
    float xs[n], ws[n];
#pragma unroll
    for (int i = 0; i < n; ++i) {
        xs[i] = x[i * N + b];
        ws[i] = use_qw ? qw[i * N + b] : xs[i] * xs[i];
    }
    float max = 0, amax = 0;
#pragma unroll
    for (int i = 0; i < n; ++i) {
        float ax = fabsf(xs[i]);
        if (ax > amax) { amax = ax; max = xs[i]; }
    }
    if (amax < GROUP_MAX_EPS) {
        for (int i = 0; i < n; ++i) L_out[i * N + b] = 0.f;
        scale_out[b] = 0.f;
        return;
    }
    float iscale = -nmax / max;
    float best_iscale = iscale;
    float sumlx = 0, suml2 = 0;
#pragma unroll
    for (int i = 0; i < n; ++i) {
        int l = clamp_int(nearest_int(iscale * xs[i]), -nmax, nmax - 1);
        sumlx += ws[i] * xs[i] * l;
        suml2 += ws[i] * l * l;
    }
    float scale = suml2 ? sumlx / suml2 : 0.0f;
    float best = scale * sumlx;
    for (int is = -9; is <= 9; ++is) {
        if (is == 0) continue;
        iscale = -(nmax + 0.1f * is) / max;
        sumlx = suml2 = 0;
#pragma unroll
        for (int i = 0; i < n; ++i) {
            int l = clamp_int(nearest_int(iscale * xs[i]), -nmax, nmax - 1);
            sumlx += ws[i] * xs[i] * l;
            suml2 += ws[i] * l * l;
        }
        if (suml2 > 0 && sumlx * sumlx > best * suml2) {
            best_iscale = iscale;             // the codes are those of this iscale: made once, at the end
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    for (int i = 0; i < n; ++i)
        L_out[i * N + b] = (float)(nmax + clamp_int(nearest_int(best_iscale * xs[i]), -nmax, nmax - 1));
    scale_out[b] = scale;
}

// make_qp_quants(n, nmax, x, L, quant_weights) for column b: the super-block scale of n sub-block
// scales (or mins) x >= 0, weighted, and their codes (Q4_K/Q5_K with an importance matrix).
template <int n>
QK_FN void qp_one(const float *x, const float *w, long long N, long long b, int nmax, float *scale_out,
                  int *L_out) {
    float xs[n], ws[n];
    int L[n];
    float max = 0;
#pragma unroll
    for (int i = 0; i < n; ++i) {
        xs[i] = x[i * N + b];
        ws[i] = w[i * N + b];
        max = max > xs[i] ? max : xs[i];    // C's MAX(max, x[i]): a NaN x[i] is taken
    }
    if (max < GROUP_MAX_EPS) {
        for (int i = 0; i < n; ++i) L_out[i * N + b] = 0;
        scale_out[b] = 0.f;
        return;
    }
    float iscale = nmax / max;
    float scale = 1 / iscale;
    float best_mse = 0;
#pragma unroll
    for (int i = 0; i < n; ++i) {
        unsigned char l = (unsigned char)nearest_int(iscale * xs[i]);   // a uint8 store, no MIN on this pass
        float diff = xs[i] - scale * l;
        best_mse += ws[i] * diff * diff;
    }
    for (int is = -4; is <= 4; ++is) {
        if (is == 0) continue;
        float iscale_is = (0.1f * is + nmax) / max;
        float scale_is = 1 / iscale_is;
        float mse = 0;
#pragma unroll
        for (int i = 0; i < n; ++i) {
            int l = nearest_int(iscale_is * xs[i]);
            l = l < nmax ? l : nmax;
            float diff = xs[i] - scale_is * l;
            mse += ws[i] * diff * diff;
        }
        if (mse < best_mse) {
            best_mse = mse;
            iscale = iscale_is;
        }
    }
    float sumlx = 0, suml2 = 0;
#pragma unroll
    for (int i = 0; i < n; ++i) {
        int l = nearest_int(iscale * xs[i]);
        l = l < nmax ? l : nmax;
        L[i] = l & 0xFF;
        sumlx += ws[i] * xs[i] * l;
        suml2 += ws[i] * l * l;
    }
    for (int itry = 0; itry < 5; ++itry) {
        int n_changed = 0;
        for (int i = 0; i < n; ++i) {
            float slx = sumlx - ws[i] * xs[i] * L[i];
            float sl2 = suml2 - ws[i] * L[i] * L[i];
            if (slx > 0 && sl2 > 0) {
                int new_l = nearest_int(xs[i] * sl2 / slx);
                new_l = new_l < nmax ? new_l : nmax;
                if (new_l != L[i]) {
                    slx += ws[i] * xs[i] * new_l;
                    sl2 += ws[i] * new_l * new_l;
                    if (slx * slx * suml2 > sumlx * sumlx * sl2) {
                        L[i] = new_l & 0xFF;
                        sumlx = slx;
                        suml2 = sl2;
                        ++n_changed;
                    }
                }
            }
        }
        if (!n_changed) break;
    }
    for (int i = 0; i < n; ++i) L_out[i * N + b] = L[i];
    scale_out[b] = suml2 > 0.0f ? sumlx / suml2 : 0.0f;
}

// Entry points, one per sub-block size n: qkx2_search_32 (Q4_K, Q5_K, Q5_1 with an imatrix),
// qx_rmse1_search_16 (Q6_K), qx_rmse1_search_32 (Q5_0 with an imatrix) and qp_search_8 (the
// super-block scales of Q4_K/Q5_K with an imatrix). params holds
// {nmax, rmin, rdelta, nstep} as float32 (exact for these small integers): no float kernel
// arguments, whose C type a launcher might get wrong. On the host each is a loop over b.
#ifdef __CUDACC__
#define QK_ENTRY(name, ...) extern "C" __global__ void name(__VA_ARGS__, int N) { \
    long long b = (long long)blockIdx.x * blockDim.x + threadIdx.x; if (b < N) {
#define QK_END }}
#else
#define QK_ENTRY(name, ...) extern "C" void name(__VA_ARGS__, int N) { for (long long b = 0; b < N; ++b) {
#define QK_END }}
#endif

#define QKX2_ENTRY(n) \
QK_ENTRY(qkx2_search_##n, const float *x, const float *w, const float *params, float *scale, float *the_min, float *L) \
    qkx2_one<n>(x, w, N, b, (int)params[0], params[1], params[2], (int)params[3], scale, the_min, L); QK_END

#define QX_RMSE1_ENTRY(n) \
QK_ENTRY(qx_rmse1_search_##n, const float *x, const float *qw, const float *params, float *scale, float *L, int use_qw) \
    qx_rmse1_one<n>(x, qw, use_qw, N, b, (int)params[0], scale, L); QK_END

QKX2_ENTRY(32)
QX_RMSE1_ENTRY(16)
QX_RMSE1_ENTRY(32)

#define QP_ENTRY(n) \
QK_ENTRY(qp_search_##n, const float *x, const float *w, const float *params, float *scale, int *L) \
    qp_one<n>(x, w, N, b, (int)params[0], scale, L); QK_END

QP_ENTRY(8)
