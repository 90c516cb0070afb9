/* code4.cuh -- NF4/FP4 code selection in one shared-memory lookup per element.
 *
 * The reference counts the float32 thresholds strictly below x_n (15 compares for NF4). Here the line is
 * cut into cells of width 1/32: floor(x_n * 32) is exact (a power-of-two scale), and no cell holds two
 * thresholds (they are >= 0.08 apart), so the count is the number of thresholds below the cell plus
 * (x_n > the threshold inside the cell). Same compares on the same float32 values: the same codes,
 * NaN included (fmaxf maps NaN to the lowest cell, whose compare is false). */
#ifndef QCKPT_CUDA_CODE4_CUH
#define QCKPT_CUDA_CODE4_CUH

#include "../common.cuh"

namespace qk {

struct CodeCell {
    float t;          /* the threshold inside the cell, or +inf */
    uint32_t codes;   /* code when x_n <= t (bits 0..7), when x_n > t (bits 8..15) */
};

constexpr int kCodeCells = 64;

/* Cell c of the table for quant_type (thread c of the block calls this). NF4 cells cover [-1, 1)
 * (cell 32 starts at 0); FP4 cells cover |x_n| in [0, 1) and hold magnitude codes. */
__device__ inline CodeCell make_code_cell(int c, int quant_type) {
    const bool nf4 = quant_type == QCKPT_NF4;
    const int count = nf4 ? 15 : 7;
    const float *thr = nf4 ? kNF4Thresholds : kFP4Thresholds;
    const float lo = (float)(c - (nf4 ? 32 : 0)) * 0.03125f, hi = lo + 0.03125f;
    int below = 0;
    float inside = __int_as_float(0x7F800000);
    for (int i = 0; i < count; i++) {
        below += thr[i] < lo;
        if (thr[i] >= lo && thr[i] < hi) inside = thr[i];
    }
    const int above = below + (inside != __int_as_float(0x7F800000));
    uint32_t le = nf4 ? below : kFP4BucketCode[below < 8 ? below : 7];
    uint32_t gt = nf4 ? above : kFP4BucketCode[above < 8 ? above : 7];
    return CodeCell{inside, le | gt << 8};
}

/* floor(v) for v in [-32, 31] without the quarter-rate F2I: adding 1.5 * 2^23 rounding down leaves
 * floor(v) in the low mantissa bits. */
__device__ __forceinline__ int floor_small(float v) {
    return __float_as_int(__fadd_rd(v, 12582912.0f)) - 0x4B400000;
}

__device__ __forceinline__ uint32_t code_nf4(const CodeCell *cells, float xn) {
    const float v = fminf(fmaxf(__fmul_rn(xn, 32.0f), -32.0f), 31.0f);
    const CodeCell cell = cells[floor_small(v) + 32];
    return (cell.codes & 0xFF) + (xn > cell.t); /* NF4 codes count thresholds: above = below + 1 */
}

__device__ __forceinline__ uint32_t code_fp4(const CodeCell *cells, float xn) {
    const float a = fabsf(xn);
    const float v = fminf(fmaxf(__fmul_rn(a, 32.0f), 0.0f), 31.0f);
    const CodeCell cell = cells[floor_small(v)];
    const uint32_t mag = a > cell.t ? cell.codes >> 8 : cell.codes & 0xFF;
    return mag | (xn < 0.0f ? 8u : 0u);
}

/* NF4 fast path for blocks whose absmax is >= 2^-120 (every realistic block): cells are indexed by
 * v32 = x * (r * 32), thresholds are stored times 32, and no clamp is needed. Same codes: r * 32 is exact
 * here, so v32 = 32 * (x * r) exactly whenever x * r is normal or zero (a power-of-two scale commutes
 * with rounding); when x * r is subnormal both forms give code 7 (between the thresholds around 0).
 * |x| <= absmax bounds |v32| by 32 * (1 + 2^-22): floor(v32) + 33 lies in [0, 65]. */
struct FastCell {
    float t32;  /* 32 * the threshold inside the cell, or +inf */
    int base;   /* thresholds below the cell */
};

constexpr int kFastCells = 66;
constexpr float kFastMinAbsmax = 0x1p-120f;

__device__ inline FastCell make_fast_cell(int c) {
    const float lo = (float)(c - 33) * 0.03125f, hi = lo + 0.03125f;
    int below = 0;
    float inside = __int_as_float(0x7F800000);
    for (int i = 0; i < 15; i++) {
        below += kNF4Thresholds[i] < lo;
        if (kNF4Thresholds[i] >= lo && kNF4Thresholds[i] < hi) inside = __fmul_rn(kNF4Thresholds[i], 32.0f);
    }
    return FastCell{inside, below};
}

__device__ __forceinline__ uint32_t code_nf4_fast(const FastCell *cells, float v32) {
    const FastCell cell = cells[floor_small(v32) + 33];
    return cell.base + (v32 > cell.t32);
}

}  // namespace qk

#endif
