/* quant4_sweep.cu -- times instantiations of the blockwise 4-bit quantize kernel (kernels/quant4.cuh) on
 * a 14336x4096 bf16 weight, blocksize 64, NF4, rotated over 8 copies so L2 cannot serve it, and checks
 * each variant's bytes against the first one. Build and run on the GPU host:
 *
 *   nvcc -O3 -std=c++17 -arch=sm_90 -I native/include -I native/cuda scripts/cuda_tune/quant4_sweep.cu \
 *        native/cuda/error.cu -o /tmp/quant4_sweep && /tmp/quant4_sweep
 *
 * Columns: tiles in flight per warp (U), register bound (blocks/SM), grid blocks per SM, with and
 * without the fused absmax sums, µs per call (harness.cuh: median of 7 runs of 24 calls) and GB/s of bytes
 * moved. */
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <functional>
#include <vector>

#include "harness.cuh"
#include "kernels/quant4.cuh"

namespace {
constexpr int64_t kN = 14336LL * 4096, kBS = 64, kNB = kN / kBS, kCopies = 8;

__global__ void fill(__nv_bfloat16 *x, int64_t n, uint32_t seed) {
    for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
        uint32_t h = uint32_t(i) * 2654435761u ^ seed;
        h ^= h >> 13, h *= 0x5bd1e995u, h ^= h >> 15;
        /* roughly Gaussian: sum of 4 uniform bytes, centred */
        const float v = (float((h & 255) + ((h >> 8) & 255) + ((h >> 16) & 255) + (h >> 24)) - 510.0f) / 147.0f;
        x[i] = __float2bfloat16_rn(v);
    }
}

template <int U, int MINB, bool SUM>
void launch(const __nv_bfloat16 *x, uint8_t *packed, float *absmax, int64_t *ws, int per_sm) {
    const int64_t warps = qk::ceil_div(kNB, 4 * U);
    const int64_t blocks = std::min<int64_t>(qk::ceil_div(warps, 8), int64_t(qk::sm_count()) * per_sm);
    qk::quantize_4bit_kernel<__nv_bfloat16, 8, 1, U, SUM, MINB><<<(unsigned)blocks, 256>>>(
        x, kN, QCKPT_NF4, packed, absmax, reinterpret_cast<unsigned long long *>(ws));
}

}  // namespace

int main() {
    std::vector<__nv_bfloat16 *> xs(kCopies);
    std::vector<uint8_t *> ps(kCopies);
    std::vector<float *> as(kCopies);
    for (int c = 0; c < kCopies; c++) {
        CK(cudaMalloc(&xs[c], kN * 2));
        CK(cudaMalloc(&ps[c], kN / 2));
        CK(cudaMalloc(&as[c], kNB * 4));
        fill<<<1024, 256>>>(xs[c], kN, 17u * c + 1);
    }
    int64_t *ws;
    CK(cudaMalloc(&ws, 4096 * 8));
    CK(cudaMemset(ws, 0, 4096 * 8)); /* a fresh workspace: no bad index, zero sums */
    std::vector<uint8_t> want(kN / 2), got(kN / 2);
    const double bytes = kN * 2.0 + kN / 2.0 + kNB * 4.0;
    bool first = true;
    auto run = [&](const char *name, std::function<void(int)> fn) {
        for (int c = 0; c < kCopies; c++) fn(c);
        CK(cudaDeviceSynchronize());
        CK(cudaMemcpy(got.data(), ps[0], kN / 2, cudaMemcpyDeviceToHost));
        if (first) want = got, first = false;
        const bool same = want == got;
        const double us = time_us(fn, kCopies);
        printf("%-34s %8.1f us %7.0f GB/s  %s\n", name, us, bytes / us * 1e-3, same ? "same bytes" : "BYTES DIFFER");
        CK(cudaMemset(ws + 3, 0, 256 * 8)); /* the sums grow with every SUM call: clear them */
    };
#define V(U, MINB, PER_SM, SUM)                                                                           \
    run("U=" #U " minb=" #MINB " grid/sm=" #PER_SM " sum=" #SUM,                                          \
        [&](int c) { launch<U, MINB, SUM>(xs[c], ps[c], as[c], ws, PER_SM); });
    V(4, 1, 8, false)   /* the launch before the sweeps */
    V(1, 8, 16, false)  /* the library's launch */
    V(1, 8, 16, true)   /* with the fused absmax sums (double quantization) */
    V(2, 6, 12, false)
    V(1, 6, 12, false)
    V(1, 7, 14, false)
    V(1, 8, 8, false)
    V(1, 8, 32, false)
#undef V
    CK(cudaGetLastError());
    return 0;
}
