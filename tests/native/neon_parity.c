/* neon_parity.c -- byte-for-byte parity of the NEON 4-bit variant against the scalar variant, through
 * the public ABI (qckpt_quantize_4bit / qckpt_dequantize_4bit with exec.isa pinned).
 * Built and run for AArch64 (under qemu on x86) by scripts/check_neon.sh; tests/test_neon_parity.py
 * runs that script. Inputs: awkward sizes (1, odd, partial blocks), every blocksize 32..4096, f32/f16/bf16,
 * NF4/FP4, Gaussian values with outliers and an all-zero block, random bit patterns (f16 subnormals,
 * huge/tiny f32), exact threshold ties, and NaN/inf for the error path; dequantize to every dtype from
 * real and from random codes/absmax (incl. 0, subnormal, huge, inf, NaN scales).
 * Usage: neon_parity [seed]. Prints one line per failure (first few) and a summary; exit 1 on mismatch. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

static uint64_t rng_state;
static uint64_t rnd(void) {
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}
static float uniform(void) { return (float)(rnd() >> 40) / (float)(1 << 24); }
static float gauss(void) {
    float s = 0;
    for (int i = 0; i < 12; i++) s += uniform();
    return s - 6.0f;
}

static long cases, failures;
static const char *DT[] = {"f32", "f16", "bf16"};

static void fail(const char *what, int64_t n, int64_t bs, int qt, int dt, int threads, int64_t at) {
    failures++;
    if (failures <= 10)
        fprintf(stderr, "MISMATCH %s: n=%lld bs=%lld %s dtype=%s threads=%d first difference at byte %lld\n", what,
                (long long)n, (long long)bs, qt == QCKPT_NF4 ? "nf4" : "fp4", DT[dt], threads, (long long)at);
}

static int64_t first_diff(const void *a, const void *b, size_t bytes) {
    const uint8_t *x = a, *y = b;
    for (size_t i = 0; i < bytes; i++)
        if (x[i] != y[i]) return (int64_t)i;
    return -1;
}

/* Store float v as element i of a dtype buffer (f16/bf16 via the scalar conversions). */
static void put(void *buf, int dt, int64_t i, float v) { qk_store(buf, dt, i, v); }

enum { FILL_GAUSS, FILL_BITS, FILL_TIES, FILL_ZERO, FILL_NONFINITE };

static void fill(void *x, int dt, int64_t n, int64_t bs, int kind, int qt) {
    for (int64_t i = 0; i < n; i++) {
        if (kind == FILL_BITS) { /* any finite bit pattern of the dtype */
            uint64_t r = rnd();
            if (dt == QCKPT_F32) {
                uint32_t b = (uint32_t)r;
                if ((b & 0x7F800000u) == 0x7F800000u) b &= 0xBFFFFFFFu;
                ((uint32_t *)x)[i] = b;
            } else {
                uint16_t h = (uint16_t)r;
                uint16_t expmask = dt == QCKPT_F16 ? 0x7C00 : 0x7F80;
                if ((h & expmask) == expmask) h &= (uint16_t)~(dt == QCKPT_F16 ? 0x4000 : 0x4000);
                ((uint16_t *)x)[i] = h;
            }
        } else if (kind == FILL_TIES) { /* exact thresholds and neighbours, block max 1.0 */
            const float *t = qt == QCKPT_NF4 ? qk_nf4_thresholds : qk_fp4_thresholds;
            int nt = qt == QCKPT_NF4 ? 15 : 7;
            float v = t[rnd() % nt];
            int m = (int)(rnd() % 4);
            if (m == 1) v = nextafterf(v, 2.0f);
            if (m == 2) v = nextafterf(v, -2.0f);
            if (rnd() & 1) v = -v;
            put(x, dt, i, (i % bs == 0) ? 1.0f : v);
        } else if (kind == FILL_ZERO) {
            put(x, dt, i, (rnd() & 1) ? 0.0f : -0.0f);
        } else { /* Gaussian, ~1% outliers x50, a few tiny values */
            float v = gauss();
            uint64_t r = rnd() % 100;
            if (r == 0) v *= 50.0f;
            if (r == 1) v *= 1e-6f;
            put(x, dt, i, v);
        }
    }
    if (kind == FILL_GAUSS && n >= 2 * bs) { /* one all-zero block in the middle */
        int64_t b = (n / bs) / 2;
        for (int64_t i = b * bs; i < (b + 1) * bs && i < n; i++) put(x, dt, i, 0.0f);
    }
    if (kind == FILL_NONFINITE) { /* Gaussian with one NaN/inf, maybe two */
        int64_t at = (int64_t)(rnd() % (uint64_t)n);
        float bad = (rnd() & 1) ? NAN : ((rnd() & 1) ? INFINITY : -INFINITY);
        put(x, dt, at, bad);
        if (rnd() & 1) put(x, dt, (int64_t)(rnd() % (uint64_t)n), NAN);
    }
}

