/* gemm4_sweep.cu -- tuning harness for the 4-bit matmul kernels (native/cuda/kernels/gemm4*.cuh): times
 * many instantiations (tile shapes, warps, prefetch depth, k splits) on Llama-8B MLP shapes and checks each
 * result against a float32 reference, so one GPU call can choose the launch table of native/cuda/gemm4.cu.
 * Not part of the library; built and run by scripts/cuda_tune/run_sweep.sh on the GPU machine:
 *
 *   nvcc -O3 -std=c++17 -fmad=false -gencode=arch=compute_90a,code=sm_90a -I native/include -I native/cuda \
 *        scripts/cuda_tune/gemm4_sweep.cu native/cuda/error.cu -o /tmp/gemm4_sweep && /tmp/gemm4_sweep [--quick]
 *
 * (sm_90a for the wgmma experiments, gemm4_wgmma.cuh and gemm4_tma.cuh; modes: --decode, --wide, --wgmma, --tma,
 * --b128, --expand, --lut, --profile, --profile-tma, --quick)
 *
 * Weights: NF4 with double-quantized scales (blocksize 64, nested 256), random bytes, rotated over 8
 * copies so L2 (50 MB) cannot serve them. Times: median over 7 repetitions of 24 back-to-back launches
 * timed with events (kernels of >= 10 us keep the GPU busy; launch cost is not included). One line per
 * measurement: kind, config, shape, batch, splits, us, TFLOP/s, GB/s of packed weights, relative error. */
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "harness.cuh"
#include "kernels/gemm4.cuh"
#include "kernels/gemv4.cuh"
#include "kernels/gemm4_tiled.cuh"
#include "kernels/gemm4_tma.cuh"
#include "gemm4_wgmma.cuh"

using bf16 = __nv_bfloat16;
using namespace qk;

constexpr int kRotate = 8, kBS = 64, kBS2 = 256, kMaxBatch = 256;

__device__ __forceinline__ uint32_t hash32(uint64_t i, uint32_t seed) {
    uint64_t z = i * 0x9E3779B97F4A7C15ull + seed;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return uint32_t(z ^ (z >> 31));
}
__global__ void fill_bytes(uint8_t *p, int64_t n, uint32_t seed) {
    for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
        p[i] = uint8_t(hash32(i, seed));
}
__global__ void fill_uniform(float *p, int64_t n, uint32_t seed, float lo, float hi) {
    for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
        p[i] = lo + (hi - lo) * (hash32(i, seed) >> 8) * (1.0f / 16777216.0f);
}
__global__ void fill_bf16(bf16 *p, int64_t n, uint32_t seed) {
    for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
        p[i] = __float2bfloat16_rn(2.0f * (hash32(i, seed) >> 8) * (1.0f / 16777216.0f) - 1.0f);
}

/* y_ref[m, n] = sum_k x[m, k] * dequant(W)[n, k] in float32, one thread per output */
__global__ void reference(const bf16 *x, int batch, const uint8_t *packed, Scales sc, int64_t n_out, int64_t k,
                          float *y) {
    const int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
    if (idx >= batch * n_out) return;
    const int64_t m = idx / n_out, n = idx % n_out;
    float acc = 0.0f;
    for (int64_t kk = 0; kk < k; kk++) {
        const int64_t flat = n * k + kk, b = flat / kBS;
        const float s = sc.code[sc.codes[b]] * sc.absmax2[b / kBS2] + sc.offset;
        const uint8_t byte = packed[flat >> 1];
        const float w = kNF4Lut[(flat & 1) ? (byte & 15) : (byte >> 4)] * s;
        acc += __bfloat162float(x[m * k + kk]) * w;
    }
    y[idx] = acc;
}

struct Problem {
    int64_t n_out, k;
    uint8_t *packed[kRotate];
    uint8_t *codes[kRotate];
    float *absmax2[kRotate];
    float *expanded[kRotate]; /* expand_scales_kernel's output, for the TMA kernel */
    float *code;
    bf16 *x, *y;
    float *y_ref;
    void *workspace;
    std::vector<float> ref_host;
    Scales scales(int c) const { return Scales{nullptr, codes[c], absmax2[c], code, 0.03125f, 8}; }
};

