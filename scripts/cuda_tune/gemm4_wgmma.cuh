/* gemm4_wgmma.cuh -- EXPERIMENT, not part of the library: the first Hopper prefill kernel, wgmma fed by cp.async
 * copies that every thread issues, timed by gemm4_sweep.cu --wgmma (sm_90a). The library's kernel,
 * native/cuda/kernels/gemm4_tma.cuh, grew out of it: it shares the wgmma pieces (kernels/wgmma.cuh) and
 * replaced the copies and the block-wide barrier with TMA and mbarriers. Kept as the measured baseline of
 * that step (scripts/BENCHMARKS.md, "Run of 2026-11-27 ~08:50 UTC").
 *
 *   x (batch, k) @ dequant(W (n_out, k))^T -> y (batch, n_out)
 *
 * Tiles: WG warpgroups of MT x 64 outputs by BN batch rows over k-tiles of BK. Each k-tile's x, packed
 * weights and block scales go into a STAGES-deep shared-memory ring: x and weights by cp.async (each thread's
 * chunks sit a constant number of rows apart, so a k-tile costs one pointer add per chunk -- the 64-bit index
 * arithmetic had been most of the instructions), the scales by register loads stored kScaleLag k-tiles later.
 * x uses wgmma's no-swizzle K-major layout: core matrices of 8 rows x 16 bytes (128 contiguous bytes), k-chunks
 * 128 bytes apart (leading byte offset), 8-row groups BK * 16 apart (stride byte offset).
 *
 * The k loop overlaps a warpgroup's dequantize with its tensor work (wait_group 1, two fragment sets), but the
 * block still meets at a barrier every k-tile. Profiled at 128 rows (Nsight Compute): issue slots 22% busy,
 * the warps mostly waiting on registers of their own cp.async copies (an LDGSTS holds its address registers
 * until the load/store unit takes it) and on that barrier: 91 us at 128 rows of 14336x4096, against 115 for
 * the mma.sync kernel and 42 for the TMA kernel. Split k and the deterministic finish are gemm4_tiled.cuh's. */
#ifndef QCKPT_CUDA_GEMM4_WGMMA_CUH
#define QCKPT_CUDA_GEMM4_WGMMA_CUH

#include "kernels/gemm4_tiled.cuh"
#include "kernels/wgmma.cuh"

