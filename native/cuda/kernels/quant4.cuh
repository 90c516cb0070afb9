/* quant4.cuh -- blockwise 4-bit quantize kernel. A group of G lanes owns one block of 8*G*C elements; each
 * lane loads C chunks of 8 contiguous elements (16 bytes for 16-bit inputs; chunk j of lane l sits at
 * (j*G + l)*8, so a warp reads contiguous memory), reduces max|x| as float bit patterns across the
 * group with shuffles, multiplies by the IEEE reciprocal and writes 4 packed bytes per chunk. A warp
 * takes U tiles per loop trip and issues all their loads first (quant4.cu picks U and the occupancy:
 * for one-chunk blocks, more resident warps beat more tiles per warp). With SUM (double quantization)
 * the kernel also adds every block's absmax into the workspace's exact-mean sums (exact_mean.cuh), a
 * shared-memory sum per exponent in each block added to the workspace once at the end, so the mean
 * needs no second pass over absmax: the nested kernel computes it from the sums (blockwise8.cuh,
 * center 2). Launched by quant4.cu; tested byte for byte against the CPU library
 * (tests/test_cuda_kernels.py). */
#ifndef QCKPT_CUDA_QUANT4_CUH
#define QCKPT_CUDA_QUANT4_CUH

#include "code4.cuh"
#include "exact_mean.cuh"

namespace qk {

/* 8 elements from x + i0 (i0 % 8 == 0): one or two 16-byte loads when the chunk is whole. */
template <typename T>
__device__ __forceinline__ void load8(const T *__restrict__ x, int64_t i0, int64_t n, float v[8]) {
    if (i0 + 8 <= n) {
        constexpr int kVecs = sizeof(T) * 8 / 16;
        uint4 raw[kVecs];
#pragma unroll
        for (int q = 0; q < kVecs; q++) raw[q] = __ldcs(reinterpret_cast<const uint4 *>(x + i0) + q);
        const T *e = reinterpret_cast<const T *>(raw);
#pragma unroll
        for (int q = 0; q < 8; q++) v[q] = to_f32<T>(e[q]);
    } else {
#pragma unroll
        for (int q = 0; q < 8; q++) v[q] = i0 + q < n ? to_f32<T>(x[i0 + q]) : 0.0f;
    }
}

/* Codes of one chunk, packed (even index in the high nibble) and stored; a partial last chunk pads an
 * odd count with the code of 0.0. */
template <int MODE> /* 0: FP4, 1: NF4, 2: NF4 fast path (code4.cuh; `r` is then 32 / absmax) */
__device__ __forceinline__ void store_chunk(const CodeCell *cells, const FastCell *fast, const float v[8], float r,
                                            int64_t i0, int64_t n, uint8_t *__restrict__ packed) {
    constexpr bool NF4 = MODE != 0;
    uint32_t c[8];
#pragma unroll
    for (int q = 0; q < 8; q++) {
        const float xn = __fmul_rn(v[q], r);
        c[q] = MODE == 2 ? code_nf4_fast(fast, xn) : (MODE == 1 ? code_nf4(cells, xn) : code_fp4(cells, xn));
    }
    if (i0 + 8 <= n) {
        uint32_t word = 0;
#pragma unroll
        for (int q = 0; q < 4; q++) word |= (c[2 * q] << 4 | c[2 * q + 1]) << (8 * q);
        __stcs(reinterpret_cast<unsigned int *>(packed + (i0 >> 1)), word);
    } else {
        const uint32_t pad = NF4 ? 7u : 0u;
#pragma unroll
        for (int q = 0; q < 4; q++) {
            const int64_t e = i0 + 2 * q;
            if (e < n) packed[e >> 1] = (uint8_t)(c[2 * q] << 4 | (e + 1 < n ? c[2 * q + 1] : pad));
        }
    }
}

/* The shared state of a quantize block: code tables and, with SUM, the per-exponent absmax sums. */
template <bool SUM>
struct Quant4Shared {
    CodeCell cells[kCodeCells];
    FastCell fast[kFastCells];
    /* sums of the low and high 12 mantissa bits per exponent: 32-bit shared atomics are native, 64-bit ones
     * a compare-and-swap loop (that made the kernel 1.6x slower); each word holds 2^20 terms */
    uint32_t bins[SUM ? 2 : 1][SUM ? 256 : 1];

