/* blockwise8.cuh -- 8-bit blockwise quantize/dequantize against a sorted 256-entry map (the nested absmax
 * of double quantization). One thread block per quantization block: max |x| as bit patterns (block
 * reduction), IEEE reciprocal, then the nearest entry by float32 midpoints with exact ties to the even
 * index, NaN -> 0, exactly as native/src/blockwise8.c. Tested against the CPU library. */
#ifndef QCKPT_CUDA_BLOCKWISE8_CUH
#define QCKPT_CUDA_BLOCKWISE8_CUH

#include "exact_mean.cuh"

namespace qk {

/* mids[0..254]: the midpoints between neighbouring code values; mids[255] = NaN, a pad that equals no xn
 * (+inf included: a subnormal absmax overflows the reciprocal, and xn = +inf must stay code 255), so the
 * tie test needs no bounds check and reads inside the array whatever the compiler schedules first. Every
 * thread of the block calls this; it does not synchronize. */
__device__ __forceinline__ void fill_midpoints(const float *__restrict__ code, float *mids) {
    for (int i = threadIdx.x; i < 256; i += blockDim.x)
        mids[i] = i < 255 ? __fmul_rn(__fadd_rn(code[i], code[i + 1]), 0.5f) : __int_as_float(0x7FC00000);
}

/* The CPU's lower bound over the 255 sorted midpoints (the count of midpoints below xn; NaN counts none),
 * then the tie rule. Eight fixed steps with no data-dependent exit: unrolled, the searches of a lane's
 * values interleave, where a while loop ran them one after another. */
__device__ __forceinline__ uint8_t nearest_even(const float *mids, float xn) {
    int lo = 0;
#pragma unroll
    for (int step = 128; step > 0; step >>= 1) /* lo + step - 1 <= 254: the steps before sum to <= 256 - 2 step */
        if (mids[lo + step - 1] < xn) lo += step;
    if (mids[lo] == xn && (lo & 1)) lo++; /* lo == 255: the NaN pad never ties */
    return (uint8_t)lo;
}

/* Whether double quant should stop because a 4-bit block was non-finite (center != 0): one thread reads
 * the word and the barrier hands its answer to all, so the block returns as one -- with center 1 another
 * block may record a bad index meanwhile, and threads that read it at different times disagreed. */
__device__ __forceinline__ bool block_saw_bad_index(int center, unsigned long long *__restrict__ ws) {
    return __syncthreads_or(center && threadIdx.x == 0 && has_bad_index(__ldcg(ws + kWsBad)));
}

/* The offset subtracted before quantizing (center: 0 none, 1 the workspace's mean, 2 the mean of the n
 * values whose terms quantize_4bit summed into the workspace, computed here by warp 0 of every block --
 * block 0 also stores it for the host). Every thread of the block calls this; it synchronizes them. */
__device__ __forceinline__ float center_offset(int center, unsigned long long *__restrict__ ws, int64_t n,
                                               MeanScratch &sc) {
    if (threadIdx.x < 32) {
        float m = 0.0f;
        if (center == 1) m = __uint_as_float((uint32_t)__ldcg(ws + kWsMean));
        else if (center == 2) m = sums_mean_warp(ws, n, sc, false);
        if (threadIdx.x == 0) {
            sc.mean = m;
            if (center == 2 && blockIdx.x == 0) ws[kWsMean] = __float_as_uint(m);
        }
    }
    __syncthreads();
    return sc.mean;
}

__global__ void __launch_bounds__(256) quantize_blockwise8_kernel(const float *__restrict__ x, int64_t n, int64_t bs,
                                                                  const float *__restrict__ code, int center,
                                                                  unsigned long long *__restrict__ ws,
                                                                  uint8_t *__restrict__ codes,
                                                                  float *__restrict__ absmax) {
    __shared__ float mids[256];
    __shared__ uint32_t scratch[8];
    __shared__ MeanScratch mean_scratch;
    fill_midpoints(code, mids);
    /* Double quant after a non-finite 4-bit block: absmax holds unwritten blocks, and the error must name
     * the input's index, not one of these. */
    if (block_saw_bad_index(center, ws)) return;
    const float offset = center_offset(center, ws, n, mean_scratch);
    const int64_t nb = ceil_div(n, bs);
    for (int64_t b = blockIdx.x; b < nb; b += gridDim.x) {
        const int64_t start = b * bs, end = min(start + bs, n);
        uint32_t m = 0;
        for (int64_t i = start + threadIdx.x; i < end; i += blockDim.x) {
            const float v = center ? __fsub_rn(x[i], offset) : x[i];
            m = max(m, __float_as_uint(v) & 0x7FFFFFFFu);
        }
        m = block_max_bits(m, scratch);
        if (m >= 0x7F800000u) {
            for (int64_t i = start + threadIdx.x; i < end; i += blockDim.x) {
                const float v = center ? __fsub_rn(x[i], offset) : x[i];
                if ((__float_as_uint(v) & 0x7FFFFFFFu) >= 0x7F800000u) record_bad_index(ws, (unsigned long long)i);
            }
            continue;
        }
        const float amax = __uint_as_float(m);
        if (threadIdx.x == 0) absmax[b] = amax;
        const float r = __frcp_rn(amax);
        for (int64_t i = start + threadIdx.x; i < end; i += blockDim.x) {
            const float v = center ? __fsub_rn(x[i], offset) : x[i];
            codes[i] = nearest_even(mids, __fmul_rn(v, r));
        }
    }
}

/* The same for blocksize 256 (double quantization): one warp per block, 8 elements per lane in
 * registers, a shuffle reduction and one pass; x 16-byte aligned. */
__global__ void __launch_bounds__(256) quantize_blockwise8_warp256_kernel(
    const float *__restrict__ x, int64_t n, const float *__restrict__ code, int center,
    unsigned long long *__restrict__ ws, uint8_t *__restrict__ codes, float *__restrict__ absmax) {
    __shared__ float mids[256];
    __shared__ MeanScratch mean_scratch;
    const int lane = threadIdx.x & 31;
    const int64_t nb = ceil_div(n, 256), warps = (int64_t(gridDim.x) * blockDim.x) >> 5;
    auto load = [&](int64_t b, float (&v)[8]) {
        const int64_t i0 = b * 256 + lane * 8;
        if (i0 + 8 <= n) {
            const float4 p = __ldg(reinterpret_cast<const float4 *>(x + i0));
            const float4 q = __ldg(reinterpret_cast<const float4 *>(x + i0) + 1);
            v[0] = p.x, v[1] = p.y, v[2] = p.z, v[3] = p.w, v[4] = q.x, v[5] = q.y, v[6] = q.z, v[7] = q.w;
        } else {
#pragma unroll
            for (int j = 0; j < 8; j++) v[j] = i0 + j < n ? x[i0 + j] : 0.0f;
        }
    };
    /* the first block's values are loaded before the workspace, the midpoints and the mean: these chains
     * of memory latency overlap (the kernel is mostly latency) */
    const int64_t b0 = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
    float v[8];
    if (b0 < nb) load(b0, v);
    if (block_saw_bad_index(center, ws)) return; /* see quantize_blockwise8_kernel */
    fill_midpoints(code, mids);
    const float offset = center_offset(center, ws, n, mean_scratch); /* synchronizes: the midpoints are ready */
    for (int64_t b = b0; b < nb; b += warps) {
        const int64_t i0 = b * 256 + lane * 8;
        if (b != b0) load(b, v);
        uint32_t m = 0;
#pragma unroll
        for (int j = 0; j < 8; j++) {
            if (center) v[j] = __fsub_rn(v[j], offset);
            if (i0 + j < n) m = max(m, __float_as_uint(v[j]) & 0x7FFFFFFFu);
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) m = max(m, __shfl_xor_sync(kFullMask, m, o));
        if (m >= 0x7F800000u) {
#pragma unroll
            for (int j = 0; j < 8; j++)
                if (i0 + j < n && (__float_as_uint(v[j]) & 0x7FFFFFFFu) >= 0x7F800000u)
                    record_bad_index(ws, (unsigned long long)(i0 + j));
            continue;
        }
        const float amax = __uint_as_float(m);
        if (lane == 0) absmax[b] = amax;
        const float r = __frcp_rn(amax);
        uint8_t c[8];
#pragma unroll
        for (int j = 0; j < 8; j++) c[j] = nearest_even(mids, __fmul_rn(v[j], r));
        if (i0 + 8 <= n) {
            *reinterpret_cast<uint2 *>(codes + i0) = *reinterpret_cast<const uint2 *>(c);
        } else {
#pragma unroll
            for (int j = 0; j < 8; j++)
                if (i0 + j < n) codes[i0 + j] = c[j];
        }
    }
}

__global__ void dequantize_blockwise8_kernel(const uint8_t *__restrict__ codes, const float *__restrict__ absmax,
                                             int64_t n, int64_t bs, const float *__restrict__ code, float offset,
                                             float *__restrict__ out) {
    __shared__ float map[256];
    for (int i = threadIdx.x; i < 256; i += blockDim.x) map[i] = code[i];
    __syncthreads();
    const int64_t stride = int64_t(gridDim.x) * blockDim.x;
    for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
        out[i] = __fadd_rn(__fmul_rn(map[codes[i]], absmax[i / bs]), offset);
}

}  // namespace qk

#endif
