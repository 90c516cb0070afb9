/* optim8.h -- private to optim8.c and its ISA variants: the work description of one fused AdamW step
 * and the per-element arithmetic every variant must reproduce (see qckpt_adamw8bit_step in qckpt.h). */
#ifndef QCKPT_OPTIM8_H
#define QCKPT_OPTIM8_H

#include "internal.h"

#define QK_OPTIM_MAX_BLOCK 4096

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
    qckpt_adamw_hparams hp;
    float *m32, *v32; /* qckpt_adamw32_step only */
} qk_adam_args;

/* Process blocks [b0, b1) of an 8-bit step. */
void qk_adam8_scalar(const qk_adam_args *a, int64_t b0, int64_t b1);
#ifdef QCKPT_HAVE_X86
void qk_adam8_avx512(const qk_adam_args *a, int64_t b0, int64_t b1);
#endif

/* The moment and parameter update of one element; the order of operations is the contract. */
static inline float qk_adam_update(const qckpt_adamw_hparams *hp, float g, float *m, float *v, float p) {
    if (hp->maximize) g = -g;
    float mm = *m * hp->beta1 + g * hp->one_minus_beta1;
    float vv = *v * hp->beta2 + (g * g) * hp->one_minus_beta2;
    float denom = __builtin_sqrtf(vv) / hp->bias_correction2_sqrt + hp->eps;
    *m = mm;
    *v = vv;
    return p * hp->decay - hp->step_size * (mm / denom);
}

/* Number of thresholds strictly below x (a branchless binary search over 256 sorted entries). */
static inline uint8_t qk_code_below(const float *thr, float x) {
    int idx = 0;
    for (int step = 128; step >= 1; step >>= 1) idx += (thr[idx + step - 1] < x) ? step : 0;
    return (uint8_t)idx;
}

#endif /* QCKPT_OPTIM8_H */
