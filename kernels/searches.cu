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

// ---------------------------------------------------------------------------------------------
// Whole blocks: Q8_0 (quantize_row_q8_0_ref) and the Q4_K, Q5_K, Q6_K super-blocks
// (quantize_row_q{4,5,6}_K_ref, and _impl with quant_weights), one thread per block from the
// values to the bytes: the weights, the searches above (on the thread's own sub-blocks, N = 1),
// the super-block scales, the fp16 rounding, the final codes and the packing. One launch a chunk
// where the torch code around the searches takes ~130 (the layouts are in kquants.py).
// x is row-major here, x[256 * s + i] (32 * s + i for Q8_0), as the chunks come.

QK_FN float f32_from_bits(unsigned int u) {
#ifdef __CUDACC__
    return __uint_as_float(u);
#else
    float f; memcpy(&f, &u, sizeof f); return f;
#endif
}

// GGML_FP32_TO_FP16: ggml_compute_fp32_to_fp16, the portable one (round to nearest even, overflow
// to inf, NaN -> 0x7E00 with its sign)
QK_FN unsigned int fp32_to_fp16(float f) {
    float base = (fabsf(f) * 0x1.0p+112f) * 0x1.0p-110f;
    unsigned int w = (unsigned int)f32_bits(f);
    unsigned int shl1_w = w + w;
    unsigned int sign = w & 0x80000000u;
    unsigned int bias = shl1_w & 0xFF000000u;
    if (bias < 0x71000000u) bias = 0x71000000u;
    base = f32_from_bits((bias >> 1) + 0x07800000u) + base;
    unsigned int bits = (unsigned int)f32_bits(base);
    unsigned int exp_bits = (bits >> 13) & 0x00007C00u;
    unsigned int mantissa_bits = bits & 0x00000FFFu;
    unsigned int nonsign = exp_bits + mantissa_bits;
    return (sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign);
}

