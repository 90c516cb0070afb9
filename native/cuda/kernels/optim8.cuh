/* optim8.cuh -- the fused AdamW steps of the 8-bit optimizers on the device: the bytes of the CPU kernel
 * native/src/optim8.c (same per-element order of operations, same code thresholds, same block absmax),
 * compared with it element for element in tests/test_cuda_optim.py.
 *
 * 8-bit step: a quantization block is dequantized, updated and re-quantized by one group of threads that
 * keeps the block's moments in registers between the update and the re-quantization, so every byte is
 * read and written once. Blocksize 256 with aligned pointers (the optimizer's case) takes a warp per
 * block with 8 contiguous elements per lane and vector loads; other blocksizes take a thread block per
 * quantization block with up to 16 elements per thread. Code selection walks the CPU's binary-search
 * tree, stored in breadth-first (Eytzinger) order in shared memory so the upper levels are broadcasts
 * rather than bank conflicts; it makes the very comparisons qk_code_below makes. */
#ifndef QCKPT_CUDA_OPTIM8_CUH
#define QCKPT_CUDA_OPTIM8_CUH

#include "../common.cuh"

namespace qk {

constexpr int kOptimMaxBlock = 4096; /* QK_OPTIM_MAX_BLOCK */
constexpr int kOptimMaxItems = 16;   /* kOptimMaxBlock / 256 threads */

/* qk_adam_update of optim8.h: one rounding per operation, in this order. */
__device__ __forceinline__ float adam_update(const qckpt_adamw_hparams &hp, float g, float &m, float &v, float p) {
    if (hp.maximize) g = -g;
    const float mm = __fadd_rn(__fmul_rn(m, hp.beta1), __fmul_rn(g, hp.one_minus_beta1));
    const float vv = __fadd_rn(__fmul_rn(v, hp.beta2), __fmul_rn(__fmul_rn(g, g), hp.one_minus_beta2));
    const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(vv), hp.bias_correction2_sqrt), hp.eps);
    m = mm;
    v = vv;
    return __fsub_rn(__fmul_rn(p, hp.decay), __fmul_rn(hp.step_size, __fdiv_rn(mm, denom)));
}

/* optim8.c's next_down: the next float below x (below +-0: the smallest negative subnormal). */
__device__ __forceinline__ float next_down(float x) {
    const uint32_t b = __float_as_uint(x);
    if ((b & 0x7FFFFFFFu) == 0) return __uint_as_float(0x80000001u);
    return __uint_as_float(x > 0.0f ? b - 1 : b + 1);
}

/* Both maps and both threshold trees of one step. tree[k] (k = 1..255) is threshold s(k) of optim8.c's
 * build_thresholds (midpoint of map[s], map[s+1]; the next float below it for odd s), where node k at
 * depth d, position p holds sorted index (2p+1) * 2^(7-d) - 1: the index qk_code_below compares at
 * that point of its search. */
struct OptimTables {
    float m_map[256], v_map[256];
    float m_tree[256], v_tree[256];
};

__device__ __forceinline__ float threshold(const float *map, int s) {
    const float mid = __fmul_rn(__fadd_rn(map[s], map[s + 1]), 0.5f);
    return (s & 1) ? next_down(mid) : mid;
}

__device__ __forceinline__ void load_tables(OptimTables &t, const float *__restrict__ m_map,
                                            const float *__restrict__ v_map) {
    for (int i = threadIdx.x; i < 256; i += blockDim.x) {
        t.m_map[i] = m_map[i];
        t.v_map[i] = v_map[i];
    }
    __syncthreads();
    for (int k = threadIdx.x + 1; k < 256; k += blockDim.x) {
        const int d = 31 - __clz(k), s = ((2 * (k - (1 << d)) + 1) << (7 - d)) - 1;
        t.m_tree[k] = threshold(t.m_map, s);
        t.v_tree[k] = threshold(t.v_map, s);
    }
    __syncthreads();
}

/* Number of thresholds (of the 255 real ones) strictly below x; NaN -> 0. */
__device__ __forceinline__ uint8_t code_below(const float *tree, float x) {
    int k = 1;
#pragma unroll
    for (int level = 0; level < 8; level++) k = 2 * k + (tree[k] < x);
    return (uint8_t)(k - 256);
}

/* Largest |x| bit pattern -> absmax; NaN sorts above inf (a NaN block: NaN absmax, every code 0). */
__device__ __forceinline__ uint32_t abs_bits(float x) { return __float_as_uint(x) & 0x7FFFFFFFu; }

