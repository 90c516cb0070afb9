/* gemm4_wgmma.cuh -- EXPERIMENT, not part of the library: a fused 4-bit dequantize + matmul for prefill-sized
 * batches on Hopper's warpgroup tensor-core instruction (wgmma, sm_90a), timed by gemm4_sweep.cu --wgmma.
 * It is correct (the harness checks every launch against a float32 reference) but on an H100 it was no
 * faster than the library's mma.sync kernel (gemm4_tiled.cuh): 120-160 us against 115 us at 128 rows of
 * 14336x4096 (scripts/BENCHMARKS.md has the table and the profile). It stays here, outside native/, as the
 * starting point for the next attempt.
 *
 *   x (batch, k) @ dequant(W (n_out, k))^T -> y (batch, n_out)
 *
 * Why wgmma: with mma.sync every warp re-reads its x fragments through registers; wgmma reads x (operand B)
 * straight from shared memory for a whole warpgroup (4 warps, 64 outputs) and takes the weights (operand A)
 * from registers, where they are dequantized.
 *
 * Tiles: a block is WG warpgroups of MT x 64 outputs each by BN batch rows, over k-tiles of 64. Each
 * k-tile's x (BN x 64 bfloat16), packed weights (BM rows x 32 bytes) and block scales stream into shared
 * memory through a STAGES-deep ring (cp.async; the scales by plain loads, stored one k-tile later). x is
 * laid out as wgmma's no-swizzle K-major "core matrices" (8 rows x 16 bytes, 128 contiguous bytes): byte
 * (n >> 3) * 1024 + c * 128 + (n & 7) * 16 holds k-chunk c (8 values) of row n, so a k16 step's descriptor
 * starts at 256 * step with 128 bytes between its two k-chunks (leading byte offset) and 1024 between
 * 8-row groups (stride byte offset) -- measured right; swapping the two gave garbage.
 *
 * A fragments follow the mma.m16n8k16 layout: lane (g, t) of warp w holds rows 16w + g and + 8 at k pairs
 * (2t, 2t + 1) and (2t + 8, 2t + 9) of a k16 step -- in packed bytes, byte t of the step's two 4-byte
 * words. Each lane reads its rows' 32 bytes of the k-tile from shared memory (a quad shares them) and looks
 * up the pairs in the shared pair table; scaling is PairDequant's, the same values as the other kernels.
 *
 * Per k-tile a warpgroup dequantizes, issues its wgmmas and waits for them. What the profile said about
 * that (Nsight Compute, 128 rows): one warpgroup per SM on a short grid, 0.22 issued warps per scheduler
 * and L2 throughput 46-69% from re-reading x once per 64-128 outputs -- latency- and L2-bound, not tensor
 * bound. Next: a persistent grid with two consumer warpgroups overlapping dequantize and wgmma
 * (wait_group 1), x shared by a cluster through TMA multicast. Split k and the deterministic finish are
 * gemm4_tiled.cuh's. */
#ifndef QCKPT_CUDA_GEMM4_WGMMA_CUH
#define QCKPT_CUDA_GEMM4_WGMMA_CUH

#include "kernels/gemm4_tiled.cuh"

