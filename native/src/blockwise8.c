/* blockwise8.c -- 8-bit blockwise quantization against a sorted 256-entry map (the dynamic map used
 * for double-quantized absmax, and for 8-bit optimizer states). Nearest entry by float32 midpoints,
 * exact midpoint ties to the even index, NaN -> 0: bitsandbytes' CUDA rule (FORMAT.md 2.3).
 * Scalar, plus an AVX-512 gather variant of the same search (identical codes): double quant runs once per
 * weight on 1/blocksize of its elements. Tested against reference.codes_nearest_even on every variant.
 * The decode has an AVX-512 variant too (identical floats: the same mul, then add): the runtime decodes
 * a double-quantized absmax on every 4-bit forward. */
#include <stdlib.h>

#include "internal.h"

typedef struct {
    const float *x;
    int64_t n, blocksize;
    const float *code;
    float mids[256]; /* 255 float32 midpoints + an +inf sentinel */
    uint8_t *codes;
    float *absmax;
    const uint8_t *codes_in;
    const float *absmax_in;
    float offset;
    float *out;
    int32_t isa;
    int64_t bad_block[QCKPT_MAX_THREADS];
} b8_job;

static inline uint8_t nearest_even(const float *mids, float xn) {
    /* Lower bound = number of midpoints strictly below xn, as a branchless binary search over the 255
     * midpoints padded to 256 (mids[255], never probed by the search): data-dependent branches mispredict
     * about half the time, which made this loop ~30 ns per element. NaN: every compare is false -> 0. */
    int lo = 0;
    for (int step = 128; step >= 1; step >>= 1) lo += step & -(int)(mids[lo + step - 1] < xn); /* setcc, no jump */
    /* exactly between lo and lo+1: take the even one. mids[255] is NaN, which equals nothing: xn = +inf
     * (a block whose absmax is subnormal overflows the reciprocal) stays 255, as in the reference; an
     * +inf pad compared equal there and wrapped to code 0. */
    lo += (mids[lo] == xn) & lo & 1;
    return (uint8_t)lo;
}

static void quantize_codes_scalar(const b8_job *job, int64_t start, int64_t end, float r) {
    for (int64_t i = start; i < end; i++) job->codes[i] = nearest_even(job->mids, job->x[i] * r);
}

#ifdef QCKPT_HAVE_X86
#include <immintrin.h>

/* nearest_even for 16 lanes: the same 8 probes, as gathers from the padded midpoint table. A function
 * target attribute (not a file-wide pragma) keeps the rest of this file baseline x86-64. */
__attribute__((target("avx512f"))) static void quantize_codes_avx512(const b8_job *job, int64_t start, int64_t end,
                                                                     float r) {
    const __m512 vr = _mm512_set1_ps(r);
    const __m512i one = _mm512_set1_epi32(1);
    int64_t i = start;
    for (; i + 16 <= end; i += 16) {
        __m512 xn = _mm512_mul_ps(_mm512_loadu_ps(job->x + i), vr);
        __m512i lo = _mm512_setzero_si512();
        for (int step = 128; step >= 1; step >>= 1) {
            __m512 m = _mm512_i32gather_ps(_mm512_add_epi32(lo, _mm512_set1_epi32(step - 1)), job->mids, 4);
            lo = _mm512_mask_add_epi32(lo, _mm512_cmp_ps_mask(m, xn, _CMP_LT_OQ), lo, _mm512_set1_epi32(step));
        }
        __mmask16 tie = _mm512_cmp_ps_mask(_mm512_i32gather_ps(lo, job->mids, 4), xn, _CMP_EQ_OQ) &
                        _mm512_test_epi32_mask(lo, one);
        lo = _mm512_mask_add_epi32(lo, tie, lo, one);
        _mm_storeu_si128((__m128i *)(job->codes + i), _mm512_cvtepi32_epi8(lo));
    }
    quantize_codes_scalar(job, i, end, r);
}
#endif

static void quantize_range(void *ctx, int64_t b0, int64_t b1, int32_t worker) {
    b8_job *job = (b8_job *)ctx;
    for (int64_t b = b0; b < b1; b++) {
        int64_t start = b * job->blocksize, end = start + job->blocksize < job->n ? start + job->blocksize : job->n;
        uint32_t max_bits = 0;
        for (int64_t i = start; i < end; i++) {
            uint32_t bits = qk_f32_to_bits(job->x[i]) & 0x7FFFFFFFu;
            max_bits = bits > max_bits ? bits : max_bits;
        }
        if (max_bits >= 0x7F800000u) {
            job->bad_block[worker] = b;
            return;
        }
        float amax = qk_bits_to_f32(max_bits);
        job->absmax[b] = amax;
        float r = 1.0f / amax;
#ifdef QCKPT_HAVE_X86
        if (job->isa == QCKPT_ISA_AVX512) {
            quantize_codes_avx512(job, start, end, r);
            continue;
        }
#endif
        quantize_codes_scalar(job, start, end, r);
    }
}

