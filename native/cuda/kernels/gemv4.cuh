/* gemv4.cuh -- fused 4-bit dequantize + matmul for 1..16 activation rows (decode), on the tensor cores.
 *
 *   x (batch, k) @ dequant(W (n_out, k))^T -> y (batch, n_out)
 *
 * mma.m16n8k16 takes W as the 16x16 A tile (rows = outputs) and x^T as the 16x8 B tile (columns = batch
 * rows; 9..16 rows use a second tile). A dot product does not care in which order k is visited, so the
 * mma's logical k is remapped; a warp's step covers 128 k of its rows, in one of two mappings:
 * - post-scaled (blocksize >= 64, k % 64 == 0): in each 64-wide chunk, lane (g = lane/4, t = lane%4) owns
 *   physical k [16t, 16t + 16) of its rows and feeds 4 of them to each of the chunk's 4 mmas, so each mma
 *   sums 16 k of one quantization block and the block scale multiplies the chunk's float32 sums once per
 *   output (4 FFMAs a lane): the tensor cores multiply unscaled code values. Two 8-byte loads a row.
 * - wide (any blocksize, k % 32 == 0): lane t owns physical k [32t, 32t + 32), one 16-byte load a row and
 *   one block scale, which it applies to its own pairs (a bf16x2 multiply each; float16: the float16 code
 *   values times the float32 scale, rounded once) before the mmas. Half the weight and scale loads of
 *   post-scaled: at batch 1 the L1 / shared-memory pipe is the busiest unit (~75% in Nsight Compute), and
 *   there wide is the faster mapping (14336x4096: 20.2 against 22.4 us); with several batch rows its x loads
 *   touch twice the lines.
 *
 * Dequantizing costs more issue slots than anything else here, so a packed byte (two codes) becomes its pair
 * of values with three instructions: a byte permute (PRMT) extracts it, one multiply-add makes the address,
 * one 32-bit shared load reads the pair from the lane table -- a copy of the 256-entry pair table per lane,
 * entry `byte` of lane l at word 32 * byte + l, so every lane reads its own bank (random bytes from one
 * shared table hit a bank ~3.5 times per access). 32 KiB a block.
 *
 * Warps of a block split k; their partial sums are added in shared memory in a fixed order
 * (deterministic). A block takes a contiguous share of the row tiles and fills its table once; each warp's
 * loads run ahead through tile boundaries, so a grid of a few blocks per multiprocessor streams the weights
 * without draining between tiles. Tested against dequantize + float64 matmul (tests/test_cuda_kernels.py). */
#ifndef QCKPT_CUDA_GEMV4_CUH
#define QCKPT_CUDA_GEMV4_CUH

#include "gemm4.cuh"

