/* optim8_avx512.c -- AVX-512 (F+BW+VL) variant of the fused 8-bit AdamW step, 16 lanes. The same float32
 * operations in the same order as qk_adam8_scalar (optim8.c), so parameters and states come out
 * identical (tests/test_optim_kernel.py compares the variants). Dequantization gathers from the 256-entry
 * map (qk_adam8_avx512) or, on CPUs with AVX-512 VBMI, looks the codes up with byte permutes and overlaps
 * one block's code selection with the next block's update (qk_adam8_avx512_vbmi, below); code selection
 * uses the bucket table (optim8.h) when the call built one, else the scalar's
 * branchless binary search with its 8 levels unrolled into per-level tables (level with step s probes
 * t[j*2s + s-1], j = idx / 2s) so every probe is a register permute. */
#include "optim8.h"

#ifdef QCKPT_HAVE_X86
#pragma GCC target("avx512f,avx512bw,avx512vl")
#include <immintrin.h>

#include "simd_avx512.h"

typedef struct {
    __m512 l128, l64, l32, l16, l8; /* steps 128..8: 1, 2, 4, 8, 16 entries (one register each) */
    __m512 l4[2], l2[4], l1[8];     /* steps 4, 2, 1: 32, 64, 128 entries */
} search_tables;

static void build_tables(const float *thr, search_tables *t) {
    float tmp[128];
    __m512 *single[5] = {NULL, &t->l64, &t->l32, &t->l16, &t->l8};
    for (int level = 0; level < 8; level++) {
        int s = 128 >> level, count = 1 << level;
        for (int j = 0; j < 16; j++) tmp[j] = 0.0f;
        for (int j = 0; j < count; j++) tmp[j] = thr[j * 2 * s + s - 1];
        if (level == 0) t->l128 = _mm512_set1_ps(tmp[0]); /* every lane probes index 127 */
        else if (level < 5) *single[level] = _mm512_loadu_ps(tmp);
        for (int r = 0; level >= 5 && r < count / 16; r++) {
            __m512 v = _mm512_loadu_ps(tmp + 16 * r);
            if (level == 5) t->l4[r] = v;
            else if (level == 6) t->l2[r] = v;
            else t->l1[r] = v;
        }
    }
}

/* idx += s where t_s[idx / 2s] < x (the scalar's "thr[idx + s - 1] < x"). */
static inline __m512i level_step(__m512i idx, __m512 probe, __m512 x, int s) {
    __mmask16 lt = _mm512_cmp_ps_mask(probe, x, _CMP_LT_OQ); /* NaN: false */
    return _mm512_mask_add_epi32(idx, lt, idx, _mm512_set1_epi32(s));
}

static inline __m512i codes16(__m512 x, const search_tables *t) {
    __m512i idx = _mm512_setzero_si512();
    idx = level_step(idx, t->l128, x, 128); /* l128 is thr[127] in every lane */
    idx = level_step(idx, _mm512_permutexvar_ps(_mm512_srli_epi32(idx, 7), t->l64), x, 64);
    idx = level_step(idx, _mm512_permutexvar_ps(_mm512_srli_epi32(idx, 6), t->l32), x, 32);
    idx = level_step(idx, _mm512_permutexvar_ps(_mm512_srli_epi32(idx, 5), t->l16), x, 16);
    idx = level_step(idx, _mm512_permutexvar_ps(_mm512_srli_epi32(idx, 4), t->l8), x, 8);
    __m512i j = _mm512_srli_epi32(idx, 3); /* 0..31 */
    idx = level_step(idx, _mm512_permutex2var_ps(t->l4[0], j, t->l4[1]), x, 4);
    j = _mm512_srli_epi32(idx, 2); /* 0..63: bit 5 picks the register pair */
    __mmask16 hi5 = _mm512_test_epi32_mask(j, _mm512_set1_epi32(32));
    __m512 p = _mm512_mask_blend_ps(hi5, _mm512_permutex2var_ps(t->l2[0], j, t->l2[1]),
                                    _mm512_permutex2var_ps(t->l2[2], j, t->l2[3]));
    idx = level_step(idx, p, x, 2);
    j = _mm512_srli_epi32(idx, 1); /* 0..127: bits 5 and 6 pick the register pair */
    hi5 = _mm512_test_epi32_mask(j, _mm512_set1_epi32(32));
    __mmask16 hi6 = _mm512_test_epi32_mask(j, _mm512_set1_epi32(64));
    __m512 lo = _mm512_mask_blend_ps(hi5, _mm512_permutex2var_ps(t->l1[0], j, t->l1[1]),
                                     _mm512_permutex2var_ps(t->l1[2], j, t->l1[3]));
    __m512 hi = _mm512_mask_blend_ps(hi5, _mm512_permutex2var_ps(t->l1[4], j, t->l1[5]),
                                     _mm512_permutex2var_ps(t->l1[6], j, t->l1[7]));
    return level_step(idx, _mm512_mask_blend_ps(hi6, lo, hi), x, 1);
}

