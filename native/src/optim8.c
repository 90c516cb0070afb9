/* optim8.c -- fused AdamW steps for the 8-bit optimizers (converter/optim): dequantize both moments,
 * update moments and parameter, re-quantize the moments, one pass over each 8-bit block; plus the
 * 32-bit-state step used for small tensors. Scalar reference here, AVX2 and AVX-512 variants in
 * optim8_avx2.c and optim8_avx512.c. Tested bit for bit against converter/optim/reference.py
 * and across variants and thread counts in tests/test_optim_kernel.py. */
#include <stdlib.h>

#include "optim8.h"

#ifndef QK_LUT_MIN_ELEMENTS
#define QK_LUT_MIN_ELEMENTS 16384
#endif

static float next_down(float x) {
    uint32_t b = qk_f32_to_bits(x);
    if ((b & 0x7FFFFFFFu) == 0) return qk_bits_to_f32(0x80000001u); /* below +-0: the smallest negative */
    return qk_bits_to_f32(x > 0 ? b - 1 : b + 1);
}

static qckpt_status build_thresholds(const float *map, float *thr, const char *which) {
    for (int i = 0; i < 255; i++) {
        if (!(map[i] < map[i + 1]))
            return qckpt_fail(QCKPT_E_INVALID, "%s code map is not strictly increasing at index %d", which, i);
        float mid = (map[i] + map[i + 1]) * 0.5f;
        thr[i] = (i & 1) ? next_down(mid) : mid;
    }
    thr[255] = qk_bits_to_f32(0x7F800000u);
    return QCKPT_OK;
}

/* Number of real thresholds (index < 255) strictly below / at most x, by linear scan from `from`. */
static int count_lt(const float *thr, int from, float x) {
    while (from < 255 && thr[from] < x) from++;
    return from;
}

static int count_le(const float *thr, int from, float x) {
    while (from < 255 && thr[from] <= x) from++;
    return from;
}

int qk_build_code_lut(const float *thr, uint32_t *lut) {
    /* Buckets in increasing value order: negative ones from the largest magnitude down, then positive
     * ones up, so one pointer sweeps the sorted thresholds. */
    int at = 0;
    for (int pass = 0; pass < 2; pass++) {
        for (int b = 0; b < QK_LUT_BUCKETS; b++) {
            int neg = pass == 0, mk = neg ? QK_LUT_BUCKETS - 1 - b : b;
            uint32_t key = QK_LUT_KEY_MIN + (uint32_t)mk, sign = neg ? 0x80000000u : 0;
            float lo, hi; /* the values the bucket stands for, after clamping */
            int clamped_low = mk == 0, clamped_high = mk == QK_LUT_BUCKETS - 1;
            if (!neg) {
                lo = clamped_low ? 0.0f : qk_bits_to_f32(key << 16);
                hi = clamped_high ? qk_bits_to_f32(0x7F800000u) : qk_bits_to_f32(key << 16 | 0xFFFFu);
            } else {
                lo = clamped_high ? qk_bits_to_f32(0xFF800000u) : qk_bits_to_f32(sign | key << 16 | 0xFFFFu);
                hi = clamped_low ? -0.0f : qk_bits_to_f32(sign | key << 16);
            }
            at = count_lt(thr, at, lo);
            int inside = count_le(thr, at, hi) - at;
            uint32_t low16 = neg ? 0u : 0xFFFFu;
            if (inside > 1 || (inside == 1 && (clamped_low || clamped_high))) return 0;
            if (inside == 1) {
                uint32_t tb = qk_f32_to_bits(thr[at]);
                if ((tb >> 16) != (sign >> 16 | key)) return 0; /* cannot happen for a finite threshold; be safe */
                low16 = tb & 0xFFFFu;
            }
            lut[mk + (neg ? QK_LUT_BUCKETS : 0)] = (uint32_t)at << 16 | low16;
        }
    }
    return 1;
}

/* Block absmax as the largest |x| bit pattern (NaN sorts above inf, so a NaN block gets a NaN absmax
 * and every code 0), then codes as in qckpt_quantize_blockwise8. */
