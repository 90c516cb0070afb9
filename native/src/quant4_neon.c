/* quant4_neon.c -- AArch64 NEON variant of blockwise 4-bit quantize/dequantize, 16 elements a step
 * (four 4-lane float vectors). Same float32 operations as the scalar variant, so the bytes are identical;
 * checked byte for byte against the scalar variant under qemu by scripts/check_neon.sh
 * (tests/test_neon_parity.py) and on ARM hardware by tests/test_kernels_cpu.py.
 * Assumes the default FPCR (round to nearest even, no flush to zero), as the scalar float code does. */
#include "internal.h"

#ifdef QCKPT_HAVE_NEON
#include <arm_neon.h>

/* Exact widening to float32: f16 subnormals/inf are exact; NaN only occurs in blocks that get rejected. */
static inline float32x4_t load4(const void *x, int32_t dtype, int64_t i) {
    switch (dtype) {
    case QCKPT_F32: return vld1q_f32((const float *)x + i);
    case QCKPT_F16: return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16((const uint16_t *)x + i)));
    default: return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16((const uint16_t *)x + i), 16));
    }
}

/* Compare masks are all-ones per true lane: subtracting them counts thresholds strictly below v. */
static inline uint32x4_t count_gt(float32x4_t v, const float *t, int count) {
    uint32x4_t c = vdupq_n_u32(0);
    for (int i = 0; i < count; i++) c = vsubq_u32(c, vcgtq_f32(v, vdupq_n_f32(t[i])));
    return c;
}

static inline uint8x16_t narrow16(uint32x4_t a, uint32x4_t b, uint32x4_t c, uint32x4_t d) {
    return vcombine_u8(vmovn_u16(vcombine_u16(vmovn_u32(a), vmovn_u32(b))),
                       vmovn_u16(vcombine_u16(vmovn_u32(c), vmovn_u32(d))));
}

/* Codes of 16 normalized values. FP4: bucket -> code by table lookup, sign bit from xn < 0
 * (false for NaN and -0.0, as in qk_fp4_code). NF4 is the plain count. */
static inline uint8x16_t codes16(const float32x4_t xn[4], int nf4, uint8x16_t bucket_code) {
    if (nf4)
        return narrow16(count_gt(xn[0], qk_nf4_thresholds, 15), count_gt(xn[1], qk_nf4_thresholds, 15),
                        count_gt(xn[2], qk_nf4_thresholds, 15), count_gt(xn[3], qk_nf4_thresholds, 15));
    uint32x4_t bucket[4], neg[4];
    for (int k = 0; k < 4; k++) {
        bucket[k] = count_gt(vabsq_f32(xn[k]), qk_fp4_thresholds, 7);
        neg[k] = vcltq_f32(xn[k], vdupq_n_f32(0.0f));
    }
    uint8x16_t code = vqtbl1q_u8(bucket_code, narrow16(bucket[0], bucket[1], bucket[2], bucket[3]));
    return vorrq_u8(code, vandq_u8(narrow16(neg[0], neg[1], neg[2], neg[3]), vdupq_n_u8(8)));
}

/* 16 codes -> 8 bytes, element 2j in the high nibble of byte j. */
static inline void pack_store(uint8x16_t codes, uint8_t *dst) {
    uint8x16_t even = vuzp1q_u8(codes, codes), odd = vuzp2q_u8(codes, codes);
    vst1_u8(dst, vsli_n_u8(vget_low_u8(odd), vget_low_u8(even), 4));
}

int64_t qk_q4_quantize_neon(const qk_q4_args *a, int64_t b0, int64_t b1) {
    const int64_t bs = a->blocksize, full = a->n / bs;
    const int nf4 = a->quant_type == QCKPT_NF4;
    uint8_t bc[16] = {0};
    for (int i = 0; i < 8; i++) bc[i] = qk_fp4_bucket_code[i];
    const uint8x16_t bucket_code = vld1q_u8(bc);
    const uint32x4_t abs_mask = vdupq_n_u32(0x7FFFFFFFu);
    int64_t b = b0, stop = b1 < full ? b1 : full;
    for (; b < stop; b++) {
        const int64_t start = b * bs;
        /* Max of |x| as bit patterns, as the scalar code: NaN/inf sort above every finite value. */
        uint32x4_t max_bits = vdupq_n_u32(0);
        for (int64_t i = 0; i < bs; i += 4)
            max_bits = vmaxq_u32(max_bits, vandq_u32(vreinterpretq_u32_f32(load4(a->x, a->dtype, start + i)), abs_mask));
        uint32_t mb = vmaxvq_u32(max_bits);
        if (mb >= 0x7F800000u) return b;
        float amax = qk_bits_to_f32(mb);
        a->absmax[b] = amax;
        const float32x4_t r = vdupq_n_f32(1.0f / amax);
        for (int64_t i = 0; i < bs; i += 16) {
            float32x4_t xn[4];
            for (int k = 0; k < 4; k++) xn[k] = vmulq_f32(load4(a->x, a->dtype, start + i + 4 * k), r);
            pack_store(codes16(xn, nf4, bucket_code), a->packed + (start + i) / 2);
        }
    }
    if (b < b1) return qk_q4_quantize_scalar(a, b, b1);
    return -1;
}

