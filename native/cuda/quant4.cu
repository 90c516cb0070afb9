/* quant4.cu -- launcher of the blockwise 4-bit quantize kernel (kernels/quant4.cuh): validates arguments,
 * picks the instantiation for the blocksize and dtype, and sizes a persistent grid. */
#include "kernels/quant4.cuh"

namespace {

template <typename T, int G, int C>
void launch(const void *x, int64_t n, int quant_type, uint8_t *packed, float *absmax, int64_t *ws, cudaStream_t s) {
    constexpr int kThreads = 256, kBS = 8 * G * C, kU = C == 1 ? 4 : 1; /* tiles in flight per warp */
    const int64_t warps = qk::ceil_div(qk::ceil_div(n, kBS), 32 / G * kU);
    const int64_t blocks = std::min<int64_t>(qk::ceil_div(warps, kThreads / 32), int64_t(qk::sm_count()) * 8);
    qk::quantize_4bit_kernel<T, G, C, kU><<<(unsigned)blocks, kThreads, 0, s>>>(
        static_cast<const T *>(x), n, quant_type, packed, absmax,
        reinterpret_cast<unsigned long long *>(ws + qk::kWsBad));
}

template <typename T>
bool launch_bs(int64_t bs, const void *x, int64_t n, int qt, uint8_t *p, float *a, int64_t *ws, cudaStream_t s) {
    switch (bs) {
    case 32: launch<T, 4, 1>(x, n, qt, p, a, ws, s); return true;
    case 64: launch<T, 8, 1>(x, n, qt, p, a, ws, s); return true;
    case 128: launch<T, 16, 1>(x, n, qt, p, a, ws, s); return true;
    case 256: launch<T, 32, 1>(x, n, qt, p, a, ws, s); return true;
    case 512: launch<T, 32, 2>(x, n, qt, p, a, ws, s); return true;
    case 1024: launch<T, 32, 4>(x, n, qt, p, a, ws, s); return true;
    case 2048: launch<T, 32, 8>(x, n, qt, p, a, ws, s); return true;
    case 4096: launch<T, 32, 16>(x, n, qt, p, a, ws, s); return true;
    default: return false;
    }
}

}  // namespace

extern "C" qckpt_status qckpt_cuda_quantize_4bit(const void *x, int32_t dtype, int64_t n, int64_t blocksize,
                                                 int32_t quant_type, uint8_t *packed, float *absmax,
                                                 int64_t *workspace, void *stream) {
    if (!x || !packed || !absmax || !workspace) return qk::fail(QCKPT_E_INVALID, "NULL data pointer");
    if (n <= 0) return qk::fail(QCKPT_E_INVALID, "element count must be positive, got %lld", (long long)n);
    if (quant_type != QCKPT_NF4 && quant_type != QCKPT_FP4)
        return qk::fail(QCKPT_E_INVALID, "unknown 4-bit quant type %d", quant_type);
    if (!qk::aligned(x, 16) || !qk::aligned(packed, 4))
        return qk::fail(QCKPT_E_INVALID, "input must be 16-byte and packed output 4-byte aligned");
    bool known_bs = false;
    const bool known_dtype = QK_DISPATCH_DTYPE(dtype, T, known_bs = launch_bs<T>(blocksize, x, n, quant_type, packed,
                                                                                 absmax, workspace, (cudaStream_t)stream));
    if (!known_dtype) return qk::fail(QCKPT_E_INVALID, "unknown input dtype %d", dtype);
    if (!known_bs)
        return qk::fail(QCKPT_E_INVALID, "blocksize must be a power of two in [32, 4096], got %lld", (long long)blocksize);
    return qk::check_launch("quantize_4bit");
}
