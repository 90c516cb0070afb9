/* gemm4_tma.cuh -- fused 4-bit dequantize + matmul for prefill batches (17..128 rows) on Hopper (sm_90a):
 * wgmma tensor-core instructions fed by the Tensor Memory Accelerator and a producer warp.
 *
 *   x (batch, k) @ dequant(W (n_out, k))^T -> y (batch, n_out)
 *
 * Why not gemm4_tiled.cuh's mma.sync kernel on an H100: there every warp re-reads its x fragments through
 * registers and loads its weights and block scales with per-thread address arithmetic; profiled, it kept the
 * issue slots 40% busy and the tensor cores mostly idle (scripts/BENCHMARKS.md has the steps that led here).
 * Here one producer warp streams each k-tile's x, packed weights and block scales into a STAGES-deep ring of
 * shared-memory stages with three TMA copies (no registers, no address arithmetic per thread), and mbarriers
 * order the ring: full[s] completes when stage s's bytes have landed, empty[s] when every consumer warp has
 * retired the wgmmas that read it. The block scales come from expand_scales_kernel, run just before into the
 * workspace: one float32 per block laid out [block of k][n_out], which TMA can copy; gathering them in the
 * kernel (a byte and a float per weight row and k-tile, 32 rows apart) made the producer the bottleneck
 * (71 -> 42 us at 128 rows of 14336x4096).
 *
 * x lands in the 128-byte-swizzled K-major layout (a TMA box of 64 k x BN rows with SWIZZLE_128B), which wgmma
 * reads through a descriptor of layout type 1 (8-row groups 1024 bytes apart; a k16 step starts 32 bytes
 * further). The weights land as [BM rows][32 bytes] and are dequantized by wgmma_dequant (wgmma.cuh) into A
 * fragments in registers -- the same values as every other 4-bit kernel here. Consumers are WG warpgroups of
 * MT x 64 output rows: during k-tile it a warpgroup issues its wgmmas, waits for k-tile it - 1's
 * (wait_group 1), releases that stage, waits for k-tile it + 1's stage and dequantizes it while k-tile it's
 * wgmmas run. The producer issues the first STAGES k-tiles before the block builds its lookup tables, so the
 * two overlap. Split k and its deterministic sum are gemm4_tiled.cuh's (reduce_split_k); the outputs leave
 * through shared memory as 16-byte row pieces (store_tile). */
#ifndef QCKPT_CUDA_GEMM4_TMA_CUH
#define QCKPT_CUDA_GEMM4_TMA_CUH

#include <cuda.h>
#include <cudaTypedefs.h>

#include "gemm4_tiled.cuh"
#include "wgmma.cuh"

namespace qk {

__device__ __forceinline__ uint32_t smem_addr(const void *p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void mbar_init(uint64_t *bar, int count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint64_t *bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_addr(bar)) : "memory");
}
__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t *bar, uint32_t bytes) {
#if QK_HAS_WGMMA
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(bytes) : "memory");
#endif
}
/* spin until the phase with parity `parity` of the barrier has completed */
__device__ __forceinline__ void mbar_wait(uint64_t *bar, uint32_t parity) {
#if QK_HAS_WGMMA
    asm volatile(
        "{\n.reg .pred p;\nWAIT_%=:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
        "@!p bra WAIT_%=;\n}\n" ::"r"(smem_addr(bar)),
        "r"(parity)
        : "memory");
#endif
}
/* a 2-D tile of `map` at (inner c0, outer c1) into shared memory; completes bytes on `bar` */
__device__ __forceinline__ void tma_load_2d(void *dst, const CUtensorMap *map, int c0, int c1, uint64_t *bar) {
#if QK_HAS_WGMMA
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::"r"(
            smem_addr(dst)),
        "l"(map), "r"(c0), "r"(c1), "r"(smem_addr(bar))
        : "memory");
#endif
}

/* A K-major, 128-byte-swizzled shared-memory matrix descriptor (8-row groups 1024 bytes apart). */
__device__ __forceinline__ uint64_t wgmma_desc_sw128(const void *smem) {
    const uint32_t a = smem_addr(smem);
    return uint64_t((a & 0x3FFFF) >> 4) | (uint64_t(1) << 16) | (uint64_t(1024 >> 4) << 32) | (uint64_t(1) << 62);
}