static Problem make_problem(int64_t n_out, int64_t k) {
    Problem p{};
    p.n_out = n_out;
    p.k = k;
    const int64_t numel = n_out * k, nb = numel / kBS, nb2 = (nb + kBS2 - 1) / kBS2;
    for (int c = 0; c < kRotate; c++) {
        CK(cudaMalloc(&p.packed[c], numel / 2));
        CK(cudaMalloc(&p.codes[c], nb));
        CK(cudaMalloc(&p.absmax2[c], nb2 * 4));
        fill_bytes<<<1024, 256>>>(p.packed[c], numel / 2, 11 + c);
        fill_bytes<<<1024, 256>>>(p.codes[c], nb, 101 + c);
        fill_uniform<<<1024, 256>>>(p.absmax2[c], nb2, 1001 + c, 0.02f, 0.1f);
    }
    CK(cudaMalloc(&p.code, 256 * 4));
    std::vector<float> code(256);
    for (int i = 0; i < 256; i++) code[i] = -1.0f + 2.0f * i / 255.0f;
    CK(cudaMemcpy(p.code, code.data(), 256 * 4, cudaMemcpyHostToDevice));
    for (int c = 0; c < kRotate; c++) {
        CK(cudaMalloc(&p.expanded[c], nb * 4));
        CK(launch_expand_scales(p.scales(c), n_out, k, 6, n_out, p.expanded[c], 0));
    }
    CK(cudaMalloc(&p.x, kMaxBatch * k * 2));
    fill_bf16<<<1024, 256>>>(p.x, kMaxBatch * k, 7);
    CK(cudaMalloc(&p.y, kMaxBatch * n_out * 2));
    CK(cudaMalloc(&p.y_ref, kMaxBatch * n_out * 4));
    CK(cudaMalloc(&p.workspace, int64_t(16) * kMaxBatch * n_out * 4 + (1 << 20)));
    CK(cudaMemset(p.workspace, 0, int64_t(16) * kMaxBatch * n_out * 4 + (1 << 20))); /* counters start zero */
    const int64_t outs = kMaxBatch * n_out;
    reference<<<(unsigned)ceil_div(outs, 256), 256>>>(p.x, kMaxBatch, p.packed[0], p.scales(0), n_out, k, p.y_ref);
    CK(cudaDeviceSynchronize());
    p.ref_host.resize(outs);
    CK(cudaMemcpy(p.ref_host.data(), p.y_ref, outs * 4, cudaMemcpyDeviceToHost));
    return p;
}

static void free_problem(Problem &p) {
    for (int c = 0; c < kRotate; c++) {
        cudaFree(p.packed[c]);
        cudaFree(p.codes[c]);
        cudaFree(p.absmax2[c]);
        cudaFree(p.expanded[c]);
    }
    cudaFree(p.code);
    cudaFree(p.x);
    cudaFree(p.y);
    cudaFree(p.y_ref);
    cudaFree(p.workspace);
}

/* ||y - ref|| / ||ref|| over the first `batch` rows (y from weight copy 0) */
static double rel_error(const Problem &p, int batch) {
    std::vector<uint16_t> raw(batch * p.n_out);
    CK(cudaMemcpy(raw.data(), p.y, raw.size() * 2, cudaMemcpyDeviceToHost));
    double num = 0, den = 0;
    for (size_t i = 0; i < raw.size(); i++) {
        uint32_t bits = uint32_t(raw[i]) << 16;
        float v;
        memcpy(&v, &bits, 4);
        const double d = double(v) - p.ref_host[i];
        num += d * d;
        den += double(p.ref_host[i]) * p.ref_host[i];
    }
    return std::sqrt(num / den);
}

static void report(const char *kind, const std::string &cfg, const Problem &p, int batch, int splits, float us,
                   double err) {
    const double flops = 2.0 * batch * p.n_out * p.k, bytes = p.n_out * p.k / 2.0 + p.n_out * p.k / kBS;
    printf("%-6s %-26s %5lldx%-5lld b%-4d s%-2d %9.2f us %7.1f TFLOP/s %7.1f GB/s err %.2e%s\n", kind, cfg.c_str(),
           (long long)p.n_out, (long long)p.k, batch, splits, us, flops / us / 1e6, bytes / us / 1e3, err,
           err > 2e-2 ? "  WRONG" : "");
    fflush(stdout);
}