/* qk_code_lut for 16 lanes: one gather from the bucket table and one compare. */
static inline __m512i codes16_lut(__m512 x, const uint32_t *lut) {
    const __m512i bits = _mm512_castps_si512(x);
    const __m512i mag = _mm512_and_si512(bits, _mm512_set1_epi32(0x7FFFFFFF));
    const __mmask16 neg = _mm512_cmplt_epi32_mask(bits, _mm512_setzero_si512());
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(mag, _mm512_set1_epi32(0x7F800000));
    __m512i key = _mm512_srli_epi32(mag, 16);
    key = _mm512_min_epu32(_mm512_max_epu32(key, _mm512_set1_epi32(QK_LUT_KEY_MIN)), _mm512_set1_epi32(QK_LUT_KEY_MAX));
    __m512i idx = _mm512_sub_epi32(key, _mm512_set1_epi32(QK_LUT_KEY_MIN));
    idx = _mm512_mask_add_epi32(idx, neg, idx, _mm512_set1_epi32(QK_LUT_BUCKETS));
    const __m512i e = _mm512_i32gather_epi32(idx, (const int *)lut, 4);
    const __m512i low16 = _mm512_set1_epi32(0xFFFF);
    const __m512i low = _mm512_and_si512(mag, low16), t = _mm512_and_si512(e, low16);
    const __mmask16 inc = _mm512_mask_cmpgt_epu32_mask((__mmask16)~neg, low, t) | _mm512_mask_cmplt_epu32_mask(neg, low, t);
    __m512i code = _mm512_srli_epi32(e, 16);
    code = _mm512_mask_add_epi32(code, inc, code, _mm512_set1_epi32(1));
    return _mm512_maskz_mov_epi32((__mmask16)~nan, code);
}

static inline __mmask16 lanes(int64_t remaining) {
    return remaining >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << remaining) - 1u);
}

/* Codes for x[0..len) with the block absmax computed as the scalar does (largest |x| bit pattern). */
static void quantize_block(const float *x, int64_t len, const search_tables *t, const uint32_t *lut, uint8_t *codes,
                           float *absmax) {
    const __m512i abs_mask = _mm512_set1_epi32(0x7FFFFFFF);
    __m512i max_bits = _mm512_setzero_si512();
    for (int64_t i = 0; i < len; i += 16) {
        __m512i bits = _mm512_maskz_loadu_epi32(lanes(len - i), x + i);
        max_bits = _mm512_max_epu32(max_bits, _mm512_and_si512(bits, abs_mask));
    }
    float amax = qk_bits_to_f32((uint32_t)_mm512_reduce_max_epu32(max_bits));
    *absmax = amax;
    const __m512 r = _mm512_set1_ps(1.0f / amax);
    for (int64_t i = 0; i < len; i += 16) {
        __mmask16 k = lanes(len - i);
        __m512 xn = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, x + i), r);
        __m512i c = lut ? codes16_lut(xn, lut) : codes16(xn, t);
        /* register-form narrowing, then a byte store: vpmovdb to memory is microcoded on Zen 4, and the
         * empty asm keeps the compiler from folding the pair back into it */
        __m128i bytes = _mm512_cvtepi32_epi8(c);
        __asm__("" : "+v"(bytes));
        if (k == 0xFFFF) _mm_storeu_si128((__m128i *)(codes + i), bytes);
        else _mm_mask_storeu_epi8(codes + i, k, bytes);
    }
}

/* The broadcast hyper-parameters of one call. */
typedef struct {
    __m512 beta1, beta2, omb1, omb2, eps, step, bc2, decay;
    __m512i sign_flip;
} adam_consts;

