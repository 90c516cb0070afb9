/* blockwise8.cu -- launchers of the 8-bit blockwise kernels (kernels/blockwise8.cuh). */
#include <algorithm>

#include "kernels/blockwise8.cuh"

extern "C" qckpt_status qckpt_cuda_quantize_blockwise8(const float *x, int64_t n, int64_t blocksize, const float *code,
                                                       int32_t center, uint8_t *codes, float *absmax,
                                                       int64_t *workspace, void *stream) {
    if (!x || !code || !codes || !absmax || !workspace) return qk::fail(QCKPT_E_INVALID, "NULL data pointer");
    if (n <= 0) return qk::fail(QCKPT_E_INVALID, "element count must be positive, got %lld", (long long)n);
    if (blocksize < 1) return qk::fail(QCKPT_E_INVALID, "blocksize must be positive, got %lld", (long long)blocksize);
    if (center < 0 || center > 2) return qk::fail(QCKPT_E_INVALID, "center must be 0, 1 or 2, got %d", center);
    if (center == 2 && n >= (int64_t(1) << 39))
        return qk::fail(QCKPT_E_INVALID, "exact mean needs fewer than 2^39 values, got %lld", (long long)n);
    if (blocksize == 256 && qk::aligned(x, 16) && qk::aligned(codes, 8)) {
        /* double quant: a warp per block */
        const int64_t blocks = std::min<int64_t>(qk::ceil_div(qk::ceil_div(n, 256), 8), int64_t(qk::sm_count()) * 8);
        qk::quantize_blockwise8_warp256_kernel<<<(unsigned)blocks, 256, 0, (cudaStream_t)stream>>>(
            x, n, code, center, reinterpret_cast<unsigned long long *>(workspace), codes, absmax);
        return qk::check_launch("quantize_blockwise8");
    }
    const int64_t blocks = std::min<int64_t>(qk::ceil_div(n, blocksize), int64_t(qk::sm_count()) * 8);
    const int threads = blocksize >= 256 ? 256 : 32 * (int)qk::ceil_div(blocksize, 32);
    qk::quantize_blockwise8_kernel<<<(unsigned)blocks, threads, 0, (cudaStream_t)stream>>>(
        x, n, blocksize, code, center, reinterpret_cast<unsigned long long *>(workspace), codes, absmax);
    return qk::check_launch("quantize_blockwise8");
}

extern "C" qckpt_status qckpt_cuda_dequantize_blockwise8(const uint8_t *codes, const float *absmax, int64_t n,
                                                         int64_t blocksize, const float *code, float offset,
                                                         float *out, void *stream) {
    if (!codes || !absmax || !code || !out) return qk::fail(QCKPT_E_INVALID, "NULL data pointer");
    if (n <= 0) return qk::fail(QCKPT_E_INVALID, "element count must be positive, got %lld", (long long)n);
    if (blocksize < 1) return qk::fail(QCKPT_E_INVALID, "blocksize must be positive, got %lld", (long long)blocksize);
    const int64_t blocks = std::min<int64_t>(qk::ceil_div(n, 256), int64_t(qk::sm_count()) * 8);
    qk::dequantize_blockwise8_kernel<<<(unsigned)blocks, 256, 0, (cudaStream_t)stream>>>(codes, absmax, n, blocksize,
                                                                                        code, offset, out);
    return qk::check_launch("dequantize_blockwise8");
}