// GGML_FP16_TO_FP32: ggml_compute_fp16_to_fp32, exact
QK_FN float fp16_to_fp32(unsigned int h) {
    unsigned int w = h << 16;
    unsigned int sign = w & 0x80000000u;
    unsigned int two_w = w + w;
    float normalized = f32_from_bits((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    float denormalized = f32_from_bits((two_w >> 17) | (126u << 23)) - 0.5f;
    unsigned int r = sign | (unsigned int)f32_bits(two_w < (1u << 27) ? denormalized : normalized);
    return f32_from_bits(r);
}

QK_FN void store_le16(unsigned char *p, unsigned int v) { p[0] = v & 0xFF; p[1] = (v >> 8) & 0xFF; }

// quantize_row_q8_0_ref for block s: d = amax/127, qs = roundf(x*id)
QK_FN void q8_0_block(const float *x, unsigned char *y) {
    float amax = 0.0f;
    for (int j = 0; j < 32; ++j) {
        float a = fabsf(x[j]);
        amax = amax > a ? amax : a;         // MAX(amax, fabsf(v))
    }
    const float d = amax / 127;
    const float id = d ? 1.0f / d : 0.0f;
    store_le16(y, fp32_to_fp16(d));
    for (int j = 0; j < 32; ++j) {
        float v = roundf(x[j] * id);
        // the float -> int conversion as on x86, where ggml's bytes come from: out of range (an
        // infinite id, for amax below ~4e-37) or NaN gives 0x80000000, so the byte 0; a GPU would
        // saturate +inf to 0x7FFFFFFF
        y[2 + j] = (unsigned char)(v >= -2147483648.f && v < 2147483648.f ? (int)v : 0);
    }
}

// Q4_K (nmax 15) / Q5_K (nmax 31) super-block: ref without qw, _impl with it (then the search
// takes -0.9, 0.05, 36: make_qkx3_quants)
QK_FN void k_with_min_block(const float *x, const float *qw, int nmax, float rmin, float rdelta, int nstep,
                            unsigned char *y) {
    float scales[8], mins[8], sw[8], L[256], weights[32];
    float sigma2 = 0;
    if (qw) {
        float sum_x2 = 0;
        for (int l = 0; l < 256; ++l) sum_x2 += x[l] * x[l];
        sigma2 = 2 * sum_x2 / 256;
    }
    for (int j = 0; j < 8; ++j) {
        const float *xj = x + 32 * j;
        if (qw) {
            for (int l = 0; l < 32; ++l) weights[l] = qw[32 * j + l] * sqrtf(sigma2 + xj[l] * xj[l]);
        } else {
            float sum_x2 = 0;
            for (int l = 0; l < 32; ++l) sum_x2 += xj[l] * xj[l];
            float av_x = sqrtf(sum_x2 / 32);
            for (int l = 0; l < 32; ++l) weights[l] = av_x + fabsf(xj[l]);
        }
        float sumw = 0;
        for (int l = 0; l < 32; ++l) sumw += weights[l];
        sw[j] = sumw;
        qkx2_one<32>(xj, weights, 1, 0, nmax, rmin, rdelta, nstep, &scales[j], &mins[j], L + 32 * j);
    }
    int ls[8], lm[8];
    float d_block, m_block;
    if (qw) {
        qp_one<8>(scales, sw, 1, 0, 63, &d_block, ls);
        qp_one<8>(mins, sw, 1, 0, 63, &m_block, lm);
        for (int j = 0; j < 8; ++j) {
            if (nmax == 31) {                               // Q5_K only: MIN(63, ...)
                ls[j] = (ls[j] & 0xFF) < 63 ? (ls[j] & 0xFF) : 63;
                lm[j] = (lm[j] & 0xFF) < 63 ? (lm[j] & 0xFF) : 63;
            }
        }
    } else {
        float max_scale = 0, max_min = 0;
        for (int j = 0; j < 8; ++j) {
            if (scales[j] > max_scale) max_scale = scales[j];
            if (mins[j] > max_min) max_min = mins[j];
        }
        float inv_scale = max_scale > 0 ? 63.f / max_scale : 0.f;
        float inv_min = max_min > 0 ? 63.f / max_min : 0.f;
        for (int j = 0; j < 8; ++j) {
            int a = nearest_int(inv_scale * scales[j]) & 0xFF, b = nearest_int(inv_min * mins[j]) & 0xFF;
            ls[j] = a < 63 ? a : 63;
            lm[j] = b < 63 ? b : 63;
        }
        d_block = max_scale / 63.f;
        m_block = max_min / 63.f;
    }
    unsigned char *sc = y + 4;
    for (int j = 0; j < 4; ++j) {                           // uint8 stores
        sc[j] = (unsigned char)(ls[j] | ((ls[j + 4] >> 4) << 6));
        sc[j + 4] = (unsigned char)(lm[j] | ((lm[j + 4] >> 4) << 6));
        sc[j + 8] = (unsigned char)((ls[j + 4] & 0xF) | ((lm[j + 4] & 0xF) << 4));
    }
    unsigned int d_bits = fp32_to_fp16(d_block), dmin_bits = fp32_to_fp16(m_block);
    store_le16(y, d_bits);
    store_le16(y + 2, dmin_bits);
    const float d_all = fp16_to_fp32(d_bits), dmin_all = fp16_to_fp32(dmin_bits);
    for (int j = 0; j < 8; ++j) {
        int s, m;                                           // get_scale_min_k4: what the bytes hold
        if (j < 4) { s = sc[j] & 63; m = sc[j + 4] & 63; }
        else { s = (sc[j + 4] & 0xF) | ((sc[j - 4] >> 6) << 4); m = (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4); }
        const float d = d_all * s;
        if (!d) continue;                                   // the search's codes stay
        const float dm = dmin_all * m;
        for (int ii = 0; ii < 32; ++ii) L[32 * j + ii] = (float)clamp_int(nearest_int((x[32 * j + ii] + dm) / d), 0, nmax);
    }
    unsigned char *qs = y + (nmax == 31 ? 48 : 16);
    if (nmax == 31) {
        for (int i = 0; i < 32; ++i) {                      // bit j of qh[i]: the fifth bit of L[32j + i]
            int h = 0;
            for (int j = 0; j < 8; ++j) h |= (((int)L[32 * j + i] >> 4) & 1) << j;
            y[16 + i] = (unsigned char)h;
        }
    }
    for (int k = 0; k < 4; ++k)
        for (int i = 0; i < 32; ++i)
            qs[32 * k + i] = (unsigned char)(((int)L[64 * k + i] & 0xF) | (((int)L[64 * k + 32 + i] & 0xF) << 4));
}

// quantize_row_q6_K_ref / _impl for one super-block
QK_FN void q6_k_block(const float *x, const float *qw, unsigned char *y) {
    float scales[16], L[256];
    float max_scale = 0, max_abs_scale = 0;
    for (int ib = 0; ib < 16; ++ib) {
        qx_rmse1_one<16>(x + 16 * ib, qw ? qw + 16 * ib : x, qw != 0, 1, 0, 32, &scales[ib], L + 16 * ib);
        const float abs_scale = fabsf(scales[ib]);
        if (abs_scale > max_abs_scale) {
            max_abs_scale = abs_scale;
            max_scale = scales[ib];
        }
    }
    if (max_abs_scale < GROUP_MAX_EPS) {                    // memset: all-zero bytes
        for (int i = 0; i < 210; ++i) y[i] = 0;
        return;
    }
    const float iscale = -128.f / max_scale;
    const unsigned int d_bits = fp32_to_fp16(1 / iscale);
    signed char sc[16];
    for (int ib = 0; ib < 16; ++ib) {
        int v = nearest_int(iscale * scales[ib]);
        sc[ib] = (signed char)(unsigned char)((v < 127 ? v : 127) & 0xFF);
        y[192 + ib] = (unsigned char)sc[ib];
    }
    store_le16(y + 208, d_bits);
    const float d_all = fp16_to_fp32(d_bits);
    for (int j = 0; j < 16; ++j) {
        const float d = d_all * sc[j];
        if (!d) continue;
        for (int ii = 0; ii < 16; ++ii)
            L[16 * j + ii] = (float)(clamp_int(nearest_int(x[16 * j + ii] / d), -32, 31) + 32);
    }
    for (int h = 0; h < 2; ++h) {
        const float *Lh = L + 128 * h;
        for (int l = 0; l < 32; ++l) {
            const int q1 = (int)Lh[l], q2 = (int)Lh[l + 32], q3 = (int)Lh[l + 64], q4 = (int)Lh[l + 96];
            y[64 * h + l] = (unsigned char)((q1 & 0xF) | ((q3 & 0xF) << 4));
            y[64 * h + l + 32] = (unsigned char)((q2 & 0xF) | ((q4 & 0xF) << 4));
            y[128 + 32 * h + l] = (unsigned char)((q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6));
        }
    }
}

// Entry points over N blocks; params as for the searches: {nmax, rmin, rdelta, nstep}
QK_ENTRY(q8_0_blocks, const float *x, unsigned char *y)
    q8_0_block(x + 32 * b, y + 34 * b); QK_END

QK_ENTRY(k_with_min_blocks, const float *x, const float *qw, const float *params, unsigned char *y, int use_qw, int type_size)
    k_with_min_block(x + 256 * b, use_qw ? qw + 256 * b : 0, (int)params[0], params[1], params[2], (int)params[3],
                     y + (long long)type_size * b); QK_END

QK_ENTRY(q6_k_blocks, const float *x, const float *qw, unsigned char *y, int use_qw)
    q6_k_block(x + 256 * b, use_qw ? qw + 256 * b : 0, y + 210 * b); QK_END