static void check_dequant(const uint8_t *packed, const float *absmax, int64_t n, int64_t bs, int qt, int threads,
                          const char *what) {
    qckpt_exec sc = {threads, QCKPT_ISA_SCALAR}, ne = {threads, QCKPT_ISA_NEON};
    for (int od = 0; od < 3; od++) {
        size_t bytes = (size_t)n * (od == QCKPT_F32 ? 4 : 2);
        void *o1 = malloc(bytes), *o2 = malloc(bytes);
        memset(o1, 0xAB, bytes);
        memset(o2, 0xCD, bytes);
        qckpt_status s1 = qckpt_dequantize_4bit(packed, absmax, n, bs, qt, o1, od, &sc);
        qckpt_status s2 = qckpt_dequantize_4bit(packed, absmax, n, bs, qt, o2, od, &ne);
        cases++;
        if (s1 != QCKPT_OK || s2 != QCKPT_OK) fail(what, n, bs, qt, od, threads, -2);
        else {
            int64_t d = first_diff(o1, o2, bytes);
            if (d >= 0) fail(what, n, bs, qt, od, threads, d);
        }
        free(o1);
        free(o2);
    }
}

static void one_case(int64_t n, int64_t bs, int qt, int dt, int kind, int threads) {
    size_t xb = (size_t)n * (dt == QCKPT_F32 ? 4 : 2), pb = (size_t)(n + 1) / 2, nb = (size_t)((n + bs - 1) / bs);
    void *x = malloc(xb);
    uint8_t *p1 = malloc(pb), *p2 = malloc(pb);
    float *a1 = malloc(nb * 4), *a2 = malloc(nb * 4);
    memset(p1, 0x11, pb);
    memset(p2, 0x11, pb);
    memset(a1, 0x22, nb * 4);
    memset(a2, 0x22, nb * 4);
    fill(x, dt, n, bs, kind, qt);
    qckpt_exec sc = {threads, QCKPT_ISA_SCALAR}, ne = {threads, QCKPT_ISA_NEON};
    qckpt_status s1 = qckpt_quantize_4bit(x, dt, n, bs, qt, p1, a1, &sc);
    char m1[256];
    snprintf(m1, sizeof m1, "%s", qckpt_last_error());
    qckpt_status s2 = qckpt_quantize_4bit(x, dt, n, bs, qt, p2, a2, &ne);
    cases++;
    if (kind == FILL_NONFINITE) {
        /* Error path: both reject with the same status and message (the same flat index). */
        if (s1 != QCKPT_E_NONFINITE || s2 != s1 || strcmp(m1, qckpt_last_error()) != 0)
            fail("nonfinite error", n, bs, qt, dt, threads, -3);
    } else if (s1 != QCKPT_OK || s2 != QCKPT_OK) {
        fail("quantize status", n, bs, qt, dt, threads, -2);
    } else {
        int64_t d;
        if ((d = first_diff(p1, p2, pb)) >= 0) fail("quantize packed", n, bs, qt, dt, threads, d);
        if ((d = first_diff(a1, a2, nb * 4)) >= 0) fail("quantize absmax", n, bs, qt, dt, threads, d);
        check_dequant(p1, a1, n, bs, qt, threads, "dequantize (quantized input)");
    }
    free(x);
    free(p1);
    free(p2);
    free(a1);
    free(a2);
}

