/* quant4.c -- blockwise 4-bit (NF4/FP4) quantize/dequantize: code tables, the scalar reference
 * variant, and the ABI entry points that validate, pick an ISA variant and split blocks over threads.
 * Tested bit for bit against converter/formats/reference.py and across variants (tests/test_kernels_cpu.py). */
#include "internal.h"

const float qk_nf4_lut[16] = {-0x1.0000000000000p+0f, -0x1.6473620000000p-1f, -0x1.0cd6600000000p-1f, -0x1.9465400000000p-2f, -0x1.23449a0000000p-2f, -0x1.7a6a7e0000000p-3f, -0x1.74f0e20000000p-4f, 0x0p+0f, 0x1.45f5fe0000000p-4f, 0x1.4995c60000000p-3f, 0x1.f809ba0000000p-3f, 0x1.5a06740000000p-2f, 0x1.c349700000000p-2f, 0x1.200f560000000p-1f, 0x1.7227660000000p-1f, 0x1.0000000000000p+0f};
/* Tables are C99 hex floats so that no decimal rounding can move a value (generated from
 * converter/formats/codebooks.py). Code 8 is -0.0 as in bitsandbytes' CUDA LUT. Magnitudes {0, 0.0625, 8, 12, 4, 6, 2, 3} / 12. */
const float qk_fp4_lut[16] = {0x0p+0f, 0x1.5555560000000p-8f, 0x1.5555560000000p-1f, 0x1.0000000000000p+0f, 0x1.5555560000000p-2f, 0x1.0000000000000p-1f, 0x1.5555560000000p-3f, 0x1.0000000000000p-2f, -0x0p+0f, -0x1.5555560000000p-8f, -0x1.5555560000000p-1f, -0x1.0000000000000p+0f, -0x1.5555560000000p-2f, -0x1.0000000000000p-1f, -0x1.5555560000000p-3f, -0x1.0000000000000p-2f};
/* Exact float32 midpoints of neighbouring NF4 codes (FORMAT.md 1.3). */
const float qk_nf4_thresholds[15] = {-0x1.b239b00000000p-1f, -0x1.38a4e00000000p-1f, -0x1.d709000000000p-2f, -0x1.5bd4ec0000000p-2f, -0x1.e079d80000000p-3f, -0x1.1a71780000000p-3f, -0x1.74f0e20000000p-5f, 0x1.45f5fe0000000p-5f, 0x1.ec90c40000000p-4f, 0x1.a0cfc00000000p-3f, 0x1.2b05a80000000p-2f, 0x1.8ea7f20000000p-2f, 0x1.00da080000000p-1f, 0x1.491b5e0000000p-1f, 0x1.b913b40000000p-1f};
/* CUDA's literal FP4 thresholds, a few ulps off the midpoints on purpose (FORMAT.md 1.3). */
const float qk_fp4_thresholds[7] = {0x1.5555720000000p-9f, 0x1.6000000000000p-4f, 0x1.aaaaaa0000000p-3f, 0x1.2aaaaa0000000p-2f, 0x1.aaaaac0000000p-2f, 0x1.2aaaa00000000p-1f, 0x1.aaaaaa0000000p-1f};
const uint8_t qk_fp4_bucket_code[8] = {0, 1, 6, 7, 4, 5, 2, 3};

static inline uint8_t code_of(int32_t quant_type, float xn) {
    return quant_type == QCKPT_NF4 ? qk_nf4_code(xn) : qk_fp4_code(xn);
}

int64_t qk_q4_quantize_scalar(const qk_q4_args *a, int64_t b0, int64_t b1) {
    const int64_t bs = a->blocksize;
    const uint8_t pad = a->quant_type == QCKPT_NF4 ? 7 : 0;
    for (int64_t b = b0; b < b1; b++) {
        int64_t start = b * bs, end = start + bs < a->n ? start + bs : a->n;
        /* Max of |x| as bit patterns: ordered like the floats, and NaN/inf sort above every finite. */
        uint32_t max_bits = 0;
        for (int64_t i = start; i < end; i++) {
            uint32_t bits = qk_f32_to_bits(qk_load_f32(a->x, a->dtype, i)) & 0x7FFFFFFFu;
            if (bits > max_bits) max_bits = bits;
        }
        if (max_bits >= 0x7F800000u) return b;
        float amax = qk_bits_to_f32(max_bits);
        a->absmax[b] = amax;
        float r = 1.0f / amax;
        for (int64_t i = start; i < end; i += 2) {
            uint8_t hi = code_of(a->quant_type, qk_load_f32(a->x, a->dtype, i) * r);
            uint8_t lo = i + 1 < end ? code_of(a->quant_type, qk_load_f32(a->x, a->dtype, i + 1) * r) : pad;
            a->packed[i / 2] = (uint8_t)(hi << 4 | lo);
        }
    }
    return -1;
}

void qk_q4_dequantize_scalar(const qk_q4_args *a, int64_t b0, int64_t b1) {
    const int64_t bs = a->blocksize;
    const float *lut = a->quant_type == QCKPT_NF4 ? qk_nf4_lut : qk_fp4_lut;
    for (int64_t b = b0; b < b1; b++) {
        int64_t start = b * bs, end = start + bs < a->n ? start + bs : a->n;
        float amax = a->absmax_in[b];
        for (int64_t i = start; i < end; i++) {
            uint8_t byte = a->packed_in[i / 2];
            uint8_t code = (i & 1) ? (byte & 0x0F) : (byte >> 4);
            qk_store(a->out, a->out_dtype, i, lut[code] * amax);
        }
    }
}

