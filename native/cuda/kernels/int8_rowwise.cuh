/* int8_rowwise.cuh -- row-wise int8 (LLM.int8 weights): one thread block per row; SCB = max |x| as bit
 * patterns, q = rint(x * ((1.0f / SCB) * 127.0f)) (bnb's torch arithmetic), an all-zero row all zeros; dequantize as
 * (q * SCB) * (1/127 as float32), two roundings. As native/src/int8_rowwise.c; tested against it. */
#ifndef QCKPT_CUDA_INT8_ROWWISE_CUH
#define QCKPT_CUDA_INT8_ROWWISE_CUH

#include "../common.cuh"

namespace qk {

template <typename T>
__global__ void __launch_bounds__(256) quantize_int8_rowwise_kernel(const T *__restrict__ x, int64_t rows, int64_t cols,
                                                                    int8_t *__restrict__ q, float *__restrict__ scb,
                                                                    unsigned long long *__restrict__ ws) {
    __shared__ uint32_t scratch[8];
    for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
        const T *row = x + r * cols;
        uint32_t m = 0;
        for (int64_t c = threadIdx.x; c < cols; c += blockDim.x)
            m = max(m, __float_as_uint(to_f32<T>(row[c])) & 0x7FFFFFFFu);
        m = block_max_bits(m, scratch);
        if (m >= 0x7F800000u) {
            for (int64_t c = threadIdx.x; c < cols; c += blockDim.x)
                if ((__float_as_uint(to_f32<T>(row[c])) & 0x7FFFFFFFu) >= 0x7F800000u)
                    record_bad_index(ws, (unsigned long long)(r * cols + c));
            continue;
        }
        const float amax = __uint_as_float(m);
        if (threadIdx.x == 0) scb[r] = amax;
        /* (1.0f / SCB) * 127.0f, two roundings: torch's evaluation of bitsandbytes' `127.0 / SCB` */
        const float scale = m ? __fmul_rn(__frcp_rn(amax), 127.0f) : 0.0f;
        for (int64_t c = threadIdx.x; c < cols; c += blockDim.x)
            q[r * cols + c] = m ? (int8_t)__float2int_rn(__fmul_rn(to_f32<T>(row[c]), scale)) : 0;
    }
}

template <typename T>
__global__ void dequantize_int8_rowwise_kernel(const int8_t *__restrict__ q, const float *__restrict__ scb,
                                               int64_t rows, int64_t cols, T *__restrict__ out) {
    const float inv127 = 7.874015718698502e-3f;
    const int64_t n = rows * cols, stride = int64_t(gridDim.x) * blockDim.x;
    for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
        out[i] = from_f32<T>(__fmul_rn(__fmul_rn((float)q[i], scb[i / cols]), inv127));
}

}  // namespace qk

#endif
