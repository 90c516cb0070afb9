/* simd_avx2.h -- 8-lane dtype loads/stores shared by the AVX2 variants. Include it after
 * `#pragma GCC target("avx2,f16c")` and <immintrin.h>. Stores round exactly like qk_store in internal.h
 * (bf16: RNE, NaN -> 0x7FC0; f16: vcvtps2ph RNE, which qk_f32_to_f16 mirrors). */
#ifndef QCKPT_SIMD_AVX2_H
#define QCKPT_SIMD_AVX2_H

static inline __m256 qk_load8(const void *x, int32_t dtype, int64_t i) {
    switch (dtype) {
    case QCKPT_F32: return _mm256_loadu_ps((const float *)x + i);
    case QCKPT_F16: return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)x + i)));
    default: {
        __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)x + i)));
        return _mm256_castsi256_ps(_mm256_slli_epi32(h, 16));
    }
    }
}

static inline void qk_store8(void *out, int32_t dtype, int64_t i, __m256 v) {
    switch (dtype) {
    case QCKPT_F32: _mm256_storeu_ps((float *)out + i, v); break;
    case QCKPT_F16:
        _mm_storeu_si128((__m128i *)((uint16_t *)out + i), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        break;
    default: {
        __m256i bits = _mm256_castps_si256(v);
        __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
        __m256i r = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
        __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
        /* 8 dwords (each < 65536) -> 8 words; packus interleaves 128-bit lanes, the permute undoes it */
        r = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xD8);
        _mm_storeu_si128((__m128i *)((uint16_t *)out + i), _mm256_castsi256_si128(r));
    }
    }
}

#endif /* QCKPT_SIMD_AVX2_H */