namespace qk {

constexpr int kLaneTableBytes = kLaneTableWords * 4; /* dynamic shared memory of the decode kernel */

/* The decode kernel's tables: the lane table of unscaled pairs (bf16x2 or f16x2 as T, first code in the
 * low half) and, when the scales are nested, the 256-entry code book. The caller synchronizes. */
template <typename T>
__device__ __forceinline__ void fill_decode_tables(uint32_t *lane_table, float *code, const Scales &scales,
                                                   int quant_type) {
    const float *lut = quant_type == QCKPT_NF4 ? kNF4Lut : kFP4Lut;
    for (int i = threadIdx.x; i < 256 * 8; i += blockDim.x) { /* 8 stores of 4 lanes' copies per entry */
        const int byte = i >> 3;
        const uint32_t v = pack2<T>(lut[byte >> 4], lut[byte & 15]);
        reinterpret_cast<uint4 *>(lane_table + byte * 32)[i & 7] = make_uint4(v, v, v, v);
    }
    if (!scales.absmax)
        for (int i = threadIdx.x; i < 256; i += blockDim.x) code[i] = scales.code[i];
}

/* The unscaled pair of byte Q of `word` from this lane's column of the lane table; lane_base: the table's
 * shared-window address plus lane * 4. Written as a 32-bit shared load so that the address is one IMAD,
 * byte * 128 + lane_base: indexing the array made the compiler scale twice (two IMADs). */
template <int Q>
__device__ __forceinline__ uint32_t lane_lookup(uint32_t lane_base, uint32_t word) {
    const uint32_t byte = prmt(word, 0, 0x4440u | Q); /* byte Q of word, zero-extended */
    uint32_t pair;
    asm volatile("ld.shared.u32 %0, [%1];" : "=r"(pair) : "r"(lane_base + (byte << 7)));
    return pair;
}

/* Pairs times a lane's own block scale (the wide mapping). bfloat16: one bf16x2 multiply by the bf16
 * scale; float16: the pair's float16 values times the float32 scale, rounded once (so scales beyond the
 * float16 range do not overflow the scale; the code values were rounded to float16 first, unlike dequantize,
 * which differs by an ulp for ~20% of NF4 weights). */
template <typename T> __device__ __forceinline__ uint32_t scale_pair(uint32_t pair, float s);
template <> __device__ __forceinline__ uint32_t scale_pair<__nv_bfloat16>(uint32_t pair, float s) {
    __nv_bfloat162 v = __hmul2(*reinterpret_cast<const __nv_bfloat162 *>(&pair), __float2bfloat162_rn(s));
    return *reinterpret_cast<uint32_t *>(&v);
}
template <> __device__ __forceinline__ uint32_t scale_pair<__half>(uint32_t pair, float s) {
    const float2 v = __half22float2(*reinterpret_cast<const __half2 *>(&pair));
    return pack2<__half>(__fmul_rn(v.x, s), __fmul_rn(v.y, s));
}

/* One lane's operands for one 128-wide k step. Post-scaled (chunks c = 0, 1 of 64): x for batch row
 * nt * 8 + g (x[nt][2c], x[nt][2c + 1]: 16 k), 8 packed bytes (16 k) of rows g and g + 8 of each 16-row
 * tile, and the raw inputs of their block scales (combined only when used: a lookup here would wait for its
 * load and stall the prefetch). Wide: x[nt][0..3] its 32 k, w[r][h][0..1] its 16 bytes of a row, and
 * scale / code_index [r][h][0] their one block. */
template <int NT, int R>
struct DecodeFrag {
    uint4 x[NT][4];
    uint2 w[R][2][2];              /* [tile][row half][chunk] */
    float scale[R][2][2];          /* absmax, or absmax2 when nested */
    uint32_t code_index[R][2][2];  /* nested only */
};

/* Loads step `step` of row tile `tile`. Positions are counted in 32-bit units of 16 elements (u = flat / 16;
 * the launcher checks that n_out * k / 16 fits), so that an address is one wide multiply-add and a block
 * index one shift: 64-bit flat indices cost ~35 instructions per load. Rows past n_out read the last row
 * (their outputs are not stored), so only steps that reach past k need predicates: those take a second copy
 * of the loads (a uniform branch) that puts zeros in x, the bytes and the raw scale inputs: with x zero they
 * add exactly zero. */
/* Row g (+ 8 h) of row tile r of `tile`, or the last row past n_out, and the raw inputs of the scale of its
 * block `block` (zeros when !ok): absmax, or absmax2 and the code index. */
template <int R>
__device__ __forceinline__ uint32_t decode_row(uint32_t tile, int r, int h, int g, uint32_t n_out) {
    return min(tile * (16 * R) + r * 16 + h * 8 + g, n_out - 1);
}
template <bool NESTED>
__device__ __forceinline__ void decode_load_scale(const Scales &scales, uint32_t block, bool ok, float &scale,
                                                  uint32_t &code_index) {
    if (NESTED) {
        scale = ok ? __ldg(scales.absmax2 + (block >> scales.log2_bs2)) : 0.0f;
        code_index = ok ? __ldg(scales.codes + block) : 0;
    } else {
        scale = ok ? __ldg(scales.absmax + block) : 0.0f;
    }
}

template <typename T, int NT, int R, bool NESTED, bool FULL>
__device__ __forceinline__ void decode_load_step(DecodeFrag<NT, R> &f, const T *const (&x_rows)[NT],
                                                 const uint8_t *__restrict__ packed, const Scales &scales,
                                                 uint32_t n_out, uint32_t k, int log2_bs, uint32_t tile,
                                                 uint32_t step, int g, int t) {
    const uint32_t k16 = k >> 4, u_step = step * 8 + t; /* the lane's first unit of the step, within a row */
#pragma unroll
    for (int nt = 0; nt < NT; nt++)
#pragma unroll
        for (int c = 0; c < 2; c++) {
            const bool ok = FULL || (u_step + 4 * c) * 16 < k; /* k % 32 == 0: a lane's 16 k are all in or out */
            const uint4 *p = reinterpret_cast<const uint4 *>(x_rows[nt] + (u_step + 4 * c) * 16);
            f.x[nt][2 * c] = ok ? __ldg(p) : make_uint4(0, 0, 0, 0);
            f.x[nt][2 * c + 1] = ok ? __ldg(p + 1) : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
    for (int r = 0; r < R; r++)
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const uint32_t u = decode_row<R>(tile, r, h, g, n_out) * k16 + u_step;
            const uint2 *w = reinterpret_cast<const uint2 *>(packed + uint64_t(u) * 8);
#pragma unroll
            for (int c = 0; c < 2; c++) {
                const bool ok = FULL || (u_step + 4 * c) * 16 < k;
                f.w[r][h][c] = ok ? __ldg(w + 4 * c) : make_uint2(0, 0);
                decode_load_scale<NESTED>(scales, (u + 4 * c) >> (log2_bs - 4), ok, f.scale[r][h][c],
                                          f.code_index[r][h][c]);
            }
        }
}

/* The wide mapping (see the top): lane t loads physical k [32t, 32t + 32) of the step's 128 -- 16 contiguous
 * bytes and one block scale a row -- and x there; zeros past k like decode_load_step. */
template <typename T, int NT, int R, bool NESTED, bool FULL>
__device__ __forceinline__ void decode_load_wide(DecodeFrag<NT, R> &f, const T *const (&x_rows)[NT],
                                                 const uint8_t *__restrict__ packed, const Scales &scales,
                                                 uint32_t n_out, uint32_t k, int log2_bs, uint32_t tile,
                                                 uint32_t step, int g, int t) {
    const uint32_t k16 = k >> 4, u_step = step * 8 + 2 * t;
    const bool ok = FULL || u_step * 16 < k; /* k % 32 == 0: a lane's 32 k are all in or out */
#pragma unroll
    for (int nt = 0; nt < NT; nt++) {
        const uint4 *p = reinterpret_cast<const uint4 *>(x_rows[nt] + u_step * 16);
#pragma unroll
        for (int q = 0; q < 4; q++) f.x[nt][q] = ok ? __ldg(p + q) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int r = 0; r < R; r++)
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const uint32_t u = decode_row<R>(tile, r, h, g, n_out) * k16 + u_step;
            const uint4 w =
                ok ? __ldg(reinterpret_cast<const uint4 *>(packed + uint64_t(u) * 8)) : make_uint4(0, 0, 0, 0);
            f.w[r][h][0] = make_uint2(w.x, w.y);
            f.w[r][h][1] = make_uint2(w.z, w.w);
            decode_load_scale<NESTED>(scales, u >> (log2_bs - 4), ok, f.scale[r][h][0], f.code_index[r][h][0]);
        }
}

