/* gemm4_avx512.c -- AVX-512 (F+BW) rows of the fused 4-bit dequantize + matmul (qckpt_gemm_4bit).
 * y (batch, n_out) = x (batch, k) @ dequant(W (n_out, k))^T, for weights whose rows split into whole
 * 32-element chunks that each sit inside one block (k % 32 == 0, blocksize % 32 == 0); gemm4.c routes
 * other shapes to the scalar rows. 16 packed bytes -> 32 nibbles -> two vpermps lookups of the 16-entry
 * code table. Up to 4 x rows accumulate each block's code*x products and scale once per block (fewer
 * multiplies than dequantize-then-dot: the same value up to float32 rounding order); more rows
 * dequantize the weight row once (exactly as qckpt_dequantize_4bit: LUT * absmax) and dot it with them.
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

static void dequant_row(const qk_gemm4_args *a, int64_t r, __m512 lut, float *w) {
    const int64_t k = a->k, bs = a->blocksize, flat = r * k;
    const uint8_t *p = a->packed + flat / 2;
    for (int64_t c = 0; c < k; c += 32) {
        const __m512 scale = _mm512_set1_ps(a->absmax[(flat + c) / bs]);
        __m512 v0, v1;
        decode32(p + c / 2, lut, &v0, &v1);
        _mm512_storeu_ps(w + c, _mm512_mul_ps(v0, scale));
        _mm512_storeu_ps(w + c + 16, _mm512_mul_ps(v1, scale));
    }
}

static float dot32(const float *w, const float *x, int64_t k) {
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    for (int64_t c = 0; c < k; c += 32) {
        acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + c), _mm512_loadu_ps(x + c), acc0);
        acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(w + c + 16), _mm512_loadu_ps(x + c + 16), acc1);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}

/* Four x rows against one dequantized w row: each w load feeds four multiply-adds. */
static void dot32x4(const float *w, const float *x, int64_t k, float *out) {
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    __m512 acc2 = _mm512_setzero_ps(), acc3 = _mm512_setzero_ps();
    for (int64_t c = 0; c < k; c += 16) {
        const __m512 wv = _mm512_loadu_ps(w + c);
        acc0 = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + c), acc0);
        acc1 = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + k + c), acc1);
        acc2 = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + 2 * k + c), acc2);
        acc3 = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + 3 * k + c), acc3);
    }
    out[0] = _mm512_reduce_add_ps(acc0);
    out[1] = _mm512_reduce_add_ps(acc1);
    out[2] = _mm512_reduce_add_ps(acc2);
    out[3] = _mm512_reduce_add_ps(acc3);
}

/* Rows [r0, r1). Up to 4 x rows: decode once per chunk and multiply in registers. More rows: dequantize
 * each weight row once into `w` (a k-float scratch row) and dot it with 4 x rows at a time. */
void qk_gemm4_rows_avx512(const qk_gemm4_args *a, int64_t r0, int64_t r1, float *w) {
    const __m512 lut = _mm512_loadu_ps(a->lut);
    const int64_t n = a->n_out;
    float out[4];
    if (a->batch <= 4) {
        for (int64_t r = r0; r < r1; r++) {
            switch (a->batch) { /* constant nb per case: the inner loops unroll */
            case 1: row_dot_small(a, r, lut, 1, a->x, out); break;
            case 2: row_dot_small(a, r, lut, 2, a->x, out); break;
            case 3: row_dot_small(a, r, lut, 3, a->x, out); break;
            default: row_dot_small(a, r, lut, 4, a->x, out); break;
            }
            for (int64_t b = 0; b < a->batch; b++) a->y[b * n + r] = out[b];
        }
        return;
    }
    for (int64_t r = r0; r < r1; r++) {
        dequant_row(a, r, lut, w);
        int64_t b = 0;
        for (; b + 4 <= a->batch; b += 4) {
            dot32x4(w, a->x + b * a->k, a->k, out);
            for (int j = 0; j < 4; j++) a->y[(b + j) * n + r] = out[j];
        }
        for (; b < a->batch; b++) a->y[b * n + r] = dot32(w, a->x + b * a->k, a->k);
    }
}
#endif
