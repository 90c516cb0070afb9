/* int8_rowwise.cu -- launchers of the row-wise int8 kernels (kernels/int8_rowwise.cuh). */
#include <algorithm>

#include "kernels/int8_rowwise.cuh"

extern "C" qckpt_status qckpt_cuda_quantize_int8_rowwise(const void *x, int32_t dtype, int64_t rows, int64_t cols,
                                                         int8_t *q, float *scb, int64_t *workspace, void *stream) {
    if (!x || !q || !scb || !workspace) return qk::fail(QCKPT_E_INVALID, "NULL data pointer");
    if (rows <= 0 || cols <= 0)
        return qk::fail(QCKPT_E_INVALID, "shape must be positive, got (%lld, %lld)", (long long)rows, (long long)cols);
    const int64_t blocks = std::min<int64_t>(rows, int64_t(qk::sm_count()) * 8);
    auto *ws = reinterpret_cast<unsigned long long *>(workspace);
    const bool known = QK_DISPATCH_DTYPE(dtype, T,
        qk::quantize_int8_rowwise_kernel<T><<<(unsigned)blocks, 256, 0, (cudaStream_t)stream>>>(
            static_cast<const T *>(x), rows, cols, q, scb, ws));
    if (!known) return qk::fail(QCKPT_E_INVALID, "unknown input dtype %d", dtype);
    return qk::check_launch("quantize_int8_rowwise");
}

extern "C" qckpt_status qckpt_cuda_dequantize_int8_rowwise(const int8_t *q, const float *scb, int64_t rows,
                                                           int64_t cols, void *out, int32_t out_dtype, void *stream) {
    if (!q || !scb || !out) return qk::fail(QCKPT_E_INVALID, "NULL data pointer");
    if (rows <= 0 || cols <= 0)
        return qk::fail(QCKPT_E_INVALID, "shape must be positive, got (%lld, %lld)", (long long)rows, (long long)cols);
    const int64_t blocks = std::min<int64_t>(qk::ceil_div(rows * cols, 256), int64_t(qk::sm_count()) * 8);
    const bool known = QK_DISPATCH_DTYPE(out_dtype, T,
        qk::dequantize_int8_rowwise_kernel<T><<<(unsigned)blocks, 256, 0, (cudaStream_t)stream>>>(
            q, scb, rows, cols, static_cast<T *>(out)));
    if (!known) return qk::fail(QCKPT_E_INVALID, "unknown output dtype %d", out_dtype);
    return qk::check_launch("dequantize_int8_rowwise");
}
