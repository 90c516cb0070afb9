/* optim8.h -- private to optim8.c and its ISA variants: the work description of one fused AdamW step
 * and the per-element arithmetic every variant must reproduce (see qckpt_adamw8bit_step in qckpt.h). */
#ifndef QCKPT_OPTIM8_H
#define QCKPT_OPTIM8_H

#include "internal.h"

#define QK_OPTIM_MAX_BLOCK 4096

/* Bucket table for code selection. A bucket is the set of floats sharing the top 16 bits of their bit
 * pattern (sign, exponent, 7 mantissa bits); magnitudes are clamped to [2^-24, 1.0] first, so buckets
 * QK_LUT_KEY_MIN..QK_LUT_KEY_MAX of each sign (negative ones after the positive ones) cover everything.
 * Entry = (number of thresholds below the bucket's lowest value) << 16 | low 16 bits of the one threshold
 * inside the bucket (0xFFFF for positive, 0 for negative buckets without one). Built only when every
 * bucket holds at most one threshold and the clamped end buckets hold none (true of both dynamic maps,
 * whose finest spacing is 0.9/128 > 2^-8 just below 1.0); otherwise the binary search is used. */
#define QK_LUT_KEY_MIN 0x3380u /* 2^-24 >> 16 */
#define QK_LUT_KEY_MAX 0x3F80u /* 1.0f >> 16 */
#define QK_LUT_BUCKETS ((int)(QK_LUT_KEY_MAX - QK_LUT_KEY_MIN + 1))

typedef struct {
    void *param;
    int32_t param_dtype;
    const void *grad;
    int32_t grad_dtype;
    int64_t n, blocksize;
    uint8_t *m_codes, *v_codes;
    float *m_absmax, *v_absmax;
    const float *m_map, *v_map;
    /* Code selection thresholds: t[i] = midpoint(map[i], map[i+1]) for even i, the next float below it
     * for odd i, t[255] = +inf. Then "number of t[i] < x" is the nearest entry with exact midpoint ties
     * going to the even index (for odd i, x > nextdown(mid) <=> x >= mid), and NaN gives 0. */
    float m_thr[256], v_thr[256];
    /* Optional bucket tables (use_lut != 0), see qk_code_lut: the same codes in one lookup + compare. */
    int32_t use_lut;
    uint32_t m_lut[2 * QK_LUT_BUCKETS], v_lut[2 * QK_LUT_BUCKETS];
    qckpt_adamw_hparams hp;
    float *m32, *v32; /* qckpt_adamw32_step only */
} qk_adam_args;

/* Process blocks [b0, b1) of an 8-bit step. */
void qk_adam8_scalar(const qk_adam_args *a, int64_t b0, int64_t b1);
#ifdef QCKPT_HAVE_X86
void qk_adam8_avx2(const qk_adam_args *a, int64_t b0, int64_t b1);
void qk_adam8_avx512(const qk_adam_args *a, int64_t b0, int64_t b1);
/* The AVX-512 variant with the map lookups done by VBMI byte permutes (CPUs with avx512vbmi). */
void qk_adam8_avx512_vbmi(const qk_adam_args *a, int64_t b0, int64_t b1);
#endif

/* IEEE float32 square root without libm's errno path (which would need -lm for sqrtf). */
#if defined(__x86_64__) || defined(_M_X64)
#include <xmmintrin.h>
static inline float qk_sqrtf(float x) { return _mm_cvtss_f32(_mm_sqrt_ss(_mm_set_ss(x))); }
#else
static inline float qk_sqrtf(float x) { return __builtin_sqrtf(x); }
#endif

/* The moment and parameter update of one element; the order of operations is the contract. */
static inline float qk_adam_update(const qckpt_adamw_hparams *hp, float g, float *m, float *v, float p) {
    if (hp->maximize) g = -g;
    float mm = *m * hp->beta1 + g * hp->one_minus_beta1;
    float vv = *v * hp->beta2 + (g * g) * hp->one_minus_beta2;
    float denom = qk_sqrtf(vv) / hp->bias_correction2_sqrt + hp->eps;
    *m = mm;
    *v = vv;
    return p * hp->decay - hp->step_size * (mm / denom);
}

/* Number of thresholds strictly below x (a branchless binary search over 256 sorted entries). */
static inline uint8_t qk_code_below(const float *thr, float x) {
    int idx = 0;
    /* step & -(compare) rather than a branch: the outcome is data-dependent and unpredictable */
    for (int step = 128; step >= 1; step >>= 1) idx += step & -(int)(thr[idx + step - 1] < x);
    return (uint8_t)idx;
}

/* The code of x from a bucket table: equal to qk_code_below(thr, x) whenever the table could be built. */
static inline uint8_t qk_code_lut(const uint32_t *lut, float x) {
    uint32_t bits = qk_f32_to_bits(x), mag = bits & 0x7FFFFFFFu, neg = bits >> 31;
    if (mag > 0x7F800000u) return 0; /* NaN */
    uint32_t key = mag >> 16;
    key = key < QK_LUT_KEY_MIN ? QK_LUT_KEY_MIN : key > QK_LUT_KEY_MAX ? QK_LUT_KEY_MAX : key;
    uint32_t e = lut[key - QK_LUT_KEY_MIN + neg * (uint32_t)QK_LUT_BUCKETS], low = mag & 0xFFFFu, t = e & 0xFFFFu;
    return (uint8_t)((e >> 16) + (neg ? low < t : low > t));
}

/* Fill lut (2 * QK_LUT_BUCKETS entries) from the 256 thresholds; 0 if the map does not allow it. */
int qk_build_code_lut(const float *thr, uint32_t *lut);

#endif /* QCKPT_OPTIM8_H */
