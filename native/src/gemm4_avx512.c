/* gemm4_avx512.c -- AVX-512 (F+BW) rows of the fused 4-bit dequantize + matmul (qckpt_gemm_4bit).
 * y (batch, n_out) = x (batch, k) @ dequant(W (n_out, k))^T, for weights whose rows split into whole
 * 32-element chunks that each sit inside one block (k % 32 == 0, blocksize % 32 == 0); gemm4.c routes
 * other shapes to the scalar rows. 16 packed bytes -> 32 nibbles -> two vpermps lookups of the 16-entry
 * code table. For each group of up to 4 x rows, every block's code*x products accumulate unscaled and
 * are scaled once per block (fewer multiplies than dequantize-then-dot: the same value up to float32
 * rounding order).
 * Tested against dequantize + torch matmul within a stated tolerance (tests/test_runtime_kernels.py). */
#include "gemm4.h"

#ifdef QCKPT_HAVE_X86
#pragma GCC target("avx512f,avx512bw,avx512vl")
#include <immintrin.h>

/* 16 packed bytes -> the code-table values of their 32 nibbles (high nibble first). */
static inline void decode32(const uint8_t *p, __m512 lut, __m512 *v0, __m512 *v1) {
    const __m128i mask = _mm_set1_epi8(0x0F);
    __m128i bytes = _mm_loadu_si128((const __m128i *)p);
    __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
    __m128i lo = _mm_and_si128(bytes, mask);
    *v0 = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(hi, lo)), lut);
    *v1 = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_unpackhi_epi8(hi, lo)), lut);
}

/* Up to 4 x rows against one weight row, decoding each 32-code chunk once: per x row, the block's
 * code*x products accumulate unscaled and are scaled once at the block end. `nb` is a compile-time
 * constant at every call site, so the loops over it unroll and the accumulators stay in registers. */
static inline void row_dot_small(const qk_gemm4_args *a, int64_t r, __m512 lut, const int nb, const float *x,
                                 float *out) {
    const int64_t k = a->k, bs = a->blocksize, flat = r * k;
    const uint8_t *p = a->packed + flat / 2;
    __m512 acc[4][2];
    for (int j = 0; j < nb; j++) acc[j][0] = acc[j][1] = _mm512_setzero_ps();
    int64_t c = 0;
    while (c < k) {
        const int64_t block = (flat + c) / bs;
        int64_t end = (block + 1) * bs - flat;
        if (end > k) end = k;
        __m512 part[4][2];
        for (int j = 0; j < nb; j++) part[j][0] = part[j][1] = _mm512_setzero_ps();
        for (; c < end; c += 32) {
            __m512 v0, v1;
            decode32(p + c / 2, lut, &v0, &v1);
            for (int j = 0; j < nb; j++) {
                part[j][0] = _mm512_fmadd_ps(v0, _mm512_loadu_ps(x + j * k + c), part[j][0]);
                part[j][1] = _mm512_fmadd_ps(v1, _mm512_loadu_ps(x + j * k + c + 16), part[j][1]);
            }
        }
        const __m512 scale = _mm512_set1_ps(a->absmax[block]);
        for (int j = 0; j < nb; j++) {
            acc[j][0] = _mm512_fmadd_ps(part[j][0], scale, acc[j][0]);
            acc[j][1] = _mm512_fmadd_ps(part[j][1], scale, acc[j][1]);
        }
    }
    for (int j = 0; j < nb; j++) out[j] = _mm512_reduce_add_ps(_mm512_add_ps(acc[j][0], acc[j][1]));
}

/* Rows [r0, r1), x rows in groups of 4: the group's x (4 * k floats) stays in cache while the weight
 * rows stream past once per group; each 32-code chunk is decoded once per group. `w` is unused here
 * (the scalar rows need it). */
void qk_gemm4_rows_avx512(const qk_gemm4_args *a, int64_t r0, int64_t r1, float *w) {
    (void)w;
    const __m512 lut = _mm512_loadu_ps(a->lut);
    const int64_t n = a->n_out, k = a->k;
    float out[4];
    for (int64_t b0 = 0; b0 < a->batch; b0 += 4) {
        const int64_t nb = a->batch - b0 < 4 ? a->batch - b0 : 4;
        const float *x = a->x + b0 * k;
        for (int64_t r = r0; r < r1; r++) {
            switch (nb) { /* a constant per case: the loops over x rows unroll */
            case 1: row_dot_small(a, r, lut, 1, x, out); break;
            case 2: row_dot_small(a, r, lut, 2, x, out); break;
            case 3: row_dot_small(a, r, lut, 3, x, out); break;
            default: row_dot_small(a, r, lut, 4, x, out); break;
            }
            for (int64_t j = 0; j < nb; j++) a->y[(b0 + j) * n + r] = out[j];
        }
    }
}
#endif