static void load_consts(const qckpt_adamw_hparams *hp, adam_consts *c) {
    c->beta1 = _mm512_set1_ps(hp->beta1), c->beta2 = _mm512_set1_ps(hp->beta2);
    c->omb1 = _mm512_set1_ps(hp->one_minus_beta1), c->omb2 = _mm512_set1_ps(hp->one_minus_beta2);
    c->eps = _mm512_set1_ps(hp->eps), c->step = _mm512_set1_ps(hp->step_size);
    c->bc2 = _mm512_set1_ps(hp->bias_correction2_sqrt), c->decay = _mm512_set1_ps(hp->decay);
    c->sign_flip = _mm512_set1_epi32(hp->maximize ? (int32_t)0x80000000u : 0);
}

/* The update of 16 elements k.. (lanes in mask) from their dequantized moments m0, v0: parameter stored,
 * new moments returned. */
static inline void update16(const qk_adam_args *a, const adam_consts *c, int64_t k, __mmask16 mask, __m512 m0,
                            __m512 v0, __m512 *m_out, __m512 *v_out) {
    __m512 g = _mm512_castsi512_ps(
        _mm512_xor_si512(_mm512_castps_si512(qk_load16(a->grad, a->grad_dtype, k, mask)), c->sign_flip));
    __m512 m = _mm512_add_ps(_mm512_mul_ps(m0, c->beta1), _mm512_mul_ps(g, c->omb1));
    __m512 v = _mm512_add_ps(_mm512_mul_ps(v0, c->beta2), _mm512_mul_ps(_mm512_mul_ps(g, g), c->omb2));
    __m512 denom = _mm512_add_ps(_mm512_div_ps(_mm512_sqrt_ps(v), c->bc2), c->eps);
    __m512 p = _mm512_mul_ps(qk_load16(a->param, a->param_dtype, k, mask), c->decay);
    p = _mm512_sub_ps(p, _mm512_mul_ps(c->step, _mm512_div_ps(m, denom)));
    qk_store16(a->param, a->param_dtype, k, p, mask);
    *m_out = m;
    *v_out = v;
}

/* Elements i0..len of block b with gathers from the maps, then both moments of the whole block
 * (mbuf/vbuf, filled below i0 by the caller) re-quantized. */
static void finish_block(const qk_adam_args *a, const adam_consts *c, const search_tables *mt,
                         const search_tables *vt, int64_t b, int64_t i0, float *mbuf, float *vbuf) {
    const int64_t start = b * a->blocksize;
    const int64_t len = a->n - start < a->blocksize ? a->n - start : a->blocksize;
    const __m512 am = _mm512_set1_ps(a->m_absmax[b]), av = _mm512_set1_ps(a->v_absmax[b]);
    for (int64_t i = i0; i < len; i += 16) {
        const int64_t k = start + i;
        const __mmask16 mask = lanes(len - i);
        /* masked-off lanes load code 0: a valid map index, and their results are never stored */
        __m512i mc, vc;
        if (mask == 0xFFFF) {
            mc = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(a->m_codes + k)));
            vc = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(a->v_codes + k)));
        } else {
            mc = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(mask, a->m_codes + k));
            vc = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(mask, a->v_codes + k));
        }
        __m512 m0 = _mm512_mul_ps(_mm512_i32gather_ps(mc, a->m_map, 4), am);
        __m512 v0 = _mm512_mul_ps(_mm512_i32gather_ps(vc, a->v_map, 4), av);
        __m512 m, v;
        update16(a, c, k, mask, m0, v0, &m, &v);
        _mm512_mask_storeu_ps(mbuf + i, mask, m);
        _mm512_mask_storeu_ps(vbuf + i, mask, v);
    }
    quantize_block(mbuf, len, mt, a->use_lut ? a->m_lut : NULL, a->m_codes + start, &a->m_absmax[b]);
    quantize_block(vbuf, len, vt, a->use_lut ? a->v_lut : NULL, a->v_codes + start, &a->v_absmax[b]);
}

void qk_adam8_avx512(const qk_adam_args *a, int64_t b0, int64_t b1) {
    float mbuf[QK_OPTIM_MAX_BLOCK], vbuf[QK_OPTIM_MAX_BLOCK];
    search_tables mt, vt;
    build_tables(a->m_thr, &mt);
    build_tables(a->v_thr, &vt);
    adam_consts c;
    load_consts(&a->hp, &c);
    for (int64_t b = b0; b < b1; b++) finish_block(a, &c, &mt, &vt, b, 0, mbuf, vbuf);
}

/* ---- AVX-512 VBMI: the map lookups without gathers ----
 * A 16-lane gather costs ~11 cycles on this class of core (half the step time went to the two map
 * gathers and the two bucket-table gathers). With VBMI, vpermi2b looks up 64 bytes in a 128-byte table
 * held in two registers; a float map is four such byte planes (byte b of every entry) of 256 entries,
 * i.e. two vpermi2b and a blend on the code's top bit per plane, then the four planes interleave back
 * into floats by unpacks. The values are the map's own bits, so results stay identical. */
