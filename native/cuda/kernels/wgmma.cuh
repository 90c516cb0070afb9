/* wgmma.cuh -- what the Hopper (sm_90a) prefill kernel shares with the tuning experiments in
 * scripts/cuda_tune/: the warpgroup matrix-multiply instruction (wgmma) with A from registers, its fences and
 * waits, the tile shape, and the dequantize of a k-tile's packed weights from shared memory into wgmma's A
 * fragments. Everything here compiles for any target; the instructions are emitted only for sm_90a. */
#ifndef QCKPT_CUDA_WGMMA_CUH
#define QCKPT_CUDA_WGMMA_CUH

#include "gemm4.cuh"

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
/* generated: one specialization per type and batch tile N (N / 2 float32 accumulators per lane) */
template <> struct Wgmma<__nv_bfloat16, 8> {
    static __device__ __forceinline__ void run(float (&d)[4], const uint32_t (&a)[4], uint64_t desc) {
        asm volatile(
            "{\n.reg .pred p;\nsetp.ne.b32 p, %9, 0;\n"
            "wgmma.mma_async.sync.aligned.m64n8k16.f32.bf16.bf16 "
            "{%0, %1, %2, %3}, "
            "{%4, %5, %6, %7}, %8, p, 1, 1, 0;\n}\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1)
            : "memory");
    }
};
template <> struct Wgmma<__half, 8> {
    static __device__ __forceinline__ void run(float (&d)[4], const uint32_t (&a)[4], uint64_t desc) {
        asm volatile(
            "{\n.reg .pred p;\nsetp.ne.b32 p, %9, 0;\n"
            "wgmma.mma_async.sync.aligned.m64n8k16.f32.f16.f16 "
            "{%0, %1, %2, %3}, "
            "{%4, %5, %6, %7}, %8, p, 1, 1, 0;\n}\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1)
            : "memory");
    }
};
template <> struct Wgmma<__nv_bfloat16, 16> {
    static __device__ __forceinline__ void run(float (&d)[8], const uint32_t (&a)[4], uint64_t desc) {
        asm volatile(
            "{\n.reg .pred p;\nsetp.ne.b32 p, %13, 0;\n"
            "wgmma.mma_async.sync.aligned.m64n16k16.f32.bf16.bf16 "
            "{%0, %1, %2, %3, %4, %5, %6, %7}, "
            "{%8, %9, %10, %11}, %12, p, 1, 1, 0;\n}\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1)
            : "memory");
    }
};
template <> struct Wgmma<__half, 16> {
    static __device__ __forceinline__ void run(float (&d)[8], const uint32_t (&a)[4], uint64_t desc) {
        asm volatile(
            "{\n.reg .pred p;\nsetp.ne.b32 p, %13, 0;\n"
            "wgmma.mma_async.sync.aligned.m64n16k16.f32.f16.f16 "
            "{%0, %1, %2, %3, %4, %5, %6, %7}, "
            "{%8, %9, %10, %11}, %12, p, 1, 1, 0;\n}\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1)
            : "memory");
    }
};
template <> struct Wgmma<__nv_bfloat16, 32> {
    static __device__ __forceinline__ void run(float (&d)[16], const uint32_t (&a)[4], uint64_t desc) {
        asm volatile(
            "{\n.reg .pred p;\nsetp.ne.b32 p, %21, 0;\n"
            "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 "
            "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, "
            "{%16, %17, %18, %19}, %20, p, 1, 1, 0;\n}\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1)
            : "memory");
    }
};
template <> struct Wgmma<__half, 32> {
    static __device__ __forceinline__ void run(float (&d)[16], const uint32_t (&a)[4], uint64_t desc) {
        asm volatile(
            "{\n.reg .pred p;\nsetp.ne.b32 p, %21, 0;\n"
            "wgmma.mma_async.sync.aligned.m64n32k16.f32.f16.f16 "
            "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, "
            "{%16, %17, %18, %19}, %20, p, 1, 1, 0;\n}\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1)
            : "memory");
    }
};
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
/* wait until at most N committed wgmma groups of this warpgroup are still running */
template <int N> __device__ __forceinline__ void wgmma_wait() {
#if QK_HAS_WGMMA
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}
/* Registers that an in-flight wgmma reads (A) or writes (the accumulators) look used here, so the
 * compiler neither reuses nor moves them before the wait that retires it. */
__device__ __forceinline__ void keep_reg(uint32_t &r) { asm volatile("" : "+r"(r)::"memory"); }
__device__ __forceinline__ void keep_reg(float &r) { asm volatile("" : "+f"(r)::"memory"); }

/* A prefill tile: WG warpgroups of MT x 64 output rows each (BM rows) by BN batch rows, over k-tiles of BK,
 * through a STAGES-deep ring of shared-memory stages, each holding a k-tile's x (BN x BK values), packed
 * weights ([BM][BK / 2] bytes) and float32 block scales. */