typedef struct {
    const qk_q4_args *args;
    qk_q4_quantize_fn quantize;
    qk_q4_dequantize_fn dequantize;
    int64_t bad_block[QCKPT_MAX_THREADS];
} q4_job;

static void quantize_range(void *ctx, int64_t b0, int64_t b1, int32_t worker) {
    q4_job *job = (q4_job *)ctx;
    job->bad_block[worker] = job->quantize(job->args, b0, b1);
}

static void dequantize_range(void *ctx, int64_t b0, int64_t b1, int32_t worker) {
    (void)worker;
    q4_job *job = (q4_job *)ctx;
    job->dequantize(job->args, b0, b1);
}

static qckpt_status check_common(int64_t n, int64_t blocksize, int32_t quant_type, const void *a, const void *b,
                                 const void *c) {
    if (a == NULL || b == NULL || c == NULL) return qckpt_fail(QCKPT_E_INVALID, "NULL data pointer");
    if (n <= 0) return qckpt_fail(QCKPT_E_INVALID, "element count must be positive, got %lld", (long long)n);
    if (blocksize < 32 || blocksize > 4096 || (blocksize & (blocksize - 1)))
        return qckpt_fail(QCKPT_E_INVALID, "blocksize must be a power of two in [32, 4096], got %lld",
                          (long long)blocksize);
    if (quant_type != QCKPT_NF4 && quant_type != QCKPT_FP4)
        return qckpt_fail(QCKPT_E_INVALID, "unknown 4-bit quant type %d", quant_type);
    return QCKPT_OK;
}

static void pick_variant(int32_t isa, q4_job *job) {
    job->quantize = qk_q4_quantize_scalar;
    job->dequantize = qk_q4_dequantize_scalar;
#ifdef QCKPT_HAVE_X86
    if (isa == QCKPT_ISA_AVX512) {
        job->quantize = qk_q4_quantize_avx512;
        job->dequantize = qk_q4_dequantize_avx512;
    } else if (isa == QCKPT_ISA_AVX2) {
        job->quantize = qk_q4_quantize_avx2;
        job->dequantize = qk_q4_dequantize_avx2;
    }
#elif defined(QCKPT_HAVE_NEON)
    if (isa == QCKPT_ISA_NEON) {
        job->quantize = qk_q4_quantize_neon;
        job->dequantize = qk_q4_dequantize_neon;
    }
#else
    (void)isa;
#endif
}

/* Blocks per thread below which splitting costs more than it saves (~64 KiB of input). */
static int64_t min_blocks(int64_t blocksize) { return 32768 / blocksize > 0 ? 32768 / blocksize : 1; }

qckpt_status qckpt_quantize_4bit(const void *x, int32_t dtype, int64_t n, int64_t blocksize, int32_t quant_type,
                                 uint8_t *packed, float *absmax, const qckpt_exec *exec) {
    int32_t threads, isa;
    qckpt_status st = qckpt_resolve_exec(exec, &threads, &isa);
    if (st != QCKPT_OK) return st;
    if ((st = check_common(n, blocksize, quant_type, x, packed, absmax)) != QCKPT_OK) return st;
    if (!qk_dtype_valid(dtype)) return qckpt_fail(QCKPT_E_INVALID, "unknown input dtype %d", dtype);
    qk_q4_args args = {.x = x, .dtype = dtype, .n = n, .blocksize = blocksize, .quant_type = quant_type,
                       .packed = packed, .absmax = absmax};
    q4_job job = {.args = &args};
    for (int i = 0; i < QCKPT_MAX_THREADS; i++) job.bad_block[i] = -1;
    pick_variant(isa, &job);
    qk_advise_hugepages(packed, (n + 1) / 2);
    int64_t nb = qk_ceil_div(n, blocksize);
    if ((st = qckpt_parallel_for(nb, min_blocks(blocksize), threads, quantize_range, &job)) != QCKPT_OK) return st;
    for (int w = 0; w < QCKPT_MAX_THREADS; w++) {
        int64_t b = job.bad_block[w];
        if (b < 0) continue; /* workers own increasing ranges: the first hit is the lowest block */
        for (int64_t i = b * blocksize; i < n; i++) {
            float v = qk_load_f32(x, dtype, i);
            if (v != v || v - v != 0.0f)
                return qckpt_fail(QCKPT_E_NONFINITE, "%s at flat index %lld", v != v ? "NaN" : "inf",
                                  (long long)i);
        }
    }
    return QCKPT_OK;
}

qckpt_status qckpt_dequantize_4bit(const uint8_t *packed, const float *absmax, int64_t n, int64_t blocksize,
                                   int32_t quant_type, void *out, int32_t out_dtype, const qckpt_exec *exec) {
    int32_t threads, isa;
    qckpt_status st = qckpt_resolve_exec(exec, &threads, &isa);
    if (st != QCKPT_OK) return st;
    if ((st = check_common(n, blocksize, quant_type, packed, absmax, out)) != QCKPT_OK) return st;
    if (!qk_dtype_valid(out_dtype)) return qckpt_fail(QCKPT_E_INVALID, "unknown output dtype %d", out_dtype);
    qk_q4_args args = {.n = n, .blocksize = blocksize, .quant_type = quant_type, .packed_in = packed,
                       .absmax_in = absmax, .out = out, .out_dtype = out_dtype};
    q4_job job = {.args = &args};
    pick_variant(isa, &job);
    qk_advise_hugepages(out, n * qk_dtype_size(out_dtype));
    return qckpt_parallel_for(qk_ceil_div(n, blocksize), min_blocks(blocksize), threads, dequantize_range, &job);
}
