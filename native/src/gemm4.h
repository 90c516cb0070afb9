/* gemm4.h -- private to the fused 4-bit matmul (gemm4.c and its ISA variants): the work description
 * and the variant entry points. Not part of the ABI (see qckpt.h). */
#ifndef QCKPT_GEMM4_H
#define QCKPT_GEMM4_H

#include "internal.h"

typedef struct {
    const float *x;       /* (batch, k) float32 */
    int64_t batch, n_out, k, blocksize;
    const uint8_t *packed; /* flattened W (n_out, k), two codes per byte, high nibble first */
    const float *absmax;   /* one float32 scale per block of the flattened W */
    const float *lut;      /* the 16-entry code table */
    float *y;              /* (batch, n_out) */
} qk_gemm4_args;

#ifdef QCKPT_HAVE_X86
/* Rows [r0, r1) of y; need k % 32 == 0 and blocksize % 32 == 0; `w` is a k-float scratch row. */
void qk_gemm4_rows_avx512(const qk_gemm4_args *a, int64_t r0, int64_t r1, float *w);
void qk_gemm4_rows_avx2(const qk_gemm4_args *a, int64_t r0, int64_t r1, float *w);
#endif

#endif /* QCKPT_GEMM4_H */