static void quantize_block(const float *x, int64_t len, const float *thr, const uint32_t *lut, uint8_t *codes,
                           float *absmax) {
    uint32_t max_bits = 0;
    for (int64_t i = 0; i < len; i++) {
        uint32_t bits = qk_f32_to_bits(x[i]) & 0x7FFFFFFFu;
        max_bits = bits > max_bits ? bits : max_bits;
    }
    float amax = qk_bits_to_f32(max_bits);
    *absmax = amax;
    float r = 1.0f / amax;
    if (lut)
        for (int64_t i = 0; i < len; i++) codes[i] = qk_code_lut(lut, x[i] * r);
    else
        for (int64_t i = 0; i < len; i++) codes[i] = qk_code_below(thr, x[i] * r);
}

void qk_adam8_scalar(const qk_adam_args *a, int64_t b0, int64_t b1) {
    float mbuf[QK_OPTIM_MAX_BLOCK], vbuf[QK_OPTIM_MAX_BLOCK];
    for (int64_t b = b0; b < b1; b++) {
        int64_t start = b * a->blocksize, len = a->n - start < a->blocksize ? a->n - start : a->blocksize;
        float am = a->m_absmax[b], av = a->v_absmax[b];
        for (int64_t i = 0; i < len; i++) {
            int64_t k = start + i;
            mbuf[i] = a->m_map[a->m_codes[k]] * am;
            vbuf[i] = a->v_map[a->v_codes[k]] * av;
            float p = qk_adam_update(&a->hp, qk_load_f32(a->grad, a->grad_dtype, k), &mbuf[i], &vbuf[i],
                                     qk_load_f32(a->param, a->param_dtype, k));
            qk_store(a->param, a->param_dtype, k, p);
        }
        quantize_block(mbuf, len, a->m_thr, a->use_lut ? a->m_lut : NULL, a->m_codes + start, &a->m_absmax[b]);
        quantize_block(vbuf, len, a->v_thr, a->use_lut ? a->v_lut : NULL, a->v_codes + start, &a->v_absmax[b]);
    }
}

#ifdef QCKPT_HAVE_X86
/* Within the AVX-512 variant, VBMI map lookups where the CPU has them. QCKPT_OPTIM_NO_VBMI (any value)
 * turns them off so the tests can compare the gather path too on a VBMI machine; read per call. */
static int use_vbmi(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512vbmi") && getenv("QCKPT_OPTIM_NO_VBMI") == NULL;
}
#endif

typedef struct {
    const qk_adam_args *args;
    void (*blocks)(const qk_adam_args *a, int64_t b0, int64_t b1);
} adam_job;

static void adam8_range(void *ctx, int64_t b0, int64_t b1, int32_t worker) {
    (void)worker;
    adam_job *job = (adam_job *)ctx;
    job->blocks(job->args, b0, b1);
}

static void adam32_range(void *ctx, int64_t i0, int64_t i1, int32_t worker) {
    (void)worker;
    const qk_adam_args *a = ((adam_job *)ctx)->args;
    for (int64_t k = i0; k < i1; k++) {
        float p = qk_adam_update(&a->hp, qk_load_f32(a->grad, a->grad_dtype, k), &a->m32[k], &a->v32[k],
                                 qk_load_f32(a->param, a->param_dtype, k));
        qk_store(a->param, a->param_dtype, k, p);
    }
}

static qckpt_status check_common(void *param, int32_t param_dtype, const void *grad, int32_t grad_dtype, int64_t n,
                                 const qckpt_adamw_hparams *hp) {
    if (!param || !grad || !hp) return qckpt_fail(QCKPT_E_INVALID, "NULL data pointer");
    if (n <= 0) return qckpt_fail(QCKPT_E_INVALID, "element count must be positive, got %lld", (long long)n);
    if (!qk_dtype_valid(param_dtype)) return qckpt_fail(QCKPT_E_INVALID, "unknown parameter dtype %d", param_dtype);
    if (!qk_dtype_valid(grad_dtype)) return qckpt_fail(QCKPT_E_INVALID, "unknown gradient dtype %d", grad_dtype);
    return QCKPT_OK;
}