/* Block scales laid out for TMA: out[kb * ld + n] = the float32 scale of row n's kb-th block (k % blocksize
 * == 0; ld >= n_out, a multiple of 4 so that rows start 16-byte aligned), exactly raw_block_scale's value.
 * A thread makes JB consecutive blocks of one row: its loads are issued together and hit one 32-byte sector;
 * a warp's 32 threads take 32 consecutive rows, so each of its stores is one coalesced 128-byte line. No
 * shared memory and no barrier: the kernel is a single round trip to memory (a version that transposed
 * 32 x 32 tiles through shared memory took 5.0 us for a 14336x4096 weight, latency-bound at 0.9 TB/s).
 * grid: (ceil(n_out / 32), ceil(blocks per row / JB / kExpandRows)); block: (32, kExpandRows). */
constexpr int kExpandRows = 8;
template <int JB>
__global__ void expand_scales_kernel(Scales scales, int64_t n_out, int64_t k, int log2_bs, int64_t ld,
                                     float *__restrict__ out, int *__restrict__ clear, int clear_count) {
    if (blockIdx.x == 0 && blockIdx.y == 0)
        for (int i = threadIdx.y * 32 + threadIdx.x; i < clear_count; i += 32 * kExpandRows) clear[i] = 0;
    const int64_t n = int64_t(blockIdx.x) * 32 + threadIdx.x;
    const int64_t kb0 = (int64_t(blockIdx.y) * kExpandRows + threadIdx.y) * JB, per_row = k >> log2_bs;
    if (n >= n_out || kb0 >= per_row) return;
    float raw[JB];
    uint32_t ci[JB];
#pragma unroll
    for (int j = 0; j < JB; j++) load_raw_scale(scales, n * per_row + kb0 + j, raw[j], ci[j]);
#pragma unroll
    for (int j = 0; j < JB; j++)
        out[(kb0 + j) * ld + n] = scales.absmax ? raw[j] : __fadd_rn(__fmul_rn(__ldg(scales.code + ci[j]), raw[j]),
                                                                     scales.offset);
}

/* Launch the expansion of one weight's scales into `out` (row stride ld) on `s`; JB 4 when the blocks of a
 * row come in fours. Its first block also zeroes clear[0, clear_count): the split-K tile counters of the
 * matmul that follows, when the call made the scales in a workspace that nothing zero-filled (inside
 * CUDA-graph capture every call gets a fresh one, and a separate fill of it cost more than the expansion). */
inline cudaError_t launch_expand_scales(const Scales &scales, int64_t n_out, int64_t k, int log2_bs, int64_t ld,
                                        float *out, cudaStream_t s, int *clear = nullptr, int clear_count = 0) {
    const int64_t per_row = k >> log2_bs;
    const int jb = per_row % 4 == 0 ? 4 : 1;
    const int64_t grid_y = ceil_div(per_row / jb, kExpandRows);
    if (grid_y > 65535) return cudaErrorInvalidValue;
    const dim3 grid((unsigned)ceil_div(n_out, 32), (unsigned)grid_y), block(32, kExpandRows);
    if (jb == 4) expand_scales_kernel<4><<<grid, block, 0, s>>>(scales, n_out, k, log2_bs, ld, out, clear, clear_count);
    else expand_scales_kernel<1><<<grid, block, 0, s>>>(scales, n_out, k, log2_bs, ld, out, clear, clear_count);
    return cudaGetLastError();
}

/* Write a block's outputs to y through shared memory: consumer accumulator e = mt * BN / 2 + i of lane
 * (lrow0, t) is output row lrow0 + 64 mt (+ 8 for i % 4 >= 2), batch row 8 * (i / 4) + 2t + i % 2 of the
 * tile; the values go to a [BN][BM + 8] tile of T in the ring (free once every warpgroup has retired its
 * wgmmas, hence the barrier first; the 8 spare columns spread a warp's stores over the banks), then every
 * thread of the block copies whole 16-byte pieces of output rows to y. Written directly, each lane stored
 * 2-byte values 8 rows apart: 2.5 us of a 38 us block at 128 x 128 outputs. Every thread calls this. */
