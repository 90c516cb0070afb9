/* gemm4_tiled.cuh -- fused 4-bit dequantize + matmul for more than 16 activation rows (prefill,
 * training forwards), on the tensor cores with float32 accumulation:
 *
 *   x (batch, k) @ dequant(W (n_out, k))^T -> y (batch, n_out)
 *
 * Why not dequantize into a buffer + cuBLAS: that writes and re-reads 2 bytes per weight (4x the packed
 * bytes) and launches twice; here each block reads its W tile once, 4 bits a weight, and dequantizes it
 * in registers, so the cost is the mma work plus reading x from L2.
 *
 * Tiles: a block computes BN = WN*NT16*16 outputs x BM = WM*MT*8 batch rows over k-tiles of 64. x tiles
 * stream into shared memory through a STAGES-deep cp.async ring (16-byte chunks, XOR-swizzled by row so
 * that the 16-byte B-fragment loads of a quarter warp hit distinct banks). W never goes through shared
 * memory: as in gemv4.cuh, logical k of the mma is remapped to physical k so that lane (g, t) owns the
 * contiguous k range [16t, 16t + 16) of a k-tile for both operands -- 8 packed bytes per weight row, read
 * straight from global memory two k-tiles ahead, and one 16-byte x load per batch tile for two k16 steps.
 * A warp dequantizes its NT16 row tiles once per k-tile and reuses them for its MT batch tiles.
 *
 * Short grids split k: each split writes float32 partial sums, the last block of a tile to finish (a
 * counter per tile) adds them in split order -- deterministic -- writes y and resets the counter, so the
 * workspace's counters stay zero between calls. */
#ifndef QCKPT_CUDA_GEMM4_TILED_CUH
#define QCKPT_CUDA_GEMM4_TILED_CUH

#include <algorithm>

#include "gemm4.cuh"

namespace qk {

constexpr int kTiledBK = 64; /* k per tile: 4 mma k16 steps, 32 packed bytes per weight row */

template <int WN_, int WM_, int NT16_, int MT_, int STAGES_>
struct TiledShape {
    static constexpr int WN = WN_, WM = WM_, NT16 = NT16_, MT = MT_, STAGES = STAGES_;
    static constexpr int kWarps = WN * WM, kThreads = kWarps * 32;
    static constexpr int BN = WN * NT16 * 16, BM = WM * MT * 8;
    static constexpr int kStageBytes = BM * kTiledBK * 2;
    static constexpr int kSmemBytes = STAGES * kStageBytes;
};

/* byte offset of 16-byte chunk c (0..7) of row r inside a stage */
__device__ __forceinline__ int tiled_x_offset(int r, int c) { return r * 128 + ((c ^ (r & 7)) << 4); }

/* One lane's weights for one k-tile: rows g and g+8 of each of its NT16 row tiles. */
template <int NT16>
struct TiledWFrag {
    uint2 w[NT16][2];
    float scale[NT16][2];       /* absmax, or absmax2 when nested */
    uint32_t code_index[NT16][2];
};

template <int NT16>
__device__ __forceinline__ void tiled_load_w(TiledWFrag<NT16> &f, const uint8_t *__restrict__ packed,
                                             const Scales &scales, int64_t n_out, int64_t k, int log2_bs,
                                             int64_t row0, int64_t kt, int g, int t) {
#pragma unroll
    for (int i = 0; i < NT16; i++)
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const int64_t n = row0 + i * 16 + h * 8 + g;
            if (n < n_out) {
                const int64_t flat = n * k + kt * kTiledBK + 16 * t; /* 16 elements inside one block (bs >= 32) */
                const int64_t b = flat >> log2_bs;
                f.w[i][h] = __ldg(reinterpret_cast<const uint2 *>(packed + (flat >> 1)));
                load_raw_scale(scales, b, f.scale[i][h], f.code_index[i][h]);
            } else { /* past n_out: zero weights, results discarded */
                f.w[i][h] = make_uint2(0, 0);
                f.scale[i][h] = 0.0f;
                f.code_index[i][h] = 0;
            }
        }
}

template <typename Shape>
__device__ __forceinline__ void tiled_load_x(unsigned char *stage, const void *__restrict__ x, int batch, int64_t k,
                                             int64_t m0, int64_t kt) {
    const unsigned char *xb = static_cast<const unsigned char *>(x);
    for (int idx = threadIdx.x; idx < Shape::BM * 8; idx += Shape::kThreads) {
        const int r = idx >> 3, c = idx & 7;
        const int64_t m = m0 + r;
        const bool valid = m < batch;
        const void *src = valid ? xb + (m * k + kt * kTiledBK + c * 8) * 2 : x;
        cp_async16(stage + tiled_x_offset(r, c), src, valid);
    }
}