namespace qk {

/* wgmma assembles only for sm_90a; elsewhere (other targets, the PTX for newer GPUs) the kernel body is
 * a trap. */
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define QK_HAS_WGMMA 1
#else
#define QK_HAS_WGMMA 0
#endif

template <typename T, int N> struct Wgmma;
#if QK_HAS_WGMMA
template <> struct Wgmma<__nv_bfloat16, 64> {
    static __device__ __forceinline__ void run(float (&d)[32], const uint32_t (&a)[4], uint64_t desc) {
        asm volatile(
            "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
            "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
            "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
            "{%32, %33, %34, %35}, %36, p, 1, 1, 0;\n}\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1)
            : "memory");
    }
};
template <> struct Wgmma<__half, 64> {
    static __device__ __forceinline__ void run(float (&d)[32], const uint32_t (&a)[4], uint64_t desc) {
        asm volatile(
            "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
            "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 "
            "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
            "{%32, %33, %34, %35}, %36, p, 1, 1, 0;\n}\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1)
            : "memory");
    }
};
template <> struct Wgmma<__nv_bfloat16, 128> {
    static __device__ __forceinline__ void run(float (&d)[64], const uint32_t (&a)[4], uint64_t desc) {
        asm volatile(
            "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
            "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
            "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
            "{%64, %65, %66, %67}, %68, p, 1, 1, 0;\n}\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1)
            : "memory");
    }
};
template <> struct Wgmma<__half, 128> {
    static __device__ __forceinline__ void run(float (&d)[64], const uint32_t (&a)[4], uint64_t desc) {
        asm volatile(
            "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
            "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 "
            "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
            "{%64, %65, %66, %67}, %68, p, 1, 1, 0;\n}\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1)
            : "memory");
    }
};
#endif

__device__ __forceinline__ void wgmma_fence() {
#if QK_HAS_WGMMA
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wgmma_commit() {
#if QK_HAS_WGMMA
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wgmma_wait_all() {
#if QK_HAS_WGMMA
    asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
#endif
}
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

template <int BN_, int WG_, int MT_, int STAGES_>
struct WgmmaShape {
    static constexpr int BN = BN_, WG = WG_, MT = MT_, STAGES = STAGES_;
    static_assert(BN == 64 || BN == 128, "batch tile of 64 or 128 rows");
    static_assert(STAGES >= 3, "scales are stored one k-tile after they are loaded, two ahead of use");
    static constexpr int kThreads = WG * 128, BM = WG * MT * 64;
    static constexpr int kXBytes = BN * kTiledBK * 2, kWBytes = BM * kTiledBK / 2, kScaleBytes = BM * 2 * 4;
    static constexpr int kStageBytes = kXBytes + kWBytes + kScaleBytes;
    static constexpr int kSmemBytes = STAGES * kStageBytes;
    static constexpr int kScalesPerThread = BM * 2 / kThreads; /* = MT */
};

constexpr uint32_t kWgmmaLbo = 128, kWgmmaSbo = 1024; /* the x layout above */

/* byte offset of k-chunk c (0..7) of batch row n inside a stage's x tile */
__device__ __forceinline__ int wgmma_x_offset(int n, int c) { return (n >> 3) * 1024 + c * 128 + (n & 7) * 16; }

template <typename Shape>
__device__ __forceinline__ void wgmma_load_stage(unsigned char *stage, const void *__restrict__ x, int batch,
                                                 int64_t k, int64_t m0, const uint8_t *__restrict__ packed,
                                                 int64_t n_out, int64_t n_block, int64_t kt) {
    const unsigned char *xb = static_cast<const unsigned char *>(x);
    /* a warp's 32 chunks: rows 8i..8i+7 x chunks 4j..4j+3, 512 contiguous bytes of shared memory */
    for (int idx = threadIdx.x; idx < Shape::BN * 8; idx += Shape::kThreads) {
        const int n = ((idx >> 6) << 3) | (idx & 7), c = (idx >> 3) & 7;
        const int64_t m = m0 + n;
        const bool valid = m < batch;
        cp_async16(stage + wgmma_x_offset(n, c), valid ? xb + (m * k + kt * kTiledBK + c * 8) * 2 : x, valid);
    }
    unsigned char *w = stage + Shape::kXBytes;
    for (int idx = threadIdx.x; idx < Shape::BM * 2; idx += Shape::kThreads) {
        const int r = idx >> 1, h = idx & 1;
        const int64_t row = n_block + r;
        const bool valid = row < n_out;
        cp_async16(w + r * 32 + h * 16, valid ? packed + ((row * k + kt * kTiledBK) >> 1) + h * 16 : packed, valid);
    }
}

/* Block scales of a k-tile, one per weight row and half of the tile (k 0..31, 32..63: they differ only for
 * blocksize 32), kept in the stage as float32 [row][half]. Each thread owns kScalesPerThread of them: it
 * loads their raw inputs one k-tile, and combines and stores them the next (a load waited on in the same
 * k-tile would stall every warp of the block for a global round trip). */
template <typename Shape>
struct WgmmaScaleLoads {
    float raw[Shape::kScalesPerThread];
    uint32_t code_index[Shape::kScalesPerThread];

    __device__ __forceinline__ void load(const Scales &scales, int64_t n_block, int64_t n_out, int64_t k, int64_t kt,
                                         int log2_bs) {
#pragma unroll
        for (int i = 0; i < Shape::kScalesPerThread; i++) {
            const int e = threadIdx.x + i * Shape::kThreads;
            const int64_t row = n_block + (e >> 1);
            raw[i] = 0.0f; /* past n_out: a zero scale, and the rows are never stored */
            code_index[i] = 0;
            if (row < n_out)
                load_raw_scale(scales, (row * k + kt * kTiledBK + 32 * (e & 1)) >> log2_bs, raw[i], code_index[i]);
        }
    }
    __device__ __forceinline__ void store(unsigned char *stage, const Scales &scales, const float *code) const {
        float *out = reinterpret_cast<float *>(stage + Shape::kXBytes + Shape::kWBytes);
#pragma unroll
        for (int i = 0; i < Shape::kScalesPerThread; i++)
            out[threadIdx.x + i * Shape::kThreads] = raw_block_scale(scales, code, raw[i], code_index[i]);
    }
};

/* One pair of a byte, scaled: the shared pair table as PairDequant::word reads it. */
template <typename T> __device__ __forceinline__ uint32_t scaled_pair(const Lut4 &t, uint32_t byte, const PairDequant<T> &d);
template <> __device__ __forceinline__ uint32_t scaled_pair<__nv_bfloat16>(const Lut4 &t, uint32_t byte,
                                                                           const PairDequant<__nv_bfloat16> &d) {
    uint32_t p = t.pairs->b16[byte];
    __nv_bfloat162 v = __hmul2(*reinterpret_cast<const __nv_bfloat162 *>(&p), d.s);
    return *reinterpret_cast<uint32_t *>(&v);
}
template <> __device__ __forceinline__ uint32_t scaled_pair<__half>(const Lut4 &t, uint32_t byte,
                                                                    const PairDequant<__half> &d) {
    const float2 v = t.pairs->f32[byte];
    return pack2<__half>(__fmul_rn(v.x, d.s), __fmul_rn(v.y, d.s));
}

/* grid: (n tiles of BM, batch tiles of BN, splits); counters and partials as gemm_4bit_tiled_kernel.
 * Needs k % 64 == 0, 16-byte aligned x rows and packed weights. lbo / sbo: the descriptor's offsets
 * (kWgmmaLbo, kWgmmaSbo; parameters so that the tuning harness can check them). */
template <typename T, typename Shape, int MINB>
__global__ void __launch_bounds__(Shape::kThreads, MINB)
    gemm_4bit_wgmma_kernel(const T *__restrict__ x, int batch, const uint8_t *__restrict__ packed, Scales scales,
                           int64_t n_out, int64_t k, int log2_bs, int quant_type, T *__restrict__ y,
                           float *__restrict__ partials, int *__restrict__ counters, uint32_t lbo, uint32_t sbo) {
#if QK_HAS_WGMMA
    constexpr int BN = Shape::BN, MT = Shape::MT, STAGES = Shape::STAGES;
    extern __shared__ __align__(1024) unsigned char smem[];
    __shared__ PairTable pairs;
    __shared__ float code[256];
    __shared__ int is_last;
    const Lut4 tab = make_lut4<T>(pairs, nullptr, quant_type, kLutShared);
    if (!scales.absmax)
        for (int i = threadIdx.x; i < 256; i += blockDim.x) code[i] = scales.code[i];

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    /* this lane's first weight row of sub-tile mt: lrow0 + 64 * mt (and + 8) */
    const int lrow0 = (warp >> 2) * MT * 64 + (warp & 3) * 16 + g;
    const int64_t n_block = int64_t(blockIdx.x) * Shape::BM, m0 = int64_t(blockIdx.y) * BN;
    const int splits = gridDim.z, split = blockIdx.z;
    const int64_t ktiles = k / kTiledBK;
    const int64_t kt0 = ktiles * split / splits, nk = ktiles * (split + 1) / splits - kt0;

    float acc[MT][BN / 2] = {};
#pragma unroll
    for (int s = 0; s < STAGES - 1; s++) {
        if (s < nk)
            wgmma_load_stage<Shape>(smem + s * Shape::kStageBytes, x, batch, k, m0, packed, n_out, n_block, kt0 + s);
        cp_async_commit();
    }
    WgmmaScaleLoads<Shape> pending;
    __syncthreads(); /* the code book, for the prologue's scales */
#pragma unroll 1
    for (int s = 0; s < STAGES - 1; s++)
        if (s < nk) {
            pending.load(scales, n_block, n_out, k, kt0 + s, log2_bs);
            pending.store(smem + s * Shape::kStageBytes, scales, code);
        }
    const int shift = 8 * t;
    for (int64_t it = 0; it < nk; it++) {
        cp_async_wait<STAGES - 2>();
        fence_proxy_async_shared();
        __syncthreads(); /* tile `it` landed for all; every warpgroup finished tile it - 1, so its slot is free */
        if (it + STAGES - 1 < nk)
            wgmma_load_stage<Shape>(smem + ((it + STAGES - 1) % STAGES) * Shape::kStageBytes, x, batch, k, m0, packed,
                                    n_out, n_block, kt0 + it + STAGES - 1);
        cp_async_commit();
        /* scales: tile it + STAGES - 2's (loaded last k-tile) into its slot, then load tile it + STAGES - 1's */
        if (it >= 1 && it + STAGES - 2 < nk)
            pending.store(smem + ((it + STAGES - 2) % STAGES) * Shape::kStageBytes, scales, code);
        if (it + STAGES - 1 < nk) pending.load(scales, n_block, n_out, k, kt0 + it + STAGES - 1, log2_bs);

        const unsigned char *stage = smem + (it % STAGES) * Shape::kStageBytes;
        const float *tile_scales = reinterpret_cast<const float *>(stage + Shape::kXBytes + Shape::kWBytes);
        uint32_t a[MT][4][4];
#pragma unroll
        for (int mt = 0; mt < MT; mt++) {
            const int lrow = lrow0 + 64 * mt;
            const uint4 *wrow = reinterpret_cast<const uint4 *>(stage + Shape::kXBytes + lrow * 32);
            const uint4 w0[2] = {wrow[0], wrow[1]}, w1[2] = {wrow[16], wrow[17]}; /* rows lrow and lrow + 8 */
            const uint32_t *b0 = reinterpret_cast<const uint32_t *>(w0), *b1 = reinterpret_cast<const uint32_t *>(w1);
#pragma unroll
            for (int h = 0; h < 2; h++) {
                const PairDequant<T> d0(tile_scales[2 * lrow + h]), d1(tile_scales[2 * (lrow + 8) + h]);
#pragma unroll
                for (int j = 2 * h; j < 2 * h + 2; j++) {
                    a[mt][j][0] = scaled_pair<T>(tab, (b0[2 * j] >> shift) & 0xFF, d0);
                    a[mt][j][1] = scaled_pair<T>(tab, (b1[2 * j] >> shift) & 0xFF, d1);
                    a[mt][j][2] = scaled_pair<T>(tab, (b0[2 * j + 1] >> shift) & 0xFF, d0);
                    a[mt][j][3] = scaled_pair<T>(tab, (b1[2 * j + 1] >> shift) & 0xFF, d1);
                }
            }
        }
        wgmma_fence();
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const uint64_t desc = wgmma_desc(stage + 256 * j, lbo, sbo);
#pragma unroll
            for (int mt = 0; mt < MT; mt++) Wgmma<T, BN>::run(acc[mt], a[mt][j], desc);
        }
        wgmma_commit();
        wgmma_wait_all();
    }
    cp_async_wait<0>();

    /* accumulator i of sub-tile mt: output row lrow0 + 64 mt (+ 8 for i % 4 >= 2), batch row
     * 8 * (i / 4) + 2t + i % 2 */
    const auto for_each = [&](const auto &f) {
#pragma unroll
        for (int mt = 0; mt < MT; mt++)
#pragma unroll
            for (int i = 0; i < BN / 2; i++) {
                const int64_t n = n_block + lrow0 + 64 * mt + ((i & 2) ? 8 : 0);
                const int64_t m = m0 + 8 * (i >> 2) + 2 * t + (i & 1);
                if (n < n_out && m < batch) f(n, m, acc[mt][i]);
            }
    };
    finish_split_k<T>(for_each, y, partials, counters, is_last, batch, n_out);
#else
    __trap(); /* not built for sm_90a (run_sweep.sh builds sm_90a on an H100) */
#endif
}

/* Launch one instantiation on `s`; workspace as tiled_workspace_bytes() (NULL when splits == 1). */
template <typename T, typename Shape, int MINB>
cudaError_t launch_gemm_4bit_wgmma(const T *x, int batch, const uint8_t *packed, const Scales &sc, int64_t n_out,
                                   int64_t k, int log2_bs, int qt, T *y, int splits, void *workspace, cudaStream_t s,
                                   uint32_t lbo = kWgmmaLbo, uint32_t sbo = kWgmmaSbo) {
    auto kernel = gemm_4bit_wgmma_kernel<T, Shape, MINB>;
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Shape::kSmemBytes);
    if (err != cudaSuccess) return err;
    const int64_t n_tiles = ceil_div(n_out, Shape::BM), m_tiles = ceil_div(batch, Shape::BN);
    int *counters = splits > 1 ? static_cast<int *>(workspace) : nullptr;
    float *partials = splits > 1 ? reinterpret_cast<float *>(counters + kTiledMaxCounters) : nullptr;
    kernel<<<dim3((unsigned)n_tiles, (unsigned)m_tiles, (unsigned)splits), Shape::kThreads, Shape::kSmemBytes, s>>>(
        x, batch, packed, sc, n_out, k, log2_bs, qt, y, partials, counters, lbo, sbo);
    return cudaGetLastError();
}

}  // namespace qk

#endif /* QCKPT_CUDA_GEMM4_WGMMA_CUH */
