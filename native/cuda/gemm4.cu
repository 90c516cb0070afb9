/* gemm4.cu -- launchers of the fused 4-bit matmuls: kernels/gemv4.cuh for 1..16 rows, and for
 * 17..QCKPT_CUDA_GEMM_MAX_ROWS rows the Hopper kernel (kernels/gemm4_tma.cuh, via gemm4_tma.h) on compute
 * capability 9.0, kernels/gemm4_tiled.cuh elsewhere or for shapes it does not take. */
#include <algorithm>

#include "gemm4_tma.h"
#include "kernels/gemv4.cuh"
#include "kernels/gemm4_tiled.cuh"

namespace {

/* two 32-row tiles or more per multiprocessor */
bool decode_many_rows(int64_t n_out) { return qk::ceil_div(n_out, 32) >= 2 * int64_t(qk::sm_count()); }

/* 1..16 rows: the instantiations scripts/cuda_tune/gemm4_sweep.cu --decode / --wide measured fastest on an
 * H100 for the Llama-8B MLP shapes (scripts/BENCHMARKS.md). With many rows (n_out >= 64 x SMs: two 32-row
 * tiles or more per multiprocessor) a warp takes two row tiles, so each of its steps has twice the loads in
 * flight; otherwise one. Two batch tiles (9..16 rows) need twice the x registers: one step of loads in flight.
 * The wide mapping (gemv4.cuh) where it measured faster -- one row, or up to 8 with many rows -- and wherever
 * the post-scaled one does not apply (blocksize 32, k % 64 == 32). */
template <typename T, bool WIDE>
cudaError_t launch_decode(const void *x, int batch, const uint8_t *packed, const qk::Scales &sc, int64_t n_out,
                          int64_t k, int log2_bs, int qt, void *y, cudaStream_t s) {
    using namespace qk;
    const T *xt = static_cast<const T *>(x);
    T *yt = static_cast<T *>(y);
    const bool many_rows = decode_many_rows(n_out);
    /* grid 0: one block per row tile, at most the instantiation's blocks per multiprocessor */
    if (batch > 8) {
        if (many_rows) /* 2 blocks per multiprocessor, not MINB 3: 29.2 against 31.9 us at 14336x4096 */
            return launch_gemm_4bit_decode<T, 2, 2, 4, 1, 3, WIDE>(xt, batch, packed, sc, n_out, k, log2_bs, qt, yt,
                                                                  2 * int64_t(sm_count()), s);
        return launch_gemm_4bit_decode<T, 2, 1, 8, 1, 2, WIDE>(xt, batch, packed, sc, n_out, k, log2_bs, qt, yt, 0, s);
    }
    if constexpr (WIDE) /* up to 8 rows with many rows are always wide (launch_decode<T> below) */
        if (many_rows) {
            if (batch == 1) /* 4 warps x 4 blocks, about a tile each (19.3 against 20.1 us at 14336x4096) */
                return launch_gemm_4bit_decode<T, 1, 2, 4, 1, 4, true>(xt, batch, packed, sc, n_out, k, log2_bs, qt, yt,
                                                                      0, s);
            return launch_gemm_4bit_decode<T, 1, 2, 8, 1, 2, true>(xt, batch, packed, sc, n_out, k, log2_bs, qt, yt, 0,
                                                                  s);
        }
    return launch_gemm_4bit_decode<T, 1, 1, 8, 2, 2, WIDE>(xt, batch, packed, sc, n_out, k, log2_bs, qt, yt, 0, s);
}

template <typename T>
cudaError_t launch_decode(const void *x, int batch, const uint8_t *packed, const qk::Scales &sc, int64_t n_out,
                          int64_t k, int log2_bs, int qt, void *y, cudaStream_t s) {
    const bool wide = !qk::decode_post_scaled(k, log2_bs) || batch == 1 || (batch <= 8 && decode_many_rows(n_out));
    return wide ? launch_decode<T, true>(x, batch, packed, sc, n_out, k, log2_bs, qt, y, s)
                : launch_decode<T, false>(x, batch, packed, sc, n_out, k, log2_bs, qt, y, s);
}

/* 17+ rows: the instantiations scripts/cuda_tune/gemm4_sweep.cu measured fastest on an H100 for the
 * Llama-8B MLP shapes (scripts/BENCHMARKS.md): 8 warps of 16 outputs each (a block covers 128 outputs),
 * 32 batch rows per block and weights 4 k-tiles ahead up to 32 rows, 64 rows and 2 ahead above; k split
 * so that the grid gives every multiprocessor two blocks. */
using TiledSmall = qk::TiledShape<8, 1, 1, 4, 4>;
using TiledLarge = qk::TiledShape<8, 1, 1, 8, 4>;
constexpr int kTiledSmallRows = 32, kTiledBlocksPerSm = 2;

struct TiledPlan {
    bool small;
    int splits;
    int64_t workspace_bytes;
};

TiledPlan tiled_plan(int64_t batch, int64_t n_out, int64_t k) {
    TiledPlan p;
    p.small = batch <= kTiledSmallRows;
    const int bm = p.small ? TiledSmall::BM : TiledLarge::BM;
    const int64_t tiles = qk::ceil_div(n_out, TiledSmall::BN) * qk::ceil_div(batch, bm);
    p.splits = qk::tiled_splits(tiles, k / qk::kTiledBK, qk::sm_count(), kTiledBlocksPerSm);
    p.workspace_bytes = p.small ? qk::tiled_workspace_bytes<TiledSmall>(p.splits, batch, n_out)
                                : qk::tiled_workspace_bytes<TiledLarge>(p.splits, batch, n_out);
    return p;
}

template <typename T>
cudaError_t launch_tiled(const TiledPlan &p, const void *x, int batch, const uint8_t *packed, const qk::Scales &sc,
                         int64_t n_out, int64_t k, int log2_bs, int qt, void *y, void *ws, cudaStream_t s) {
    const T *xt = static_cast<const T *>(x);
    T *yt = static_cast<T *>(y);
    if (p.small)
        return qk::launch_gemm_4bit_tiled<T, TiledSmall, 4, 2>(xt, batch, packed, sc, n_out, k, log2_bs, qt, yt,
                                                               p.splits, ws, s);
    return qk::launch_gemm_4bit_tiled<T, TiledLarge, 2, 2>(xt, batch, packed, sc, n_out, k, log2_bs, qt, yt, p.splits,
                                                           ws, s);
}

bool tiled_supported(int64_t batch, int64_t k) {
    return batch > 16 && batch <= QCKPT_CUDA_GEMM_MAX_ROWS && k % qk::kTiledBK == 0;
}

/* Whether a prefill call takes the Hopper kernel: compute capability 9.0, shapes it takes, and room for it in
 * the workspace (else the tiled kernel runs). */
bool takes_hopper(int64_t batch, int64_t n_out, int64_t k, int log2_bs, int64_t workspace_bytes, bool scales_given) {
    return qk::is_sm90() && qk::tma_gemm_supported(batch, k, log2_bs) &&
           workspace_bytes >= qk::tma_gemm_workspace_bytes(batch, n_out, k, scales_given);
}

}  // namespace

