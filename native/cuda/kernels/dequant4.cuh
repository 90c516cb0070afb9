/* dequant4.cuh -- blockwise 4-bit dequantize: each thread expands 16 packed bytes (32 elements, one block
 * scale since blocks hold >= 32) to out = cast(LUT[code] * scale), one float32 multiply and one RNE cast
 * as qckpt_dequantize_4bit; double-quantized scales are expanded on the fly. Tested against the CPU. */
#ifndef QCKPT_CUDA_DEQUANT4_CUH
#define QCKPT_CUDA_DEQUANT4_CUH

#include "../common.cuh"

namespace qk {

template <typename T>
__global__ void __launch_bounds__(256) dequantize_4bit_kernel(const uint8_t *__restrict__ packed, Scales scales,
                                                              int64_t n, int log2_bs, int quant_type, bool vec,
                                                              T *__restrict__ out) {
    __shared__ float lut[16];
    __shared__ float code[256];
    if (threadIdx.x < 16) lut[threadIdx.x] = (quant_type == QCKPT_NF4 ? kNF4Lut : kFP4Lut)[threadIdx.x];
    if (!scales.absmax)
        for (int i = threadIdx.x; i < 256; i += blockDim.x) code[i] = scales.code[i];
    __syncthreads();
    const int64_t chunks = ceil_div(n, 32), stride = int64_t(gridDim.x) * blockDim.x;
    for (int64_t ch = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; ch < chunks; ch += stride) {
        const int64_t i0 = ch * 32;
        const float s = block_scale(scales, code, i0 >> log2_bs);
        if (vec && i0 + 32 <= n) {
            const uint4 raw = __ldg(reinterpret_cast<const uint4 *>(packed + (i0 >> 1)));
            const uint8_t *bytes = reinterpret_cast<const uint8_t *>(&raw);
            constexpr int kPer16 = 16 / sizeof(T); /* outputs per 16-byte store */
            T vals[32];
#pragma unroll
            for (int q = 0; q < 16; q++) {
                vals[2 * q] = from_f32<T>(__fmul_rn(lut[bytes[q] >> 4], s));
                vals[2 * q + 1] = from_f32<T>(__fmul_rn(lut[bytes[q] & 15], s));
            }
#pragma unroll
            for (int q = 0; q < 32 / kPer16; q++)
                reinterpret_cast<uint4 *>(out + i0)[q] = reinterpret_cast<const uint4 *>(vals)[q];
        } else {
            for (int64_t i = i0; i < i0 + 32 && i < n; i++) {
                const uint8_t byte = packed[i >> 1];
                out[i] = from_f32<T>(__fmul_rn(lut[(i & 1) ? (byte & 15) : (byte >> 4)], s));
            }
        }
    }
}

}  // namespace qk

#endif