template <typename T, typename Shape>
__device__ __forceinline__ void store_tile(const float (&acc)[Shape::MT * Shape::BN / 2], unsigned char *smem,
                                           bool producer, int lrow0, int t, T *__restrict__ y, int64_t n_block,
                                           int64_t m0, int batch, int64_t n_out) {
    constexpr int BM = Shape::BM, BN = Shape::BN, kPitch = BM + 8, kPieces = BM / 8;
    static_assert(Shape::kSmemBytes >= BN * kPitch * int(sizeof(T)), "the ring holds the output tile");
    T *tile = reinterpret_cast<T *>(smem);
    __syncthreads();
    if (!producer) {
#pragma unroll
        for (int e = 0; e < Shape::MT * BN / 2; e++) {
            const int mt = e / (BN / 2), i = e % (BN / 2);
            const int n = lrow0 + 64 * mt + ((i & 2) ? 8 : 0), m = 8 * (i >> 2) + 2 * t + (i & 1);
            tile[m * kPitch + n] = from_f32<T>(acc[e]);
        }
    }
    __syncthreads();
    const bool whole = n_out % 8 == 0 && (reinterpret_cast<uintptr_t>(y) & 15) == 0;
    for (int piece = threadIdx.x; piece < BN * kPieces; piece += blockDim.x) {
        const int m = piece / kPieces, n = (piece % kPieces) * 8;
        if (m0 + m >= batch) break; /* pieces go row by row: the later ones lie further out */
        const T *src = tile + m * kPitch + n;
        T *dst = y + (m0 + m) * n_out + n_block + n;
        if (whole && n_block + n + 8 <= n_out) {
            *reinterpret_cast<uint4 *>(dst) = *reinterpret_cast<const uint4 *>(src);
        } else {
            for (int c = 0; c < 8 && n_block + n + c < n_out; c++) dst[c] = src[c];
        }
    }
}

/* grid: (n tiles of BM, batch tiles of BN, splits); counters and partials as gemm_4bit_tiled_kernel; block:
 * WG * 128 consumer threads + one producer warp. x_map: bfloat16/float16 [batch][k], box 64 x BN, 128-byte
 * swizzle; w_map: bytes [n_out][k / 2], box BK / 2 x BM; s_map: expand_scales_kernel's output. Needs
 * k % 64 == 0 and k % blocksize == 0. */
