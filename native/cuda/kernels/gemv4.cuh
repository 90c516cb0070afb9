/* gemv4.cuh -- batch-1 4-bit dequantize + matrix-vector product on the CUDA cores:
 *
 *   y (n_out) = dequant(W (n_out, k)) @ x (k)
 *
 * Why a second small-batch kernel next to gemm4.cuh's tensor-core one: at batch 1 the work is reading
 * the packed weights, and the mma fragment layout makes each load instruction of a warp touch 16 rows
 * 64 bytes apiece. Here a warp reads ROWS whole rows, 512 contiguous bytes per row per load instruction
 * (lane l owns k in [32 l, 32 l + 32) of each 1024-wide chunk), with ROWS * U loads in flight per lane.
 * x is staged once per block in shared memory as float32, permuted so that the eight 4-element pieces
 * a lane reads for its 32 k land at consecutive 16-byte slots of the warp (no bank conflicts).
 * Products: sum_k LUT[code] * x in float32 per block-of-32 run, times the block scale once. */
#ifndef QCKPT_CUDA_GEMV4_CUH
#define QCKPT_CUDA_GEMV4_CUH

#include "../common.cuh"

namespace qk {

constexpr int kGemvChunk = 1024; /* k per warp-wide load: 32 lanes x 32 codes */

/* position of x[k] in the permuted shared copy: chunk c, lane l, piece q (8 per lane), element e */
__device__ __forceinline__ int gemv_x_slot(int64_t kk) {
    const int c = int(kk >> 10), within = int(kk & 1023), l = within >> 5, q = (within >> 2) & 7, e = within & 3;
    return (c << 10) + (q << 7) + (l << 2) + e;
}

template <typename T, int ROWS, int U>
__global__ void __launch_bounds__(128) gemv_4bit_kernel(const T *__restrict__ x, const uint8_t *__restrict__ packed,
                                                        Scales scales, int64_t n_out, int64_t k, int log2_bs,
                                                        int quant_type, T *__restrict__ y) {
    extern __shared__ __align__(16) float xs[]; /* ceil(k / 1024) * 1024 floats */
    __shared__ float2 pair[256];
    __shared__ float code[256];
    const int64_t chunks = ceil_div(k, kGemvChunk);
    for (int i = threadIdx.x; i < 256; i += blockDim.x) {
        const float *lut = quant_type == QCKPT_NF4 ? kNF4Lut : kFP4Lut;
        pair[i] = make_float2(lut[i >> 4], lut[i & 15]);
        if (!scales.absmax) code[i] = scales.code[i];
    }
    for (int64_t kk = threadIdx.x; kk < chunks * kGemvChunk; kk += blockDim.x)
        xs[gemv_x_slot(kk)] = kk < k ? to_f32<T>(x[kk]) : 0.0f;
    __syncthreads();

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int64_t n0 = (int64_t(blockIdx.x) * (blockDim.x >> 5) + warp) * ROWS;
    if (n0 >= n_out) return;
    float acc[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; r++) acc[r] = 0.0f;

    for (int64_t c0 = 0; c0 < chunks; c0 += U) {
        /* raw scale inputs, combined after every load is issued: a code-table lookup here would wait for
         * its load and serialize the rest */
        uint4 w[U][ROWS];
        float s[U][ROWS];
        uint32_t ci[U][ROWS];
#pragma unroll
        for (int u = 0; u < U; u++)
#pragma unroll
            for (int r = 0; r < ROWS; r++) {
                const int64_t n = n0 + r, kk = (c0 + u) * kGemvChunk + 32 * lane;
                if (n < n_out && c0 + u < chunks && kk < k) {
                    const int64_t flat = n * k + kk;
                    w[u][r] = __ldg(reinterpret_cast<const uint4 *>(packed + (flat >> 1)));
                    const int64_t b = flat >> log2_bs;
                    if (scales.absmax) {
                        s[u][r] = __ldg(scales.absmax + b);
                    } else {
                        s[u][r] = __ldg(scales.absmax2 + (b >> scales.log2_bs2));
                        ci[u][r] = __ldg(scales.codes + b);
                    }
                } else {
                    w[u][r] = make_uint4(0, 0, 0, 0);
                    s[u][r] = 0.0f;
                    ci[u][r] = 0;
                }
            }
#pragma unroll
        for (int u = 0; u < U; u++) {
            if (c0 + u >= chunks) break;
            const float *xc = xs + (c0 + u) * kGemvChunk + (lane << 2);
            float4 xv[8];
#pragma unroll
            for (int q = 0; q < 8; q++) xv[q] = *reinterpret_cast<const float4 *>(xc + (q << 7));
#pragma unroll
            for (int r = 0; r < ROWS; r++) {
                const uint32_t words[4] = {w[u][r].x, w[u][r].y, w[u][r].z, w[u][r].w};
                float part = 0.0f;
#pragma unroll
                for (int q = 0; q < 8; q++) { /* piece q: bytes 2q, 2q + 1 = k 4q .. 4q + 3 */
                    const uint32_t word = words[q >> 1], sh = (q & 1) * 16;
                    const float2 p0 = pair[(word >> sh) & 0xFF], p1 = pair[(word >> (sh + 8)) & 0xFF];
                    part = fmaf(p0.x, xv[q].x, part);
                    part = fmaf(p0.y, xv[q].y, part);
                    part = fmaf(p1.x, xv[q].z, part);
                    part = fmaf(p1.y, xv[q].w, part);
                }
                /* the block scale exactly as block_scale(): two float32 roundings when nested */
                const float scale = scales.absmax ? s[u][r]
                                                  : __fadd_rn(__fmul_rn(code[ci[u][r]], s[u][r]), scales.offset);
                acc[r] = fmaf(part, scale, acc[r]);
            }
        }
    }
#pragma unroll
    for (int r = 0; r < ROWS; r++) {
        float v = acc[r];
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
        if (lane == 0 && n0 + r < n_out) y[n0 + r] = from_f32<T>(v);
    }
}

/* Shared memory bytes of a launch over k. */
inline size_t gemv_smem_bytes(int64_t k) { return size_t(ceil_div(k, kGemvChunk)) * kGemvChunk * sizeof(float); }

}  // namespace qk

#endif /* QCKPT_CUDA_GEMV4_CUH */