    __device__ __forceinline__ void init(int quant_type) {
        if (threadIdx.x < kCodeCells) cells[threadIdx.x] = make_code_cell(threadIdx.x, quant_type);
        if (threadIdx.x < kFastCells) fast[threadIdx.x] = make_fast_cell(threadIdx.x);
        if (SUM)
            for (int i = threadIdx.x; i < 256; i += blockDim.x) bins[0][i] = bins[1][i] = 0;
    }
    /* after the block's last tile: add the sums into the workspace's (exact_mean.cuh) */
    __device__ __forceinline__ void flush(unsigned long long *ws) {
        if (!SUM) return;
        __syncthreads();
        for (int i = threadIdx.x; i < 256; i += blockDim.x) {
            const unsigned long long sum = bins[0][i] + ((unsigned long long)bins[1][i] << 12);
            if (sum) atomicAdd(&ws[kWsBins + i], sum);
        }
    }
};

/* max |x| of a lane's C chunks as float bit patterns, reduced over its group of G lanes (every lane of
 * the warp must call this) */
template <int G, int C>
__device__ __forceinline__ uint32_t group_max_bits(const float (&v)[C][8]) {
    uint32_t m = 0;
#pragma unroll
    for (int j = 0; j < C; j++)
#pragma unroll
        for (int q = 0; q < 8; q++) m = max(m, __float_as_uint(v[j][q]) & 0x7FFFFFFFu);
#pragma unroll
    for (int o = G / 2; o > 0; o >>= 1) m = max(m, __shfl_xor_sync(kFullMask, m, o));
    return m;
}

/* Quantize block b (< nb) from a lane's C chunks once its group's max is known: absmax (and its sum),
 * then the packed codes; a non-finite block records its first bad index instead. */
template <int G, int C, bool SUM>
__device__ __forceinline__ void quantize_block(Quant4Shared<SUM> &sh, const float (&v)[C][8], uint32_t m, int64_t b,
                                               int64_t n, int sub, bool nf4, uint8_t *__restrict__ packed,
                                               float *__restrict__ absmax, unsigned long long *__restrict__ ws) {
    constexpr int kBS = 8 * G * C;
    const int64_t start = b * kBS;
    if (m >= 0x7F800000u) { /* NaN/inf: record the first flat index, write nothing */
#pragma unroll
        for (int j = 0; j < C; j++) {
            const int64_t i0 = start + int64_t(j * G + sub) * 8;
#pragma unroll
            for (int q = 0; q < 8; q++)
                if (i0 + q < n && (__float_as_uint(v[j][q]) & 0x7FFFFFFFu) >= 0x7F800000u)
                    record_bad_index(ws, (unsigned long long)(i0 + q));
        }
        return;
    }
    const float amax = __uint_as_float(m);
    if (sub == 0) {
        absmax[b] = amax;
        if (SUM) {
            const MeanTerm term = mean_term(m);
            atomicAdd(&sh.bins[0][term.e], term.m & 0xFFFu);
            atomicAdd(&sh.bins[1][term.e], term.m >> 12);
        }
    }
    const float r = __frcp_rn(amax); /* == 1.0f / amax, IEEE; 0 gives inf and NaN codes below */
    const bool fast_nf4 = nf4 && amax >= kFastMinAbsmax;
#pragma unroll
    for (int j = 0; j < C; j++) {
        const int64_t i0 = start + int64_t(j * G + sub) * 8;
        if (i0 >= n) continue;
        if (fast_nf4) store_chunk<2>(sh.cells, sh.fast, v[j], __fmul_rn(r, 32.0f), i0, n, packed);
        else if (nf4) store_chunk<1>(sh.cells, sh.fast, v[j], r, i0, n, packed);
        else store_chunk<0>(sh.cells, sh.fast, v[j], r, i0, n, packed);
    }
}

/* U tiles of loads in registers per loop trip; MINB: blocks per multiprocessor the registers must allow
 * (quant4.cu picks both). */
template <typename T, int G, int C, int U, bool SUM, int MINB = 1>
__global__ void __launch_bounds__(256, MINB) quantize_4bit_kernel(const T *__restrict__ x, int64_t n, int quant_type,
                                                                  uint8_t *__restrict__ packed,
                                                                  float *__restrict__ absmax,
                                                                  unsigned long long *__restrict__ ws) {
    constexpr int kBS = 8 * G * C, kGroupsPerWarp = 32 / G;
    __shared__ Quant4Shared<SUM> sh;
    sh.init(quant_type);
    __syncthreads();

    const bool nf4 = quant_type == QCKPT_NF4;
    const int lane = threadIdx.x & 31, sub = lane % G;
    const int64_t nb = ceil_div(n, kBS);
    const int64_t warp = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
    const int64_t warps = (int64_t(gridDim.x) * blockDim.x) >> 5;

    /* Warp-uniform trip count: every lane reaches every shuffle. */
    for (int64_t wb = warp * kGroupsPerWarp * U; wb < nb; wb += warps * kGroupsPerWarp * U) {
        float v[U][C][8];
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int64_t b = wb + u * kGroupsPerWarp + lane / G;
#pragma unroll
            for (int j = 0; j < C; j++) {
                const int64_t i0 = b * kBS + int64_t(j * G + sub) * 8;
                if (b < nb) load8<T>(x, i0, n, v[u][j]);
                else {
#pragma unroll
                    for (int q = 0; q < 8; q++) v[u][j][q] = 0.0f;
                }
            }
        }
        uint32_t m[U];
#pragma unroll
        for (int u = 0; u < U; u++) m[u] = group_max_bits<G, C>(v[u]);
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int64_t b = wb + u * kGroupsPerWarp + lane / G;
            if (b < nb) quantize_block<G, C, SUM>(sh, v[u], m[u], b, n, sub, nf4, packed, absmax, ws);
        }
    }
    sh.flush(ws);
}

}  // namespace qk

#endif
