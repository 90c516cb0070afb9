/* gemm4_tma_sm90a.cu -- launcher of the Hopper prefill matmul (kernels/gemm4_tma.cuh). native/ffi/build_cuda.py
 * builds files named *_sm90a.cu for sm_90a in place of sm_90; for other targets the kernels are traps that
 * gemm4.cu never launches. Shapes as scripts/cuda_tune/gemm4_sweep.cu --tma measured fastest on an H100
 * (scripts/BENCHMARKS.md): a tile of 128 output rows by 32, 64 or 128 batch rows (8, 6 and 8 stages), k
 * split so that the grid covers the multiprocessors. */
#include <algorithm>

#include "gemm4_tma.h"

#if CUDART_VERSION >= 12000 /* tensor maps and sm_90a came with CUDA 12; older toolkits get the stubs below */
#include "kernels/gemm4_tma.cuh"

namespace qk {
namespace {

using TmaSmall = WgmmaShape<32, 2, 1, 8>;
using TmaMedium = WgmmaShape<64, 2, 1, 6>;
using TmaLarge = WgmmaShape<128, 2, 1, 8>;
static_assert(TmaSmall::BM == TmaLarge::BM && TmaMedium::BM == TmaLarge::BM, "one output tile height: tma_splits");

/* a row of the expand kernel's grid covers JB x kExpandRows blocks of k (JB 4 or 1): this checks JB = 1,
 * the tallest grid, so that launch_expand_scales never refuses a shape this accepts */
bool grid_too_tall(int64_t blocks_per_row) { return ceil_div(blocks_per_row, kExpandRows) > 65535; }

int tile_rows(int64_t batch) { return batch <= 32 ? TmaSmall::BN : batch <= 64 ? TmaMedium::BN : TmaLarge::BN; }

/* output tiles of a call: 128 output rows by tile_rows(batch) batch rows */
int64_t tma_tiles(int64_t batch, int64_t n_out) {
    return ceil_div(n_out, TmaLarge::BM) * ceil_div(batch, tile_rows(batch));
}

/* k splits: enough blocks for one per multiprocessor, at most 4 (each split's partial sums are read back by
 * the tile's last block) */
int tma_splits(int64_t batch, int64_t n_out, int64_t k) {
    return std::min(tiled_splits(tma_tiles(batch, n_out), k / 64, sm_count(), 1), 4);
}

/* the expanded scales' row stride: n_out rounded up to 4 floats (TMA wants 16-byte aligned rows) */
int64_t scale_ld(int64_t n_out) { return (n_out + 3) / 4 * 4; }

/* Where the expanded scales start in the workspace: after the tile counters (which must stay zero for the
 * next call, split or not) and this call's partial sums, at a 128-byte boundary (TMA wants the base of a
 * tensor 16-byte aligned). */
int64_t scales_offset(int splits, int64_t batch, int64_t n_out) {
    const int64_t partials =
        split_k_workspace_bytes(splits, tma_tiles(batch, n_out), int64_t(TmaLarge::BM) * tile_rows(batch));
    const int64_t end = std::max<int64_t>(kTiledMaxCounters * 4, partials);
    return (end + 127) / 128 * 128;
}

template <typename T, typename Shape>
cudaError_t launch(const void *x, int batch, const uint8_t *packed, const Scales &sc, const float *expanded,
                   int64_t n_out, int64_t k, int log2_bs, int qt, void *y, void *workspace, int splits, cudaStream_t s) {
    return launch_gemm_4bit_tma<T, Shape, kLutLane, 1>(static_cast<const T *>(x), batch, packed, expanded,
                                                      scale_ld(n_out), sc, n_out, k, log2_bs, qt, static_cast<T *>(y),
                                                      splits, splits > 1 ? workspace : nullptr, s);
}

template <typename T>
cudaError_t launch_rows(const void *x, int batch, const uint8_t *packed, const Scales &sc, const float *expanded,
                        int64_t n_out, int64_t k, int log2_bs, int qt, void *y, void *workspace, int splits,
                        cudaStream_t s) {
    if (batch <= TmaSmall::BN)
        return launch<T, TmaSmall>(x, batch, packed, sc, expanded, n_out, k, log2_bs, qt, y, workspace, splits, s);
    if (batch <= TmaMedium::BN)
        return launch<T, TmaMedium>(x, batch, packed, sc, expanded, n_out, k, log2_bs, qt, y, workspace, splits, s);
    return launch<T, TmaLarge>(x, batch, packed, sc, expanded, n_out, k, log2_bs, qt, y, workspace, splits, s);
}

}  // namespace

bool tma_gemm_supported(int64_t batch, int64_t k, int log2_bs) {
#if !QCKPT_HAVE_SM90A
    return false; /* the build has no sm_90a code: on an H100 the kernel would be the PTX's trap */
#endif
    return batch > 16 && batch <= TmaLarge::BN && k % 64 == 0 && (k & ((int64_t(1) << log2_bs) - 1)) == 0 &&
           k < (int64_t(1) << 31) && !grid_too_tall(k >> log2_bs);
}

int64_t tma_gemm_workspace_bytes(int64_t batch, int64_t n_out, int64_t k, bool scales_given) {
    const int64_t splits_bytes = scales_offset(tma_splits(batch, n_out, k), batch, n_out);
    return scales_given ? splits_bytes : splits_bytes + (k / 32) * scale_ld(n_out) * 4; /* blocksize 32: most blocks */
}

int64_t tma_gemm_zeroed_bytes(int64_t batch, int64_t n_out, int64_t k, bool scales_given) {
    return scales_given && tma_splits(batch, n_out, k) > 1 ? kTiledMaxCounters * 4 : 0;
}

int64_t tma_scales_bytes(int64_t n_out, int64_t k, int log2_bs) { return (k >> log2_bs) * scale_ld(n_out) * 4; }

cudaError_t tma_expand_scales(const Scales &scales, int64_t n_out, int64_t k, int log2_bs, float *out, cudaStream_t s,
                              int *clear, int clear_count) {
    if (grid_too_tall(k >> log2_bs)) return cudaErrorInvalidValue;
    return launch_expand_scales(scales, n_out, k, log2_bs, scale_ld(n_out), out, s, clear, clear_count);
}

cudaError_t tma_gemm_launch(const void *x, bool bf16, int batch, const uint8_t *packed, const Scales &scales,
                            const float *expanded, int64_t n_out, int64_t k, int log2_bs, int quant_type, void *y,
                            void *workspace, int64_t workspace_bytes, cudaStream_t s) {
    if (!workspace || workspace_bytes < tma_gemm_workspace_bytes(batch, n_out, k, expanded != nullptr) ||
        grid_too_tall(k >> log2_bs))
        return cudaErrorInvalidValue;
    const int splits = tma_splits(batch, n_out, k);
    if (!expanded) { /* made here, after the counters and this call's partial sums; the counters zeroed too */
        float *made = reinterpret_cast<float *>(static_cast<unsigned char *>(workspace) + scales_offset(splits, batch, n_out));
        const cudaError_t err = tma_expand_scales(scales, n_out, k, log2_bs, made, s, static_cast<int *>(workspace),
                                                  splits > 1 ? int(tma_tiles(batch, n_out)) : 0);
        if (err != cudaSuccess) return err;
        expanded = made;
    }
    return bf16 ? launch_rows<__nv_bfloat16>(x, batch, packed, scales, expanded, n_out, k, log2_bs, quant_type, y,
                                             workspace, splits, s)
                : launch_rows<__half>(x, batch, packed, scales, expanded, n_out, k, log2_bs, quant_type, y, workspace,
                                      splits, s);
}

}  // namespace qk

#else

namespace qk {
bool tma_gemm_supported(int64_t, int64_t, int) { return false; }
int64_t tma_gemm_workspace_bytes(int64_t, int64_t, int64_t, bool) { return 0; }
int64_t tma_gemm_zeroed_bytes(int64_t, int64_t, int64_t, bool) { return 0; }
int64_t tma_scales_bytes(int64_t, int64_t, int) { return 0; }
cudaError_t tma_expand_scales(const Scales &, int64_t, int64_t, int, float *, cudaStream_t, int *, int) {
    return cudaErrorNotSupported;
}
cudaError_t tma_gemm_launch(const void *, bool, int, const uint8_t *, const Scales &, const float *, int64_t, int64_t,
                            int, int, void *, void *, int64_t, cudaStream_t) {
    return cudaErrorNotSupported;
}
}  // namespace qk

#endif