/* Random codes and scales, incl. 0, subnormal, huge (f16/bf16 overflow), inf and NaN absmax. */
static void random_dequant(int64_t n, int64_t bs, int qt, int threads) {
    size_t pb = (size_t)(n + 1) / 2, nb = (size_t)((n + bs - 1) / bs);
    uint8_t *p = malloc(pb);
    float *a = malloc(nb * 4);
    for (size_t i = 0; i < pb; i++) p[i] = (uint8_t)rnd();
    const float special[] = {0.0f, 1e-40f, 1e-45f, 3e-5f, 6e-8f, 65504.0f, 65520.0f, 1e30f, 3.4e38f, INFINITY, NAN};
    for (size_t b = 0; b < nb; b++) {
        uint64_t r = rnd() % 4;
        if (r == 0) a[b] = special[rnd() % (sizeof special / sizeof *special)];
        else if (r == 1) { uint32_t bits = (uint32_t)rnd() & 0x7FFFFFFFu; memcpy(&a[b], &bits, 4); }
        else a[b] = fabsf(gauss()) * 4.0f;
    }
    check_dequant(p, a, n, bs, qt, threads, "dequantize (random codes/scales)");
    free(p);
    free(a);
}

int main(int argc, char **argv) {
    unsigned long long seed = argc > 1 ? strtoull(argv[1], NULL, 10) : 12345;
    rng_state = seed * 0x9E3779B97F4A7C15ull + 1;
    printf("seed %llu, best ISA %d (NEON is %d)\n", seed, qckpt_best_isa(), QCKPT_ISA_NEON);
    if (qckpt_best_isa() != QCKPT_ISA_NEON) {
        fprintf(stderr, "FAIL: qckpt_best_isa() is not NEON on this build\n");
        return 1;
    }
    /* An x86 variant must be refused here, not silently run as scalar. */
    uint8_t pk[32];
    float am[1], ones[64];
    for (int i = 0; i < 64; i++) ones[i] = 1.0f;
    qckpt_exec avx = {1, QCKPT_ISA_AVX2};
    if (qckpt_quantize_4bit(ones, QCKPT_F32, 64, 64, QCKPT_NF4, pk, am, &avx) != QCKPT_E_UNSUPPORTED) {
        fprintf(stderr, "FAIL: AVX2 was not refused on AArch64\n");
        return 1;
    }
    for (int64_t bs = 32; bs <= 4096; bs *= 2) {
        /* 1, odd, below one block, one block +-1, partial last block, several blocks */
        int64_t sizes[] = {1, 3, 17, bs - 1, bs, bs + 1, 2 * bs + 15, 5 * bs, 3 * bs + 1 + (int64_t)(rnd() % (uint64_t)bs)};
        for (size_t s = 0; s < sizeof sizes / sizeof *sizes; s++) {
            int64_t n = sizes[s];
            for (int qt = 0; qt < 2; qt++)
                for (int dt = 0; dt < 3; dt++) {
                    int threads = (s % 3 == 2) ? 3 : 1;
                    one_case(n, bs, qt, dt, FILL_GAUSS, threads);
                    one_case(n, bs, qt, dt, FILL_BITS, threads);
                    one_case(n, bs, qt, dt, FILL_TIES, threads);
                    one_case(n, bs, qt, dt, FILL_NONFINITE, threads);
                    if (s == 5) one_case(n, bs, qt, dt, FILL_ZERO, threads);
                }
            for (int qt = 0; qt < 2; qt++) random_dequant(n, bs, qt, s % 2 ? 2 : 1);
        }
    }
    printf("%ld cases, %ld mismatches\n", cases, failures);
    if (failures) return 1;
    printf("NEON == scalar byte for byte\n");
    return 0;
}
