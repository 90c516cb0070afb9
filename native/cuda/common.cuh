/* common.cuh -- what every CUDA kernel and launcher shares: the code tables (same float32 bit patterns as
 * native/src/quant4.c), dtype loads/stores that round exactly like the CPU library, error recording, and
 * launch helpers. Device arithmetic that decides bytes uses the _rn intrinsics, so neither contraction
 * nor fast-math flags could change it (the build also passes -fmad=false). */
#ifndef QCKPT_CUDA_COMMON_CUH
#define QCKPT_CUDA_COMMON_CUH

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "qckpt_cuda.h"

namespace qk {

constexpr unsigned kFullMask = 0xFFFFFFFFu;

/* Workspace word offsets (qckpt_cuda.h). */
constexpr int kWsBad = 0, kWsMean = 1, kWsCounter = 2, kWsBins = 3;

/* The bad-index word holds ~index of the first non-finite element, 0 when none: atomicMax of the
 * complement keeps the smallest index, and a zeroed workspace (one memset) reads as "none". */
__device__ __forceinline__ void record_bad_index(unsigned long long *ws, unsigned long long index) {
    atomicMax(ws + kWsBad, ~index);
}
__host__ __device__ inline bool has_bad_index(unsigned long long word) { return word != 0; }

/* Record a failure for qckpt_cuda_last_error() and return `status` (error.cu). */
qckpt_status fail(qckpt_status status, const char *fmt, ...);
/* QCKPT_OK, or a failure naming `what` if the last launch failed. */
qckpt_status check_launch(const char *what);
/* Streaming multiprocessors of the current device (for persistent grids). */
int sm_count();
/* Whether the current device has compute capability 9.0 (Hopper: the sm_90a kernels run there). */
bool is_sm90();

inline bool aligned(const void *p, uintptr_t bytes) { return ((uintptr_t)p & (bytes - 1)) == 0; }
__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int log2_exact(int64_t v) {  /* -1 unless v is a power of two */
    if (v <= 0 || (v & (v - 1))) return -1;
    int l = 0;
    while ((int64_t(1) << l) < v) l++;
    return l;
}

/* ---- code tables: C99 hex floats, generated from converter/formats/codebooks.py ---- */
static __constant__ float kNF4Lut[16] = {-0x1.0000000000000p+0f, -0x1.6473620000000p-1f, -0x1.0cd6600000000p-1f, -0x1.9465400000000p-2f, -0x1.23449a0000000p-2f, -0x1.7a6a7e0000000p-3f, -0x1.74f0e20000000p-4f, 0x0p+0f, 0x1.45f5fe0000000p-4f, 0x1.4995c60000000p-3f, 0x1.f809ba0000000p-3f, 0x1.5a06740000000p-2f, 0x1.c349700000000p-2f, 0x1.200f560000000p-1f, 0x1.7227660000000p-1f, 0x1.0000000000000p+0f};
static __constant__ float kFP4Lut[16] = {0x0p+0f, 0x1.5555560000000p-8f, 0x1.5555560000000p-1f, 0x1.0000000000000p+0f, 0x1.5555560000000p-2f, 0x1.0000000000000p-1f, 0x1.5555560000000p-3f, 0x1.0000000000000p-2f, -0x0p+0f, -0x1.5555560000000p-8f, -0x1.5555560000000p-1f, -0x1.0000000000000p+0f, -0x1.5555560000000p-2f, -0x1.0000000000000p-1f, -0x1.5555560000000p-3f, -0x1.0000000000000p-2f};
static __constant__ float kNF4Thresholds[15] = {-0x1.b239b00000000p-1f, -0x1.38a4e00000000p-1f, -0x1.d709000000000p-2f, -0x1.5bd4ec0000000p-2f, -0x1.e079d80000000p-3f, -0x1.1a71780000000p-3f, -0x1.74f0e20000000p-5f, 0x1.45f5fe0000000p-5f, 0x1.ec90c40000000p-4f, 0x1.a0cfc00000000p-3f, 0x1.2b05a80000000p-2f, 0x1.8ea7f20000000p-2f, 0x1.00da080000000p-1f, 0x1.491b5e0000000p-1f, 0x1.b913b40000000p-1f};
static __constant__ float kFP4Thresholds[7] = {0x1.5555720000000p-9f, 0x1.6000000000000p-4f, 0x1.aaaaaa0000000p-3f, 0x1.2aaaaa0000000p-2f, 0x1.aaaaac0000000p-2f, 0x1.2aaaa00000000p-1f, 0x1.aaaaaa0000000p-1f};
static __constant__ uint8_t kFP4BucketCode[8] = {0, 1, 6, 7, 4, 5, 2, 3};

/* ---- dtype conversions: exact widening; RNE narrowing, as the CPU library's qk_store ---- */
template <typename T> __device__ __forceinline__ float to_f32(T v);
template <> __device__ __forceinline__ float to_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_f32<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
    /* torch writes every NaN as 0x7FC0; __float2bfloat16_rn keeps the payload. */
    return v != v ? __ushort_as_bfloat16((unsigned short)0x7FC0) : __float2bfloat16_rn(v);
}

/* Run `body<T>()` for the dtype code of qckpt.h; false for an unknown code. */
#define QK_DISPATCH_DTYPE(code, T, ...)                                         \
    [&]() -> bool {                                                             \
        switch (code) {                                                         \
        case QCKPT_F32: { using T = float; __VA_ARGS__; return true; }          \
        case QCKPT_F16: { using T = __half; __VA_ARGS__; return true; }         \
        case QCKPT_BF16: { using T = __nv_bfloat16; __VA_ARGS__; return true; } \
        default: return false;                                                  \
        }                                                                       \
    }()

/* Block scale b of a 4-bit weight, plain or double-quantized (code_smem: the 256-entry map in shared
 * memory). Two float32 roundings, as qckpt_dequantize_blockwise8. */
struct Scales {
    const float *absmax;
    const uint8_t *codes;
    const float *absmax2;
    const float *code;
    float offset;
    int log2_bs2;
};

__device__ __forceinline__ float block_scale(const Scales &s, const float *code_smem, int64_t b) {
    if (s.absmax) return __ldg(s.absmax + b);
    float q = code_smem[__ldg(s.codes + b)];
    return __fadd_rn(__fmul_rn(q, __ldg(s.absmax2 + (b >> s.log2_bs2))), s.offset);
}

/* Max over the thread block of per-thread bit patterns (blockDim a multiple of 32, <= 256). */
__device__ __forceinline__ uint32_t block_max_bits(uint32_t m, uint32_t *scratch) {
    for (int o = 16; o > 0; o >>= 1) m = max(m, __shfl_xor_sync(kFullMask, m, o));
    if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = m;
    __syncthreads();
    uint32_t r = 0;
    for (int w = 0; w < (int)(blockDim.x >> 5); w++) r = max(r, scratch[w]);
    __syncthreads();
    return r;
}

/* Host: validate a qckpt_cuda_scales and turn it into the kernels' Scales. */
qckpt_status make_scales(const qckpt_cuda_scales *in, Scales *out);

}  // namespace qk

#endif /* QCKPT_CUDA_COMMON_CUH */