/* ---- 8 contiguous elements per lane (vector path) ---- */

template <typename T> __device__ __forceinline__ void load8(const T *x, int64_t i, int count, float *out) {
    if (count == 8) {
        if constexpr (sizeof(T) == 4) {
            const float4 a = reinterpret_cast<const float4 *>(x + i)[0], b = reinterpret_cast<const float4 *>(x + i)[1];
            out[0] = a.x, out[1] = a.y, out[2] = a.z, out[3] = a.w, out[4] = b.x, out[5] = b.y, out[6] = b.z, out[7] = b.w;
        } else {
            const uint4 raw = *reinterpret_cast<const uint4 *>(x + i);
            const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
            for (int j = 0; j < 8; j++) {
                const unsigned short h = (unsigned short)(w[j >> 1] >> (16 * (j & 1)));
                T v;
                memcpy(&v, &h, sizeof v);
                out[j] = to_f32<T>(v);
            }
        }
        return;
    }
#pragma unroll
    for (int j = 0; j < 8; j++) out[j] = j < count ? to_f32<T>(x[i + j]) : 0.0f;
}

template <typename T> __device__ __forceinline__ void store8(T *x, int64_t i, int count, const float *in) {
    if (count == 8) {
        if constexpr (sizeof(T) == 4) {
            reinterpret_cast<float4 *>(x + i)[0] = make_float4(in[0], in[1], in[2], in[3]);
            reinterpret_cast<float4 *>(x + i)[1] = make_float4(in[4], in[5], in[6], in[7]);
        } else {
            uint32_t w[4] = {0, 0, 0, 0};
#pragma unroll
            for (int j = 0; j < 8; j++) {
                const T v = from_f32<T>(in[j]);
                unsigned short h;
                memcpy(&h, &v, sizeof h);
                w[j >> 1] |= uint32_t(h) << (16 * (j & 1));
            }
            *reinterpret_cast<uint4 *>(x + i) = make_uint4(w[0], w[1], w[2], w[3]);
        }
        return;
    }
#pragma unroll
    for (int j = 0; j < 8; j++)
        if (j < count) x[i + j] = from_f32<T>(in[j]);
}

__device__ __forceinline__ void load_codes8(const uint8_t *c, int64_t i, int count, uint8_t *out) {
    if (count == 8) {
        const uint2 raw = *reinterpret_cast<const uint2 *>(c + i);
        memcpy(out, &raw, 8);
        return;
    }
#pragma unroll
    for (int j = 0; j < 8; j++) out[j] = j < count ? c[i + j] : 0;
}

__device__ __forceinline__ void store_codes8(uint8_t *c, int64_t i, int count, const uint8_t *in) {
    if (count == 8) {
        uint2 raw;
        memcpy(&raw, in, 8);
        *reinterpret_cast<uint2 *>(c + i) = raw;
        return;
    }
#pragma unroll
    for (int j = 0; j < 8; j++)
        if (j < count) c[i + j] = in[j];
}

struct Adam8Args {
    int64_t n, blocksize;
    uint8_t *m_codes, *v_codes;
    float *m_absmax, *v_absmax;
    const float *m_map, *v_map;
    qckpt_adamw_hparams hp;
};

/* Blocksize 256: a warp per quantization block, lane l owns elements 8l..8l+7 (param and grad 16-byte
 * aligned, codes 8-byte aligned). One block b of one tensor. */
template <typename P, typename G>
__device__ __forceinline__ void adam8_warp256_block(P *__restrict__ param, const G *__restrict__ grad,
                                                    const Adam8Args &a, const OptimTables &t, int64_t b, int lane) {
    const int64_t i0 = b * 256 + lane * 8;
    const int64_t left = a.n - i0;
    const int count = left >= 8 ? 8 : left > 0 ? (int)left : 0;
    float p[8], g[8], m[8], v[8];
    uint8_t mc[8], vc[8];
    load8(param, i0, count, p);
    load8(grad, i0, count, g);
    load_codes8(a.m_codes, i0, count, mc);
    load_codes8(a.v_codes, i0, count, vc);
    const float am = a.m_absmax[b], av = a.v_absmax[b];
    uint32_t mbits = 0, vbits = 0;
#pragma unroll
    for (int j = 0; j < 8; j++) {
        m[j] = __fmul_rn(t.m_map[mc[j]], am);
        v[j] = __fmul_rn(t.v_map[vc[j]], av);
        p[j] = adam_update(a.hp, g[j], m[j], v[j], p[j]);
        if (j < count) mbits = max(mbits, abs_bits(m[j])), vbits = max(vbits, abs_bits(v[j]));
    }
    store8(param, i0, count, p);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        mbits = max(mbits, __shfl_xor_sync(kFullMask, mbits, o));
        vbits = max(vbits, __shfl_xor_sync(kFullMask, vbits, o));
    }
    /* every lane has read this block's absmax (its value fed the shuffles above) */
    const float m_amax = __uint_as_float(mbits), v_amax = __uint_as_float(vbits);
    if (lane == 0) a.m_absmax[b] = m_amax, a.v_absmax[b] = v_amax;
    const float mr = __fdiv_rn(1.0f, m_amax), vr = __fdiv_rn(1.0f, v_amax);