/* the decode kernel (gemv4.cuh); blocks_per_sm 0: one block per row tile, else a grid of that many blocks
 * per SM walking over the tiles */
template <int NT, int R, int W, int DEPTH, int MINB, bool WIDE = false>
static void sweep_decode(Problem &p, int batch, int sms, int blocks_per_sm) {
    if (batch > NT * 8) return;
    const int64_t tiles = ceil_div(p.n_out, 16 * R);
    const int64_t grid = blocks_per_sm ? std::min<int64_t>(tiles, int64_t(sms) * blocks_per_sm) : tiles;
    auto launch = [&](int c) {
        CK((launch_gemm_4bit_decode<bf16, NT, R, W, DEPTH, MINB, WIDE>(p.x, batch, p.packed[c], p.scales(c), p.n_out,
                                                                       p.k, 6, QCKPT_NF4, p.y, grid, 0)));
    };
    CK(cudaMemset(p.y, 0, size_t(batch) * p.n_out * 2));
    launch(0);
    CK(cudaDeviceSynchronize());
    const double err = rel_error(p, batch);
    char cfg[64];
    snprintf(cfg, sizeof cfg, "NT%d R%d W%d D%d MINB%d %s g%d", NT, R, W, DEPTH, MINB, WIDE ? "wide" : "post",
             blocks_per_sm);
    report("decode", cfg, p, batch, 1, time_us(launch, kRotate), err);
}

/* For each distinct k split of `candidates` that keeps >= 4 k-tiles a split: check launch(copy 0, splits)
 * against the reference (the output cleared first, so that rows a kernel never writes show), then time it. */
static void sweep_splits(Problem &p, int batch, const char *kind, const char *cfg, int64_t ktiles,
                         std::vector<int> candidates, const std::function<void(int, int)> &launch) {
    std::sort(candidates.begin(), candidates.end());
    candidates.erase(std::unique(candidates.begin(), candidates.end()), candidates.end());
    for (int splits : candidates) {
        if (splits > 1 && ktiles / splits < 4) continue;
        CK(cudaMemset(p.y, 0, size_t(batch) * p.n_out * 2));
        launch(0, splits);
        CK(cudaDeviceSynchronize());
        const double err = rel_error(p, batch);
        report(kind, cfg, p, batch, splits, time_us([&](int c) { launch(c, splits); }, kRotate), err);
    }
}

template <typename Shape, int DEPTH, int MINB, int LUT = kLutDefault>
static void sweep_tiled(Problem &p, int batch, int sms) {
    const int64_t tiles = ceil_div(p.n_out, Shape::BN) * ceil_div(batch, Shape::BM), ktiles = p.k / kTiledBK;
    char cfg[64];
    snprintf(cfg, sizeof cfg, "WN%d WM%d NT%d MT%d S%d D%d MINB%d L%d", Shape::WN, Shape::WM, Shape::NT16, Shape::MT,
             Shape::STAGES, DEPTH, MINB, LUT);
    sweep_splits(p, batch, "tiled", cfg, ktiles,
                 {1, 2, 4, 8, tiled_splits(tiles, ktiles, sms, 1), tiled_splits(tiles, ktiles, sms, 2)},
                 [&](int c, int splits) {
                     CK((launch_gemm_4bit_tiled<bf16, Shape, DEPTH, MINB, LUT>(p.x, batch, p.packed[c], p.scales(c),
                                                                               p.n_out, p.k, 6, QCKPT_NF4, p.y,
                                                                               splits, p.workspace, 0)));
                 });
}

/* A wgmma-tiled kernel (Shape: WgmmaShape) over k splits 1, 2 and enough for 1..max_per_sm blocks a
 * multiprocessor; launch(copy, splits) as sweep_splits. */