static void dequantize_codes_scalar(const b8_job *job, int64_t start, int64_t end, float amax) {
    for (int64_t i = start; i < end; i++) {
        float scaled = job->code[job->codes_in[i]] * amax; /* two roundings: no FMA (-ffp-contract=off) */
        job->out[i] = scaled + job->offset;
    }
}

#ifdef QCKPT_HAVE_X86
/* The same two roundings (mul, then add) on 16 lanes, the map read by a gather: the runtime decodes a
 * double-quantized absmax on every 4-bit forward, where the scalar loop was ~0.14 ms at 4096x4096. */
__attribute__((target("avx512f"))) static void dequantize_codes_avx512(const b8_job *job, int64_t start, int64_t end,
                                                                       float amax) {
    const __m512 va = _mm512_set1_ps(amax), voff = _mm512_set1_ps(job->offset);
    int64_t i = start;
    for (; i + 16 <= end; i += 16) {
        __m512i idx = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(job->codes_in + i)));
        __m512 scaled = _mm512_mul_ps(_mm512_i32gather_ps(idx, job->code, 4), va);
        _mm512_storeu_ps(job->out + i, _mm512_add_ps(scaled, voff));
    }
    dequantize_codes_scalar(job, i, end, amax);
}
#endif

static void dequantize_range(void *ctx, int64_t b0, int64_t b1, int32_t worker) {
    (void)worker;
    b8_job *job = (b8_job *)ctx;
    for (int64_t b = b0; b < b1; b++) {
        int64_t start = b * job->blocksize, end = start + job->blocksize < job->n ? start + job->blocksize : job->n;
#ifdef QCKPT_HAVE_X86
        if (job->isa == QCKPT_ISA_AVX512) {
            dequantize_codes_avx512(job, start, end, job->absmax_in[b]);
            continue;
        }
#endif
        dequantize_codes_scalar(job, start, end, job->absmax_in[b]);
    }
}

static qckpt_status check(int64_t n, int64_t blocksize, const void *a, const void *b, const void *c, const void *d) {
    if (!a || !b || !c || !d) return qckpt_fail(QCKPT_E_INVALID, "NULL data pointer");
    if (n <= 0) return qckpt_fail(QCKPT_E_INVALID, "element count must be positive, got %lld", (long long)n);
    if (blocksize < 1) return qckpt_fail(QCKPT_E_INVALID, "blocksize must be positive, got %lld", (long long)blocksize);
    return QCKPT_OK;
}

qckpt_status qckpt_quantize_blockwise8(const float *x, int64_t n, int64_t blocksize, const float *code,
                                       uint8_t *codes, float *absmax, const qckpt_exec *exec) {
    int32_t threads, isa;
    qckpt_status st = qckpt_resolve_exec(exec, &threads, &isa);
    if (st != QCKPT_OK) return st;
    if ((st = check(n, blocksize, x, code, codes, absmax)) != QCKPT_OK) return st;
    b8_job *job = (b8_job *)malloc(sizeof *job);
    if (!job) return qckpt_fail(QCKPT_E_NOMEM, "out of memory");
    job->x = x, job->n = n, job->blocksize = blocksize, job->code = code, job->codes = codes, job->absmax = absmax;
    job->isa = isa;
    for (int i = 0; i < 255; i++) {
        if (!(code[i] < code[i + 1])) {
            free(job);
            return qckpt_fail(QCKPT_E_INVALID, "code map is not strictly increasing at index %d", i);
        }
        job->mids[i] = (code[i] + code[i + 1]) * 0.5f;
    }
    job->mids[255] = qk_bits_to_f32(0x7FC00000u); /* NaN: see nearest_even */
    for (int i = 0; i < QCKPT_MAX_THREADS; i++) job->bad_block[i] = -1;
    st = qckpt_parallel_for(qk_ceil_div(n, blocksize), qk_ceil_div(65536, blocksize), threads, quantize_range, job);
    for (int w = 0; st == QCKPT_OK && w < QCKPT_MAX_THREADS; w++) {
        if (job->bad_block[w] < 0) continue;
        for (int64_t i = job->bad_block[w] * blocksize; i < n; i++) {
            if (x[i] != x[i] || x[i] - x[i] != 0.0f) {
                st = qckpt_fail(QCKPT_E_NONFINITE, "%s at flat index %lld", x[i] != x[i] ? "NaN" : "inf", (long long)i);
                break;
            }
        }
        break;
    }
    free(job);
    return st;
}

qckpt_status qckpt_dequantize_blockwise8(const uint8_t *codes, const float *absmax, int64_t n, int64_t blocksize,
                                         const float *code, float offset, float *out, const qckpt_exec *exec) {
    int32_t threads, isa;
    qckpt_status st = qckpt_resolve_exec(exec, &threads, &isa);
    if (st != QCKPT_OK) return st;
    if ((st = check(n, blocksize, codes, absmax, code, out)) != QCKPT_OK) return st;
    b8_job job = {.n = n, .blocksize = blocksize, .code = code, .codes_in = codes, .absmax_in = absmax,
                  .offset = offset, .out = out, .isa = isa};
    return qckpt_parallel_for(qk_ceil_div(n, blocksize), qk_ceil_div(65536, blocksize), threads, dequantize_range, &job);
}