qckpt_status qckpt_adamw8bit_step(void *param, int32_t param_dtype, const void *grad, int32_t grad_dtype, int64_t n,
                                  uint8_t *m_codes, float *m_absmax, const float *m_map, uint8_t *v_codes,
                                  float *v_absmax, const float *v_map, int64_t blocksize,
                                  const qckpt_adamw_hparams *hp, const qckpt_exec *exec) {
    int32_t threads, isa;
    qckpt_status st = qckpt_resolve_exec(exec, &threads, &isa);
    if (st != QCKPT_OK) return st;
    if ((st = check_common(param, param_dtype, grad, grad_dtype, n, hp)) != QCKPT_OK) return st;
    if (!m_codes || !m_absmax || !m_map || !v_codes || !v_absmax || !v_map)
        return qckpt_fail(QCKPT_E_INVALID, "NULL state pointer");
    if (blocksize < 1 || blocksize > QK_OPTIM_MAX_BLOCK)
        return qckpt_fail(QCKPT_E_INVALID, "blocksize must be in [1, %d], got %lld", QK_OPTIM_MAX_BLOCK,
                          (long long)blocksize);
    qk_adam_args *a = (qk_adam_args *)malloc(sizeof *a);
    if (!a) return qckpt_fail(QCKPT_E_NOMEM, "out of memory");
    *a = (qk_adam_args){.param = param, .param_dtype = param_dtype, .grad = grad, .grad_dtype = grad_dtype,
                        .n = n, .blocksize = blocksize, .m_codes = m_codes, .v_codes = v_codes,
                        .m_absmax = m_absmax, .v_absmax = v_absmax, .m_map = m_map, .v_map = v_map, .hp = *hp};
    if ((st = build_thresholds(m_map, a->m_thr, "first-moment")) == QCKPT_OK &&
        (st = build_thresholds(v_map, a->v_thr, "second-moment")) == QCKPT_OK) {
        /* The bucket tables cost ~6K entries each to build: worth it from a few blocks per call on. */
        a->use_lut = n >= QK_LUT_MIN_ELEMENTS && qk_build_code_lut(a->m_thr, a->m_lut) && qk_build_code_lut(a->v_thr, a->v_lut);
        adam_job job = {.args = a, .blocks = qk_adam8_scalar};
#ifdef QCKPT_HAVE_X86
        if (isa == QCKPT_ISA_AVX512) job.blocks = use_vbmi() ? qk_adam8_avx512_vbmi : qk_adam8_avx512;
        else if (isa == QCKPT_ISA_AVX2) job.blocks = qk_adam8_avx2;
#endif
        /* >= 16K elements per worker: below that a thread start (~20 us) outweighs the work. */
        int64_t grain = qk_ceil_div(16384, blocksize);
        st = qckpt_parallel_for(qk_ceil_div(n, blocksize), grain, threads, adam8_range, &job);
    }
    free(a);
    return st;
}

qckpt_status qckpt_adamw32_step(void *param, int32_t param_dtype, const void *grad, int32_t grad_dtype, int64_t n,
                                float *m, float *v, const qckpt_adamw_hparams *hp, const qckpt_exec *exec) {
    int32_t threads, isa;
    qckpt_status st = qckpt_resolve_exec(exec, &threads, &isa);
    if (st != QCKPT_OK) return st;
    if ((st = check_common(param, param_dtype, grad, grad_dtype, n, hp)) != QCKPT_OK) return st;
    if (!m || !v) return qckpt_fail(QCKPT_E_INVALID, "NULL state pointer");
    qk_adam_args a = {.param = param, .param_dtype = param_dtype, .grad = grad, .grad_dtype = grad_dtype, .n = n,
                      .hp = *hp, .m32 = m, .v32 = v};
    adam_job job = {.args = &a};
    return qckpt_parallel_for(n, 65536, threads, adam32_range, &job);
}