template <typename Shape, int LUT, int MINB>
static void sweep_wgmma_tiles(Problem &p, int batch, int sms, const char *kind, int max_per_sm,
                              const std::function<void(int, int)> &launch) {
    const int64_t tiles = ceil_div(p.n_out, Shape::BM) * ceil_div(batch, Shape::BN), ktiles = p.k / Shape::BK;
    char cfg[64];
    snprintf(cfg, sizeof cfg, "BN%d WG%d MT%d S%d BK%d L%d MINB%d", Shape::BN, Shape::WG, Shape::MT, Shape::STAGES,
             Shape::BK, LUT, MINB);
    std::vector<int> candidates{1, 2};
    for (int per_sm = 1; per_sm <= max_per_sm; per_sm++) candidates.push_back(tiled_splits(tiles, ktiles, sms, per_sm));
    sweep_splits(p, batch, kind, cfg, ktiles, candidates, launch);
}

template <typename Shape, int LUT, int MINB>
static void sweep_wgmma(Problem &p, int batch, int sms) {
    sweep_wgmma_tiles<Shape, LUT, MINB>(p, batch, sms, "wgmma", 4, [&](int c, int splits) {
        CK((launch_gemm_4bit_wgmma<bf16, Shape, LUT, MINB>(p.x, batch, p.packed[c], p.scales(c), p.n_out, p.k, 6,
                                                           QCKPT_NF4, p.y, splits, p.workspace, 0)));
    });
}

template <typename Shape, int LUT, int MINB>
static void sweep_tma(Problem &p, int batch, int sms) {
    sweep_wgmma_tiles<Shape, LUT, MINB>(p, batch, sms, "tma", 3, [&](int c, int splits) {
        CK((launch_gemm_4bit_tma<bf16, Shape, LUT, MINB>(p.x, batch, p.packed[c], p.expanded[c], p.n_out,
                                                         p.scales(c), p.n_out, p.k, 6, QCKPT_NF4, p.y, splits,
                                                         p.workspace, 0)));
    });
}

/* Run `fn` on the problem of each shape (made before it, freed after). */
template <typename Fn>
static void for_each_problem(const int64_t (&shapes)[2][2], Fn &&fn) {
    for (auto &shape : shapes) {
        Problem p = make_problem(shape[0], shape[1]);
        fn(p);
        free_problem(p);
    }
}

