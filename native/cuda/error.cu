/* error.cu -- per-thread error message, launch checks, and the workspace (reset, and the one call that
 * synchronizes: reading back the first non-finite index and the exact mean). Host code only. */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "common.cuh"

namespace qk {

static thread_local char last_error[512];

qckpt_status fail(qckpt_status status, const char *fmt, ...) {
    va_list args;
    va_start(args, fmt);
    vsnprintf(last_error, sizeof last_error, fmt, args);
    va_end(args);
    return status;
}

qckpt_status check_launch(const char *what) {
    cudaError_t err = cudaGetLastError();
    if (err == cudaSuccess) return QCKPT_OK;
    return fail(QCKPT_E_INVALID, "%s: CUDA launch failed: %s", what, cudaGetErrorString(err));
}

int sm_count() {
    int device = 0, count = 0;
    if (cudaGetDevice(&device) != cudaSuccess) return 1;
    if (cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) return 1;
    return count > 0 ? count : 1;
}

bool is_sm90() {
    int device = 0, major = 0, minor = 0;
    if (cudaGetDevice(&device) != cudaSuccess) return false;
    if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) return false;
    if (cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess) return false;
    return major == 9 && minor == 0;
}

qckpt_status make_scales(const qckpt_cuda_scales *in, Scales *out) {
    if (!in) return fail(QCKPT_E_INVALID, "NULL scales");
    *out = Scales{in->absmax, in->codes, in->absmax2, in->code, in->offset, 0};
    if (in->absmax) return QCKPT_OK;
    if (!in->codes || !in->absmax2 || !in->code) return fail(QCKPT_E_INVALID, "NULL nested scale pointer");
    out->log2_bs2 = log2_exact(in->blocksize2);
    if (out->log2_bs2 < 0)
        return fail(QCKPT_E_INVALID, "nested blocksize must be a power of two, got %lld", (long long)in->blocksize2);
    return QCKPT_OK;
}

}  // namespace qk

extern "C" const char *qckpt_cuda_last_error(void) { return qk::last_error; }

extern "C" qckpt_status qckpt_cuda_workspace_reset(int64_t *workspace, void *stream) {
    if (!workspace) return qk::fail(QCKPT_E_INVALID, "NULL workspace");
    cudaStream_t s = (cudaStream_t)stream;
    /* all zero: no bad index, zero sums (one memset: each is a node of a captured graph) */
    const cudaError_t err = cudaMemsetAsync(workspace, 0, QCKPT_CUDA_WORKSPACE_WORDS * sizeof(int64_t), s);
    if (err != cudaSuccess) return qk::fail(QCKPT_E_INVALID, "workspace reset: %s", cudaGetErrorString(err));
    return QCKPT_OK;
}

extern "C" qckpt_status qckpt_cuda_read_report(const int64_t *workspace, int64_t *bad_index, float *mean,
                                               void *stream) {
    if (!workspace || !bad_index || !mean) return qk::fail(QCKPT_E_INVALID, "NULL pointer");
    int64_t words[2];
    cudaStream_t s = (cudaStream_t)stream;
    cudaError_t err = cudaMemcpyAsync(words, workspace, sizeof words, cudaMemcpyDeviceToHost, s);
    if (err == cudaSuccess) err = cudaStreamSynchronize(s);
    if (err != cudaSuccess) return qk::fail(QCKPT_E_INVALID, "reading the workspace: %s", cudaGetErrorString(err));
    uint32_t bits = (uint32_t)(uint64_t)words[1];
    memcpy(mean, &bits, sizeof bits);
    *bad_index = qk::has_bad_index((uint64_t)words[0]) ? (int64_t)~(uint64_t)words[0] : -1;
    if (*bad_index >= 0)
        return qk::fail(QCKPT_E_NONFINITE, "NaN or inf at flat index %lld", (long long)*bad_index);
    return QCKPT_OK;
}
