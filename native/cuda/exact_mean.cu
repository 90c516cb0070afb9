/* exact_mean.cu -- launcher of the exact float32 mean (kernels/exact_mean.cuh). */
#include <algorithm>

#include "kernels/exact_mean.cuh"

extern "C" qckpt_status qckpt_cuda_exact_mean(const float *values, int64_t n, int64_t *workspace, void *stream) {
    if (!values || !workspace) return qk::fail(QCKPT_E_INVALID, "NULL data pointer");
    if (n <= 0 || n >= (int64_t(1) << 39))
        return qk::fail(QCKPT_E_INVALID, "exact mean needs 0 < n < 2^39 values, got %lld", (long long)n);
    const int64_t blocks = std::min<int64_t>(qk::ceil_div(n, 1024), int64_t(qk::sm_count()) * 8);
    qk::exact_mean_kernel<<<(unsigned)blocks, 256, 0, (cudaStream_t)stream>>>(
        values, n, reinterpret_cast<unsigned long long *>(workspace));
    return qk::check_launch("exact_mean");
}
