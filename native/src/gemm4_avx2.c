/* gemm4_avx2.c -- AVX2+FMA rows of the fused 4-bit dequantize + matmul (qckpt_gemm_4bit), for CPUs
 * without AVX-512 (most laptops). Same structure as gemm4_avx512.c: y (batch, n_out) = x (batch, k) @
 * dequant(W (n_out, k))^T for k % 32 == 0 and blocksize % 32 == 0; x rows in groups of up to 4, each
 * 32-code chunk decoded once per group, block sums scaled once per block. The 16-entry code table is
 * looked up with two 8-entry vpermps and a blend on bit 3 of the code.
 * Tested against dequantize + matmul with the variant forced (tests/test_runtime_kernels.py). */
#include "gemm4.h"

#ifdef QCKPT_HAVE_X86
#pragma GCC target("avx2,fma")
#include <immintrin.h>

static inline __m256 lut16(__m256i idx, __m256 lo, __m256 hi) {
    const __m256 a = _mm256_permutevar8x32_ps(lo, idx); /* uses idx & 7 */
    const __m256 b = _mm256_permutevar8x32_ps(hi, idx);
    return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28))); /* bit 3 -> sign */
}

/* 16 packed bytes -> the code-table values of their 32 nibbles (high nibble first), 4 x 8 floats. */
static inline void decode32(const uint8_t *p, __m256 lo, __m256 hi, __m256 v[4]) {
    const __m128i mask = _mm_set1_epi8(0x0F);
    const __m128i bytes = _mm_loadu_si128((const __m128i *)p);
    const __m128i h = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask), l = _mm_and_si128(bytes, mask);
    const __m128i e0 = _mm_unpacklo_epi8(h, l), e1 = _mm_unpackhi_epi8(h, l);
    v[0] = lut16(_mm256_cvtepu8_epi32(e0), lo, hi);
    v[1] = lut16(_mm256_cvtepu8_epi32(_mm_srli_si128(e0, 8)), lo, hi);
    v[2] = lut16(_mm256_cvtepu8_epi32(e1), lo, hi);
    v[3] = lut16(_mm256_cvtepu8_epi32(_mm_srli_si128(e1, 8)), lo, hi);
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* `nb` (1..4) is a constant at every call site, so the loops over x rows unroll. */
static inline void row_dot_small(const qk_gemm4_args *a, int64_t r, __m256 lo, __m256 hi, const int nb,
                                 const float *x, float *out) {
    const int64_t k = a->k, bs = a->blocksize, flat = r * k;
    const uint8_t *p = a->packed + flat / 2;
    __m256 acc[4];
    for (int j = 0; j < nb; j++) acc[j] = _mm256_setzero_ps();
    int64_t c = 0;
    while (c < k) {
        const int64_t block = (flat + c) / bs;
        int64_t end = (block + 1) * bs - flat;
        if (end > k) end = k;
        __m256 part[4][2];
        for (int j = 0; j < nb; j++) part[j][0] = part[j][1] = _mm256_setzero_ps();
        for (; c < end; c += 32) {
            __m256 v[4];
            decode32(p + c / 2, lo, hi, v);
            for (int j = 0; j < nb; j++) {
                const float *xj = x + j * k + c;
                part[j][0] = _mm256_fmadd_ps(v[0], _mm256_loadu_ps(xj), part[j][0]);
                part[j][1] = _mm256_fmadd_ps(v[1], _mm256_loadu_ps(xj + 8), part[j][1]);
                part[j][0] = _mm256_fmadd_ps(v[2], _mm256_loadu_ps(xj + 16), part[j][0]);
                part[j][1] = _mm256_fmadd_ps(v[3], _mm256_loadu_ps(xj + 24), part[j][1]);
            }
        }
        const __m256 scale = _mm256_set1_ps(a->absmax[block]);
        for (int j = 0; j < nb; j++) acc[j] = _mm256_fmadd_ps(_mm256_add_ps(part[j][0], part[j][1]), scale, acc[j]);
    }
    for (int j = 0; j < nb; j++) out[j] = hsum(acc[j]);
}

void qk_gemm4_rows_avx2(const qk_gemm4_args *a, int64_t r0, int64_t r1, float *w) {
    (void)w;
    const __m256 lo = _mm256_loadu_ps(a->lut), hi = _mm256_loadu_ps(a->lut + 8);
    const int64_t n = a->n_out, k = a->k;
    float out[4];
    for (int64_t b0 = 0; b0 < a->batch; b0 += 4) {
        const int64_t nb = a->batch - b0 < 4 ? a->batch - b0 : 4;
        const float *x = a->x + b0 * k;
        for (int64_t r = r0; r < r1; r++) {
            switch (nb) {
            case 1: row_dot_small(a, r, lo, hi, 1, x, out); break;
            case 2: row_dot_small(a, r, lo, hi, 2, x, out); break;
            case 3: row_dot_small(a, r, lo, hi, 3, x, out); break;
            default: row_dot_small(a, r, lo, hi, 4, x, out); break;
            }
            for (int64_t j = 0; j < nb; j++) a->y[(b0 + j) * n + r] = out[j];
        }
    }
}
#endif