template <typename T, typename Shape, int LUT>
__device__ __forceinline__ void tiled_compute(const unsigned char *stage, const TiledWFrag<Shape::NT16> &f,
                                              const Lut4 &tab, const Scales &scales, const float *code,
                                              int wm, int g, int t, float (&acc)[Shape::NT16][Shape::MT][4]) {
    constexpr int NT16 = Shape::NT16, MT = Shape::MT;
    PairDequant<T> deq[NT16][2];
#pragma unroll
    for (int i = 0; i < NT16; i++)
#pragma unroll
        for (int h = 0; h < 2; h++)
            deq[i][h] = PairDequant<T>(raw_block_scale(scales, code, f.scale[i][h], f.code_index[i][h]));
#pragma unroll
    for (int jj = 0; jj < 2; jj++) {
        /* A fragments of k16 steps j = 2jj, 2jj + 1: bytes 2j, 2j + 1 of the lane's 8 per row */
        uint32_t a[2][NT16][4];
#pragma unroll
        for (int i = 0; i < NT16; i++)
#pragma unroll
            for (int h = 0; h < 2; h++) {
                uint32_t p[4];
                deq[i][h].word(tab, jj ? f.w[i][h].y : f.w[i][h].x, p, lut_kind(LUT, h));
#pragma unroll
                for (int j2 = 0; j2 < 2; j2++) {
                    a[j2][i][h] = p[2 * j2];
                    a[j2][i][2 + h] = p[2 * j2 + 1];
                }
            }
#pragma unroll
        for (int mt = 0; mt < MT; mt++) {
            const int r = (wm * MT + mt) * 8 + g;
            const uint4 xb = *reinterpret_cast<const uint4 *>(stage + tiled_x_offset(r, 2 * t + jj));
#pragma unroll
            for (int i = 0; i < NT16; i++) {
                mma16816<T>(acc[i][mt], a[0][i], xb.x, xb.y);
                mma16816<T>(acc[i][mt], a[1][i], xb.z, xb.w);
            }
        }
    }
}

/* The end of a block that may split k, before its outputs are written. One split: true at once. Several:
 * consumer thread `thread` (of `threads`; a thread without accumulators passes -1) stores its float32
 * partial sums to the workspace; the last split of the tile to arrive (a counter per tile) loads every
 * split's, adds them in split order -- deterministic, the same sums whichever block comes last -- into acc,
 * resets the counter (so that the counters stay zero between calls) and returns true; the others return
 * false. Every thread of the block calls this (it has barriers); is_last is a __shared__ flag.
 *
 * Layout (split_k_workspace_bytes): split s, tile `tile` of the grid's tiles, has COUNT x threads floats in
 * which accumulators 4j..4j + 3 of a thread are one float4 at index j * threads + thread, so that every
 * store and load of a warp is one coalesced 512-byte access. The last block issues all COUNT / 4 loads of
 * a split before adding them: a version that loaded each output's partials one after another, as the output
 * coordinates came, spent up to 57 us there at 4 splits (128 blocks of 4096x14336), more than the k-loop. */
template <int COUNT>
__device__ __forceinline__ bool reduce_split_k(float (&acc)[COUNT], int thread, int threads,
                                               float *__restrict__ partials, int *__restrict__ counters,
                                               int &is_last) {
    static_assert(COUNT % 4 == 0, "whole float4s");
    const int splits = gridDim.z;
    if (splits == 1) return true;
    const int tile = blockIdx.y * gridDim.x + blockIdx.x;
    const int64_t tile_floats = int64_t(COUNT) * threads, split_floats = int64_t(gridDim.x) * gridDim.y * tile_floats;
    if (thread >= 0) {
        float4 *own = reinterpret_cast<float4 *>(partials + blockIdx.z * split_floats + tile * tile_floats) + thread;
#pragma unroll
        for (int j = 0; j < COUNT / 4; j++)
            __stcg(own + j * threads, make_float4(acc[4 * j], acc[4 * j + 1], acc[4 * j + 2], acc[4 * j + 3]));
    }
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) is_last = atomicAdd(counters + tile, 1) == splits - 1;
    __syncthreads();
    if (!is_last) return false;
    __threadfence();
    if (thread >= 0) {
        const float4 *first = reinterpret_cast<const float4 *>(partials + tile * tile_floats) + thread;
#pragma unroll
        for (int i = 0; i < COUNT; i++) acc[i] = 0.0f;
        for (int s = 0; s < splits; s++) {
            const float4 *part = first + s * (split_floats / 4);
            float4 v[COUNT / 4];
#pragma unroll
            for (int j = 0; j < COUNT / 4; j++) v[j] = __ldcg(part + j * threads);
#pragma unroll
            for (int j = 0; j < COUNT / 4; j++) {
                acc[4 * j] = __fadd_rn(acc[4 * j], v[j].x);
                acc[4 * j + 1] = __fadd_rn(acc[4 * j + 1], v[j].y);
                acc[4 * j + 2] = __fadd_rn(acc[4 * j + 2], v[j].z);
                acc[4 * j + 3] = __fadd_rn(acc[4 * j + 3], v[j].w);
            }
        }
    }
    if (threadIdx.x == 0) counters[tile] = 0;
    return true;
}