template <int BN_, int WG_, int MT_, int STAGES_, int BK_ = 64>
struct WgmmaShape {
    static constexpr int BN = BN_, WG = WG_, MT = MT_, STAGES = STAGES_, BK = BK_;
    static_assert(BK == 64 || BK == 128, "k-tiles of 64 or 128");
    static_assert(BN == 8 || BN == 16 || BN == 32 || BN == 64 || BN == 128, "batch tile of 8 to 128 rows");
    /* k16 steps, 32-wide scale groups and 16-byte weight chunks per weight row in a k-tile */
    static constexpr int kSteps = BK / 16, kGroups = BK / 32, kWChunks = BK / 32;
    static constexpr int kThreads = WG * 128, BM = WG * MT * 64;
    static constexpr int kXBytes = BN * BK * 2, kWBytes = BM * BK / 2, kScaleBytes = BM * kGroups * 4;
    static constexpr int kStageBytes = kXBytes + kWBytes + kScaleBytes;
    static constexpr int kSmemBytes = STAGES * kStageBytes;
};

/* A block's place in a (n tiles of BM, batch tiles of BN, splits of k) grid: its first output row and batch
 * row, its k-tiles [kt0, kt0 + nk), and this lane's first weight row of sub-tile mt, lrow0 + 64 mt (and + 8). */
template <typename Shape>
struct WgmmaBlock {
    int64_t n_block, m0, kt0;
    int nk, lrow0;
    __device__ __forceinline__ WgmmaBlock(int64_t k, int warp, int g) {
        n_block = int64_t(blockIdx.x) * Shape::BM;
        m0 = int64_t(blockIdx.y) * Shape::BN;
        const int64_t ktiles = k / Shape::BK;
        kt0 = ktiles * blockIdx.z / gridDim.z;
        nk = int(ktiles * (blockIdx.z + 1) / gridDim.z - kt0);
        lrow0 = (warp >> 2) * Shape::MT * 64 + (warp & 3) * 16 + g;
    }
};

/* This lane's A fragments of one k-tile: for sub-tile mt, rows lrow = lrow0 + 64 mt and lrow + 8, k16 step
 * j, in the mma.m16n8k16 order (a[mt][j][0..3] = row lrow at k pairs (2t, 2t + 1), row lrow + 8 there,
 * row lrow at (2t + 8, 2t + 9), row lrow + 8 there). In packed bytes that is byte t of each of the row's
 * 8 words in the k-tile (word 2j and 2j + 1 for step j): three byte permutes gather byte t of four words
 * into one word, which PairDequant::word turns into four scaled pairs like every other kernel. The stage's
 * float32 scale of row r, 32-wide group h sits at index s_row * r + s_group * h. */
template <typename T, typename Shape, int LUT>
__device__ __forceinline__ void wgmma_dequant(uint32_t (&a)[Shape::MT][Shape::kSteps][4], const unsigned char *stage,
                                              const Lut4 &tab, int lrow0, int t, int s_row = Shape::kGroups,
                                              int s_group = 1) {
    const float *tile_scales = reinterpret_cast<const float *>(stage + Shape::kXBytes + Shape::kWBytes);
    const uint32_t gather = uint32_t(t) | uint32_t(t + 4) << 4; /* byte t of the first word, byte t of the second */
#pragma unroll
    for (int mt = 0; mt < Shape::MT; mt++)
#pragma unroll
        for (int r = 0; r < 2; r++) {
            const int lrow = lrow0 + 64 * mt + 8 * r;
            const uint4 *wrow = reinterpret_cast<const uint4 *>(stage + Shape::kXBytes + lrow * (Shape::BK / 2));
            uint4 chunks[Shape::kWChunks];
#pragma unroll
            for (int c = 0; c < Shape::kWChunks; c++) chunks[c] = wrow[c];
            const uint32_t *w = reinterpret_cast<const uint32_t *>(chunks);
#pragma unroll
            for (int h = 0; h < Shape::kGroups; h++) { /* k 32h..32h + 31: words 4h..4h + 3, one block scale */
                const PairDequant<T> d(tile_scales[s_row * lrow + s_group * h]);
                const uint32_t bytes = prmt(prmt(w[4 * h], w[4 * h + 1], gather), prmt(w[4 * h + 2], w[4 * h + 3], gather),
                                            0x5410u);
                uint32_t p[4];
                d.word(tab, bytes, p, LUT);
#pragma unroll
                for (int q = 0; q < 4; q++) a[mt][2 * h + (q >> 1)][2 * (q & 1) + r] = p[q];
            }
        }
}

template <int MT, int KS> __device__ __forceinline__ void keep_fragments(uint32_t (&a)[MT][KS][4]) {
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int j = 0; j < KS; j++)
#pragma unroll
            for (int q = 0; q < 4; q++) keep_reg(a[mt][j][q]);
}

/* Wait for all of this warpgroup's wgmmas; until then the fragment sets they read and the accumulators they
 * write stay untouched (keep_reg). */
template <int MT, int KS, int ACC>
__device__ __forceinline__ void wgmma_retire(uint32_t (&a)[2][MT][KS][4], float (&acc)[MT][ACC]) {
    wgmma_wait<0>();
    keep_fragments(a[0]);
    keep_fragments(a[1]);
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int i = 0; i < ACC; i++) keep_reg(acc[mt][i]);
}

}  // namespace qk

#endif /* QCKPT_CUDA_WGMMA_CUH */
