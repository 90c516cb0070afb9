/* dequant4.cu -- launcher of the 4-bit dequantize kernel (kernels/dequant4.cuh). */
#include <algorithm>

#include "kernels/dequant4.cuh"

extern "C" qckpt_status qckpt_cuda_dequantize_4bit(const uint8_t *packed, const qckpt_cuda_scales *scales, int64_t n,
                                                   int64_t blocksize, int32_t quant_type, void *out,
                                                   int32_t out_dtype, void *stream) {
    if (!packed || !out) return qk::fail(QCKPT_E_INVALID, "NULL data pointer");
    if (n <= 0) return qk::fail(QCKPT_E_INVALID, "element count must be positive, got %lld", (long long)n);
    const int log2_bs = qk::log2_exact(blocksize);
    if (log2_bs < 5 || log2_bs > 12)
        return qk::fail(QCKPT_E_INVALID, "blocksize must be a power of two in [32, 4096], got %lld", (long long)blocksize);
    if (quant_type != QCKPT_NF4 && quant_type != QCKPT_FP4)
        return qk::fail(QCKPT_E_INVALID, "unknown 4-bit quant type %d", quant_type);
    qk::Scales sc;
    qckpt_status st = qk::make_scales(scales, &sc);
    if (st != QCKPT_OK) return st;
    const bool vec = qk::aligned(packed, 16) && qk::aligned(out, 16);
    const int64_t blocks = std::min<int64_t>(qk::ceil_div(qk::ceil_div(n, 32), 256), int64_t(qk::sm_count()) * 8);
    const bool known = QK_DISPATCH_DTYPE(out_dtype, T,
        qk::dequantize_4bit_kernel<T><<<(unsigned)blocks, 256, 0, (cudaStream_t)stream>>>(
            packed, sc, n, log2_bs, quant_type, vec, static_cast<T *>(out)));
    if (!known) return qk::fail(QCKPT_E_INVALID, "unknown output dtype %d", out_dtype);
    return qk::check_launch("dequantize_4bit");
}
