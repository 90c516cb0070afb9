/* int8_rowwise.c -- row-wise absmax int8 (the LLM.int8 weight format, FORMAT.md 4.1 and section 0):
 * SCB = max |row| in float32, q = round_half_even(x * ((1.0f / SCB) * 127.0f)); an all-zero row is all zeros.
 * Written so GCC vectorizes the inner loops at -O3 (per-dtype loops, no libm call); the arithmetic is
 * per element, so any vector width gives the same bytes. Tested against reference.quantize_int8_rowwise. */
#include "internal.h"

typedef struct {
    const void *x;
    int32_t dtype;
    int64_t cols;
    int8_t *q;
    float *scb;
    const int8_t *q_in;
    const float *scb_in;
    void *out;
    int32_t out_dtype;
    int64_t bad_row[QCKPT_MAX_THREADS];
} i8_job;

/* GCC compiles these row loops for AVX-512, AVX2 and baseline x86-64 and picks one at load time (ifunc).
 * The arithmetic is per element (the max is exact), so every clone writes the same bytes. */
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__)
#define QK_ROW_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define QK_ROW_CLONES
#endif

/* Round to nearest, ties to even, for |v| < 2^22: adding 1.5 * 2^23 leaves no fraction bits, so the FPU's
 * default rounding does it. Same result as rintf, but no libm call, so the loops vectorize. */
static inline float round_half_even(float v) {
    const float magic = 12582912.0f;
    return (v + magic) - magic;
}

static inline uint32_t abs_bits(const void *x, int32_t dtype, int64_t i) {
    switch (dtype) {
    case QCKPT_F32: return qk_f32_to_bits(((const float *)x)[i]) & 0x7FFFFFFFu;
    case QCKPT_BF16: return ((uint32_t)((const uint16_t *)x)[i] & 0x7FFFu) << 16;
    default: return qk_f32_to_bits(qk_f16_to_f32(((const uint16_t *)x)[i])) & 0x7FFFFFFFu;
    }
}

QK_ROW_CLONES
static void quantize_rows(void *ctx, int64_t r0, int64_t r1, int32_t worker) {
    i8_job *job = (i8_job *)ctx;
    const int64_t cols = job->cols;
    for (int64_t r = r0; r < r1; r++) {
        const int64_t base = r * cols;
        uint32_t max_bits = 0;
        /* max of |x| as bit patterns: ordered like the floats; NaN/inf sort above every finite value */
        if (job->dtype == QCKPT_F32) {
            const uint32_t *x = (const uint32_t *)job->x + base;
            for (int64_t c = 0; c < cols; c++) max_bits = (x[c] & 0x7FFFFFFFu) > max_bits ? (x[c] & 0x7FFFFFFFu) : max_bits;
        } else if (job->dtype == QCKPT_BF16) {
            const uint16_t *x = (const uint16_t *)job->x + base;
            uint32_t m = 0;
            for (int64_t c = 0; c < cols; c++) m = (x[c] & 0x7FFFu) > m ? (x[c] & 0x7FFFu) : m;
            max_bits = m << 16;
        } else {
            for (int64_t c = 0; c < cols; c++) {
                uint32_t bits = abs_bits(job->x, job->dtype, base + c);
                max_bits = bits > max_bits ? bits : max_bits;
            }
        }
        if (max_bits >= 0x7F800000u) {
            job->bad_row[worker] = r;
            return;
        }
        float scb = qk_bits_to_f32(max_bits);
        job->scb[r] = scb;
        int8_t *q = job->q + base;
        if (max_bits == 0) {
            memset(q, 0, (size_t)cols);
            continue;
        }
        /* bitsandbytes computes `127.0 / scb` in torch, which torch evaluates as reciprocal(scb) * 127:
         * two float32 roundings. Matching it keeps exact .5 ties (common in fp16 data) identical. */
        const float scale = (1.0f / scb) * 127.0f;
        if (job->dtype == QCKPT_F32) {
            const float *x = (const float *)job->x + base;
            for (int64_t c = 0; c < cols; c++) q[c] = (int8_t)(int32_t)round_half_even(x[c] * scale);
        } else if (job->dtype == QCKPT_BF16) {
            const uint16_t *x = (const uint16_t *)job->x + base;
            for (int64_t c = 0; c < cols; c++) q[c] = (int8_t)(int32_t)round_half_even(qk_bf16_to_f32(x[c]) * scale);
        } else {
            const uint16_t *x = (const uint16_t *)job->x + base;
            for (int64_t c = 0; c < cols; c++) q[c] = (int8_t)(int32_t)round_half_even(qk_f16_to_f32(x[c]) * scale);
        }
    }
}

