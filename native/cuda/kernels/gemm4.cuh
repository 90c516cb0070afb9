/* gemm4.cuh -- what the fused 4-bit matmuls share: mma.m16n8k16 and pair packing, block-scale loads, and the
 * code lookups of the tiled (gemm4_tiled.cuh) and Hopper (gemm4_tma.cuh) kernels. A byte (two codes) becomes
 * two weights with one lookup of a 256-entry pair table: for float16 the pair is float32 and is scaled in
 * float32 then rounded once (exactly qckpt_dequantize_4bit's values); for bfloat16 the pair is already
 * bfloat16 and one bf16x2 multiply by the bf16 scale finishes it (two extra roundings, within bf16 noise).
 * The bfloat16 pairs come from shared memory, from byte permutes of table planes held in registers, or half
 * from each (LutMode): the same values either way. The decode kernel (gemv4.cuh) has its own lookup. */
#ifndef QCKPT_CUDA_GEMM4_CUH
#define QCKPT_CUDA_GEMM4_CUH

#include <type_traits>

#include "../common.cuh"

namespace qk {


template <typename T> __device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t *>(&v);
}
template <> __device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t *>(&v);
}

template <typename T> __device__ __forceinline__ void mma16816(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1);
template <> __device__ __forceinline__ void mma16816<__nv_bfloat16>(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <> __device__ __forceinline__ void mma16816<__half>(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

/* Asynchronous 16-byte copies into shared memory (sm_80+); zeros when !valid (nothing is read then). A wait
 * is no compiler barrier: a __syncthreads follows it before the reads. */
__device__ __forceinline__ void cp_async16(void *smem, const void *gmem, bool valid) {
    const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
    const int src_bytes = valid ? 16 : 0; /* 0: no read, the 16 bytes are zero-filled */
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

/* The raw inputs of block b's scale, loaded ahead of use: absmax, or absmax2 and the code index when
 * nested (raw_block_scale combines them once the loads have landed). */
__device__ __forceinline__ void load_raw_scale(const Scales &scales, int64_t b, float &raw, uint32_t &code_index) {
    if (scales.absmax) {
        raw = __ldg(scales.absmax + b);
    } else {
        raw = __ldg(scales.absmax2 + (b >> scales.log2_bs2));
        code_index = __ldg(scales.codes + b);
    }
}

/* Shared tables of the kernel: byte -> dequantized pair before scaling. */
struct PairTable {
    float2 f32[256];   /* float16 path: (LUT[hi], LUT[lo]) */
    uint32_t b16[256]; /* bfloat16 path: the same pair rounded to bf16x2 */
};

/* Where the bfloat16 path looks codes up. The shared pair table costs one shared load per byte, and 32
 * random bytes hit the same bank ~3 times per access (in the old decode kernel at batch 1 the L1/shared
 * pipe was 80% busy); the registers cost ~21 integer ops per 8 codes (its ALU pipe was 57% busy). Mixed splits a lane's rows
 * between them so that both pipes share the work. */
enum LutMode { kLutShared = 0, kLutRegs = 1, kLutMixed = 2, kLutLane = 3 };
constexpr int kLutDefault = kLutMixed;

/* The lane table: a copy of the bfloat16 pair table per lane (entry [byte][lane], 32 KiB a block), so
 * that lane l always reads bank l: one wavefront per lookup instead of ~3.5 for 32 random bytes. */
constexpr int kLaneTableWords = 256 * 32;
__host__ __device__ constexpr bool uses_lane_table(int mode) { return mode == kLutLane; }

/* The table row half h (0, 1) of a fragment uses under `mode`: kLutShared, kLutRegs or kLutLane. */
__host__ __device__ constexpr int lut_kind(int mode, int h) {
    return mode == kLutMixed ? (h == 0 ? kLutRegs : kLutShared) : mode;
}

__device__ __forceinline__ uint32_t prmt(uint32_t a, uint32_t b, uint32_t sel) {
    uint32_t d;
    asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(sel));
    return d;
}

/* The 16 table values as bfloat16, split into byte planes held in registers: lo[i] holds the low bytes
 * of values 4i..4i+3, hi[i] their high bytes. Why registers: a shared-memory pair table costs one lookup
 * per packed byte, and random bytes from 32 lanes hit the same bank ~3 times per access -- in the old decode
 * kernel at batch 1 that kept the L1/shared pipe 80% busy. Byte permutes (prmt) do the lookup in the ALUs. */
struct RegLut {
    uint32_t lo[4], hi[4];
};

__device__ __forceinline__ RegLut make_reg_lut(int quant_type) {
    const float *lut = quant_type == QCKPT_NF4 ? kNF4Lut : kFP4Lut;
    RegLut r = {};
#pragma unroll
    for (int i = 0; i < 16; i++) {
        const uint32_t b = __bfloat16_as_ushort(__float2bfloat16_rn(lut[i]));
        r.lo[i >> 2] |= (b & 0xFFu) << (8 * (i & 3));
        r.hi[i >> 2] |= (b >> 8) << (8 * (i & 3));
    }
    return r;
}

/* Bytes 0..3 of `word` (8 codes, the first of each byte in its high nibble) -> 4 bf16x2 pairs, the
 * first code in the low half: the same values as pack2(LUT[hi], LUT[lo]). A prmt picks 4 bytes out of
 * 8 by 3-bit selectors, so each byte plane takes two (values 0-7 and 8-15) and a third chooses by
 * each code's bit 3; two more interleave the planes. */
__device__ __forceinline__ void reg_lookup_word(const RegLut &t, uint32_t word, uint32_t (&p)[4]) {
    const uint32_t idx = word & 0x77777777u;                     /* low 3 bits of each code */
    const uint32_t sel = 0x32103210u | ((word >> 1) & 0x44444444u); /* byte n of plane 0-7 or 8-15 */
#pragma unroll
    for (int half = 0; half < 2; half++) {
        const uint32_t i = half ? idx >> 16 : idx, s = half ? sel >> 16 : sel;
        /* byte n of l / h: the low / high byte of the value of nibble n (second code of each byte first) */
        const uint32_t l = prmt(prmt(t.lo[0], t.lo[1], i), prmt(t.lo[2], t.lo[3], i), s);
        const uint32_t h = prmt(prmt(t.hi[0], t.hi[1], i), prmt(t.hi[2], t.hi[3], i), s);
        p[2 * half] = prmt(l, h, 0x4051u);     /* nibbles 1, 0: first byte's codes */
        p[2 * half + 1] = prmt(l, h, 0x6273u); /* nibbles 3, 2: second byte's codes */
    }
}

/* The lookups; the float16 path uses the shared pair table, the bfloat16 path the others as LutMode says. */
struct Lut4 {
    const PairTable *pairs;
    const uint32_t *lane_pairs; /* this lane's column of the lane table: entry `byte` at [32 * byte] */
    RegLut reg;
};

template <typename T> struct PairDequant;
template <> struct PairDequant<__half> {  /* exact: float32 product, one RNE rounding */
    float s;
    PairDequant() = default;
    __device__ __forceinline__ explicit PairDequant(float scale) : s(scale) {}
    /* the 4 scaled pairs of the bytes of `w`, byte 0 first (one table: `regs` changes nothing) */
    __device__ __forceinline__ void word(const Lut4 &t, uint32_t w, uint32_t (&p)[4], int /*kind*/) const {
#pragma unroll
        for (int q = 0; q < 4; q++) {
            const float2 v = t.pairs->f32[(w >> (8 * q)) & 0xFF];
            p[q] = pack2<__half>(__fmul_rn(v.x, s), __fmul_rn(v.y, s));
        }
    }
};
template <> struct PairDequant<__nv_bfloat16> {  /* one bf16x2 multiply per pair */
    __nv_bfloat162 s;
    PairDequant() = default;
    __device__ __forceinline__ explicit PairDequant(float scale) : s(__float2bfloat162_rn(scale)) {}
    __device__ __forceinline__ void word(const Lut4 &t, uint32_t w, uint32_t (&p)[4], int kind) const {
        if (kind == kLutRegs) reg_lookup_word(t.reg, w, p);
        else if (kind == kLutLane)
#pragma unroll
            for (int q = 0; q < 4; q++) p[q] = t.lane_pairs[32 * ((w >> (8 * q)) & 0xFF)];
        else
#pragma unroll
            for (int q = 0; q < 4; q++) p[q] = t.pairs->b16[(w >> (8 * q)) & 0xFF];
#pragma unroll
        for (int q = 0; q < 4; q++) {
            __nv_bfloat162 v = __hmul2(*reinterpret_cast<const __nv_bfloat162 *>(&p[q]), s);
            p[q] = *reinterpret_cast<uint32_t *>(&v);
        }
    }
};

/* The kernels' lookup tables, filled by the block (the caller synchronizes): the shared pair table, the
 * lane table (`lane_pairs`, kLaneTableWords words) when `mode` uses it, and for bfloat16 the register
 * planes when `mode` uses them. */
template <typename T>
__device__ __forceinline__ Lut4 make_lut4(PairTable &pairs, uint32_t *lane_pairs, int quant_type, int mode) {
    const float *lut = quant_type == QCKPT_NF4 ? kNF4Lut : kFP4Lut;
    const bool bf16 = std::is_same<T, __nv_bfloat16>::value;
    const bool lane_table = bf16 && uses_lane_table(mode);
    if (!bf16 || (mode != kLutRegs && !lane_table))
        for (int i = threadIdx.x; i < 256; i += blockDim.x) {
            if (bf16) pairs.b16[i] = pack2<__nv_bfloat16>(lut[i >> 4], lut[i & 15]);
            else pairs.f32[i] = make_float2(lut[i >> 4], lut[i & 15]);
        }
    if (lane_table) /* 16-byte stores: four lanes' copies of one entry at a time */
        for (int i = threadIdx.x; i < kLaneTableWords / 4; i += blockDim.x) {
            const int byte = i >> 3;
            const uint32_t v = pack2<__nv_bfloat16>(lut[byte >> 4], lut[byte & 15]);
            reinterpret_cast<uint4 *>(lane_pairs)[i] = make_uint4(v, v, v, v);
        }
    Lut4 t;
    t.pairs = &pairs;
    t.lane_pairs = lane_table ? lane_pairs + (threadIdx.x & 31) : nullptr;
    t.reg = bf16 && mode != kLutShared && mode != kLutLane ? make_reg_lut(quant_type) : RegLut{};
    return t;
}

/* A block scale from the raw values loaded ahead of use (absmax; absmax2 and the code index when
 * nested), exactly as block_scale(): two float32 roundings when nested. */
__device__ __forceinline__ float raw_block_scale(const Scales &scales, const float *code, float raw,
                                                 uint32_t code_index) {
    return scales.absmax ? raw : __fadd_rn(__fmul_rn(code[code_index], raw), scales.offset);
}

/* Fills a kernel's tables (lookups, and the nested code book when scales are nested) and waits for the
 * whole block. Callers issue their first loads before: those need no table. */
template <typename T, int LUT>
__device__ __forceinline__ Lut4 gemm_tables(PairTable &pairs, uint32_t *lane_pairs, float *code, const Scales &scales,
                                            int quant_type) {
    const Lut4 tab = make_lut4<T>(pairs, lane_pairs, quant_type, LUT);
    if (!scales.absmax)
        for (int i = threadIdx.x; i < 256; i += blockDim.x) code[i] = scales.code[i];
    __syncthreads();
    return tab;
}

}  // namespace qk

#endif
