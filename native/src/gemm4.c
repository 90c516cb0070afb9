/* gemm4.c -- fused 4-bit dequantize + matmul for small batches (the runtime's CPU decode path).
 * y (batch, n_out) = x (batch, k) @ dequant(W (n_out, k))^T. Each worker owns a range of output rows;
 * a row is dequantized to float32 into a private buffer (exactly as qckpt_dequantize_4bit does), then
 * dotted with every x row while it is hot in L1. The AVX-512 and AVX2 rows (gemm4_avx512.c,
 * gemm4_avx2.c) take shapes whose rows split into 32-element chunks inside one block; everything else
 * runs the scalar rows here.
 * Tested against dequantize + torch matmul (tests/test_runtime_kernels.py). */
#include <stdlib.h>

#include "gemm4.h"

typedef struct {
    qk_gemm4_args a;
    int32_t isa;
    int failed;
} gemm_job;

static float dot(const float *a, const float *b, int64_t k) {
    float acc[16] = {0};
    int64_t i = 0;
    for (; i + 16 <= k; i += 16)
        for (int j = 0; j < 16; j++) acc[j] += a[i + j] * b[i + j];
    float s = 0.0f;
    for (; i < k; i++) s += a[i] * b[i];
    for (int j = 0; j < 16; j++) s += acc[j];
    return s;
}

static void scalar_rows(const qk_gemm4_args *a, int64_t r0, int64_t r1, float *w) {
    const int64_t k = a->k, bs = a->blocksize;
    for (int64_t r = r0; r < r1; r++) {
        const int64_t base = r * k;
        for (int64_t c = 0; c < k; c++) {
            int64_t i = base + c;
            uint8_t byte = a->packed[i >> 1];
            w[c] = a->lut[(i & 1) ? (byte & 0x0F) : (byte >> 4)] * a->absmax[i / bs];
        }
        for (int64_t b = 0; b < a->batch; b++) a->y[b * a->n_out + r] = dot(a->x + b * k, w, k);
    }
}

static void gemm_rows(void *ctx, int64_t r0, int64_t r1, int32_t worker) {
    (void)worker;
    gemm_job *job = (gemm_job *)ctx;
    float *w = (float *)malloc((size_t)job->a.k * sizeof(float));
    if (!w) {
        job->failed = 1;
        return;
    }
#ifdef QCKPT_HAVE_X86
    const int simd_shape = job->a.k % 32 == 0 && job->a.blocksize % 32 == 0;
    if (simd_shape && job->isa == QCKPT_ISA_AVX512)
        qk_gemm4_rows_avx512(&job->a, r0, r1, w);
    else if (simd_shape && job->isa == QCKPT_ISA_AVX2)
        qk_gemm4_rows_avx2(&job->a, r0, r1, w);
    else
#endif
        scalar_rows(&job->a, r0, r1, w);
    free(w);
}

qckpt_status qckpt_gemm_4bit(const float *x, int64_t batch, const uint8_t *packed, const float *absmax,
                             int64_t n_out, int64_t k, int64_t blocksize, int32_t quant_type, float *y,
                             const qckpt_exec *exec) {
    int32_t threads, isa;
    qckpt_status st = qckpt_resolve_exec(exec, &threads, &isa);
    if (st != QCKPT_OK) return st;
    if (!x || !packed || !absmax || !y) return qckpt_fail(QCKPT_E_INVALID, "NULL data pointer");
    if (batch <= 0 || n_out <= 0 || k <= 0)
        return qckpt_fail(QCKPT_E_INVALID, "shapes must be positive: batch %lld, n_out %lld, k %lld", (long long)batch,
                          (long long)n_out, (long long)k);
    if (blocksize < 1) return qckpt_fail(QCKPT_E_INVALID, "blocksize must be positive");
    if (quant_type != QCKPT_NF4 && quant_type != QCKPT_FP4)
        return qckpt_fail(QCKPT_E_INVALID, "unknown 4-bit quant type %d", quant_type);
    gemm_job job = {.a = {.x = x, .batch = batch, .n_out = n_out, .k = k, .blocksize = blocksize, .packed = packed,
                          .absmax = absmax, .lut = quant_type == QCKPT_NF4 ? qk_nf4_lut : qk_fp4_lut, .y = y},
                    .isa = isa};
    /* Grain: at least ~64K multiply-adds per worker, so small layers are not split over threads
     * whose start-up (~20 us) would cost more than the work. */
    st = qckpt_parallel_for(n_out, qk_ceil_div(65536, k * batch), threads, gemm_rows, &job);
    if (st == QCKPT_OK && job.failed) return qckpt_fail(QCKPT_E_NOMEM, "out of memory for a %lld-float row", (long long)k);
    return st;
}