template <typename T, typename Shape, int LUT, int MINB>
__global__ void __launch_bounds__(Shape::kThreads + 32, MINB)
    gemm_4bit_tma_kernel(const __grid_constant__ CUtensorMap x_map, const __grid_constant__ CUtensorMap w_map,
                         const __grid_constant__ CUtensorMap s_map, int batch, Scales scales, int64_t n_out, int64_t k,
                         int log2_bs, int quant_type,
                         T *__restrict__ y, float *__restrict__ partials, int *__restrict__ counters) {
#if QK_HAS_WGMMA
    static_assert(Shape::BK == 64, "the scale rows of a k-tile are indexed by group for 64-wide k-tiles");
    /* x: one TMA box (64 k x BN rows, 128-byte swizzle atoms) per 64 k of the k-tile */
    constexpr int kXBoxes = Shape::BK / 64, kXBoxBytes = Shape::BN * 128;
    constexpr int BN = Shape::BN, MT = Shape::MT, STAGES = Shape::STAGES;
    constexpr int kConsumerWarps = Shape::kThreads / 32;
    extern __shared__ __align__(1024) unsigned char smem_raw[];
    /* the ring starts at the next 1024-byte boundary (the swizzle's alignment); an integer offset keeps the
     * pointer in the shared window (a round trip through uintptr_t made every access a generic one) */
    unsigned char *smem = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);
    __shared__ PairTable pairs;
    __shared__ __align__(16) uint32_t lane_pairs[uses_lane_table(LUT) ? kLaneTableWords : 4];
    __shared__ float code[256];
    __shared__ int is_last;
    __shared__ __align__(8) uint64_t full[STAGES], empty[STAGES];

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const bool producer = warp == kConsumerWarps;
    const WgmmaBlock<Shape> blk(k, warp, g);
    const int lrow0 = blk.lrow0, nk = blk.nk;
    const int64_t n_block = blk.n_block, m0 = blk.m0, kt0 = blk.kt0;
    const auto stage_of = [&](int it) { return smem + (it % STAGES) * Shape::kStageBytes; };

    /* k-tile it goes to stage it % STAGES once the consumers released k-tile it - STAGES there: its x, its
     * packed weights and the rows of expanded scales it covers, three TMA copies issued by the producer's
     * lane 0, which expects their bytes on full[stage] */
    const int s_rows = Shape::BK >= (1 << log2_bs) ? Shape::BK >> log2_bs : 1;
    const uint32_t stage_bytes = Shape::kXBytes + Shape::kWBytes + uint32_t(s_rows) * Shape::BM * 4;
    const auto issue = [&](int it) {
        unsigned char *stage = stage_of(it);
        uint64_t *bar = full + it % STAGES;
        const int64_t kt = kt0 + it;
        mbar_arrive_expect_tx(bar, stage_bytes);
#pragma unroll
        for (int b = 0; b < kXBoxes; b++)
            tma_load_2d(stage + b * kXBoxBytes, &x_map, int(kt * Shape::BK + 64 * b), int(m0), bar);
        tma_load_2d(stage + Shape::kXBytes, &w_map, int(kt * (Shape::BK / 2)), int(n_block), bar);
        tma_load_2d(stage + Shape::kXBytes + Shape::kWBytes, &s_map, int(n_block), int((kt * Shape::BK) >> log2_bs),
                    bar);
    };
    /* That lane readies the barriers and fills the ring before the block builds its tables (~1 us), which
     * then overlap the first copies; the tables' barrier publishes the barriers to the consumers. */
    const bool issuer = producer && lane == 0;
    if (issuer) {
        for (int s = 0; s < STAGES; s++) {
            mbar_init(full + s, 1);
            mbar_init(empty + s, kConsumerWarps); /* one arrival per consumer warp */
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
        for (int it = 0; it < nk && it < STAGES; it++) issue(it);
    }
    const Lut4 tab = gemm_tables<T, LUT>(pairs, lane_pairs, code, scales, quant_type); /* syncs the block */

    float acc[MT][BN / 2] = {};
    if (producer) {
        if (issuer)
            for (int it = STAGES; it < nk; it++) {
                mbar_wait(empty + it % STAGES, ((it / STAGES) + 1) & 1);
                issue(it);
            }
    } else {
        uint32_t a[2][MT][Shape::kSteps][4] = {};
        /* the stage's scales are [block row][BM]: group h of a k-tile is block row 32h / blocksize */
        const int s_group = log2_bs == 5 ? Shape::BM : 0;
        if (nk > 0) {
            mbar_wait(full, 0);
            wgmma_dequant<T, Shape, LUT>(a[0], stage_of(0), tab, lrow0, t, 1, s_group);
        }
        for (int base = 0; base < nk; base += 2) {
#pragma unroll
            for (int cur = 0; cur < 2; cur++) {
                const int it = base + cur;
                if (it >= nk) break;
                const unsigned char *stage = stage_of(it);
                wgmma_fence();
#pragma unroll
                for (int j = 0; j < Shape::kSteps; j++) {
                    const uint64_t desc = wgmma_desc_sw128(stage + (j / 4) * kXBoxBytes + 32 * (j % 4));
#pragma unroll
                    for (int mt = 0; mt < MT; mt++) Wgmma<T, BN>::run(acc[mt], a[cur][mt][j], desc);
                }
                wgmma_commit();
                wgmma_wait<1>(); /* k-tile it - 1's wgmmas are done: a[1 - cur] and its stage are free */
                keep_fragments(a[1 - cur]);
                if (it >= 1) {
                    __syncwarp();
                    if (lane == 0) mbar_arrive(empty + (it - 1) % STAGES);
                }
                if (it + 1 < nk) {
                    mbar_wait(full + (it + 1) % STAGES, ((it + 1) / STAGES) & 1);
                    wgmma_dequant<T, Shape, LUT>(a[1 - cur], stage_of(it + 1), tab, lrow0, t, 1, s_group);
                }
            }
        }
        wgmma_retire(a, acc);
    }

    float(&flat)[MT * BN / 2] = reinterpret_cast<float(&)[MT * BN / 2]>(acc);
    if (reduce_split_k(flat, producer ? -1 : int(threadIdx.x), Shape::kThreads, partials, counters, is_last))
        store_tile<T, Shape>(flat, smem, producer, lrow0, t, y, n_block, m0, batch, n_out);
#else
    __trap(); /* not built for sm_90a: the launcher only runs this kernel on compute capability 9.0 */
#endif
}

