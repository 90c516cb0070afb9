/* quant4_avx512.c -- AVX-512 (F+BW) variant of blockwise 4-bit quantize/dequantize, 16 lanes.
 * Same float32 operations in the same order as the scalar variant, so the bytes are identical
 * (tests/test_kernels_cpu.py compares every variant). Code selection is a branchless binary search
 * over the sorted thresholds with strict compares, i.e. "number of thresholds below x_n". */
#include "internal.h"

#ifdef QCKPT_HAVE_X86
#pragma GCC target("avx512f,avx512bw,avx512vl")
#include <immintrin.h>

#include "simd_avx512.h"

/* Number of entries of the sorted table t (padded to 16 with +inf) strictly below xn; steps
 * 8,4,2,1 cover 15 thresholds, 4,2,1 cover 7. NaN compares false throughout and gives 0. */
static inline __m512i count_below(__m512 xn, __m512 t, int steps_from) {
    __m512i idx = _mm512_setzero_si512();
    for (int step = steps_from; step >= 1; step >>= 1) {
        __m512i probe = _mm512_add_epi32(idx, _mm512_set1_epi32(step - 1));
        __mmask16 gt = _mm512_cmp_ps_mask(xn, _mm512_permutexvar_ps(probe, t), _CMP_GT_OQ);
        idx = _mm512_mask_add_epi32(idx, gt, idx, _mm512_set1_epi32(step));
    }
    return idx;
}

typedef struct {
    __m512 thresholds;
    __m512i bucket_code;
    int nf4;
} code_tables;

static inline __m512i codes16(__m512 xn, const code_tables *t) {
    if (t->nf4) return count_below(xn, t->thresholds, 8);
    __m512 mag = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(xn), _mm512_set1_epi32(0x7FFFFFFF)));
    __m512i code = _mm512_permutexvar_epi32(count_below(mag, t->thresholds, 4), t->bucket_code);
    __mmask16 neg = _mm512_cmp_ps_mask(xn, _mm512_setzero_ps(), _CMP_LT_OQ);
    return _mm512_mask_or_epi32(code, neg, code, _mm512_set1_epi32(8));
}

/* 16 codes (epi32) -> 8 bytes, element 2j in the high nibble of byte j. */
static inline void pack_store(__m512i codes, uint8_t *dst) {
    __m512i pairs = _mm512_or_si512(_mm512_slli_epi64(codes, 4), _mm512_srli_epi64(codes, 32));
    __m128i bytes = _mm512_cvtepi64_epi8(_mm512_and_si512(pairs, _mm512_set1_epi64(0xFF)));
    _mm_storel_epi64((__m128i *)dst, bytes);
}

int64_t qk_q4_quantize_avx512(const qk_q4_args *a, int64_t b0, int64_t b1) {
    const int64_t bs = a->blocksize, full = a->n / bs;
    code_tables t;
    t.nf4 = a->quant_type == QCKPT_NF4;
    float thr[16];
    for (int i = 0; i < 16; i++) thr[i] = qk_bits_to_f32(0x7F800000u); /* +inf padding */
    if (t.nf4) memcpy(thr, qk_nf4_thresholds, sizeof qk_nf4_thresholds);
    else memcpy(thr, qk_fp4_thresholds, sizeof qk_fp4_thresholds);
    t.thresholds = _mm512_loadu_ps(thr);
    int32_t bc[16] = {0};
    for (int i = 0; i < 8; i++) bc[i] = qk_fp4_bucket_code[i];
    t.bucket_code = _mm512_loadu_si512(bc);
    const __m512i abs_mask = _mm512_set1_epi32(0x7FFFFFFF);

    int64_t b = b0, stop = b1 < full ? b1 : full;
    for (; b < stop; b++) {
        const int64_t start = b * bs;
        __m512i max_bits = _mm512_setzero_si512();
        for (int64_t i = 0; i < bs; i += 16)
            max_bits = _mm512_max_epu32(max_bits,
                                        _mm512_and_si512(_mm512_castps_si512(qk_load16(a->x, a->dtype, start + i, 0xFFFF)), abs_mask));
        uint32_t mb = (uint32_t)_mm512_reduce_max_epu32(max_bits);
        if (mb >= 0x7F800000u) return b;
        float amax = qk_bits_to_f32(mb);
        a->absmax[b] = amax;
        const __m512 r = _mm512_set1_ps(1.0f / amax);
        for (int64_t i = 0; i < bs; i += 16)
            pack_store(codes16(_mm512_mul_ps(qk_load16(a->x, a->dtype, start + i, 0xFFFF), r), &t), a->packed + (start + i) / 2);
    }
    if (b < b1) return qk_q4_quantize_scalar(a, b, b1); /* the partial last block */
    return -1;
}

void qk_q4_dequantize_avx512(const qk_q4_args *a, int64_t b0, int64_t b1) {
    const int64_t bs = a->blocksize, full = a->n / bs;
    const __m512 lut = _mm512_loadu_ps(a->quant_type == QCKPT_NF4 ? qk_nf4_lut : qk_fp4_lut);
    int64_t b = b0, stop = b1 < full ? b1 : full;
    for (; b < stop; b++) {
        const int64_t start = b * bs;
        const __m512 amax = _mm512_set1_ps(a->absmax_in[b]);
        for (int64_t i = 0; i < bs; i += 16) {
            /* 8 bytes -> 8 x 64-bit lanes; low dword = high nibble (even element), high dword = low nibble */
            __m512i bytes = _mm512_cvtepu8_epi64(_mm_loadl_epi64((const __m128i *)(a->packed_in + (start + i) / 2)));
            __m512i codes = _mm512_or_si512(_mm512_srli_epi64(bytes, 4),
                                            _mm512_slli_epi64(_mm512_and_si512(bytes, _mm512_set1_epi64(0x0F)), 32));
            qk_store16(a->out, a->out_dtype, start + i, _mm512_mul_ps(_mm512_permutexvar_ps(codes, lut), amax), 0xFFFF);
        }
    }
    if (b < b1) qk_q4_dequantize_scalar(a, b, b1);
}
#endif