template <typename T, int NT, int R, bool NESTED, bool WIDE>
__device__ __forceinline__ void decode_load(DecodeFrag<NT, R> &f, const T *const (&x_rows)[NT],
                                            const uint8_t *__restrict__ packed, const Scales &scales,
                                            uint32_t n_out, uint32_t k, int log2_bs, uint32_t tile, uint32_t step,
                                            int g, int t) {
    if (WIDE) {
        if ((step + 1) * 128 <= k)
            decode_load_wide<T, NT, R, NESTED, true>(f, x_rows, packed, scales, n_out, k, log2_bs, tile, step, g, t);
        else
            decode_load_wide<T, NT, R, NESTED, false>(f, x_rows, packed, scales, n_out, k, log2_bs, tile, step, g, t);
        return;
    }
    if ((step + 1) * 128 <= k)
        decode_load_step<T, NT, R, NESTED, true>(f, x_rows, packed, scales, n_out, k, log2_bs, tile, step, g, t);
    else
        decode_load_step<T, NT, R, NESTED, false>(f, x_rows, packed, scales, n_out, k, log2_bs, tile, step, g, t);
}

/* The wide step: each lane scales its own pairs, which go into the mmas as they are. */
template <typename T, int NT, int R, bool NESTED>
__device__ __forceinline__ void decode_compute_wide(const DecodeFrag<NT, R> &f, uint32_t lane_base,
                                                    const Scales &scales, const float *code,
                                                    float (&acc)[R][NT][4]) {
#pragma unroll
    for (int r = 0; r < R; r++) {
        uint32_t p[2][16]; /* [row half][pair]: pairs 2i, 2i + 1 of the lane's 32 k, scaled */
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const float s = NESTED
                ? __fadd_rn(__fmul_rn(code[f.code_index[r][h][0]], f.scale[r][h][0]), scales.offset)
                : f.scale[r][h][0];
            const uint32_t words[4] = {f.w[r][h][0].x, f.w[r][h][0].y, f.w[r][h][1].x, f.w[r][h][1].y};
#pragma unroll
            for (int wd = 0; wd < 4; wd++) {
                p[h][4 * wd + 0] = scale_pair<T>(lane_lookup<0>(lane_base, words[wd]), s);
                p[h][4 * wd + 1] = scale_pair<T>(lane_lookup<1>(lane_base, words[wd]), s);
                p[h][4 * wd + 2] = scale_pair<T>(lane_lookup<2>(lane_base, words[wd]), s);
                p[h][4 * wd + 3] = scale_pair<T>(lane_lookup<3>(lane_base, words[wd]), s);
            }
        }
#pragma unroll
        for (int j = 0; j < 8; j++) {
            /* mma j: the lane's pairs 2j (logical k 2t, 2t + 1) and 2j + 1 (2t + 8, 2t + 9) of rows g (a0, a2) and
             * g + 8 (a1, a3), and x at the same k */
            const uint32_t a[4] = {p[0][2 * j], p[1][2 * j], p[0][2 * j + 1], p[1][2 * j + 1]};
#pragma unroll
            for (int nt = 0; nt < NT; nt++) {
                const uint32_t *xw = reinterpret_cast<const uint32_t *>(&f.x[nt][j >> 1]);
                mma16816<T>(acc[r][nt], a, xw[2 * (j & 1)], xw[2 * (j & 1) + 1]);
            }
        }
    }
}