/* The Hopper kernel's workspace is an upper bound over blocksizes (the query does not know it). */
extern "C" qckpt_status qckpt_cuda_gemm_4bit_workspace(int64_t batch, int64_t n_out, int64_t k, int32_t scales_expanded,
                                                      int64_t *bytes) {
    if (!bytes) return qk::fail(QCKPT_E_INVALID, "NULL output pointer");
    *bytes = 0;
    if (!tiled_supported(batch, k) || n_out <= 0) return QCKPT_OK;
    *bytes = tiled_plan(batch, n_out, k).workspace_bytes;
    if (qk::is_sm90() && qk::tma_gemm_supported(batch, k, 5))
        *bytes = std::max(*bytes, qk::tma_gemm_workspace_bytes(batch, n_out, k, scales_expanded != 0));
    return QCKPT_OK;
}

extern "C" qckpt_status qckpt_cuda_gemm_4bit_workspace_zeroed(int64_t batch, int64_t n_out, int64_t k,
                                                             int64_t blocksize, int32_t scales_expanded,
                                                             int64_t *bytes) {
    if (!bytes) return qk::fail(QCKPT_E_INVALID, "NULL output pointer");
    *bytes = 0;
    const int log2_bs = qk::log2_exact(blocksize);
    if (log2_bs < 5 || log2_bs > 12)
        return qk::fail(QCKPT_E_INVALID, "blocksize must be a power of two in [32, 4096], got %lld", (long long)blocksize);
    if (!tiled_supported(batch, k) || n_out <= 0) return QCKPT_OK;
    int64_t size = 0;
    qckpt_cuda_gemm_4bit_workspace(batch, n_out, k, scales_expanded, &size);
    const bool given = scales_expanded != 0;
    const int64_t hopper = qk::is_sm90() && qk::tma_gemm_supported(batch, k, log2_bs)
        ? qk::tma_gemm_zeroed_bytes(batch, n_out, k, given) : 0;
    const int64_t tiled = tiled_plan(batch, n_out, k).splits > 1 ? qk::kTiledMaxCounters * 4 : 0;
    /* a workspace of the queried size may leave the Hopper kernel no room (a blocksize above 32 where 32
     * would not fit it); a larger one may give it room again: then either kernel's counters */
    *bytes = takes_hopper(batch, n_out, k, log2_bs, size, given) ? hopper : std::max(hopper, tiled);
    return QCKPT_OK;
}