QK_ROW_CLONES
static void dequantize_rows(void *ctx, int64_t r0, int64_t r1, int32_t worker) {
    (void)worker;
    i8_job *job = (i8_job *)ctx;
    const float inv127 = 7.874015718698502e-3f;
    const int64_t cols = job->cols;
    for (int64_t r = r0; r < r1; r++) {
        const float scb = job->scb_in[r];
        const int8_t *q = job->q_in + r * cols;
        if (job->out_dtype == QCKPT_F32) {
            float *out = (float *)job->out + r * cols;
            for (int64_t c = 0; c < cols; c++) out[c] = ((float)q[c] * scb) * inv127;
        } else if (job->out_dtype == QCKPT_BF16) {
            uint16_t *out = (uint16_t *)job->out + r * cols;
            for (int64_t c = 0; c < cols; c++) out[c] = qk_f32_to_bf16(((float)q[c] * scb) * inv127);
        } else {
            uint16_t *out = (uint16_t *)job->out + r * cols;
            for (int64_t c = 0; c < cols; c++) out[c] = qk_f32_to_f16(((float)q[c] * scb) * inv127);
        }
    }
}

static qckpt_status check(int64_t rows, int64_t cols, const void *a, const void *b, const void *c) {
    if (!a || !b || !c) return qckpt_fail(QCKPT_E_INVALID, "NULL data pointer");
    if (rows <= 0 || cols <= 0)
        return qckpt_fail(QCKPT_E_INVALID, "shape must be positive, got (%lld, %lld)", (long long)rows, (long long)cols);
    return QCKPT_OK;
}

qckpt_status qckpt_quantize_int8_rowwise(const void *x, int32_t dtype, int64_t rows, int64_t cols, int8_t *q,
                                         float *scb, const qckpt_exec *exec) {
    int32_t threads, isa;
    qckpt_status st = qckpt_resolve_exec(exec, &threads, &isa);
    if (st != QCKPT_OK) return st;
    if ((st = check(rows, cols, x, q, scb)) != QCKPT_OK) return st;
    if (!qk_dtype_valid(dtype)) return qckpt_fail(QCKPT_E_INVALID, "unknown input dtype %d", dtype);
    i8_job job = {.x = x, .dtype = dtype, .cols = cols, .q = q, .scb = scb};
    qk_advise_hugepages(q, rows * cols);
    for (int i = 0; i < QCKPT_MAX_THREADS; i++) job.bad_row[i] = -1;
    if ((st = qckpt_parallel_for(rows, qk_ceil_div(32768, cols), threads, quantize_rows, &job)) != QCKPT_OK) return st;
    for (int w = 0; w < QCKPT_MAX_THREADS; w++) {
        int64_t r = job.bad_row[w];
        if (r < 0) continue;
        for (int64_t i = r * cols; i < rows * cols; i++) {
            float v = qk_load_f32(x, dtype, i);
            if (v != v || v - v != 0.0f)
                return qckpt_fail(QCKPT_E_NONFINITE, "%s at flat index %lld (row %lld)", v != v ? "NaN" : "inf",
                                  (long long)i, (long long)(i / cols));
        }
    }
    return QCKPT_OK;
}

qckpt_status qckpt_dequantize_int8_rowwise(const int8_t *q, const float *scb, int64_t rows, int64_t cols, void *out,
                                           int32_t out_dtype, const qckpt_exec *exec) {
    int32_t threads, isa;
    qckpt_status st = qckpt_resolve_exec(exec, &threads, &isa);
    if (st != QCKPT_OK) return st;
    if ((st = check(rows, cols, q, scb, out)) != QCKPT_OK) return st;
    if (!qk_dtype_valid(out_dtype)) return qckpt_fail(QCKPT_E_INVALID, "unknown output dtype %d", out_dtype);
    i8_job job = {.cols = cols, .q_in = q, .scb_in = scb, .out = out, .out_dtype = out_dtype};
    qk_advise_hugepages(out, rows * cols * qk_dtype_size(out_dtype));
    return qckpt_parallel_for(rows, qk_ceil_div(32768, cols), threads, dequantize_rows, &job);
}
