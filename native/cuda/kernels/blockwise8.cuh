/* blockwise8.cuh -- 8-bit blockwise quantize/dequantize against a sorted 256-entry map (the nested absmax
 * of double quantization). One thread block per quantization block: max |x| as bit patterns (block
 * reduction), IEEE reciprocal, then the nearest entry by float32 midpoints with exact ties to the even
 * index, NaN -> 0, exactly as native/src/blockwise8.c. Tested against the CPU library. */
#ifndef QCKPT_CUDA_BLOCKWISE8_CUH
#define QCKPT_CUDA_BLOCKWISE8_CUH

#include "../common.cuh"

namespace qk {

/* The CPU's lower-bound search over 255 midpoints, then the tie rule. */
__device__ __forceinline__ uint8_t nearest_even(const float *mids, float xn) {
    int lo = 0, hi = 255;
    while (lo < hi) {
        const int mid = (lo + hi) >> 1;
        if (mids[mid] < xn) lo = mid + 1;
        else hi = mid;
    }
    if (lo < 255 && mids[lo] == xn && (lo & 1)) lo++;
    return (uint8_t)lo;
}

__global__ void __launch_bounds__(256) quantize_blockwise8_kernel(const float *__restrict__ x, int64_t n, int64_t bs,
                                                                  const float *__restrict__ code, int center,
                                                                  unsigned long long *__restrict__ ws,
                                                                  uint8_t *__restrict__ codes,
                                                                  float *__restrict__ absmax) {
    __shared__ float mids[255];
    __shared__ uint32_t scratch[8];
    for (int i = threadIdx.x; i < 255; i += blockDim.x) mids[i] = __fmul_rn(__fadd_rn(code[i], code[i + 1]), 0.5f);
    /* Double quant after a non-finite 4-bit block: absmax holds unwritten blocks, and the error must name
     * the input's index, not one of these. */
    if (center && ws[kWsBad] != kNoBadIndex) return;
    const float offset = center ? __uint_as_float((uint32_t)ws[kWsMean]) : 0.0f;
    __syncthreads();
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
                if ((__float_as_uint(v) & 0x7FFFFFFFu) >= 0x7F800000u) atomicMin(&ws[kWsBad], (unsigned long long)i);
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
    __shared__ float mids[255];
    if (center && ws[kWsBad] != kNoBadIndex) return; /* see quantize_blockwise8_kernel */
    for (int i = threadIdx.x; i < 255; i += blockDim.x) mids[i] = __fmul_rn(__fadd_rn(code[i], code[i + 1]), 0.5f);
    const float offset = center ? __uint_as_float((uint32_t)ws[kWsMean]) : 0.0f;
    __syncthreads();
    const int lane = threadIdx.x & 31;
    const int64_t nb = ceil_div(n, 256), warps = (int64_t(gridDim.x) * blockDim.x) >> 5;
    for (int64_t b = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5; b < nb; b += warps) {
        const int64_t i0 = b * 256 + lane * 8;
        float v[8];
        if (i0 + 8 <= n) {
            const float4 p = __ldg(reinterpret_cast<const float4 *>(x + i0));
            const float4 q = __ldg(reinterpret_cast<const float4 *>(x + i0) + 1);
            v[0] = p.x, v[1] = p.y, v[2] = p.z, v[3] = p.w, v[4] = q.x, v[5] = q.y, v[6] = q.z, v[7] = q.w;
        } else {
#pragma unroll
            for (int j = 0; j < 8; j++) v[j] = i0 + j < n ? x[i0 + j] : 0.0f;
        }
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
                    atomicMin(&ws[kWsBad], (unsigned long long)(i0 + j));
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
