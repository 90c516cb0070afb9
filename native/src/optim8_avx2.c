/* optim8_avx2.c -- AVX2 (+F16C) variant of the fused 8-bit AdamW step, 8 lanes: the same float32
 * operations in the same order as qk_adam8_scalar (optim8.c), so results are identical (compared in
 * tests/test_optim_kernel.py). Whole groups of 8 run here; each block's remainder runs the scalar
 * per-element code. Map lookups and the binary search use gathers; the bucket table when available. */
#include "optim8.h"

#ifdef QCKPT_HAVE_X86
#pragma GCC target("avx2,f16c")
#include <immintrin.h>

#include "simd_avx2.h"

static inline void store_codes8(uint8_t *dst, __m256i c) {
    __m256i b = _mm256_packus_epi16(_mm256_packus_epi32(c, c), _mm256_setzero_si256());
    uint32_t lo = (uint32_t)_mm_cvtsi128_si32(_mm256_castsi256_si128(b));
    uint32_t hi = (uint32_t)_mm256_extract_epi32(b, 4);
    memcpy(dst, &lo, 4);
    memcpy(dst + 4, &hi, 4);
}

/* qk_code_below: the same 8-level search, probes gathered. */
static inline __m256i codes8_search(__m256 x, const float *thr) {
    __m256i idx = _mm256_setzero_si256();
    for (int step = 128; step >= 1; step >>= 1) {
        __m256 probe = _mm256_i32gather_ps(thr, _mm256_add_epi32(idx, _mm256_set1_epi32(step - 1)), 4);
        __m256i lt = _mm256_castps_si256(_mm256_cmp_ps(probe, x, _CMP_LT_OQ));
        idx = _mm256_add_epi32(idx, _mm256_and_si256(lt, _mm256_set1_epi32(step)));
    }
    return idx;
}

/* qk_code_lut for 8 lanes (all integer compares are on values below 2^31, so signed ones serve). */
static inline __m256i codes8_lut(__m256 x, const uint32_t *lut) {
    const __m256i bits = _mm256_castps_si256(x);
    const __m256i mag = _mm256_and_si256(bits, _mm256_set1_epi32(0x7FFFFFFF));
    const __m256i neg = _mm256_srai_epi32(bits, 31);
    const __m256i nan = _mm256_cmpgt_epi32(mag, _mm256_set1_epi32(0x7F800000));
    __m256i key = _mm256_srli_epi32(mag, 16);
    key = _mm256_min_epi32(_mm256_max_epi32(key, _mm256_set1_epi32(QK_LUT_KEY_MIN)), _mm256_set1_epi32(QK_LUT_KEY_MAX));
    __m256i idx = _mm256_sub_epi32(key, _mm256_set1_epi32(QK_LUT_KEY_MIN));
    idx = _mm256_add_epi32(idx, _mm256_and_si256(neg, _mm256_set1_epi32(QK_LUT_BUCKETS)));
    const __m256i e = _mm256_i32gather_epi32((const int *)lut, idx, 4);
    const __m256i low16 = _mm256_set1_epi32(0xFFFF);
    const __m256i low = _mm256_and_si256(mag, low16), t = _mm256_and_si256(e, low16);
    const __m256i inc = _mm256_blendv_epi8(_mm256_cmpgt_epi32(low, t), _mm256_cmpgt_epi32(t, low), neg); /* -1 or 0 */
    const __m256i code = _mm256_sub_epi32(_mm256_srli_epi32(e, 16), inc);
    return _mm256_andnot_si256(nan, code);
}

static void quantize_block(const float *x, int64_t len, const float *thr, const uint32_t *lut, uint8_t *codes,
                           float *absmax) {
    const int64_t full = len & ~(int64_t)7;
    const __m256i abs_mask = _mm256_set1_epi32(0x7FFFFFFF);
    __m256i mb = _mm256_setzero_si256();
    for (int64_t i = 0; i < full; i += 8)
        mb = _mm256_max_epu32(mb, _mm256_and_si256(_mm256_loadu_si256((const __m256i *)(x + i)), abs_mask));
    uint32_t lanes[8], max_bits = 0;
    _mm256_storeu_si256((__m256i *)lanes, mb);
    for (int j = 0; j < 8; j++) max_bits = lanes[j] > max_bits ? lanes[j] : max_bits;
    for (int64_t i = full; i < len; i++) {
        uint32_t bits = qk_f32_to_bits(x[i]) & 0x7FFFFFFFu;
        max_bits = bits > max_bits ? bits : max_bits;
    }
    float amax = qk_bits_to_f32(max_bits);
    *absmax = amax;
    const float r = 1.0f / amax;
    const __m256 rv = _mm256_set1_ps(r);
    for (int64_t i = 0; i < full; i += 8) {
        __m256 xn = _mm256_mul_ps(_mm256_loadu_ps(x + i), rv);
        store_codes8(codes + i, lut ? codes8_lut(xn, lut) : codes8_search(xn, thr));
    }
    for (int64_t i = full; i < len; i++) codes[i] = lut ? qk_code_lut(lut, x[i] * r) : qk_code_below(thr, x[i] * r);
}

