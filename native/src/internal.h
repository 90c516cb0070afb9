/* internal.h -- private helpers shared by the CPU kernels: errors, threading, ISA dispatch tables and
 * the scalar dtype conversions every variant must agree with. Not part of the ABI (see qckpt.h). */
#ifndef QCKPT_INTERNAL_H
#define QCKPT_INTERNAL_H

#include <stdint.h>
#include <string.h>

#include "qckpt.h"

#define QCKPT_MAX_THREADS 256

/* Record a message for qckpt_last_error() on this thread and return `status`. */
qckpt_status qckpt_fail(qckpt_status status, const char *fmt, ...);
void qckpt_clear_error(void);

/* Validate exec and resolve it: threads clamped to [1, QCKPT_MAX_THREADS], isa resolved from AUTO.
 * Fails with QCKPT_E_UNSUPPORTED if the requested variant cannot run here. */
qckpt_status qckpt_resolve_exec(const qckpt_exec *exec, int32_t *threads, int32_t *isa);

/* Split [0, n_items) into at most `threads` contiguous chunks of at least `min_grain` items and run
 * fn(ctx, begin, end, worker) on each; the calling thread runs chunk 0. */
typedef void (*qckpt_range_fn)(void *ctx, int64_t begin, int64_t end, int32_t worker);
qckpt_status qckpt_parallel_for(int64_t n_items, int64_t min_grain, int32_t threads, qckpt_range_fn fn, void *ctx);

/* Hint that a large output buffer about to be written for the first time be backed by transparent huge
 * pages (Linux madvise; a no-op elsewhere or below 8 MiB). Never changes results. */
void qk_advise_hugepages(void *p, int64_t bytes);

/* ---- dtype conversions (bit-exact scalar definitions) ---- */
static inline float qk_bits_to_f32(uint32_t b) { float f; memcpy(&f, &b, 4); return f; }
static inline uint32_t qk_f32_to_bits(float f) { uint32_t b; memcpy(&b, &f, 4); return b; }

static inline float qk_bf16_to_f32(uint16_t h) { return qk_bits_to_f32((uint32_t)h << 16); }

static inline float qk_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF;
    if (exp == 0x1F) return qk_bits_to_f32(sign | 0x7F800000u | (man << 13));
    if (exp == 0) {
        if (man == 0) return qk_bits_to_f32(sign);
        /* subnormal: value = man * 2^-24, exact in float32 */
        float v = (float)man * 5.9604644775390625e-8f;
        return sign ? -v : v;
    }
    return qk_bits_to_f32(sign | ((exp + 112) << 23) | (man << 13));
}