extern "C" qckpt_status qckpt_cuda_gemm_4bit(const void *x, int32_t dtype, int64_t batch, const uint8_t *packed,
                                             const qckpt_cuda_scales *scales, int64_t n_out, int64_t k,
                                             int64_t blocksize, int32_t quant_type, void *y, void *workspace,
                                             int64_t workspace_bytes, const float *expanded_scales, void *stream) {
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
    if (dtype != QCKPT_BF16 && dtype != QCKPT_F16)
        return qk::fail(QCKPT_E_UNSUPPORTED, "fused 4-bit matmul takes bfloat16 or float16 activations, not dtype %d", dtype);
    if (!qk::aligned(x, 16) || !qk::aligned(packed, 16))
        return qk::fail(QCKPT_E_UNSUPPORTED, "fused 4-bit matmul needs 16-byte aligned activations and weights");
    cudaStream_t s = (cudaStream_t)stream;
    if (batch >= 1 && batch <= 16 && k % 32 == 0 && qk::decode_fits(n_out, k)) {
        const cudaError_t err = dtype == QCKPT_BF16
            ? launch_decode<__nv_bfloat16>(x, (int)batch, packed, sc, n_out, k, log2_bs, quant_type, y, s)
            : launch_decode<__half>(x, (int)batch, packed, sc, n_out, k, log2_bs, quant_type, y, s);
        if (err != cudaSuccess)
            return qk::fail(QCKPT_E_INVALID, "gemm_4bit (%lld rows): %s", (long long)batch, cudaGetErrorString(err));
        return qk::check_launch("gemm_4bit");
    }
    if (!tiled_supported(batch, k))
        return qk::fail(QCKPT_E_UNSUPPORTED, "fused 4-bit matmul takes 1..16 rows with k %% 32 == 0 (and n_out * k < "
                        "2^36) or 17..%d rows with k %% 64 == 0, got %lld rows, %lld x %lld", QCKPT_CUDA_GEMM_MAX_ROWS,
                        (long long)batch, (long long)n_out, (long long)k);
    if (workspace && !qk::aligned(workspace, 16))
        return qk::fail(QCKPT_E_INVALID, "the fused 4-bit matmul's workspace must be 16-byte aligned");
    if (workspace && takes_hopper(batch, n_out, k, log2_bs, workspace_bytes, expanded_scales != nullptr)) {
        if (expanded_scales && !qk::aligned(expanded_scales, 16))
            return qk::fail(QCKPT_E_INVALID, "expanded scales must be 16-byte aligned");
        const cudaError_t err = qk::tma_gemm_launch(x, dtype == QCKPT_BF16, (int)batch, packed, sc, expanded_scales,
                                                    n_out, k, log2_bs, quant_type, y, workspace, workspace_bytes, s);
        if (err != cudaSuccess)
            return qk::fail(QCKPT_E_INVALID, "gemm_4bit (%lld rows, Hopper kernel): %s", (long long)batch,
                            cudaGetErrorString(err));
        return qk::check_launch("gemm_4bit");
    }
    const TiledPlan plan = tiled_plan(batch, n_out, k);
    if (plan.workspace_bytes > 0 && (!workspace || workspace_bytes < plan.workspace_bytes))
        return qk::fail(QCKPT_E_INVALID, "fused 4-bit matmul of %lld rows needs a workspace of %lld bytes, got %lld",
                        (long long)batch, (long long)plan.workspace_bytes, (long long)(workspace ? workspace_bytes : 0));
    const cudaError_t err = dtype == QCKPT_BF16
        ? launch_tiled<__nv_bfloat16>(plan, x, (int)batch, packed, sc, n_out, k, log2_bs, quant_type, y, workspace, s)
        : launch_tiled<__half>(plan, x, (int)batch, packed, sc, n_out, k, log2_bs, quant_type, y, workspace, s);
    if (err != cudaSuccess) return qk::fail(QCKPT_E_INVALID, "gemm_4bit (%lld rows): %s", (long long)batch, cudaGetErrorString(err));
    return qk::check_launch("gemm_4bit");
}