namespace qk {

/* shared memory written through the generic proxy (cp.async here) becomes visible to wgmma's reads */
__device__ __forceinline__ void fence_proxy_async_shared() {
#if QK_HAS_WGMMA
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

/* A no-swizzle shared-memory matrix descriptor: start address, leading and stride byte offsets. */
__device__ __forceinline__ uint64_t wgmma_desc(const void *smem, uint32_t lbo, uint32_t sbo) {
    const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
    return uint64_t((a & 0x3FFFF) >> 4) | (uint64_t((lbo & 0x3FFFF) >> 4) << 16) |
           (uint64_t((sbo & 0x3FFFF) >> 4) << 32);
}


/* The cp.async kernel's layout on top of WgmmaShape: x in the no-swizzle K-major layout (16-byte chunks per
 * batch row, leading and stride byte offsets), and how far its scale loads run ahead. */
template <typename Shape>
struct CpAsync {
    static constexpr int kXChunks = Shape::BK / 8;
    static constexpr uint32_t kLbo = 128, kSbo = Shape::BK * 16;
    static_assert(Shape::STAGES >= 4, "k-tile it + 2's scales are stored during k-tile it, after k-tile it + 1's loads");
    /* k-tiles between a scale's load and its store, and the k loop's unroll (a multiple of it and of the
     * two fragment sets) */
    static constexpr int kScaleLag = Shape::STAGES - 3, kUnroll = kScaleLag % 2 ? 2 * kScaleLag : kScaleLag;
};

/* byte offset of k-chunk c (0..BK/8 - 1) of batch row n inside a stage's x tile: 8-row core matrices of 128
 * contiguous bytes, k-chunks 128 bytes apart (the leading byte offset), 8-row groups BK * 16 apart (the stride
 * byte offset) */
template <typename Shape> __device__ __forceinline__ int wgmma_x_offset(int n, int c) {
    return (n >> 3) * int(CpAsync<Shape>::kSbo) + c * 128 + (n & 7) * 16;
}

/* One thread's share of every stage's copies and block scales, fixed for the whole k loop. The chunks a
 * thread copies sit a constant number of rows apart (the block's thread count is a multiple of a row's
 * chunks), so a k-tile costs one pointer add per chunk: the index arithmetic, in 64 bits, had been most of
 * the kernel's instructions. Rows past `batch` or `n_out` come last in each thread's list and are counted
 * out; x rows past `batch` are zeroed once in every stage and never copied. */
template <typename Shape>
struct WgmmaCopies {
    static constexpr int kThreads = Shape::kThreads, XC = CpAsync<Shape>::kXChunks, WC = Shape::kWChunks, G = Shape::kGroups;
    static_assert(kThreads % (8 * XC) == 0 && kThreads % WC == 0 && kThreads % G == 0, "rows per thread step");
    static_assert((Shape::BM * WC) % kThreads == 0 && (Shape::BM * G) % kThreads == 0, "whole weight rows per thread");
    static constexpr int kXPer = (Shape::BN * XC + kThreads - 1) / kThreads, kWPer = Shape::BM * WC / kThreads;
    static constexpr int kSPer = Shape::BM * G / kThreads;
    static constexpr int kXRowStep = kThreads / XC, kWRowStep = kThreads / WC, kSRowStep = kThreads / G;

    const unsigned char *x_src; /* this k-tile's first chunk; the others are x_stride bytes apart */
    const uint8_t *w_src;
    int64_t x_stride, w_stride, s_flat, s_stride; /* s_flat: element index of the first scale's row at k 0 */
    uint32_t x_dst, w_dst;
    int x_count, w_count, s_count;

    __device__ __forceinline__ void init(const void *x, int batch, const uint8_t *packed, int64_t n_out, int64_t k,
                                         int64_t m0, int64_t n_block, int64_t kt0) {
        const int tid = threadIdx.x;
        const int n = (tid / (8 * XC)) * 8 + (tid & 7), c = (tid >> 3) % XC;
        x_src = static_cast<const unsigned char *>(x) + ((m0 + n) * k + kt0 * Shape::BK + c * 8) * 2;
        x_stride = int64_t(kXRowStep) * k * 2;
        x_dst = wgmma_x_offset<Shape>(n, c);
        x_count = 0;
#pragma unroll
        for (int i = 0; i < kXPer; i++)
            x_count += tid + i * kThreads < Shape::BN * XC && m0 + n + i * kXRowStep < batch;
        const int r = tid / WC, h = tid % WC;
        w_src = packed + (((n_block + r) * k + kt0 * Shape::BK) >> 1) + h * 16;
        w_stride = int64_t(kWRowStep) * (k >> 1);
        w_dst = Shape::kXBytes + r * (Shape::BK / 2) + h * 16;
        w_count = 0;
#pragma unroll
        for (int i = 0; i < kWPer; i++) w_count += n_block + r + i * kWRowStep < n_out;
        const int sr = tid / G, sg = tid % G;
        s_flat = (n_block + sr) * k + kt0 * Shape::BK + 32 * sg;
        s_stride = int64_t(kSRowStep) * k;
        s_count = 0;
#pragma unroll
        for (int i = 0; i < kSPer; i++) s_count += n_block + sr + i * kSRowStep < n_out;
    }

    /* zero the x rows past `batch` in every stage (plain stores, before the first k-tile's barrier) */
    __device__ __forceinline__ void zero_missing_rows(unsigned char *smem, int batch, int64_t m0) const {
        for (int idx = threadIdx.x; idx < Shape::BN * XC; idx += kThreads) {
            const int n = (idx / (8 * XC)) * 8 + (idx & 7), c = (idx >> 3) % XC;
            if (m0 + n >= batch)
                for (int s = 0; s < Shape::STAGES; s++)
                    *reinterpret_cast<uint4 *>(smem + s * Shape::kStageBytes + wgmma_x_offset<Shape>(n, c)) =
                        make_uint4(0, 0, 0, 0);
        }
    }

    /* k-tile `rel` (counted from kt0) into `stage` */
    __device__ __forceinline__ void issue(unsigned char *stage, int rel) const {
        const unsigned char *xs = x_src + int64_t(rel) * (Shape::BK * 2);
#pragma unroll
        for (int i = 0; i < kXPer; i++)
            if (i < x_count) cp_async16(stage + x_dst + i * (kXRowStep / 8) * int(CpAsync<Shape>::kSbo), xs + i * x_stride, true);
        const uint8_t *ws = w_src + int64_t(rel) * (Shape::BK / 2);
#pragma unroll
        for (int i = 0; i < kWPer; i++)
            if (i < w_count) cp_async16(stage + w_dst + i * kWRowStep * (Shape::BK / 2), ws + i * w_stride, true);
    }
};

/* Block scales of a k-tile, one per weight row and 32-wide group of the tile (they differ only for blocksize
 * 32), kept in the stage as float32 [row][group]. Each thread owns WgmmaCopies::kSPer of them: it loads
 * their raw inputs one k-tile and combines and stores them a few k-tiles later (a load waited on in the same
 * k-tile would stall every warp of the block for a global round trip). */
template <typename Shape>
struct WgmmaScaleLoads {
    static constexpr int kPer = WgmmaCopies<Shape>::kSPer;
    float raw[kPer];
    uint32_t code_index[kPer];

    __device__ __forceinline__ void load(const WgmmaCopies<Shape> &cp, const Scales &scales, int rel, int log2_bs) {
        const int64_t flat = cp.s_flat + int64_t(rel) * Shape::BK;
#pragma unroll
        for (int i = 0; i < kPer; i++) {
            raw[i] = 0.0f; /* past n_out: a zero scale, and the rows are never stored */
            code_index[i] = 0;
            if (i < cp.s_count) load_raw_scale(scales, (flat + i * cp.s_stride) >> log2_bs, raw[i], code_index[i]);
        }
    }
    __device__ __forceinline__ void store(unsigned char *stage, const Scales &scales, const float *code) const {
        float *out = reinterpret_cast<float *>(stage + Shape::kXBytes + Shape::kWBytes);
#pragma unroll
        for (int i = 0; i < kPer; i++)
            out[threadIdx.x + i * Shape::kThreads] = raw_block_scale(scales, code, raw[i], code_index[i]);
    }
};

/* grid: (n tiles of BM, batch tiles of BN, splits); counters and partials as gemm_4bit_tiled_kernel.
 * Needs k % BK == 0, 16-byte aligned x rows and packed weights. LUT: kLutRegs, kLutShared or kLutLane
 * (bfloat16; float16 always uses the shared float32 pairs).
 *
 * The k loop overlaps a warpgroup's dequantize with its own tensor work: k-tile it's wgmmas are issued
 * from A fragments dequantized during k-tile it - 1, then (wgmma.wait_group 1: k-tile it - 1's are done,
 * so its fragments and its stage are free) the block syncs, refills the freed stage and dequantizes k-tile
 * it + 1 into the other fragment set while k-tile it's wgmmas run. */
template <typename T, typename Shape, int LUT, int MINB>
__global__ void __launch_bounds__(Shape::kThreads, MINB)
    gemm_4bit_wgmma_kernel(const T *__restrict__ x, int batch, const uint8_t *__restrict__ packed, Scales scales,
                           int64_t n_out, int64_t k, int log2_bs, int quant_type, T *__restrict__ y,
                           float *__restrict__ partials, int *__restrict__ counters) {
#if QK_HAS_WGMMA
    constexpr int BN = Shape::BN, MT = Shape::MT, STAGES = Shape::STAGES;
    extern __shared__ __align__(1024) unsigned char smem[];
    __shared__ PairTable pairs;
    __shared__ __align__(16) uint32_t lane_pairs[uses_lane_table(LUT) ? kLaneTableWords : 4];
    __shared__ float code[256];
    __shared__ int is_last;

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const WgmmaBlock<Shape> blk(k, warp, g);
    const int lrow0 = blk.lrow0, nk = blk.nk;
    const int64_t n_block = blk.n_block, m0 = blk.m0, kt0 = blk.kt0;
    const auto stage_of = [&](int it) { return smem + (it % STAGES) * Shape::kStageBytes; };

    WgmmaCopies<Shape> copies;
    copies.init(x, batch, packed, n_out, k, m0, n_block, kt0);
    copies.zero_missing_rows(smem, batch, m0);
#pragma unroll
    for (int s = 0; s < STAGES - 1; s++) {
        if (s < nk) copies.issue(stage_of(s), s);
        cp_async_commit();
    }
    /* Block scales travel global -> registers -> shared memory. A register load lands ~1 us later under
     * load, so its store waits kScaleLag k-tiles: k-tiles 0 and 1 are stored before the loop; during k-tile
     * it, ring[it % kScaleLag] stores k-tile it + 2 (dequantized during k-tile it + 1) and loads k-tile
     * it + STAGES - 1. */
    constexpr int kScaleLag = CpAsync<Shape>::kScaleLag, kUnroll = CpAsync<Shape>::kUnroll;
    WgmmaScaleLoads<Shape> head[2], ring[kScaleLag];
#pragma unroll
    for (int s = 0; s < 2; s++)
        if (s < nk) head[s].load(copies, scales, s, log2_bs);
#pragma unroll
    for (int s = 0; s < kScaleLag; s++)
        if (2 + s < nk) ring[s].load(copies, scales, 2 + s, log2_bs);
    const Lut4 tab = gemm_tables<T, LUT>(pairs, lane_pairs, code, scales, quant_type);
#pragma unroll
    for (int s = 0; s < 2; s++)
        if (s < nk) head[s].store(stage_of(s), scales, code);

    float acc[MT][BN / 2] = {};
    uint32_t a[2][MT][Shape::kSteps][4] = {};
    cp_async_wait<STAGES - 2>();
    fence_proxy_async_shared();
    __syncthreads(); /* k-tile 0 and the prologue's scales */
    if (nk > 0) wgmma_dequant<T, Shape, LUT>(a[0], stage_of(0), tab, lrow0, t);

    for (int base = 0; base < nk; base += kUnroll) {
#pragma unroll
        for (int d = 0; d < kUnroll; d++) { /* unrolled: fragment set d % 2, scale slot d % kScaleLag */
            const int it = base + d;
            const int cur = d & 1, sl = d % kScaleLag;
            if (it >= nk) break;
            const unsigned char *stage = stage_of(it);
            wgmma_fence();
#pragma unroll
            for (int j = 0; j < Shape::kSteps; j++) {
                const uint64_t desc = wgmma_desc(stage + 256 * j, CpAsync<Shape>::kLbo, CpAsync<Shape>::kSbo);
#pragma unroll
                for (int mt = 0; mt < MT; mt++) Wgmma<T, BN>::run(acc[mt], a[cur][mt][j], desc);
            }
            wgmma_commit();
            wgmma_wait<1>(); /* k-tile it - 1's wgmmas are done: a[1 - cur] and its stage are free */
            keep_fragments(a[1 - cur]); /* ...and not before: its registers stay untouched until here */
            cp_async_wait<STAGES - 3>();
            fence_proxy_async_shared();
            __syncthreads(); /* k-tile it + 1 landed for every thread; no warpgroup reads k-tile it - 1 any more */
            if (it + STAGES - 1 < nk) copies.issue(stage_of(it + STAGES - 1), it + STAGES - 1);
            cp_async_commit();
            /* scales: k-tile it + STAGES - 2's (loaded one k-tile ago) into its stage, then k-tile it + STAGES - 1's */
            if (it + 2 < nk) ring[sl].store(stage_of(it + 2), scales, code);
            if (it + STAGES - 1 < nk) ring[sl].load(copies, scales, it + STAGES - 1, log2_bs);
            if (it + 1 < nk) wgmma_dequant<T, Shape, LUT>(a[1 - cur], stage_of(it + 1), tab, lrow0, t);
        }
    }
    wgmma_retire(a, acc);
    cp_async_wait<0>();

    /* accumulator i of sub-tile mt (flattened: mt * BN / 2 + i): output row lrow0 + 64 mt (+ 8 for i % 4 >= 2),
     * batch row 8 * (i / 4) + 2t + i % 2 */
    const auto at = [&](int e, int64_t &n, int64_t &m) {
        const int mt = e / (BN / 2), i = e % (BN / 2);
        n = n_block + lrow0 + 64 * mt + ((i & 2) ? 8 : 0);
        m = m0 + 8 * (i >> 2) + 2 * t + (i & 1);
        return n < n_out && m < batch;
    };
    float(&flat)[MT * BN / 2] = reinterpret_cast<float(&)[MT * BN / 2]>(acc);
    if (reduce_split_k(flat, threadIdx.x, Shape::kThreads, partials, counters, is_last)) store_outputs(flat, at, y, n_out);
#else
    __trap(); /* not built for sm_90a (run_sweep.sh builds sm_90a on an H100) */
#endif
}

/* Launch one instantiation on `s`; workspace as split_k_workspace_bytes() (NULL when splits == 1). */
template <typename T, typename Shape, int LUT, int MINB>
cudaError_t launch_gemm_4bit_wgmma(const T *x, int batch, const uint8_t *packed, const Scales &sc, int64_t n_out,
                                   int64_t k, int log2_bs, int qt, T *y, int splits, void *workspace, cudaStream_t s) {
    return launch_split_k(gemm_4bit_wgmma_kernel<T, Shape, LUT, MINB>, ceil_div(n_out, Shape::BM),
                          ceil_div(batch, Shape::BN), splits, Shape::kThreads, Shape::kSmemBytes, workspace, s, x,
                          batch, packed, sc, n_out, k, log2_bs, qt, y);
}

}  // namespace qk

#endif /* QCKPT_CUDA_GEMM4_WGMMA_CUH */
