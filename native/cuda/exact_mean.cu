/* exact_mean.cu -- launcher of the exact float32 mean (kernels/exact_mean.cuh). */
#include <algorithm>
#include <cstdlib>

#include "kernels/exact_mean.cuh"

/* Grid blocks per SM: 8 unless QCKPT_CUDA_MEAN_BLOCKS_PER_SM (1..64) says otherwise -- a tuning knob that
 * scripts/bench_cuda.py sweeps in one process (read per call: getenv costs far less than the launch).
 * The per-exponent sums are exact integers, so the grid never changes the result. */
static int64_t mean_blocks_per_sm() {
    const char *s = std::getenv("QCKPT_CUDA_MEAN_BLOCKS_PER_SM");
    const long v = s ? std::strtol(s, nullptr, 10) : 0;
    return v >= 1 && v <= 64 ? v : 8;
}

extern "C" qckpt_status qckpt_cuda_exact_mean(const float *values, int64_t n, int64_t *workspace, void *stream) {
    if (!values || !workspace) return qk::fail(QCKPT_E_INVALID, "NULL data pointer");
    if (n <= 0 || n >= (int64_t(1) << 39))
        return qk::fail(QCKPT_E_INVALID, "exact mean needs 0 < n < 2^39 values, got %lld", (long long)n);
    const int64_t blocks = std::min<int64_t>(qk::ceil_div(n, 1024), int64_t(qk::sm_count()) * mean_blocks_per_sm());
    qk::exact_mean_kernel<<<(unsigned)blocks, 256, 0, (cudaStream_t)stream>>>(
        values, n, reinterpret_cast<unsigned long long *>(workspace));
    return qk::check_launch("exact_mean");
}