extern "C" qckpt_status qckpt_cuda_gemm_4bit_scales_bytes(int64_t n_out, int64_t k, int64_t blocksize, int64_t *bytes) {
    if (!bytes) return qk::fail(QCKPT_E_INVALID, "NULL output pointer");
    const int log2_bs = qk::log2_exact(blocksize);
    *bytes = 0;
    if (n_out > 0 && log2_bs >= 5 && log2_bs <= 12 && qk::is_sm90() && qk::tma_gemm_supported(17, k, log2_bs))
        *bytes = qk::tma_scales_bytes(n_out, k, log2_bs);
    return QCKPT_OK;
}

extern "C" qckpt_status qckpt_cuda_gemm_4bit_expand_scales(const qckpt_cuda_scales *scales, int64_t n_out, int64_t k,
                                                           int64_t blocksize, float *out, void *stream) {
    int64_t bytes = 0;
    qckpt_status st = qckpt_cuda_gemm_4bit_scales_bytes(n_out, k, blocksize, &bytes);
    if (st != QCKPT_OK) return st;
    if (bytes == 0)
        return qk::fail(QCKPT_E_UNSUPPORTED, "no expanded scales for a %lld x %lld weight of blocksize %lld on this "
                        "device", (long long)n_out, (long long)k, (long long)blocksize);
    if (!out || !qk::aligned(out, 16)) return qk::fail(QCKPT_E_INVALID, "expanded scales must be 16-byte aligned");
    qk::Scales sc;
    st = qk::make_scales(scales, &sc);
    if (st != QCKPT_OK) return st;
    const cudaError_t err = qk::tma_expand_scales(sc, n_out, k, qk::log2_exact(blocksize), out, (cudaStream_t)stream);
    if (err != cudaSuccess) return qk::fail(QCKPT_E_INVALID, "expand scales: %s", cudaGetErrorString(err));
    return qk::check_launch("gemm_4bit_expand_scales");
}