void qk_adam8_avx2(const qk_adam_args *a, int64_t b0, int64_t b1) {
    float mbuf[QK_OPTIM_MAX_BLOCK], vbuf[QK_OPTIM_MAX_BLOCK];
    const qckpt_adamw_hparams *hp = &a->hp;
    const __m256 beta1 = _mm256_set1_ps(hp->beta1), beta2 = _mm256_set1_ps(hp->beta2);
    const __m256 omb1 = _mm256_set1_ps(hp->one_minus_beta1), omb2 = _mm256_set1_ps(hp->one_minus_beta2);
    const __m256 eps = _mm256_set1_ps(hp->eps), step = _mm256_set1_ps(hp->step_size);
    const __m256 bc2 = _mm256_set1_ps(hp->bias_correction2_sqrt), decay = _mm256_set1_ps(hp->decay);
    const __m256 sign_flip = _mm256_castsi256_ps(_mm256_set1_epi32(hp->maximize ? (int32_t)0x80000000u : 0));
    for (int64_t b = b0; b < b1; b++) {
        const int64_t start = b * a->blocksize;
        const int64_t len = a->n - start < a->blocksize ? a->n - start : a->blocksize, full = len & ~(int64_t)7;
        const float am = a->m_absmax[b], av = a->v_absmax[b];
        const __m256 amv = _mm256_set1_ps(am), avv = _mm256_set1_ps(av);
        for (int64_t i = 0; i < full; i += 8) {
            const int64_t k = start + i;
            __m256i mc = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(a->m_codes + k)));
            __m256i vc = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(a->v_codes + k)));
            __m256 m0 = _mm256_mul_ps(_mm256_i32gather_ps(a->m_map, mc, 4), amv);
            __m256 v0 = _mm256_mul_ps(_mm256_i32gather_ps(a->v_map, vc, 4), avv);
            __m256 g = _mm256_xor_ps(qk_load8(a->grad, a->grad_dtype, k), sign_flip);
            __m256 m = _mm256_add_ps(_mm256_mul_ps(m0, beta1), _mm256_mul_ps(g, omb1));
            __m256 v = _mm256_add_ps(_mm256_mul_ps(v0, beta2), _mm256_mul_ps(_mm256_mul_ps(g, g), omb2));
            __m256 denom = _mm256_add_ps(_mm256_div_ps(_mm256_sqrt_ps(v), bc2), eps);
            __m256 p = _mm256_mul_ps(qk_load8(a->param, a->param_dtype, k), decay);
            p = _mm256_sub_ps(p, _mm256_mul_ps(step, _mm256_div_ps(m, denom)));
            qk_store8(a->param, a->param_dtype, k, p);
            _mm256_storeu_ps(mbuf + i, m);
            _mm256_storeu_ps(vbuf + i, v);
        }
        for (int64_t i = full; i < len; i++) {
            int64_t k = start + i;
            mbuf[i] = a->m_map[a->m_codes[k]] * am;
            vbuf[i] = a->v_map[a->v_codes[k]] * av;
            float p = qk_adam_update(hp, qk_load_f32(a->grad, a->grad_dtype, k), &mbuf[i], &vbuf[i],
                                     qk_load_f32(a->param, a->param_dtype, k));
            qk_store(a->param, a->param_dtype, k, p);
        }
        quantize_block(mbuf, len, a->m_thr, a->use_lut ? a->m_lut : NULL, a->m_codes + start, &a->m_absmax[b]);
        quantize_block(vbuf, len, a->v_thr, a->use_lut ? a->v_lut : NULL, a->v_codes + start, &a->v_absmax[b]);
    }
}
#endif
