/* quant4.cu -- launcher of the blockwise 4-bit quantize kernel (kernels/quant4.cuh): validates arguments,
 * picks the instantiation for the blocksize and dtype, and sizes a persistent grid. */
#include "kernels/quant4.cuh"

namespace {

/* One-chunk blocks (<= 256 elements): one tile per warp and loop trip, registers bounded for 8 blocks of
 * 256 threads per multiprocessor, a grid of 16 per multiprocessor -- occupancy hides the load latency
 * better than more tiles in flight per warp or a cp.async ring (scripts/cuda_tune/quant4_sweep.cu on an
 * H100: 88 us for 4 tiles at 64 registers, 74 us for an 8-stage ring, 64.6 us here; BENCHMARKS.md).
 * Larger blocks hold C chunks per lane already: one tile, default bounds, 8 blocks per multiprocessor. */
template <int C> struct Quant4Launch {
    static constexpr int kMinBlocks = C == 1 ? 8 : 1, kGridPerSm = C == 1 ? 16 : 8;
};

/* Sums of 2^20 terms per block and exponent fit the kernel's 32-bit shared words (Quant4Shared). */
qckpt_status check_sum_capacity(int64_t nb, int64_t blocks) {
    if (qk::ceil_div(nb, blocks) >= (int64_t(1) << 20))
        return qk::fail(QCKPT_E_UNSUPPORTED, "double quantization of %lld blocks in one call is too large", (long long)nb);
    return QCKPT_OK;
}

template <typename T, int G, int C>
qckpt_status launch(const void *x, int64_t n, int quant_type, uint8_t *packed, float *absmax, bool sum, int64_t *ws,
                    cudaStream_t s) {
    constexpr int kThreads = 256, kBS = 8 * G * C;
    using L = Quant4Launch<C>;
    const int64_t nb = qk::ceil_div(n, kBS);
    const int64_t warps = qk::ceil_div(nb, 32 / G);
    const int64_t blocks = std::min<int64_t>(qk::ceil_div(warps, kThreads / 32), int64_t(qk::sm_count()) * L::kGridPerSm);
    if (sum && check_sum_capacity(nb, blocks) != QCKPT_OK) return QCKPT_E_UNSUPPORTED;
    auto kernel = sum ? qk::quantize_4bit_kernel<T, G, C, 1, true, L::kMinBlocks>
                      : qk::quantize_4bit_kernel<T, G, C, 1, false, L::kMinBlocks>;
    kernel<<<(unsigned)blocks, kThreads, 0, s>>>(static_cast<const T *>(x), n, quant_type, packed, absmax,
                                                 reinterpret_cast<unsigned long long *>(ws));
    return QCKPT_OK;
}

/* false for a blocksize without an instantiation; otherwise *st is the launch's status */
template <typename T>
bool launch_bs(int64_t bs, const void *x, int64_t n, int qt, uint8_t *p, float *a, bool sum, int64_t *ws,
               cudaStream_t s, qckpt_status *st) {
    switch (bs) {
    case 32: *st = launch<T, 4, 1>(x, n, qt, p, a, sum, ws, s); return true;
    case 64: *st = launch<T, 8, 1>(x, n, qt, p, a, sum, ws, s); return true;
    case 128: *st = launch<T, 16, 1>(x, n, qt, p, a, sum, ws, s); return true;
    case 256: *st = launch<T, 32, 1>(x, n, qt, p, a, sum, ws, s); return true;
    case 512: *st = launch<T, 32, 2>(x, n, qt, p, a, sum, ws, s); return true;
    case 1024: *st = launch<T, 32, 4>(x, n, qt, p, a, sum, ws, s); return true;
    case 2048: *st = launch<T, 32, 8>(x, n, qt, p, a, sum, ws, s); return true;
    case 4096: *st = launch<T, 32, 16>(x, n, qt, p, a, sum, ws, s); return true;
    default: return false;
    }
}

}  // namespace

extern "C" qckpt_status qckpt_cuda_quantize_4bit(const void *x, int32_t dtype, int64_t n, int64_t blocksize,
                                                 int32_t quant_type, uint8_t *packed, float *absmax,
                                                 int32_t sum_absmax, int64_t *workspace, void *stream) {
    if (!x || !packed || !absmax || !workspace) return qk::fail(QCKPT_E_INVALID, "NULL data pointer");
    if (n <= 0) return qk::fail(QCKPT_E_INVALID, "element count must be positive, got %lld", (long long)n);
    if (quant_type != QCKPT_NF4 && quant_type != QCKPT_FP4)
        return qk::fail(QCKPT_E_INVALID, "unknown 4-bit quant type %d", quant_type);
    if (!qk::aligned(x, 16) || !qk::aligned(packed, 4))
        return qk::fail(QCKPT_E_INVALID, "input must be 16-byte and packed output 4-byte aligned");
    bool known_bs = false;
    qckpt_status st = QCKPT_OK;
    const bool known_dtype = QK_DISPATCH_DTYPE(dtype, T, known_bs = launch_bs<T>(blocksize, x, n, quant_type, packed,
                                                                                 absmax, sum_absmax != 0, workspace,
                                                                                 (cudaStream_t)stream, &st));
    if (!known_dtype) return qk::fail(QCKPT_E_INVALID, "unknown input dtype %d", dtype);
    if (!known_bs)
        return qk::fail(QCKPT_E_INVALID, "blocksize must be a power of two in [32, 4096], got %lld", (long long)blocksize);
    if (st != QCKPT_OK) return st;
    return qk::check_launch("quantize_4bit");
}