/* float32 -> bfloat16, round to nearest even; NaN -> 0x7FC0 (torch's canonical bf16 NaN). */
static inline uint16_t qk_f32_to_bf16(float f) {
    uint32_t b = qk_f32_to_bits(f);
    if ((b & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;
    b += 0x7FFFu + ((b >> 16) & 1u);
    return (uint16_t)(b >> 16);
}

/* float32 -> IEEE half, round to nearest even, overflow to inf (what F16C's vcvtps2ph does). */
static inline uint16_t qk_f32_to_f16(float f) {
    uint32_t b = qk_f32_to_bits(f);
    uint32_t sign = (b >> 16) & 0x8000u, abs = b & 0x7FFFFFFFu;
    if (abs > 0x7F800000u) return (uint16_t)(sign | 0x7E00u | ((abs >> 13) & 0x3FFu));
    if (abs >= 0x477FF000u) return (uint16_t)(sign | 0x7C00u); /* rounds to >= 65520: inf */
    if (abs < 0x38800000u) {                                  /* below the smallest normal half */
        if (abs < 0x33000000u) return (uint16_t)sign;         /* < 2^-25: rounds to zero */
        uint32_t exp = abs >> 23, man = (abs & 0x7FFFFFu) | 0x800000u;
        uint32_t shift = 126 - exp; /* 14..24: man * 2^(exp-150) in units of 2^-24 */
        uint32_t q = man >> shift, rem = man & ((1u << shift) - 1), half = 1u << (shift - 1);
        if (rem > half || (rem == half && (q & 1u))) q++;
        return (uint16_t)(sign | q);
    }
    uint32_t r = abs + 0xFFFu + ((abs >> 13) & 1u); /* round mantissa to 10 bits, ties to even */
    return (uint16_t)(sign | ((r - 0x38000000u) >> 13));
}

static inline float qk_load_f32(const void *x, int32_t dtype, int64_t i) {
    switch (dtype) {
    case QCKPT_F32: return ((const float *)x)[i];
    case QCKPT_F16: return qk_f16_to_f32(((const uint16_t *)x)[i]);
    default: return qk_bf16_to_f32(((const uint16_t *)x)[i]);
    }
}

static inline void qk_store(void *out, int32_t dtype, int64_t i, float v) {
    switch (dtype) {
    case QCKPT_F32: ((float *)out)[i] = v; break;
    case QCKPT_F16: ((uint16_t *)out)[i] = qk_f32_to_f16(v); break;
    default: ((uint16_t *)out)[i] = qk_f32_to_bf16(v); break;
    }
}

static inline int qk_dtype_valid(int32_t d) { return d == QCKPT_F32 || d == QCKPT_F16 || d == QCKPT_BF16; }
static inline int64_t qk_dtype_size(int32_t d) { return d == QCKPT_F32 ? 4 : 2; }
static inline int64_t qk_ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

/* ---- 4-bit codes ---- */
extern const float qk_nf4_lut[16];
extern const float qk_fp4_lut[16];
extern const float qk_nf4_thresholds[15];
extern const float qk_fp4_thresholds[7];
extern const uint8_t qk_fp4_bucket_code[8];

static inline uint8_t qk_nf4_code(float xn) {
    uint8_t c = 0;
    for (int i = 0; i < 15; i++) c += (xn > qk_nf4_thresholds[i]);
    return c;
}

static inline uint8_t qk_fp4_code(float xn) {
    float a = xn < 0 ? -xn : xn; /* NaN stays NaN: every compare false, bucket 0 */
    uint8_t bucket = 0;
    for (int i = 0; i < 7; i++) bucket += (a > qk_fp4_thresholds[i]);
    return (uint8_t)(qk_fp4_bucket_code[bucket] | ((xn < 0) << 3));
}

/* Work description of one 4-bit call, shared by every ISA variant. Blocks are processed in
 * [b0, b1); a variant handles whole blocks and leaves the partial last one to the scalar code. */
typedef struct {
    const void *x;
    int32_t dtype;
    int64_t n;
    int64_t blocksize;
    int32_t quant_type;
    uint8_t *packed;
    float *absmax;
    const uint8_t *packed_in;
    const float *absmax_in;
    void *out;
    int32_t out_dtype;
} qk_q4_args;

/* Quantize blocks [b0, b1); return -1, or the first block holding NaN/inf (stopping there). */
typedef int64_t (*qk_q4_quantize_fn)(const qk_q4_args *a, int64_t b0, int64_t b1);
typedef void (*qk_q4_dequantize_fn)(const qk_q4_args *a, int64_t b0, int64_t b1);

int64_t qk_q4_quantize_scalar(const qk_q4_args *a, int64_t b0, int64_t b1);
void qk_q4_dequantize_scalar(const qk_q4_args *a, int64_t b0, int64_t b1);
#if defined(__x86_64__) || defined(_M_X64)
#define QCKPT_HAVE_X86 1
int64_t qk_q4_quantize_avx2(const qk_q4_args *a, int64_t b0, int64_t b1);
void qk_q4_dequantize_avx2(const qk_q4_args *a, int64_t b0, int64_t b1);
int64_t qk_q4_quantize_avx512(const qk_q4_args *a, int64_t b0, int64_t b1);
void qk_q4_dequantize_avx512(const qk_q4_args *a, int64_t b0, int64_t b1);
#endif
#if defined(__aarch64__)
#define QCKPT_HAVE_NEON 1
int64_t qk_q4_quantize_neon(const qk_q4_args *a, int64_t b0, int64_t b1);
void qk_q4_dequantize_neon(const qk_q4_args *a, int64_t b0, int64_t b1);
#endif

#endif /* QCKPT_INTERNAL_H */