#pragma unroll
    for (int j = 0; j < 8; j++) {
        mc[j] = code_below(t.m_tree, __fmul_rn(m[j], mr));
        vc[j] = code_below(t.v_tree, __fmul_rn(v[j], vr));
    }
    store_codes8(a.m_codes, i0, count, mc);
    store_codes8(a.v_codes, i0, count, vc);
}

template <typename P, typename G>
__global__ void __launch_bounds__(256) adam8_warp256_kernel(P *__restrict__ param, const G *__restrict__ grad,
                                                            const Adam8Args a) {
    __shared__ OptimTables t;
    load_tables(t, a.m_map, a.v_map);
    const int lane = threadIdx.x & 31;
    const int64_t nb = ceil_div(a.n, 256), warps = (int64_t(gridDim.x) * blockDim.x) >> 5;
    for (int64_t b = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5; b < nb; b += warps)
        adam8_warp256_block(param, grad, a, t, b, lane);
}

/* ---- many tensors in one launch (qckpt_cuda_adamw8bit_multi / qckpt_cuda_adamw32_multi) ----
 * Work unit u of the launch (256 elements: a quantization block for 8-bit state) belongs to the tensor t
 * with tensors[t].first <= u < tensors[t + 1].first, found by binary search over the firsts in shared
 * memory. Why: a step over many small tensors launched one kernel each was bound by the host (tens of
 * microseconds of Python and launch per parameter), not by the memory traffic. */
constexpr int kMultiMaxTensors = 512;

__device__ __forceinline__ int multi_find(const int64_t *first, int count, int64_t u) {
    int lo = 0, hi = count - 1; /* first[lo] <= u < first[count] */
    while (lo < hi) {
        const int mid = (lo + hi + 1) >> 1;
        if (first[mid] <= u) lo = mid;
        else hi = mid - 1;
    }
    return lo;
}

/* Every work unit of a multi-tensor launch, a warp each: body(entry, unit index within the entry, lane).
 * `first` is shared scratch for count + 1 offsets. */
template <typename Body>
__device__ __forceinline__ void multi_for_each_unit(int64_t *first, const qckpt_cuda_adam_tensor *tensors, int count,
                                                    int64_t units, Body body) {
    for (int i = threadIdx.x; i < count; i += blockDim.x) first[i] = tensors[i].first;
    if (threadIdx.x == 0) first[count] = units;
    __syncthreads();
    const int lane = threadIdx.x & 31;
    const int64_t warps = (int64_t(gridDim.x) * blockDim.x) >> 5;
    for (int64_t u = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5; u < units; u += warps) {
        const int ti = multi_find(first, count, u);
        body(tensors[ti], u - first[ti], lane);
    }
}

template <typename P, typename G>
__global__ void __launch_bounds__(256) adam8_multi_kernel(const qckpt_cuda_adam_tensor *__restrict__ tensors,
                                                          int count, int64_t units, const float *m_map,
                                                          const float *v_map) {
    __shared__ OptimTables t;
    __shared__ int64_t first[kMultiMaxTensors + 1];
    load_tables(t, m_map, v_map);
    multi_for_each_unit(first, tensors, count, units, [&](const qckpt_cuda_adam_tensor &e, int64_t b, int lane) {
        const Adam8Args a{e.n, 256, e.m_codes, e.v_codes, e.m_absmax, e.v_absmax, m_map, v_map, e.hp};
        adam8_warp256_block(static_cast<P *>(e.param), static_cast<const G *>(e.grad), a, t, b, lane);
    });
}