/* The post-scaled step: unscaled pairs into the mmas, the block scales applied to each chunk's sums. */
template <typename T, int NT, int R, bool NESTED>
__device__ __forceinline__ void decode_compute(const DecodeFrag<NT, R> &f, uint32_t lane_base,
                                               const Scales &scales, const float *code, float (&acc)[R][NT][4]) {
#pragma unroll
    for (int c = 0; c < 2; c++)
#pragma unroll
        for (int r = 0; r < R; r++) {
            float s[2];
            uint32_t p[2][8]; /* [row half][byte]: unscaled pairs */
#pragma unroll
            for (int h = 0; h < 2; h++) {
                s[h] = NESTED ? __fadd_rn(__fmul_rn(code[f.code_index[r][h][c]], f.scale[r][h][c]), scales.offset)
                              : f.scale[r][h][c];
#pragma unroll
                for (int wd = 0; wd < 2; wd++) {
                    const uint32_t word = wd ? f.w[r][h][c].y : f.w[r][h][c].x;
                    p[h][4 * wd + 0] = lane_lookup<0>(lane_base, word);
                    p[h][4 * wd + 1] = lane_lookup<1>(lane_base, word);
                    p[h][4 * wd + 2] = lane_lookup<2>(lane_base, word);
                    p[h][4 * wd + 3] = lane_lookup<3>(lane_base, word);
                }
            }
            float sums[NT][4] = {}; /* this chunk's unscaled sums */
#pragma unroll
            for (int j = 0; j < 4; j++) {
                /* mma j: physical k 4j..4j+3 of the lane's 16 = bytes 2j (logical k 2t, 2t+1) and 2j + 1
                 * (2t + 8, 2t + 9); rows g (a0, a2) and g + 8 (a1, a3) */
                const uint32_t a[4] = {p[0][2 * j], p[1][2 * j], p[0][2 * j + 1], p[1][2 * j + 1]};
#pragma unroll
                for (int nt = 0; nt < NT; nt++) {
                    const uint32_t *xw = reinterpret_cast<const uint32_t *>(&f.x[nt][2 * c + (j >> 1)]);
                    mma16816<T>(sums[nt], a, xw[2 * (j & 1)], xw[2 * (j & 1) + 1]);
                }
            }
#pragma unroll
            for (int nt = 0; nt < NT; nt++) /* c0, c1: row g; c2, c3: row g + 8 */
#pragma unroll
                for (int q = 0; q < 4; q++) acc[r][nt][q] = __fmaf_rn(s[q >> 1], sums[nt][q], acc[r][nt][q]);
        }
}

/* A tile's last step: the warps' sums added in shared memory in a fixed order (deterministic) and stored;
 * acc is cleared for the next tile. */
