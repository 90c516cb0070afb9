/* exact_mean.cuh -- the exact float32 mean of double quantization (reference.exact_mean_f32): each value
 * m * 2^(e-150) adds its 24-bit mantissa into a 64-bit sum per exponent e (exact: n < 2^39); the last
 * block to finish turns the 256 sums into one big integer, divides it by n and rounds once, ties to
 * even. Values must be non-negative (they are block absmax). mean_from_bins() is host+device so the
 * rounding can be checked without a GPU. */
#ifndef QCKPT_CUDA_EXACT_MEAN_CUH
#define QCKPT_CUDA_EXACT_MEAN_CUH

#include "../common.cuh"

namespace qk {

/* The sum as 16-bit limbs in 32-bit words: bins[e] * 2^e needs up to 255 + 64 bits. */
constexpr int kLimbs = (256 + 64) / 16 + 2;

/* Index of the highest set bit of v != 0. */
__host__ __device__ inline int hibit32(uint32_t v) {
#ifdef __CUDA_ARCH__
    return 31 - __clz(v);
#else
    return 31 - __builtin_clz(v);
#endif
}

/* Round (sum_e bins[e] * 2^(e - 150)) / count to float32, ties to even; count < 2^39.
 * Only the top 64 bits T of the sum enter the one division: with total = T * 2^E + low (low < 2^E),
 * total / count = floor(T / count) * 2^E + (rem * 2^E + low) / count, and the last term is below 2^E,
 * so Q = floor(T / count) holds every quotient bit at or above 2^E and the rest is nonzero exactly when
 * rem or low is. T has its top bit set, so Q >= 2^63 / 2^39 = 2^24: 24 bits and a rounding bit. */
__host__ __device__ inline int lowbit32(uint32_t v) {
#ifdef __CUDA_ARCH__
    return __ffs(v) - 1;
#else
    return __builtin_ctz(v);
#endif
}

/* The general path of mean_from_bins for any exponent span: the sum as a big integer of 16-bit limbs
 * (limb_store: kLimbs words of scratch, or NULL for a local array -- see mean_from_bins), then its top 64
 * bits T from bit E on and whether any lower bit is set. False when the sum is zero. */
__host__ __device__ inline bool mean_from_limbs(const unsigned long long *bins, const uint32_t *marks_of,
                                                 uint32_t *limb_store, unsigned long long &T, int &E, bool &sticky) {
    uint32_t own[kLimbs];
    uint32_t *limb = limb_store ? limb_store : own;
    for (int i = 0; i < kLimbs; i++) limb[i] = 0;
    int top = -1;
    for (int w = 0; w < 8; w++) {
        for (uint32_t marks = marks_of[w]; marks; marks &= marks - 1) {
            const int e = w * 32 + lowbit32(marks);
            const unsigned long long v = bins[e];
            const int li = e >> 4, sh = e & 15;
            const unsigned long long lo = v << sh, hi = sh ? v >> (64 - sh) : 0; /* v * 2^sh = hi:lo */
            unsigned long long carry = 0;
            for (int k = 0; li + k < kLimbs; k++) {
                const unsigned long long piece = k < 4 ? (lo >> (16 * k)) & 0xFFFF : (k == 4 ? hi : 0);
                const unsigned long long sum = limb[li + k] + piece + carry;
                limb[li + k] = (uint32_t)(sum & 0xFFFF);
                carry = sum >> 16;
                if (limb[li + k] && li + k > top) top = li + k;
                if (k >= 4 && carry == 0) break;
            }
        }
    }
    if (top < 0) return false;
    const int p = top * 16 + hibit32(limb[top]); /* highest set bit of the sum */
    E = p - 63; /* T = bits [E, E + 64) of the sum; E < 0 shifts left, exactly */
    const int lo_li = E > 0 ? E >> 4 : 0;
    unsigned __int128 acc = 0; /* bits [16 * lo_li, p]: at most 5 limbs, 80 bits */
    for (int li = top; li >= lo_li; li--) acc = (acc << 16) | limb[li];
    const int sh = E - 16 * lo_li; /* >= 0 unless E < 0 (then lo_li == 0 and sh == E) */
    T = sh >= 0 ? (unsigned long long)(acc >> sh) : (unsigned long long)(acc << -sh);
    sticky = sh > 0 && (acc & ((((unsigned __int128)1) << sh) - 1)) != 0; /* sum bits below E */
    for (int li = 0; li < lo_li && !sticky; li++) sticky = limb[li] != 0;
    return true;
}

__host__ __device__ inline int hibit64(unsigned long long v) {
#ifdef __CUDA_ARCH__
    return 63 - __clzll((long long)v);
#else
    return 63 - __builtin_clzll(v);
#endif
}

/* Nonzero bins spanning at most this many exponents take the 128-bit path: each bin is < 2^63, shifted by
 * <= 56 it stays below 2^119, and <= 57 of them sum below 2^125. Why: the general path (big integer of
 * 16-bit limbs, carries run by one thread) cost ~10 us per call on the H100, most of the exact mean's time;
 * block absmax of a weight usually span a few dozen exponents at most. */
constexpr int kFastSpan = 56;

/* nonzero: 8 words marking the nonzero bins (the kernel finds them with ballots; one thread walking
 * all 256 bins cost microseconds), or NULL to scan. limb_store: kLimbs words of scratch (the kernel passes
 * shared memory), or NULL for a local array. Why: a local array indexed by the runtime exponent cannot
 * live in registers, and ptxas turned every such access into a select chain over all kLimbs registers
 * (2.7k PTX lines executed by one thread); through a pointer each access is one load or store. */
__host__ __device__ inline float mean_from_bins(const unsigned long long *bins, unsigned long long count,
                                                const uint32_t *nonzero = nullptr, uint32_t *limb_store = nullptr) {
    uint32_t marks_of[8];
    int e_min = 256, e_max = -1;
    for (int w = 0; w < 8; w++) {
        uint32_t marks = 0;
        if (nonzero) marks = nonzero[w];
        else
            for (int j = 0; j < 32; j++) marks |= uint32_t(bins[w * 32 + j] != 0) << j;
        marks_of[w] = marks;
        if (marks) {
            e_min = e_min < 256 ? e_min : w * 32 + lowbit32(marks);
            e_max = w * 32 + hibit32(marks);
        }
    }
    if (e_max < 0) return 0.0f;
    unsigned long long T; /* bits [E, E + 64) of the sum, whose highest set bit is E + 63 */
    int E;
    bool sticky; /* a sum bit below E is set */
    if (e_max - e_min <= kFastSpan) {
        unsigned __int128 acc = 0; /* the sum / 2^e_min */
        for (int w = 0; w < 8; w++)
            for (uint32_t marks = marks_of[w]; marks; marks &= marks - 1) {
                const int e = w * 32 + lowbit32(marks);
                acc += (unsigned __int128)bins[e] << (e - e_min);
            }
        const unsigned long long hi = (unsigned long long)(acc >> 64), lo = (unsigned long long)acc;
        const int sh = (hi ? 64 + hibit64(hi) : hibit64(lo)) - 63; /* E - e_min */
        E = e_min + sh;
        T = sh >= 0 ? (unsigned long long)(acc >> sh) : (unsigned long long)(acc << -sh);
        sticky = sh > 0 && (acc & ((((unsigned __int128)1) << sh) - 1)) != 0;
    } else if (!mean_from_limbs(bins, marks_of, limb_store, T, E, sticky)) {
        return 0.0f; /* not reached: some bin is nonzero */
    }
    const unsigned long long Q = T / count;
    sticky = sticky || T - Q * count != 0;
    const int P = (Q >> 32) ? 32 + hibit32((uint32_t)(Q >> 32)) : hibit32((uint32_t)Q); /* Q >= 2^24 */
    /* mean = Q * 2^(E - 150) + a fraction of 2^(E - 150) that is nonzero iff sticky */
    const int e = P + E - 150;
    const int ulp = (e < -126 ? -126 : e) - 23; /* float32 spacing at this magnitude */
    const int d = ulp - (E - 150);              /* quotient bits below one ulp (>= 1) */
    const int rp = d - 1; /* position of the rounding bit in Q */
    const unsigned long long m0 = d >= 64 ? 0 : Q >> d;
    const bool round = rp < 64 && ((Q >> rp) & 1);
    const unsigned long long below = rp >= 64 ? Q : (rp > 0 ? Q & ((1ull << rp) - 1) : 0);
    sticky = sticky || below != 0;
    const unsigned long long m = m0 + (round && (sticky || (m0 & 1)));
    return ldexpf((float)m, ulp);
}

/* A non-negative float32's place in the sums: value = m * 2^(e - 150) (subnormals scale like e = 1). */
struct MeanTerm {
    uint32_t e, m;
};
__device__ __forceinline__ MeanTerm mean_term(uint32_t bits) {
    uint32_t e = bits >> 23, m = bits & 0x7FFFFFu;
    if (e > 0) m |= 0x800000u; else e = 1;
    return MeanTerm{e, m};
}

/* Shared memory of sums_mean_warp, declared by the calling kernel. (Static __shared__ variables inside a
 * device function were placed outside the block's allocation when two kernels of one file inlined it:
 * compute-sanitizer caught the out-of-bounds reads.) */
struct MeanScratch {
    unsigned long long bins[256];
    uint32_t nonzero[8];
    uint32_t limbs[kLimbs];
    float mean;
};

/* The mean of the n values summed into ws, for one warp (every lane gets it); `clear` also zeroes the
 * sums (and the counter) so the workspace is ready for the next call -- only when no other block still
 * reads them. Called once every term is in ws: by the last block of the summing kernel, or by a kernel
 * launched after it. */
__device__ __forceinline__ float sums_mean_warp(unsigned long long *__restrict__ ws, int64_t n, MeanScratch &sc,
                                                bool clear) {
    const int lane = threadIdx.x & 31;
    /* all 8 loads in flight at once, from L2 (the sums were added there by atomics): one round trip,
     * where 8 dependent atomic exchanges took ~4 us */
    unsigned long long v[8];
#pragma unroll
    for (int w = 0; w < 8; w++) v[w] = __ldcg(&ws[kWsBins + w * 32 + lane]);
#pragma unroll
    for (int w = 0; w < 8; w++) {
        if (clear) __stcg(&ws[kWsBins + w * 32 + lane], 0ull);
        sc.bins[w * 32 + lane] = v[w];
        const uint32_t marks = __ballot_sync(kFullMask, v[w] != 0);
        if (lane == 0) sc.nonzero[w] = marks;
    }
    __syncwarp();
    if (lane == 0) {
        sc.mean = mean_from_bins(sc.bins, (unsigned long long)n, sc.nonzero, sc.limbs);
        if (clear) ws[kWsCounter] = 0;
    }
    __syncwarp();
    return sc.mean;
}

/* Add each value's mantissa to the sum of its exponent: lanes with equal exponents are summed by a warp
 * reduction (32 * 2^24 fits 32 bits), so one shared atomic is issued per distinct exponent per warp. */
static __global__ void __launch_bounds__(256) exact_mean_kernel(const float *__restrict__ values, int64_t n,
                                                         unsigned long long *__restrict__ ws) {
    __shared__ MeanScratch scratch;
    __shared__ bool last;
    unsigned long long *bins = scratch.bins; /* this block's sums, then (last block) the totals */
    for (int i = threadIdx.x; i < 256; i += blockDim.x) bins[i] = 0;
    __syncthreads();
    const int lane = threadIdx.x & 31;
    const int64_t stride = int64_t(gridDim.x) * blockDim.x * 4;
    /* 4 values per lane per trip (one 16-byte load when whole and aligned) */
    const bool vec = (reinterpret_cast<uintptr_t>(values) & 15) == 0;
    auto load4 = [&](int64_t i0, float (&v)[4]) {
        if (vec && i0 + 4 <= n) {
            const float4 q = __ldg(reinterpret_cast<const float4 *>(values + i0));
            v[0] = q.x, v[1] = q.y, v[2] = q.z, v[3] = q.w;
        } else {
#pragma unroll
            for (int j = 0; j < 4; j++) v[j] = i0 + j < n ? values[i0 + j] : 0.0f;
        }
    };
    /* each warp keeps its next load in flight while it sums the current values */
    float next[4];
    const int64_t first = (int64_t(blockIdx.x) * blockDim.x + (threadIdx.x & ~31)) * 4;
    if (first < n) load4(first + lane * 4, next);
    for (int64_t base = first; base < n; base += stride) {
        const int64_t i0 = base + lane * 4;
        float v[4] = {next[0], next[1], next[2], next[3]};
        if (base + stride < n) load4(i0 + stride, next);
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const bool active = i0 + j < n;
            const MeanTerm term = mean_term(active ? __float_as_uint(v[j]) & 0x7FFFFFFFu : 0u);
            const uint32_t e = term.e, m = term.m;
            unsigned pending = __ballot_sync(kFullMask, active);
            while (pending) {
                const int leader = __ffs(pending) - 1;
                const uint32_t le = __shfl_sync(kFullMask, e, leader);
                const bool mine = active && e == le && ((pending >> lane) & 1);
                const uint32_t sum = __reduce_add_sync(kFullMask, mine ? m : 0u);
                if (lane == leader) atomicAdd(&bins[le], (unsigned long long)sum);
                pending &= ~__ballot_sync(kFullMask, mine);
            }
        }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < 256; i += blockDim.x)
        if (bins[i]) atomicAdd(&ws[kWsBins + i], bins[i]);
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) last = atomicAdd(&ws[kWsCounter], 1ull) == gridDim.x - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();
    if (threadIdx.x < 32) {
        const float mean = sums_mean_warp(ws, n, scratch, true);
        if (threadIdx.x == 0) ws[kWsMean] = __float_as_uint(mean);
    }
}

}  // namespace qk

#endif