#define QK_VBMI_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi")))

typedef struct {
    __m512i t[4][4]; /* t[b][q]: byte b of map entries 64q..64q+63 */
} byte_planes;

static void build_planes(const float *map, byte_planes *bp) {
    uint8_t tmp[4][256];
    for (int i = 0; i < 256; i++) {
        uint32_t bits = qk_f32_to_bits(map[i]);
        for (int b = 0; b < 4; b++) tmp[b][i] = (uint8_t)(bits >> (8 * b));
    }
    for (int b = 0; b < 4; b++)
        for (int q = 0; q < 4; q++) bp->t[b][q] = _mm512_loadu_si512(tmp[b] + 64 * q);
}

static inline QK_VBMI_TARGET __m512i plane_lookup(const byte_planes *bp, int b, __m512i c, __mmask64 high) {
    __m512i lo = _mm512_permutex2var_epi8(bp->t[b][0], c, bp->t[b][1]);
    __m512i hi = _mm512_permutex2var_epi8(bp->t[b][2], c, bp->t[b][3]);
    return _mm512_mask_blend_epi8(high, lo, hi);
}

/* The unpacks below interleave within 128-bit lanes: output register u, lane L, dword j holds position
 * 16L + 4u + j of the code vector. Codes are permuted first (position 16L + 4u + j <- element 16u + 4L + j)
 * so that output register u is elements 16u..16u+15 in order. */
static __m512i unpack_order(void) {
    uint8_t p[64];
    for (int L = 0; L < 4; L++)
        for (int u = 0; u < 4; u++)
            for (int j = 0; j < 4; j++) p[16 * L + 4 * u + j] = (uint8_t)(16 * u + 4 * L + j);
    return _mm512_loadu_si512(p);
}

/* map[codes[0..63]] as 4 x 16 floats in element order. */
static inline QK_VBMI_TARGET void lookup64(const uint8_t *codes, const byte_planes *bp, __m512i order,
                                           __m512 out[4]) {
    __m512i c = _mm512_permutexvar_epi8(order, _mm512_loadu_si512(codes));
    __mmask64 high = _mm512_movepi8_mask(c); /* code >= 128: the upper table pair */
    __m512i b0 = plane_lookup(bp, 0, c, high), b1 = plane_lookup(bp, 1, c, high);
    __m512i b2 = plane_lookup(bp, 2, c, high), b3 = plane_lookup(bp, 3, c, high);
    __m512i wl = _mm512_unpacklo_epi8(b0, b1), wh = _mm512_unpackhi_epi8(b0, b1);
    __m512i xl = _mm512_unpacklo_epi8(b2, b3), xh = _mm512_unpackhi_epi8(b2, b3);
    out[0] = _mm512_castsi512_ps(_mm512_unpacklo_epi16(wl, xl));
    out[1] = _mm512_castsi512_ps(_mm512_unpackhi_epi16(wl, xl));
    out[2] = _mm512_castsi512_ps(_mm512_unpacklo_epi16(wh, xh));
    out[3] = _mm512_castsi512_ps(_mm512_unpackhi_epi16(wh, xh));
}

/* Codes of 16 whole elements x[0..16) * r, stored at codes (quantize_block's inner step). */
static inline void codes_store16(const float *x, __m512 r, const search_tables *t, const uint32_t *lut,
                                 uint8_t *codes) {
    __m512 xn = _mm512_mul_ps(_mm512_loadu_ps(x), r);
    __m128i bytes = _mm512_cvtepi32_epi8(lut ? codes16_lut(xn, lut) : codes16(xn, t));
    __asm__("" : "+v"(bytes)); /* see quantize_block */
    _mm_storeu_si128((__m128i *)codes, bytes);
}

static inline __m512i max_abs_bits(__m512i acc, __m512 x) {
    return _mm512_max_epu32(acc, _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(0x7FFFFFFF)));
}

/* Whole blocks (blocksize a multiple of 64) are software-pipelined: the code selection of the previous
 * block runs in the same loop as the update of this one. The code selection is bound by its table gathers
 * (~16 cycles per 16 lanes, ~0.3 ns per element each) and the update by vector arithmetic, so interleaving
 * lets the two overlap. The block absmax is taken from the update's registers (the same largest |x| bit
 * pattern quantize_block finds). Other blocks (a short last block, other block sizes) run unpipelined. */