template <typename T, int NT, int R, int W>
__device__ __forceinline__ void decode_store_tile(float (&red)[W][R][NT][4][32], float (&acc)[R][NT][4], int warp,
                                                  int lane, uint32_t tile, uint32_t n_out, int batch,
                                                  T *__restrict__ y) {
#pragma unroll
    for (int r = 0; r < R; r++)
#pragma unroll
        for (int nt = 0; nt < NT; nt++)
#pragma unroll
            for (int q = 0; q < 4; q++) {
                red[warp][r][nt][q][lane] = acc[r][nt][q];
                acc[r][nt][q] = 0.0f;
            }
    __syncthreads();
    for (int idx = threadIdx.x; idx < R * NT * 4 * 32; idx += blockDim.x) {
        const int ln = idx & 31, q = (idx >> 5) & 3, nt = (idx >> 7) % NT, r = (idx >> 7) / NT;
        float sum = 0.0f;
#pragma unroll
        for (int w = 0; w < W; w++) sum = __fadd_rn(sum, red[w][r][nt][q][ln]);
        const uint32_t row = tile * (16 * R) + r * 16 + (ln >> 2) + (q >= 2 ? 8 : 0);
        const int col = nt * 8 + 2 * (ln & 3) + (q & 1);
        if (row < n_out && col < batch) y[size_t(col) * n_out + row] = from_f32<T>(sum);
    }
    __syncthreads(); /* `red` is written again at the next tile */
}

/* NT batch tiles of 8 rows, R row tiles of 16 outputs per warp, W warps splitting k, DEPTH steps of loads
 * in flight ahead of the one being computed, MINB blocks per multiprocessor (bounds the registers), WIDE:
 * the wide mapping, else post-scaled (see the top), NESTED: double-quantized scales. Dynamic shared memory:
 * kLaneTableBytes. */
template <typename T, int NT, int R, int W, int DEPTH, int MINB, bool WIDE, bool NESTED>
__global__ void __launch_bounds__(W * 32, MINB) gemm_4bit_decode_kernel(const T *__restrict__ x, int batch,
                                                                           const uint8_t *__restrict__ packed,
                                                                           Scales scales, uint32_t n_out, uint32_t k,
                                                                           int log2_bs, int quant_type,
                                                                           T *__restrict__ y) {
    static_assert(DEPTH >= 1 && DEPTH <= 3, "the register ring holds one to three steps ahead");
    extern __shared__ __align__(16) uint32_t lane_table[];
    __shared__ float code[NESTED ? 256 : 1];
    __shared__ float red[W][R][NT][4][32];

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const uint32_t lane_base = uint32_t(__cvta_generic_to_shared(lane_table)) + uint32_t(lane) * 4;
    const T *x_rows[NT]; /* batch rows past `batch` read the last row: their outputs are not stored */
#pragma unroll
    for (int nt = 0; nt < NT; nt++) x_rows[nt] = x + size_t(min(nt * 8 + g, batch - 1)) * k;
    /* this block's row tiles, a contiguous share; every warp makes `per_warp` steps on each (steps past k
     * load zeros), so all warps reach each tile's reduction together */
    const uint32_t tiles = uint32_t(ceil_div(n_out, 16 * R)), per_warp = uint32_t(ceil_div(ceil_div(k, 128), W));
    const uint32_t tile_begin = uint32_t(uint64_t(blockIdx.x) * tiles / gridDim.x);
    const uint32_t tile_end = uint32_t(uint64_t(blockIdx.x + 1) * tiles / gridDim.x);
    const uint32_t iters = (tile_end - tile_begin) * per_warp;

    /* The loads run DEPTH iterations ahead through tile boundaries, so the stream never drains: a ring of
     * DEPTH + 1 slots that turns once per DEPTH + 1 iterations, the slot loop unrolled so that every slot
     * index is a constant (rotating named buffers made the compiler copy registers whose loads were still
     * in flight, and each copy waited for its load). */
    constexpr int kSlots = DEPTH + 1;
    DecodeFrag<NT, R> ring[kSlots];
    uint32_t load_tile = tile_begin, load_j = 0; /* the next load: tile, and the warp's step on it */
    auto load_next = [&](DecodeFrag<NT, R> &f) {
        if (load_tile < tile_end)
            decode_load<T, NT, R, NESTED, WIDE>(f, x_rows, packed, scales, n_out, k, log2_bs, load_tile,
                                                warp + load_j * W, g, t);
        if (++load_j == per_warp) {
            load_j = 0;
            load_tile++;
        }
    };
#pragma unroll
    for (int d = 0; d < DEPTH; d++) load_next(ring[d]);
    fill_decode_tables<T>(lane_table, code, scales, quant_type); /* after the first loads are on their way */
    __syncthreads();

    float acc[R][NT][4] = {};
    uint32_t tile = tile_begin, j = 0;
    for (uint32_t base = 0; base < iters; base += kSlots) {
#pragma unroll
        for (int d = 0; d < kSlots; d++) {
            if (base + d >= iters) break;
            load_next(ring[(d + DEPTH) % kSlots]);
            if (WIDE) decode_compute_wide<T, NT, R, NESTED>(ring[d], lane_base, scales, code, acc);
            else decode_compute<T, NT, R, NESTED>(ring[d], lane_base, scales, code, acc);
            if (++j < per_warp) continue;
            decode_store_tile<T, NT, R, W>(red, acc, warp, lane, tile, n_out, batch, y);
            j = 0;
            tile++;
        }
    }
}

