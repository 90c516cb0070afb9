/* exact_mean.cuh -- the exact float32 mean of double quantization (reference.exact_mean_f32): each value
 * m * 2^(e-150) adds its 24-bit mantissa into a 64-bit sum per exponent e (exact: n < 2^39); the last
 * block to finish turns the 256 sums into one big integer, divides it by n and rounds once, ties to
 * even. Values must be non-negative (they are block absmax). mean_from_bins() is host+device so the
 * rounding can be checked without a GPU. */
#ifndef QCKPT_CUDA_EXACT_MEAN_CUH
#define QCKPT_CUDA_EXACT_MEAN_CUH

#include "../common.cuh"

namespace qk {

/* 16-bit limbs (in 32-bit words) so each long-division step fits u64: rem < n < 2^39, rem * 2^16 + limb < 2^55.
 * The sum is scaled by 2^80 before dividing so the quotient keeps >= 40 significant bits. */
constexpr int kFracBits = 80, kLimbs = (256 + 64 + kFracBits) / 16 + 1;

__host__ __device__ inline float mean_from_bins(const unsigned long long *bins, unsigned long long count) {
    uint32_t limb[kLimbs];
    for (int i = 0; i < kLimbs; i++) limb[i] = 0;
    for (int e = 0; e < 256; e++) {
        const unsigned long long v = bins[e];
        if (!v) continue;
        const int pos = e + kFracBits, li = pos >> 4, sh = pos & 15;
        const unsigned long long lo = v << sh, hi = sh ? v >> (64 - sh) : 0; /* v * 2^sh = hi:lo */
        unsigned long long carry = 0;
        for (int k = 0; li + k < kLimbs; k++) {
            const unsigned long long piece = k < 4 ? (lo >> (16 * k)) & 0xFFFF : (k == 4 ? hi : 0);
            const unsigned long long s = limb[li + k] + piece + carry;
            limb[li + k] = (uint32_t)(s & 0xFFFF);
            carry = s >> 16;
            if (k >= 4 && carry == 0) break;
        }
    }
    /* quotient limbs, most significant first; the remainder only matters as a sticky bit */
    unsigned long long rem = 0;
    int top = -1;
    for (int i = kLimbs - 1; i >= 0; i--) {
        const unsigned long long cur = (rem << 16) | limb[i];
        limb[i] = (uint32_t)(cur / count);
        rem = cur % count;
        if (top < 0 && limb[i]) top = i;
    }
    if (top < 0) return 0.0f; /* mean below 2^-230 can only be an exact zero sum */
    int p = top * 16 + 15;
    while (!((limb[p >> 4] >> (p & 15)) & 1)) p--;
    /* value = Q * 2^-(150 + kFracBits), Q in [2^p, 2^(p+1)) */
    const int e = p - 150 - kFracBits;
    const int ulp = (e < -126 ? -126 : e) - 23; /* float32 spacing at this magnitude */
    const int d = ulp + 150 + kFracBits;         /* quotient bits below one ulp (>= 1 here) */
    unsigned long long m = 0;
    for (int b = p; b >= d; b--) m = (m << 1) | ((limb[b >> 4] >> (b & 15)) & 1);
    const bool round = (limb[(d - 1) >> 4] >> ((d - 1) & 15)) & 1;
    bool sticky = rem != 0;
    for (int b = d - 2; b >= 0 && !sticky; b--) sticky = (limb[b >> 4] >> (b & 15)) & 1;
    if (round && (sticky || (m & 1))) m++;
    return ldexpf((float)m, ulp);
}

/* Add each value's mantissa to the sum of its exponent: lanes with equal exponents are summed by a warp
 * reduction (32 * 2^24 fits 32 bits), so one shared atomic is issued per distinct exponent per warp. */
__global__ void __launch_bounds__(256) exact_mean_kernel(const float *__restrict__ values, int64_t n,
                                                         unsigned long long *__restrict__ ws) {
    __shared__ unsigned long long bins[256];
    __shared__ bool last;
    for (int i = threadIdx.x; i < 256; i += blockDim.x) bins[i] = 0;
    __syncthreads();
    const int lane = threadIdx.x & 31;
    const int64_t stride = int64_t(gridDim.x) * blockDim.x;
    for (int64_t base = int64_t(blockIdx.x) * blockDim.x + (threadIdx.x & ~31); base < n; base += stride) {
        const int64_t i = base + lane;
        const bool active = i < n;
        const uint32_t bits = active ? __float_as_uint(values[i]) & 0x7FFFFFFFu : 0u;
        uint32_t e = bits >> 23, m = bits & 0x7FFFFFu;
        if (e > 0) m |= 0x800000u; else e = 1; /* subnormals scale like e = 1 */
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
    __syncthreads();
    for (int i = threadIdx.x; i < 256; i += blockDim.x)
        if (bins[i]) atomicAdd(&ws[kWsBins + i], bins[i]);
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) last = atomicAdd(&ws[kWsCounter], 1ull) == gridDim.x - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();
    for (int i = threadIdx.x; i < 256; i += blockDim.x) bins[i] = atomicAdd(&ws[kWsBins + i], 0ull);
    __syncthreads();
    if (threadIdx.x == 0) {
        ws[kWsMean] = __float_as_uint(mean_from_bins(bins, (unsigned long long)n));
        ws[kWsCounter] = 0; /* reusable: the next call on this workspace starts its count again */
        for (int i = 0; i < 256; i++) ws[kWsBins + i] = 0;
    }
}

}  // namespace qk

#endif