/* 32-bit state, 256 elements per warp-sized unit (lane l: elements l, l + 32, ...: coalesced). */
template <typename P, typename G>
__global__ void __launch_bounds__(256) adam32_multi_kernel(const qckpt_cuda_adam_tensor *__restrict__ tensors,
                                                           int count, int64_t units) {
    __shared__ int64_t first[kMultiMaxTensors + 1];
    multi_for_each_unit(first, tensors, count, units, [&](const qckpt_cuda_adam_tensor &e, int64_t unit, int lane) {
        P *param = static_cast<P *>(e.param);
        const G *grad = static_cast<const G *>(e.grad);
        const int64_t start = unit * 256;
#pragma unroll
        for (int j = 0; j < 8; j++) {
            const int64_t k = start + lane + 32 * j;
            if (k < e.n) {
                float mm = e.m32[k], vv = e.v32[k];
                const float p = adam_update(e.hp, to_f32<G>(grad[k]), mm, vv, to_f32<P>(param[k]));
                e.m32[k] = mm;
                e.v32[k] = vv;
                param[k] = from_f32<P>(p);
            }
        }
    });
}

/* Any blocksize in [1, 4096]: a thread block (blockDim a multiple of 32, <= 256, >= blocksize when
 * below 256) per quantization block; thread x owns elements x + j * blockDim (coalesced). */
template <typename P, typename G>
__global__ void __launch_bounds__(256) adam8_block_kernel(P *__restrict__ param, const G *__restrict__ grad,
                                                          const Adam8Args a) {
    __shared__ OptimTables t;
    __shared__ uint32_t scratch[8];
    load_tables(t, a.m_map, a.v_map);
    const int64_t nb = ceil_div(a.n, a.blocksize);
    const int threads = blockDim.x;
    for (int64_t b = blockIdx.x; b < nb; b += gridDim.x) {
        const int64_t start = b * a.blocksize;
        const int len = (int)(a.n - start < a.blocksize ? a.n - start : a.blocksize);
        const float am = a.m_absmax[b], av = a.v_absmax[b];
        float m[kOptimMaxItems], v[kOptimMaxItems];
        uint32_t mbits = 0, vbits = 0;
#pragma unroll
        for (int j = 0; j < kOptimMaxItems; j++) {
            const int i = threadIdx.x + j * threads;
            m[j] = v[j] = 0.0f;
            if (i < len) {
                const int64_t k = start + i;
                m[j] = __fmul_rn(t.m_map[a.m_codes[k]], am);
                v[j] = __fmul_rn(t.v_map[a.v_codes[k]], av);
                const float p = adam_update(a.hp, to_f32<G>(grad[k]), m[j], v[j], to_f32<P>(param[k]));
                param[k] = from_f32<P>(p);
                mbits = max(mbits, abs_bits(m[j]));
                vbits = max(vbits, abs_bits(v[j]));
            }
        }
        mbits = block_max_bits(mbits, scratch); /* its __syncthreads also orders the absmax reads above */
        vbits = block_max_bits(vbits, scratch);
        const float m_amax = __uint_as_float(mbits), v_amax = __uint_as_float(vbits);
        if (threadIdx.x == 0) a.m_absmax[b] = m_amax, a.v_absmax[b] = v_amax;
        const float mr = __fdiv_rn(1.0f, m_amax), vr = __fdiv_rn(1.0f, v_amax);
#pragma unroll
        for (int j = 0; j < kOptimMaxItems; j++) {
            const int i = threadIdx.x + j * threads;
            if (i < len) {
                a.m_codes[start + i] = code_below(t.m_tree, __fmul_rn(m[j], mr));
                a.v_codes[start + i] = code_below(t.v_tree, __fmul_rn(v[j], vr));
            }
        }
    }
}

/* 32-bit state: elementwise, grid-stride. */
template <typename P, typename G>
__global__ void __launch_bounds__(256) adam32_kernel(P *__restrict__ param, const G *__restrict__ grad, int64_t n,
                                                     float *__restrict__ m, float *__restrict__ v,
                                                     const qckpt_adamw_hparams hp) {
    const int64_t stride = int64_t(gridDim.x) * blockDim.x;
    for (int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; k < n; k += stride) {
        float mm = m[k], vv = v[k];
        const float p = adam_update(hp, to_f32<G>(grad[k]), mm, vv, to_f32<P>(param[k]));
        m[k] = mm;
        v[k] = vv;
        param[k] = from_f32<P>(p);
    }
}

}  // namespace qk

#endif /* QCKPT_CUDA_OPTIM8_CUH */