/* y at the outputs of acc that lie inside: at(i, n, m) sets output row n and batch row m of acc[i] and says
 * whether it lies inside (n_out, batch). */
template <typename T, int COUNT, typename At>
__device__ __forceinline__ void store_outputs(const float (&acc)[COUNT], const At &at, T *__restrict__ y,
                                              int64_t n_out) {
    int64_t n, m;
#pragma unroll
    for (int i = 0; i < COUNT; i++)
        if (at(i, n, m)) y[m * n_out + n] = from_f32<T>(acc[i]);
}

/* grid: (n tiles, m tiles, splits). counters: one per (n, m) tile, zero on entry and left zero; partials:
 * 16-byte aligned, splits x tiles x BN x BM floats (reduce_split_k). Needs k % 64 == 0 and 16-byte aligned
 * x rows (k even suffices with an aligned base) and 8-byte aligned packed. */
template <typename T, typename Shape, int DEPTH, int MINB, int LUT = kLutDefault>
__global__ void __launch_bounds__(Shape::kThreads, MINB)
    gemm_4bit_tiled_kernel(const T *__restrict__ x, int batch, const uint8_t *__restrict__ packed, Scales scales,
                           int64_t n_out, int64_t k, int log2_bs, int quant_type, T *__restrict__ y,
                           float *__restrict__ partials, int *__restrict__ counters) {
    static_assert(!uses_lane_table(LUT), "the tiled kernel has no lane table");
    extern __shared__ __align__(128) unsigned char smem_x[];
    __shared__ PairTable pairs;
    __shared__ float code[256];
    __shared__ int is_last;
    const Lut4 tab = make_lut4<T>(pairs, nullptr, quant_type, LUT);
    if (!scales.absmax)
        for (int i = threadIdx.x; i < 256; i += blockDim.x) code[i] = scales.code[i];

    constexpr int NT16 = Shape::NT16, MT = Shape::MT, STAGES = Shape::STAGES;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int wn = warp % Shape::WN, wm = warp / Shape::WN;
    const int64_t n_block = int64_t(blockIdx.x) * Shape::BN, m0 = int64_t(blockIdx.y) * Shape::BM;
    const int64_t row0 = n_block + wn * NT16 * 16;
    const int splits = gridDim.z, split = blockIdx.z;
    const int64_t ktiles = k / kTiledBK;
    const int64_t kt0 = ktiles * split / splits, nk = ktiles * (split + 1) / splits - kt0;

    float acc[NT16][MT][4] = {};

    /* x tiles STAGES - 1 ahead in shared memory */
#pragma unroll
    for (int s = 0; s < STAGES - 1; s++) {
        if (s < nk) tiled_load_x<Shape>(smem_x + s * Shape::kStageBytes, x, batch, k, m0, kt0 + s);
        cp_async_commit();
    }
    /* weights: a ring of DEPTH k-tiles in registers (slot d holds k-tile base + d; unrolled so that the
     * slot index is a compile-time constant and the ring stays in registers) */
    TiledWFrag<NT16> ring[DEPTH];
#pragma unroll
    for (int d = 0; d < DEPTH; d++)
        if (d < nk) tiled_load_w<NT16>(ring[d], packed, scales, n_out, k, log2_bs, row0, kt0 + d, g, t);
    __syncthreads(); /* the tables */
    for (int64_t base = 0; base < nk; base += DEPTH) {
#pragma unroll
        for (int d = 0; d < DEPTH; d++) {
            const int64_t it = base + d;
            if (it >= nk) break;
            cp_async_wait<STAGES - 2>();
            __syncthreads(); /* stage `it` landed for every thread; stage `it - 1` is free again */
            if (it + STAGES - 1 < nk)
                tiled_load_x<Shape>(smem_x + ((it + STAGES - 1) % STAGES) * Shape::kStageBytes, x, batch, k, m0,
                                    kt0 + it + STAGES - 1);
            cp_async_commit();
            const TiledWFrag<NT16> cur = ring[d];
            if (it + DEPTH < nk)
                tiled_load_w<NT16>(ring[d], packed, scales, n_out, k, log2_bs, row0, kt0 + it + DEPTH, g, t);
            tiled_compute<T, Shape, LUT>(smem_x + (it % STAGES) * Shape::kStageBytes, cur, tab, scales, code, wm, g, t,
                                    acc);
        }
    }
    cp_async_wait<0>();

    /* element (i, mt, q) of this lane, flattened: output row n, batch row m */
    const auto at = [&](int e, int64_t &n, int64_t &m) {
        const int i = e / (MT * 4), mt = (e / 4) % MT, q = e % 4;
        n = row0 + i * 16 + g + (q >= 2 ? 8 : 0);
        m = m0 + (wm * MT + mt) * 8 + 2 * t + (q & 1);
        return n < n_out && m < batch;
    };
    float(&flat)[NT16 * MT * 4] = reinterpret_cast<float(&)[NT16 * MT * 4]>(acc);
    if (reduce_split_k(flat, threadIdx.x, Shape::kThreads, partials, counters, is_last))
        store_outputs(flat, at, y, n_out);
}