int main(int argc, char **argv) {
    const int64_t shapes[2][2] = {{14336, 4096}, {4096, 14336}}; /* Llama-8B MLP: up / gate and down */
    const bool quick = argc > 1 && !strcmp(argv[1], "--quick");
    /* --profile: one launch each of the batch-1 decode kernel (the library's wide launch, then post-scaled),
     * the batch-128 tiled, wgmma and TMA kernels and the batch-1 TMA kernel, for a profiler */
    if (argc > 1 && !strcmp(argv[1], "--profile")) {
        Problem p = make_problem(14336, 4096);
        int sms;
        CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
        CK((launch_gemm_4bit_decode<bf16, 1, 2, 4, 1, 4, true>(p.x, 1, p.packed[1], p.scales(1), p.n_out, p.k, 6,
                                                              QCKPT_NF4, p.y, 0, 0)));
        CK((launch_gemm_4bit_decode<bf16, 1, 2, 8, 1, 2, false>(p.x, 1, p.packed[2], p.scales(2), p.n_out, p.k, 6,
                                                               QCKPT_NF4, p.y, 2 * sms, 0)));
        CK((launch_gemm_4bit_tiled<bf16, TiledShape<8, 1, 1, 8, 4>, 2, 2>(p.x, 128, p.packed[1], p.scales(1), p.n_out,
                                                                           p.k, 6, QCKPT_NF4, p.y, 1, p.workspace, 0)));
        CK((launch_gemm_4bit_wgmma<bf16, WgmmaShape<128, 2, 1, 5>, kLutLane, 1>(p.x, 128, p.packed[1], p.scales(1),
                                                                            p.n_out, p.k, 6, QCKPT_NF4, p.y, 1,
                                                                            p.workspace, 0)));
        CK((launch_gemm_4bit_tma<bf16, WgmmaShape<128, 2, 1, 6>, kLutLane, 1>(p.x, 128, p.packed[2], p.expanded[2], p.n_out, p.scales(2),
                                                                          p.n_out, p.k, 6, QCKPT_NF4, p.y, 1,
                                                                          p.workspace, 0)));
        CK((launch_gemm_4bit_tma<bf16, WgmmaShape<8, 2, 1, 8>, kLutLane, 2>(p.x, 1, p.packed[3], p.expanded[3], p.n_out, p.scales(3), p.n_out,
                                                                        p.k, 6, QCKPT_NF4, p.y, 2, p.workspace, 0)));
        CK(cudaDeviceSynchronize());
        free_problem(p);
        return 0;
    }
    /* --profile-tma: the library's batch-128 TMA launch on 14336x4096 (unsplit) and 4096x14336 split 1, 2 and
     * 4 ways, for a profiler */
    if (argc > 1 && !strcmp(argv[1], "--profile-tma")) {
        for_each_problem(shapes, [&](Problem &p) {
            for (int splits : {1, 2, 4}) {
                if (p.n_out > p.k && splits > 1) continue;
                CK((launch_gemm_4bit_tma<bf16, WgmmaShape<128, 2, 1, 8>, kLutLane, 1>(
                    p.x, 128, p.packed[splits], p.expanded[splits], p.n_out, p.scales(splits), p.n_out, p.k, 6,
                    QCKPT_NF4, p.y, splits, p.workspace, 0)));
            }
            CK(cudaDeviceSynchronize());
        });
        return 0;
    }
    cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));
    printf("# %s, %d SMs\n", prop.name, prop.multiProcessorCount);
    const int sms = prop.multiProcessorCount;
    /* --wgmma: the sm_90a prefill kernel's batch tile, warpgroups, stages and k splits, beside the tiled
     * mma.sync kernel the library used before */
    if (argc > 1 && !strcmp(argv[1], "--wgmma")) {
        for_each_problem(shapes, [&](Problem &p) {
            for (int batch : {128, 64, 32, 16, 8, 1}) {
                if (batch > 64) {
                    sweep_wgmma<WgmmaShape<128, 2, 1, 5>, kLutLane, 1>(p, batch, sms);
                    sweep_wgmma<WgmmaShape<128, 2, 1, 5>, kLutRegs, 1>(p, batch, sms);
                    sweep_wgmma<WgmmaShape<128, 2, 1, 4, 128>, kLutLane, 1>(p, batch, sms);
                    sweep_wgmma<WgmmaShape<128, 1, 1, 5>, kLutRegs, 2>(p, batch, sms);
                    sweep_wgmma<WgmmaShape<128, 2, 2, 4>, kLutLane, 1>(p, batch, sms);
                    sweep_tiled<TiledShape<8, 1, 1, 8, 4>, 2, 2>(p, batch, sms);
                } else if (batch > 32) {
                    sweep_wgmma<WgmmaShape<64, 2, 1, 5>, kLutRegs, 2>(p, batch, sms);
                    sweep_wgmma<WgmmaShape<64, 2, 1, 5>, kLutLane, 1>(p, batch, sms);
                    sweep_wgmma<WgmmaShape<64, 2, 1, 5, 128>, kLutLane, 1>(p, batch, sms);
                    sweep_tiled<TiledShape<8, 1, 1, 8, 4>, 2, 2>(p, batch, sms);
                } else if (batch > 16) {
                    sweep_wgmma<WgmmaShape<32, 2, 1, 5>, kLutRegs, 2>(p, batch, sms);
                    sweep_wgmma<WgmmaShape<32, 2, 1, 5>, kLutLane, 2>(p, batch, sms);
                    sweep_wgmma<WgmmaShape<32, 2, 1, 5, 128>, kLutLane, 1>(p, batch, sms);
                    sweep_tiled<TiledShape<8, 1, 1, 4, 4>, 4, 2>(p, batch, sms);
                } else if (batch > 8) {
                    sweep_wgmma<WgmmaShape<16, 2, 1, 5>, kLutLane, 2>(p, batch, sms);
                    sweep_wgmma<WgmmaShape<16, 2, 1, 5>, kLutRegs, 3>(p, batch, sms);
                    sweep_wgmma<WgmmaShape<16, 2, 1, 7>, kLutRegs, 3>(p, batch, sms);
                    sweep_wgmma<WgmmaShape<16, 2, 1, 5, 128>, kLutLane, 2>(p, batch, sms);
                    sweep_decode<2, 1, 8, 1, 2>(p, batch, sms, 2); /* the library's decode launches */
                    sweep_decode<2, 2, 4, 1, 3>(p, batch, sms, 3);
                } else {
                    sweep_wgmma<WgmmaShape<8, 2, 1, 5>, kLutLane, 3>(p, batch, sms);
                    sweep_wgmma<WgmmaShape<8, 2, 1, 5>, kLutRegs, 4>(p, batch, sms);
                    sweep_wgmma<WgmmaShape<8, 2, 1, 7>, kLutRegs, 3>(p, batch, sms);
                    sweep_wgmma<WgmmaShape<8, 2, 1, 5, 128>, kLutLane, 2>(p, batch, sms);
                    sweep_decode<1, 1, 8, 2, 2>(p, batch, sms, 2);
                    sweep_decode<1, 2, 8, 1, 2>(p, batch, sms, 2);
                }
            }
        });
        return 0;
    }
    /* --expand: the scale expansion alone (expand_scales_kernel), per weight copy */
    if (argc > 1 && !strcmp(argv[1], "--expand")) {
        for_each_problem(shapes, [&](Problem &p) {
            const float us = time_us([&](int c) {
                CK(launch_expand_scales(p.scales(c), p.n_out, p.k, 6, p.n_out, p.expanded[c], 0));
            }, kRotate);
            printf("expand %5lldx%-5lld %8.2f us %7.1f GB/s\n", (long long)p.n_out, (long long)p.k, us,
                   (p.n_out * p.k / kBS * 5.0) / us / 1e3);
        });
        return 0;
    }
    /* --b128: the Hopper prefill kernel's tiles of 128 and 256 output rows at 128 batch rows */
    if (argc > 1 && !strcmp(argv[1], "--b128")) {
        for_each_problem(shapes, [&](Problem &p) {
            sweep_tma<WgmmaShape<128, 2, 1, 8>, kLutLane, 1>(p, 128, sms);
            sweep_tma<WgmmaShape<64, 2, 1, 8>, kLutLane, 1>(p, 128, sms);
        });
        return 0;
    }
    /* --tma-quick: one prefill (128 rows) and one decode (1 row) launch of the TMA kernel per shape */
    if (argc > 1 && !strcmp(argv[1], "--tma-quick")) {
        for_each_problem(shapes, [&](Problem &p) {
            sweep_tma<WgmmaShape<128, 2, 1, 6>, kLutLane, 1>(p, 128, sms);
            sweep_tma<WgmmaShape<8, 2, 1, 8>, kLutLane, 2>(p, 1, sms);
        });
        return 0;
    }
    /* --tma: the TMA-fed wgmma kernel (gemm4_tma.cuh) beside the cp.async one and the library's kernels */
    if (argc > 1 && !strcmp(argv[1], "--tma")) {
        for_each_problem(shapes, [&](Problem &p) {
            for (int batch : {128, 64, 32, 16, 1}) {
                if (batch > 64) {
                    sweep_tma<WgmmaShape<128, 2, 1, 6>, kLutLane, 1>(p, batch, sms);
                    sweep_tma<WgmmaShape<128, 2, 1, 6>, kLutRegs, 1>(p, batch, sms);
                    sweep_tma<WgmmaShape<128, 2, 1, 8>, kLutLane, 1>(p, batch, sms);
                    sweep_tma<WgmmaShape<128, 2, 1, 4>, kLutLane, 1>(p, batch, sms);
                    sweep_tiled<TiledShape<8, 1, 1, 8, 4>, 2, 2>(p, batch, sms);
                } else if (batch > 32) {
                    sweep_tma<WgmmaShape<64, 2, 1, 6>, kLutLane, 1>(p, batch, sms);
                    sweep_tma<WgmmaShape<64, 2, 1, 8>, kLutRegs, 1>(p, batch, sms);
                    sweep_tma<WgmmaShape<64, 2, 1, 5>, kLutRegs, 2>(p, batch, sms);
                    sweep_tiled<TiledShape<8, 1, 1, 8, 4>, 2, 2>(p, batch, sms);
                } else if (batch > 16) {
                    sweep_tma<WgmmaShape<32, 2, 1, 6>, kLutRegs, 2>(p, batch, sms);
                    sweep_tma<WgmmaShape<32, 2, 1, 8>, kLutLane, 1>(p, batch, sms);
                    sweep_tiled<TiledShape<8, 1, 1, 4, 4>, 4, 2>(p, batch, sms);
                } else if (batch > 8) {
                    sweep_tma<WgmmaShape<16, 2, 1, 8>, kLutLane, 2>(p, batch, sms);
                    sweep_tma<WgmmaShape<16, 2, 1, 8>, kLutRegs, 2>(p, batch, sms);
                    sweep_decode<2, 1, 8, 1, 2>(p, batch, sms, 2);
                } else {
                    sweep_tma<WgmmaShape<8, 2, 1, 8>, kLutLane, 2>(p, batch, sms);
                    sweep_tma<WgmmaShape<8, 2, 1, 10>, kLutRegs, 2>(p, batch, sms);
                    sweep_decode<1, 1, 8, 2, 2>(p, batch, sms, 2);
                    sweep_decode<1, 2, 8, 1, 2>(p, batch, sms, 2);
                }
            }
        });
        return 0;
    }
    /* --wide: the library's decode instantiations in the post-scaled and the wide mapping (gemv4.cuh) */
    if (argc > 1 && !strcmp(argv[1], "--wide")) {
        for_each_problem(shapes, [&](Problem &p) {
            for (int batch : {1, 8, 16}) {
                sweep_decode<1, 2, 8, 1, 2, false>(p, batch, sms, 2);
                sweep_decode<1, 2, 8, 1, 2, true>(p, batch, sms, 2);
                sweep_decode<1, 1, 8, 2, 2, false>(p, batch, sms, 2);
                sweep_decode<1, 1, 8, 2, 2, true>(p, batch, sms, 2);
                sweep_decode<2, 1, 8, 1, 2, false>(p, batch, sms, 2);
                sweep_decode<2, 1, 8, 1, 2, true>(p, batch, sms, 2);
                sweep_decode<2, 2, 4, 1, 3, false>(p, batch, sms, 2);
                sweep_decode<2, 2, 4, 1, 3, true>(p, batch, sms, 2);
                sweep_decode<2, 2, 4, 1, 3, false>(p, batch, sms, 3);
            }
        });
        return 0;
    }
    /* --wide-b1: block shapes of the wide mapping at one row */
    if (argc > 1 && !strcmp(argv[1], "--wide-b1")) {
        for_each_problem(shapes, [&](Problem &p) {
            sweep_decode<1, 2, 8, 1, 2, true>(p, 1, sms, 2);
            sweep_decode<1, 2, 4, 1, 4, true>(p, 1, sms, 4);
            sweep_decode<1, 2, 4, 1, 3, true>(p, 1, sms, 3);
            sweep_decode<1, 2, 16, 1, 1, true>(p, 1, sms, 1);
            sweep_decode<1, 1, 16, 2, 1, true>(p, 1, sms, 1);
            sweep_decode<1, 1, 4, 2, 4, true>(p, 1, sms, 4);
            sweep_decode<1, 1, 8, 2, 2, true>(p, 1, sms, 2);
        });
        return 0;
    }
    /* --decode: the 1..16-row kernel (gemv4.cuh): warps, prefetch depth, rows per warp, blocks per SM (0: one
     * per row tile), post-scaled and wide */
    if (argc > 1 && !strcmp(argv[1], "--decode")) {
        for_each_problem(shapes, [&](Problem &p) {
            for (int batch : {1, 8}) {
                sweep_decode<1, 1, 4, 2, 3>(p, batch, sms, 0);
                sweep_decode<1, 1, 4, 2, 4>(p, batch, sms, 4);
                sweep_decode<1, 1, 4, 1, 4>(p, batch, sms, 4);
                sweep_decode<1, 1, 4, 2, 3>(p, batch, sms, 3);
                sweep_decode<1, 1, 4, 2, 3, true>(p, batch, sms, 3);
                sweep_decode<1, 1, 4, 3, 3>(p, batch, sms, 3);
                sweep_decode<1, 1, 8, 1, 2>(p, batch, sms, 2);
                sweep_decode<1, 1, 8, 2, 2>(p, batch, sms, 2);
                sweep_decode<1, 1, 8, 3, 2>(p, batch, sms, 2);
                sweep_decode<1, 1, 16, 2, 1>(p, batch, sms, 1);
                sweep_decode<1, 1, 16, 1, 1>(p, batch, sms, 1);
                sweep_decode<1, 2, 4, 1, 3>(p, batch, sms, 3);
                sweep_decode<1, 2, 8, 1, 2>(p, batch, sms, 2);
                sweep_decode<1, 2, 4, 2, 3>(p, batch, sms, 3);
            }
            for (int batch : {16}) {
                sweep_decode<2, 1, 4, 1, 3>(p, batch, sms, 0);
                sweep_decode<2, 1, 4, 1, 4>(p, batch, sms, 4);
                sweep_decode<2, 1, 4, 1, 3>(p, batch, sms, 3);
                sweep_decode<2, 1, 4, 2, 3>(p, batch, sms, 3);
                sweep_decode<2, 1, 8, 1, 2>(p, batch, sms, 2);
                sweep_decode<2, 1, 16, 1, 1>(p, batch, sms, 1);
                sweep_decode<2, 2, 4, 1, 3>(p, batch, sms, 3);
                sweep_decode<2, 2, 8, 1, 2>(p, batch, sms, 2);
            }
        });
        return 0;
    }
    /* --lut: the tiled kernel's launch shapes under each lookup mode (LutMode: 0 shared, 1 registers, 2 mixed) */
    if (argc > 1 && !strcmp(argv[1], "--lut")) {
        for_each_problem(shapes, [&](Problem &p) {
            for (int lut = 0; lut < 3; lut++) { /* the library's tiled shapes */
                auto small = lut == 0 ? sweep_tiled<TiledShape<8, 1, 1, 4, 4>, 4, 2, 0>
                           : lut == 1 ? sweep_tiled<TiledShape<8, 1, 1, 4, 4>, 4, 2, 1>
                                      : sweep_tiled<TiledShape<8, 1, 1, 4, 4>, 4, 2, 2>;
                auto large = lut == 0 ? sweep_tiled<TiledShape<8, 1, 1, 8, 4>, 2, 2, 0>
                           : lut == 1 ? sweep_tiled<TiledShape<8, 1, 1, 8, 4>, 2, 2, 1>
                                      : sweep_tiled<TiledShape<8, 1, 1, 8, 4>, 2, 2, 2>;
                small(p, 32, sms);
                large(p, 128, sms);
            }
        });
        return 0;
    }
    for_each_problem(shapes, [&](Problem &p) {
        for (int batch : {1, 8, 16}) {
            sweep_decode<1, 1, 8, 2, 2>(p, batch, sms, 2);
            sweep_decode<2, 1, 8, 1, 2>(p, batch, sms, 2);
        }
        for (int batch : {16, 32, 64, 128, 256}) {
            if (batch <= 32) {
                sweep_tiled<TiledShape<8, 1, 1, 2, 4>, 4, 2>(p, batch, sms);
                sweep_tiled<TiledShape<8, 1, 1, 2, 4>, 6, 2>(p, batch, sms);
                sweep_tiled<TiledShape<4, 1, 2, 2, 4>, 4, 4>(p, batch, sms);
            }
            if (batch <= 64 && batch >= 32) sweep_tiled<TiledShape<8, 1, 1, 4, 4>, 4, 2>(p, batch, sms);
            if (batch >= 32) sweep_tiled<TiledShape<8, 1, 1, 8, 4>, 4, 2>(p, batch, sms);
            if (batch >= 64) {
                sweep_tiled<TiledShape<8, 1, 1, 8, 4>, 2, 2>(p, batch, sms);
                sweep_tiled<TiledShape<4, 2, 2, 8, 3>, 3, 1>(p, batch, sms);
                sweep_tiled<TiledShape<8, 1, 1, 16, 3>, 3, 1>(p, batch, sms);
                sweep_tiled<TiledShape<4, 2, 1, 8, 4>, 4, 2>(p, batch, sms);
                if (!quick) {
                    sweep_tiled<TiledShape<2, 4, 4, 4, 3>, 2, 1>(p, batch, sms);
                    sweep_tiled<TiledShape<4, 1, 2, 8, 4>, 4, 2>(p, batch, sms);
                    sweep_tiled<TiledShape<8, 1, 2, 8, 3>, 3, 1>(p, batch, sms);
                }
            }
        }
    });
    return 0;
}