/* The tensor maps of one call (host): x as [batch][k] of 2-byte values in 64 x BN boxes with the 128-byte
 * swizzle, the packed weights as [n_out][k / 2] bytes in 32 x BM boxes, the expanded scales as
 * [k / blocksize][ld] floats in BM x (64 / blocksize, at least 1) boxes. false if the driver refused. */
template <typename Shape>
inline bool make_tma_maps(CUtensorMap *x_map, CUtensorMap *w_map, CUtensorMap *s_map, const void *x, int batch,
                          const uint8_t *packed, const float *expanded, int64_t ld, int64_t n_out, int64_t k,
                          int log2_bs, bool bf16) {
    static PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
        void *fn = nullptr;
        cudaDriverEntryPointQueryResult q;
#if CUDART_VERSION >= 12050
        const cudaError_t err = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &q);
#else
        const cudaError_t err = cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &fn, cudaEnableDefault, &q);
#endif
        return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(err == cudaSuccess ? fn : nullptr);
    }();
    if (!encode) return false;
    const cuuint32_t ones[2] = {1, 1};
    const cuuint64_t x_dims[2] = {cuuint64_t(k), cuuint64_t(batch)}, x_strides[1] = {cuuint64_t(k) * 2};
    const cuuint32_t x_box[2] = {64, Shape::BN};
    CUresult r = encode(x_map, bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 2,
                        const_cast<void *>(x), x_dims, x_strides, x_box, ones, CU_TENSOR_MAP_INTERLEAVE_NONE,
                        CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    if (r != CUDA_SUCCESS) return false;
    const cuuint64_t w_dims[2] = {cuuint64_t(k / 2), cuuint64_t(n_out)}, w_strides[1] = {cuuint64_t(k / 2)};
    const cuuint32_t w_box[2] = {Shape::BK / 2, Shape::BM};
    r = encode(w_map, CU_TENSOR_MAP_DATA_TYPE_UINT8, 2, const_cast<uint8_t *>(packed), w_dims, w_strides, w_box, ones,
               CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_NONE, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
               CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    if (r != CUDA_SUCCESS) return false;
    const cuuint64_t s_dims[2] = {cuuint64_t(n_out), cuuint64_t(k >> log2_bs)}, s_strides[1] = {cuuint64_t(ld) * 4};
    const cuuint32_t s_box[2] = {Shape::BM, cuuint32_t(log2_bs < 6 ? 64 >> log2_bs : 1)};
    r = encode(s_map, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, 2, const_cast<float *>(expanded), s_dims, s_strides, s_box, ones,
               CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_NONE, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
               CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    return r == CUDA_SUCCESS;
}

/* Launch one instantiation on `s`; expanded: expand_scales_kernel's output for these weights (row stride
 * ld); workspace as split_k_workspace_bytes() (NULL when splits == 1). */
template <typename T, typename Shape, int LUT, int MINB>
cudaError_t launch_gemm_4bit_tma(const T *x, int batch, const uint8_t *packed, const float *expanded, int64_t ld,
                                 const Scales &sc, int64_t n_out, int64_t k, int log2_bs, int qt, T *y, int splits,
                                 void *workspace, cudaStream_t s) {
    CUtensorMap x_map, w_map, s_map;
    if (!make_tma_maps<Shape>(&x_map, &w_map, &s_map, x, batch, packed, expanded, ld, n_out, k, log2_bs,
                              std::is_same<T, __nv_bfloat16>::value))
        return cudaErrorInvalidValue;
    /* + 1024: room to align the ring to 1024 bytes; + 32 threads: the producer warp */
    return launch_split_k(gemm_4bit_tma_kernel<T, Shape, LUT, MINB>, ceil_div(n_out, Shape::BM),
                          ceil_div(batch, Shape::BN), splits, Shape::kThreads + 32, Shape::kSmemBytes + 1024,
                          workspace, s, x_map, w_map, s_map, batch, sc, n_out, k, log2_bs, qt, y);
}

}  // namespace qk

#endif /* QCKPT_CUDA_GEMM4_TMA_CUH */