QK_VBMI_TARGET void qk_adam8_avx512_vbmi(const qk_adam_args *a, int64_t b0, int64_t b1) {
    float buf[2][2][QK_OPTIM_MAX_BLOCK]; /* [this block / previous block][m, v] */
    search_tables mt, vt;
    build_tables(a->m_thr, &mt);
    build_tables(a->v_thr, &vt);
    adam_consts c;
    load_consts(&a->hp, &c);
    byte_planes mp, vp;
    build_planes(a->m_map, &mp);
    build_planes(a->v_map, &vp);
    const __m512i order = unpack_order();
    const uint32_t *m_lut = a->use_lut ? a->m_lut : NULL, *v_lut = a->use_lut ? a->v_lut : NULL;
    const int64_t bs = a->blocksize;
    int cur = 0, pending = 0; /* pending: block prev's moments wait in buf[cur ^ 1] for their codes */
    int64_t prev = 0;
    __m512 prev_rm = _mm512_setzero_ps(), prev_rv = _mm512_setzero_ps();
    for (int64_t b = b0; b < b1; b++) {
        const int64_t start = b * bs;
        const int64_t len = a->n - start < bs ? a->n - start : bs;
        float *mbuf = buf[cur][0], *vbuf = buf[cur][1];
        const float *pm = buf[cur ^ 1][0], *pv = buf[cur ^ 1][1];
        uint8_t *pmc = a->m_codes + prev * bs, *pvc = a->v_codes + prev * bs;
        const __m512 am = _mm512_set1_ps(a->m_absmax[b]), av = _mm512_set1_ps(a->v_absmax[b]);
        const int pipelined = len == bs && bs % 64 == 0;
        if (!pipelined && pending) {
            for (int64_t i = 0; i < bs; i += 16) {
                codes_store16(pm + i, prev_rm, &mt, m_lut, pmc + i);
                codes_store16(pv + i, prev_rv, &vt, v_lut, pvc + i);
            }
            pending = 0;
        }
        __m512i m_max = _mm512_setzero_si512(), v_max = _mm512_setzero_si512();
        int64_t i = 0;
        for (; i + 64 <= len; i += 64) {
            __m512 mq[4], vq[4];
            lookup64(a->m_codes + start + i, &mp, order, mq);
            lookup64(a->v_codes + start + i, &vp, order, vq);
            for (int u = 0; u < 4; u++) {
                __m512 m, v;
                update16(a, &c, start + i + 16 * u, 0xFFFF, _mm512_mul_ps(mq[u], am), _mm512_mul_ps(vq[u], av),
                         &m, &v);
                _mm512_storeu_ps(mbuf + i + 16 * u, m);
                _mm512_storeu_ps(vbuf + i + 16 * u, v);
                m_max = max_abs_bits(m_max, m);
                v_max = max_abs_bits(v_max, v);
            }
            if (pending)
                for (int u = 0; u < 64; u += 16) {
                    codes_store16(pm + i + u, prev_rm, &mt, m_lut, pmc + i + u);
                    codes_store16(pv + i + u, prev_rv, &vt, v_lut, pvc + i + u);
                }
        }
        if (!pipelined) {
            finish_block(a, &c, &mt, &vt, b, i, mbuf, vbuf); /* the last len % 64 elements, then quantize */
            continue;
        }
        /* m_absmax[b] / v_absmax[b] were read into am / av above; now they take the new values */
        float amax_m = qk_bits_to_f32((uint32_t)_mm512_reduce_max_epu32(m_max));
        float amax_v = qk_bits_to_f32((uint32_t)_mm512_reduce_max_epu32(v_max));
        a->m_absmax[b] = amax_m, a->v_absmax[b] = amax_v;
        prev_rm = _mm512_set1_ps(1.0f / amax_m), prev_rv = _mm512_set1_ps(1.0f / amax_v);
        prev = b, pending = 1, cur ^= 1;
    }
    if (pending) {
        const float *pm = buf[cur ^ 1][0], *pv = buf[cur ^ 1][1];
        uint8_t *pmc = a->m_codes + prev * bs, *pvc = a->v_codes + prev * bs;
        for (int64_t i = 0; i < bs; i += 16) {
            codes_store16(pm + i, prev_rm, &mt, m_lut, pmc + i);
            codes_store16(pv + i, prev_rv, &vt, v_lut, pvc + i);
        }
    }
}
#endif