/* The workspace starts with kTiledMaxCounters tile counters (a fixed region, so that calls of any shape
 * find them zero), then the float32 partial sums. Grids with more tiles never split k. */
constexpr int64_t kTiledMaxCounters = 1024;

/* Splits of k for a grid of `tiles` output tiles: enough blocks to give every multiprocessor
 * `blocks_per_sm` of them, each split keeping >= 8 k-tiles, at most 16. */
inline int tiled_splits(int64_t tiles, int64_t ktiles, int sms, int blocks_per_sm) {
    if (tiles > kTiledMaxCounters) return 1;
    int64_t s = (int64_t(sms) * blocks_per_sm) / tiles;
    s = std::min<int64_t>(s, ktiles / 8);
    s = std::min<int64_t>(s, 16);
    return int(std::max<int64_t>(s, 1));
}

/* Workspace bytes of a launch that splits k `splits` ways (0 when it does not) over `tiles` tiles of
 * `tile_outputs` outputs each: the counters, then each split's partial sums of every tile (reduce_split_k). */
inline int64_t split_k_workspace_bytes(int splits, int64_t tiles, int64_t tile_outputs) {
    return splits > 1 ? kTiledMaxCounters * 4 + int64_t(splits) * tiles * tile_outputs * 4 : 0;
}

/* Launch `kernel` on a (n_tiles, m_tiles, splits) grid whose last two arguments are the split-k partial sums
 * and tile counters carved from `workspace` (split_k_workspace_bytes(); NULL when splits == 1). Dynamic +
 * static shared memory above 48 KiB needs the opt-in, which is per device: it is set each time. */
template <typename Kernel, typename... Args>
cudaError_t launch_split_k(Kernel kernel, int64_t n_tiles, int64_t m_tiles, int splits, int threads, int smem_bytes,
                           void *workspace, cudaStream_t s, Args... args) {
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
    if (err != cudaSuccess) return err;
    int *counters = splits > 1 ? static_cast<int *>(workspace) : nullptr;
    float *partials = splits > 1 ? reinterpret_cast<float *>(counters + kTiledMaxCounters) : nullptr;
    kernel<<<dim3((unsigned)n_tiles, (unsigned)m_tiles, (unsigned)splits), threads, smem_bytes, s>>>(args..., partials,
                                                                                                    counters);
    return cudaGetLastError();
}

/* The workspace bytes of launch_gemm_4bit_tiled<.., Shape, ..>. */
template <typename Shape>
inline int64_t tiled_workspace_bytes(int splits, int64_t batch, int64_t n_out) {
    return split_k_workspace_bytes(splits, ceil_div(n_out, Shape::BN) * ceil_div(batch, Shape::BM),
                                   int64_t(Shape::BN) * Shape::BM);
}

/* Launch one instantiation on `s`; workspace as tiled_workspace_bytes<Shape>() (NULL when splits == 1). */
template <typename T, typename Shape, int DEPTH, int MINB, int LUT = kLutDefault>
cudaError_t launch_gemm_4bit_tiled(const T *x, int batch, const uint8_t *packed, const Scales &sc, int64_t n_out,
                                   int64_t k, int log2_bs, int qt, T *y, int splits, void *workspace,
                                   cudaStream_t s) {
    return launch_split_k(gemm_4bit_tiled_kernel<T, Shape, DEPTH, MINB, LUT>, ceil_div(n_out, Shape::BN),
                          ceil_div(batch, Shape::BM), splits, Shape::kThreads, Shape::kSmemBytes, workspace, s, x,
                          batch, packed, sc, n_out, k, log2_bs, qt, y);
}

}  // namespace qk

#endif /* QCKPT_CUDA_GEMM4_TILED_CUH */
