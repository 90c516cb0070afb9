/* simd_avx512.h -- 16-lane dtype loads/stores shared by the AVX-512 variants, masked to the first lanes
 * of `k` (pass 0xFFFF for a whole group: a constant mask folds to plain loads, which measured faster on
 * streaming data than masked ones). Include after `#pragma GCC target("avx512f,avx512bw,avx512vl")` and
 * <immintrin.h>. Stores round exactly like qk_store in internal.h. */
#ifndef QCKPT_SIMD_AVX512_H
#define QCKPT_SIMD_AVX512_H

static inline __m512 qk_load16(const void *x, int32_t dtype, int64_t i, __mmask16 k) {
    if (k == 0xFFFF) {
        switch (dtype) {
        case QCKPT_F32: return _mm512_loadu_ps((const float *)x + i);
        case QCKPT_F16: return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)x + i)));
        default: {
            __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)x + i));
            return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
        }
        }
    }
    switch (dtype) {
    case QCKPT_F32: return _mm512_maskz_loadu_ps(k, (const float *)x + i);
    case QCKPT_F16: return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, (const uint16_t *)x + i));
    default: {
        __m256i h = _mm256_maskz_loadu_epi16(k, (const uint16_t *)x + i);
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    }
}

static inline void qk_store16(void *out, int32_t dtype, int64_t i, __m512 v, __mmask16 k) {
    switch (dtype) {
    case QCKPT_F32:
        if (k == 0xFFFF) _mm512_storeu_ps((float *)out + i, v);
        else _mm512_mask_storeu_ps((float *)out + i, k, v);
        break;
    case QCKPT_F16:
        _mm256_mask_storeu_epi16((uint16_t *)out + i, k, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        break;
    default: {
        __m512i bits = _mm512_castps_si512(v);
        __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
        __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
        __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        rounded = _mm512_mask_mov_epi32(rounded, nan, _mm512_set1_epi32(0x7FC0));
        _mm256_mask_storeu_epi16((uint16_t *)out + i, k, _mm512_cvtepi32_epi16(rounded));
    }
    }
}

#endif /* QCKPT_SIMD_AVX512_H */
