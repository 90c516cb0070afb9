/* gemm4.cu -- launcher of the fused small-batch 4-bit matmul (kernels/gemm4.cuh): picks the batch tiles
 * (NT) and rows per warp (R) so the grid covers every multiprocessor at least twice. */
#include <algorithm>

#include "kernels/gemm4.cuh"

namespace {

template <typename T, int NT, int R, int W, int DEPTH, int MINB = 8 / W * 2>
void launch(const void *x, int batch, const uint8_t *packed, const qk::Scales &sc, int64_t n_out, int64_t k,
            int log2_bs, int qt, void *y, cudaStream_t s) {
    const int64_t blocks = qk::ceil_div(n_out, 16 * R);
    qk::gemm_4bit_kernel<T, NT, R, W, DEPTH, MINB><<<(unsigned)blocks, W * 32, 0, s>>>(
        static_cast<const T *>(x), batch, packed, sc, n_out, k, log2_bs, qt, static_cast<T *>(y));
}

/* Shapes: one row tile (16 outputs) per warp and two steps of loads in flight for up to 8 rows; two
 * batch tiles (9..16 rows) need twice the x registers, so one step ahead (and two row tiles when there
 * are many). k splits over 4 warps when it
 * is short (>= 8 steps of 128 each) and over 8 when long, so each warp streams long enough. */
template <typename T>
void launch_shape(const void *x, int batch, const uint8_t *packed, const qk::Scales &sc, int64_t n_out, int64_t k,
                  int log2_bs, int qt, void *y, cudaStream_t s) {
    const bool long_k = qk::ceil_div(k, 128) >= 64;
    /* many row tiles: two per warp halve the x traffic from L2, which 16 rows make as large as the weights */
    const bool many_rows = qk::ceil_div(n_out, 32) >= 2 * qk::sm_count();
    if (batch > 8) {
        if (many_rows) launch<T, 2, 2, 4, 1, 3>(x, batch, packed, sc, n_out, k, log2_bs, qt, y, s);
        else if (long_k) launch<T, 2, 1, 8, 1>(x, batch, packed, sc, n_out, k, log2_bs, qt, y, s);
        else launch<T, 2, 1, 4, 1>(x, batch, packed, sc, n_out, k, log2_bs, qt, y, s);
    } else {
        if (long_k) launch<T, 1, 1, 8, 2>(x, batch, packed, sc, n_out, k, log2_bs, qt, y, s);
        else launch<T, 1, 1, 4, 2>(x, batch, packed, sc, n_out, k, log2_bs, qt, y, s);
    }
}

}  // namespace

extern "C" qckpt_status qckpt_cuda_gemm_4bit(const void *x, int32_t dtype, int64_t batch, const uint8_t *packed,
                                             const qckpt_cuda_scales *scales, int64_t n_out, int64_t k,
                                             int64_t blocksize, int32_t quant_type, void *y, void *stream) {
    if (!x || !packed || !y) return qk::fail(QCKPT_E_INVALID, "NULL data pointer");
    if (n_out <= 0 || k <= 0)
        return qk::fail(QCKPT_E_INVALID, "shapes must be positive: n_out %lld, k %lld", (long long)n_out, (long long)k);
    if (quant_type != QCKPT_NF4 && quant_type != QCKPT_FP4)
        return qk::fail(QCKPT_E_INVALID, "unknown 4-bit quant type %d", quant_type);
    const int log2_bs = qk::log2_exact(blocksize);
    if (log2_bs < 5 || log2_bs > 12)
        return qk::fail(QCKPT_E_INVALID, "blocksize must be a power of two in [32, 4096], got %lld", (long long)blocksize);
    qk::Scales sc;
    qckpt_status st = qk::make_scales(scales, &sc);
    if (st != QCKPT_OK) return st;
    if (batch < 1 || batch > 16 || k % 32 != 0 || !qk::aligned(x, 16) || !qk::aligned(packed, 16))
        return qk::fail(QCKPT_E_UNSUPPORTED, "fused 4-bit matmul needs 1..16 rows, k %% 32 == 0 and 16-byte alignment");
    cudaStream_t s = (cudaStream_t)stream;
    if (dtype == QCKPT_BF16) launch_shape<__nv_bfloat16>(x, (int)batch, packed, sc, n_out, k, log2_bs, quant_type, y, s);
    else if (dtype == QCKPT_F16) launch_shape<__half>(x, (int)batch, packed, sc, n_out, k, log2_bs, quant_type, y, s);
    else return qk::fail(QCKPT_E_UNSUPPORTED, "fused 4-bit matmul takes bfloat16 or float16 activations, not dtype %d", dtype);
    return qk::check_launch("gemm_4bit");
}