/* Whether the decode kernel's 32-bit positions hold this weight (see decode_load). */
__host__ __device__ inline bool decode_fits(int64_t n_out, int64_t k) {
    return n_out < (int64_t(1) << 31) && k < (int64_t(1) << 31) && n_out * (k / 16) < (int64_t(1) << 32);
}

/* Blocks of `kernel` that fit on one multiprocessor of the current device at once, asked once per device
 * (after opting in to its shared memory, which only matters above 48 KiB) and kept in `known`, which must
 * belong to this kernel alone: kernels of one signature share a Kernel type. */
template <typename Kernel>
cudaError_t resident_blocks(Kernel kernel, int threads, int smem_bytes, int (&known)[64], int *blocks) {
    int dev = 0;
    cudaError_t err = cudaGetDevice(&dev);
    if (err != cudaSuccess) return err;
    if (dev < 64 && known[dev] > 0) {
        *blocks = known[dev];
        return cudaSuccess;
    }
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
    if (err == cudaSuccess) err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(blocks, kernel, threads, smem_bytes);
    if (err != cudaSuccess) return err;
    if (*blocks < 1) *blocks = 1;
    if (dev < 64) known[dev] = *blocks;
    return cudaSuccess;
}

/* Launch one instantiation on `s` over `grid` blocks (each takes a contiguous share of the row tiles; 0: one
 * per row tile, at most MINB per multiprocessor), at most as many as fit on the device at once (a second
 * wave would wait for whole shares: on a GPU with less shared memory than an H100, MINB blocks may not fit);
 * decode_fits(n_out, k) must hold. */
template <typename T, int NT, int R, int W, int DEPTH, int MINB, bool WIDE>
cudaError_t launch_gemm_4bit_decode(const T *x, int batch, const uint8_t *packed, const Scales &sc, int64_t n_out,
                                    int64_t k, int log2_bs, int qt, T *y, int64_t grid, cudaStream_t s) {
    auto kernel = sc.absmax ? gemm_4bit_decode_kernel<T, NT, R, W, DEPTH, MINB, WIDE, false>
                            : gemm_4bit_decode_kernel<T, NT, R, W, DEPTH, MINB, WIDE, true>;
    static int known[2][64] = {}; /* per kernel and device; writers agree on the value */
    int fit = 0;
    const cudaError_t err = resident_blocks(kernel, W * 32, kLaneTableBytes, known[sc.absmax ? 0 : 1], &fit);
    if (err != cudaSuccess) return err;
    if (grid == 0) grid = std::min<int64_t>(ceil_div(n_out, 16 * R), int64_t(sm_count()) * std::min(fit, MINB));
    grid = std::min<int64_t>(grid, int64_t(sm_count()) * fit);
    kernel<<<(unsigned)grid, W * 32, kLaneTableBytes, s>>>(x, batch, packed, sc, uint32_t(n_out), uint32_t(k),
                                                            log2_bs, qt, y);
    return cudaGetLastError();
}

/* Whether the post-scaled path applies: every 64-wide chunk of k lies inside one quantization block. */
__host__ __device__ inline bool decode_post_scaled(int64_t k, int log2_bs) { return log2_bs >= 6 && k % 64 == 0; }

}  // namespace qk

#endif /* QCKPT_CUDA_GEMV4_CUH */
