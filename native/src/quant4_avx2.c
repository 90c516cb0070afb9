/* quant4_avx2.c -- AVX2 + F16C variant of blockwise 4-bit quantize/dequantize, 8 lanes.
 * Same float32 operations as the scalar variant (bytes identical; tests/test_kernels_cpu.py).
 * Codes are counted with 15 (NF4) or 7 (FP4) strict compares against broadcast thresholds. */
#include "internal.h"

#ifdef QCKPT_HAVE_X86
#pragma GCC target("avx2,f16c,fma")
#include <immintrin.h>

#include "simd_avx2.h"

/* Compare masks are all-ones (-1) per true lane: subtracting them counts. */
static inline __m256i count_gt(__m256 v, const float *t, int count) {
    __m256i c = _mm256_setzero_si256();
    for (int i = 0; i < count; i++)
        c = _mm256_sub_epi32(c, _mm256_castps_si256(_mm256_cmp_ps(v, _mm256_set1_ps(t[i]), _CMP_GT_OQ)));
    return c;
}

static inline __m256i codes8(__m256 xn, int nf4, __m256i bucket_code) {
    if (nf4) return count_gt(xn, qk_nf4_thresholds, 15);
    __m256 mag = _mm256_and_ps(xn, _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF)));
    __m256i code = _mm256_permutevar8x32_epi32(bucket_code, count_gt(mag, qk_fp4_thresholds, 7));
    __m256i neg = _mm256_castps_si256(_mm256_cmp_ps(xn, _mm256_setzero_ps(), _CMP_LT_OQ));
    return _mm256_or_si256(code, _mm256_and_si256(neg, _mm256_set1_epi32(8)));
}

/* 8 codes -> 4 bytes, element 2j in the high nibble of byte j. */
static inline void pack_store(__m256i codes, uint8_t *dst) {
    __m256i pairs = _mm256_and_si256(_mm256_or_si256(_mm256_slli_epi64(codes, 4), _mm256_srli_epi64(codes, 32)),
                                     _mm256_set1_epi64x(0xFF));
    uint64_t lanes[4];
    _mm256_storeu_si256((__m256i *)lanes, pairs);
    for (int j = 0; j < 4; j++) dst[j] = (uint8_t)lanes[j];
}

int64_t qk_q4_quantize_avx2(const qk_q4_args *a, int64_t b0, int64_t b1) {
    const int64_t bs = a->blocksize, full = a->n / bs;
    const int nf4 = a->quant_type == QCKPT_NF4;
    int32_t bc[8];
    for (int i = 0; i < 8; i++) bc[i] = qk_fp4_bucket_code[i];
    const __m256i bucket_code = _mm256_loadu_si256((const __m256i *)bc);
    const __m256i abs_mask = _mm256_set1_epi32(0x7FFFFFFF);
    int64_t b = b0, stop = b1 < full ? b1 : full;
    for (; b < stop; b++) {
        const int64_t start = b * bs;
        __m256i max_bits = _mm256_setzero_si256();
        for (int64_t i = 0; i < bs; i += 8)
            max_bits = _mm256_max_epu32(max_bits,
                                        _mm256_and_si256(_mm256_castps_si256(qk_load8(a->x, a->dtype, start + i)), abs_mask));
        uint32_t lanes[8], mb = 0;
        _mm256_storeu_si256((__m256i *)lanes, max_bits);
        for (int j = 0; j < 8; j++) mb = lanes[j] > mb ? lanes[j] : mb;
        if (mb >= 0x7F800000u) return b;
        float amax = qk_bits_to_f32(mb);
        a->absmax[b] = amax;
        const __m256 r = _mm256_set1_ps(1.0f / amax);
        for (int64_t i = 0; i < bs; i += 8)
            pack_store(codes8(_mm256_mul_ps(qk_load8(a->x, a->dtype, start + i), r), nf4, bucket_code),
                       a->packed + (start + i) / 2);
    }
    if (b < b1) return qk_q4_quantize_scalar(a, b, b1);
    return -1;
}

void qk_q4_dequantize_avx2(const qk_q4_args *a, int64_t b0, int64_t b1) {
    const int64_t bs = a->blocksize, full = a->n / bs;
    const float *lut = a->quant_type == QCKPT_NF4 ? qk_nf4_lut : qk_fp4_lut;
    const __m256 lut_lo = _mm256_loadu_ps(lut), lut_hi = _mm256_loadu_ps(lut + 8);
    int64_t b = b0, stop = b1 < full ? b1 : full;
    for (; b < stop; b++) {
        const int64_t start = b * bs;
        const __m256 amax = _mm256_set1_ps(a->absmax_in[b]);
        for (int64_t i = 0; i < bs; i += 8) {
            uint32_t four;
            memcpy(&four, a->packed_in + (start + i) / 2, 4);
            __m256i bytes = _mm256_cvtepu8_epi64(_mm_cvtsi32_si128((int)four));
            __m256i codes = _mm256_or_si256(_mm256_srli_epi64(bytes, 4),
                                            _mm256_slli_epi64(_mm256_and_si256(bytes, _mm256_set1_epi64x(0x0F)), 32));
            /* 16-entry lookup from two 8-entry permutes, chosen by bit 3 of the code */
            __m256 lo = _mm256_permutevar8x32_ps(lut_lo, codes), hi = _mm256_permutevar8x32_ps(lut_hi, codes);
            __m256 sel = _mm256_castsi256_ps(_mm256_slli_epi32(codes, 28));
            qk_store8(a->out, a->out_dtype, start + i, _mm256_mul_ps(_mm256_blendv_ps(lo, hi, sel), amax));
        }
    }
    if (b < b1) qk_q4_dequantize_scalar(a, b, b1);
}
#endif
