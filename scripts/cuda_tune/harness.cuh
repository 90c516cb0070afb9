/* harness.cuh -- what the tuning harnesses in scripts/cuda_tune/ share: a checked CUDA call and the
 * timing rule (median of 7 runs of 24 back-to-back launches, timed with events, inputs rotated over
 * `rotate` copies so L2 cannot serve them). Not part of the library. */
#ifndef QCKPT_CUDA_TUNE_HARNESS_CUH
#define QCKPT_CUDA_TUNE_HARNESS_CUH

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <vector>

#include <cuda_runtime.h>

#define CK(call)                                                                                   \
    do {                                                                                           \
        cudaError_t e_ = (call);                                                                   \
        if (e_ != cudaSuccess) {                                                                   \
            fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(e_)); \
            exit(1);                                                                               \
        }                                                                                          \
    } while (0)

/* Microseconds per launch(copy) call: one warm-up pass over the copies, then the median of 7 runs. */
inline float time_us(const std::function<void(int)> &launch, int rotate) {
    cudaEvent_t a, b;
    CK(cudaEventCreate(&a));
    CK(cudaEventCreate(&b));
    for (int i = 0; i < rotate; i++) launch(i);
    std::vector<float> ms;
    for (int rep = 0; rep < 7; rep++) {
        CK(cudaEventRecord(a));
        for (int i = 0; i < 24; i++) launch(i % rotate);
        CK(cudaEventRecord(b));
        CK(cudaEventSynchronize(b));
        float t;
        CK(cudaEventElapsedTime(&t, a, b));
        ms.push_back(t * 1000.0f / 24);
    }
    CK(cudaGetLastError());
    std::sort(ms.begin(), ms.end());
    CK(cudaEventDestroy(a));
    CK(cudaEventDestroy(b));
    return ms[3];
}

#endif
