/* gemm4_tma.h -- the Hopper prefill matmul (kernels/gemm4_tma.cuh) as gemm4.cu calls it. Defined in
 * gemm4_tma_sm90a.cu, which the build compiles for sm_90a (the wgmma and TMA instructions exist only there);
 * callers take this path only on devices of compute capability 9.0. */
#ifndef QCKPT_CUDA_GEMM4_TMA_H
#define QCKPT_CUDA_GEMM4_TMA_H

#include "common.cuh"

namespace qk {

/* Whether the Hopper kernel takes this call: 17..128 rows, K a multiple of 64 and of the blocksize. */
bool tma_gemm_supported(int64_t batch, int64_t k, int log2_bs);
/* Workspace bytes of such a call for any blocksize: split-K counters and partial sums, then (unless the call
 * passes them, scales_given) room to expand the block scales for TMA. */
int64_t tma_gemm_workspace_bytes(int64_t batch, int64_t n_out, int64_t k, bool scales_given);
/* Leading workspace bytes such a call needs zero on entry (the split-K tile counters, which every call leaves
 * zero): none when it does not split k, nor without given scales, where the kernel that makes them in the
 * workspace zeroes the counters first. */
int64_t tma_gemm_zeroed_bytes(int64_t batch, int64_t n_out, int64_t k, bool scales_given);
/* Bytes of a weight's expanded scales (one float32 per block, rows of n_out rounded up to 4). */
int64_t tma_scales_bytes(int64_t n_out, int64_t k, int log2_bs);
/* Fill `out` (tma_scales_bytes) with the weight's expanded scales on `s`, zeroing clear[0, clear_count) too. */
cudaError_t tma_expand_scales(const Scales &scales, int64_t n_out, int64_t k, int log2_bs, float *out, cudaStream_t s,
                              int *clear = nullptr, int clear_count = 0);
/* Launch on `s` (x and y bfloat16 when bf16, else float16); expanded: the weight's expanded scales, or NULL to
 * make them in the workspace first. cudaErrorInvalidValue when the workspace is too small or the driver
 * refuses the tensor maps. */
cudaError_t tma_gemm_launch(const void *x, bool bf16, int batch, const uint8_t *packed, const Scales &scales,
                            const float *expanded, int64_t n_out, int64_t k, int log2_bs, int quant_type, void *y,
                            void *workspace, int64_t workspace_bytes, cudaStream_t s);

}  // namespace qk

#endif /* QCKPT_CUDA_GEMM4_TMA_H */