static inline void store4(void *out, int32_t dtype, int64_t i, float32x4_t v) {
    uint32x4_t bits = vreinterpretq_u32_f32(v);
    uint32x4_t not_nan = vceqq_f32(v, v);
    switch (dtype) {
    case QCKPT_F32: vst1q_f32((float *)out + i, v); break;
    case QCKPT_F16: {
        /* FCVTN rounds to nearest even (default FPCR) and overflows to inf like qk_f32_to_f16; NaN is
         * rebuilt as sign | 0x7E00 | mantissa >> 13 so the result does not depend on FPCR.DN. */
        uint32x4_t nan16 = vorrq_u32(vandq_u32(vshrq_n_u32(bits, 16), vdupq_n_u32(0x8000u)),
                                     vorrq_u32(vdupq_n_u32(0x7E00u), vandq_u32(vshrq_n_u32(bits, 13), vdupq_n_u32(0x3FFu))));
        uint16x4_t h = vreinterpret_u16_f16(vcvt_f16_f32(v));
        vst1_u16((uint16_t *)out + i, vbsl_u16(vmovn_u32(not_nan), h, vmovn_u32(nan16)));
        break;
    }
    default: {
        /* qk_f32_to_bf16 in integer lanes: round to nearest even, NaN -> 0x7FC0. */
        uint32x4_t lsb = vandq_u32(vshrq_n_u32(bits, 16), vdupq_n_u32(1));
        uint32x4_t rounded = vshrq_n_u32(vaddq_u32(bits, vaddq_u32(lsb, vdupq_n_u32(0x7FFFu))), 16);
        rounded = vbslq_u32(not_nan, rounded, vdupq_n_u32(0x7FC0u));
        vst1_u16((uint16_t *)out + i, vmovn_u32(rounded));
    }
    }
}

void qk_q4_dequantize_neon(const qk_q4_args *a, int64_t b0, int64_t b1) {
    const int64_t bs = a->blocksize, full = a->n / bs;
    const float *lut = a->quant_type == QCKPT_NF4 ? qk_nf4_lut : qk_fp4_lut;
    /* The 16-float LUT split into four byte planes: one byte-table lookup per plane gives byte k of
     * lut[code] for 16 codes, and two rounds of zips put the bytes back together as floats. */
    uint8_t planes[4][16];
    for (int c = 0; c < 16; c++) {
        uint32_t v = qk_f32_to_bits(lut[c]);
        for (int k = 0; k < 4; k++) planes[k][c] = (uint8_t)(v >> (8 * k));
    }
    const uint8x16_t p0 = vld1q_u8(planes[0]), p1 = vld1q_u8(planes[1]), p2 = vld1q_u8(planes[2]),
                     p3 = vld1q_u8(planes[3]);
    int64_t b = b0, stop = b1 < full ? b1 : full;
    for (; b < stop; b++) {
        const int64_t start = b * bs;
        const float32x4_t amax = vdupq_n_f32(a->absmax_in[b]);
        for (int64_t i = 0; i < bs; i += 16) {
            uint8x8_t bytes = vld1_u8(a->packed_in + (start + i) / 2);
            uint8x8_t hi = vshr_n_u8(bytes, 4), lo = vand_u8(bytes, vdup_n_u8(0x0F));
            uint8x16_t codes = vcombine_u8(vzip1_u8(hi, lo), vzip2_u8(hi, lo));
            uint8x16_t b0v = vqtbl1q_u8(p0, codes), b1v = vqtbl1q_u8(p1, codes), b2v = vqtbl1q_u8(p2, codes),
                       b3v = vqtbl1q_u8(p3, codes);
            uint16x8_t l01 = vreinterpretq_u16_u8(vzip1q_u8(b0v, b1v)), h01 = vreinterpretq_u16_u8(vzip2q_u8(b0v, b1v));
            uint16x8_t l23 = vreinterpretq_u16_u8(vzip1q_u8(b2v, b3v)), h23 = vreinterpretq_u16_u8(vzip2q_u8(b2v, b3v));
            float32x4_t v[4] = {vreinterpretq_f32_u16(vzip1q_u16(l01, l23)), vreinterpretq_f32_u16(vzip2q_u16(l01, l23)),
                                vreinterpretq_f32_u16(vzip1q_u16(h01, h23)), vreinterpretq_f32_u16(vzip2q_u16(h01, h23))};
            for (int k = 0; k < 4; k++) store4(a->out, a->out_dtype, start + i + 4 * k, vmulq_f32(v[k], amax));
        }
    }
    if (b < b1) qk_q4_dequantize_scalar(a, b, b1);
}
#endif
