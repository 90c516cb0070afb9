/* managed.cu -- CUDA unified memory for the paged optimizer (converter/optim/paged.py): allocate, free,
 * prefetch to a device or the host, and ask whether a pointer is managed. Host code only; tested through
 * converter.kernels.optim_cuda in tests/test_cuda_optim.py. */
#include "common.cuh"

namespace {

/* Make `device` current for the scope (cudaMallocManaged records the current device as the allocation's
 * device, which torch reads back to place the tensor). */
struct DeviceScope {
    int previous = -1;
    cudaError_t err = cudaSuccess;
    explicit DeviceScope(int device) {
        err = cudaGetDevice(&previous);
        if (err == cudaSuccess && previous != device) err = cudaSetDevice(device);
    }
    ~DeviceScope() {
        if (previous >= 0) cudaSetDevice(previous);
    }
};

qckpt_status check_device(int32_t device) {
    int count = 0;
    cudaError_t err = cudaGetDeviceCount(&count);
    if (err != cudaSuccess) return qk::fail(QCKPT_E_INVALID, "no CUDA device: %s", cudaGetErrorString(err));
    if (device < 0 || device >= count)
        return qk::fail(QCKPT_E_INVALID, "device %d out of range (%d CUDA devices)", device, count);
    return QCKPT_OK;
}

}  // namespace

extern "C" qckpt_status qckpt_cuda_managed_alloc(int64_t bytes, int32_t device, void **ptr) {
    if (!ptr) return qk::fail(QCKPT_E_INVALID, "NULL output pointer");
    *ptr = nullptr;
    if (bytes <= 0) return qk::fail(QCKPT_E_INVALID, "byte count must be positive, got %lld", (long long)bytes);
    qckpt_status st = check_device(device);
    if (st != QCKPT_OK) return st;
    int managed = 0;
    cudaError_t err = cudaDeviceGetAttribute(&managed, cudaDevAttrManagedMemory, device);
    if (err == cudaSuccess && !managed)
        return qk::fail(QCKPT_E_UNSUPPORTED, "device %d cannot allocate managed memory", device);
    DeviceScope scope(device);
    if (err == cudaSuccess) err = scope.err;
    if (err == cudaSuccess) err = cudaMallocManaged(ptr, (size_t)bytes, cudaMemAttachGlobal);
    if (err != cudaSuccess) {
        *ptr = nullptr;
        cudaGetLastError(); /* an allocation failure is not sticky: do not leave it for the next launch check */
        const qckpt_status code = err == cudaErrorMemoryAllocation ? QCKPT_E_NOMEM : QCKPT_E_INVALID;
        return qk::fail(code, "cudaMallocManaged of %lld bytes on device %d: %s", (long long)bytes, device,
                        cudaGetErrorString(err));
    }
    return QCKPT_OK;
}

extern "C" qckpt_status qckpt_cuda_managed_free(void *ptr) {
    if (!ptr) return QCKPT_OK;
    const cudaError_t err = cudaFree(ptr); /* synchronizes: no kernel still uses the memory */
    if (err != cudaSuccess) return qk::fail(QCKPT_E_INVALID, "freeing managed memory: %s", cudaGetErrorString(err));
    return QCKPT_OK;
}

extern "C" qckpt_status qckpt_cuda_prefetch(const void *ptr, int64_t bytes, int32_t device, void *stream) {
    if (!ptr) return qk::fail(QCKPT_E_INVALID, "NULL pointer");
    if (bytes <= 0) return qk::fail(QCKPT_E_INVALID, "byte count must be positive, got %lld", (long long)bytes);
    if (device != -1) {
        qckpt_status st = check_device(device);
        if (st != QCKPT_OK) return st;
        /* Without concurrent managed access (Windows, WSL, some virtual GPUs) prefetching is an error;
         * the driver migrates pages on demand there, so prefetching is skipped rather than refused. */
        int concurrent = 0;
        if (cudaDeviceGetAttribute(&concurrent, cudaDevAttrConcurrentManagedAccess, device) != cudaSuccess) {
            cudaGetLastError();
            concurrent = 0;
        }
        if (!concurrent) return QCKPT_OK;
    }
#if CUDART_VERSION >= 13000
    cudaMemLocation where{};
    where.type = device < 0 ? cudaMemLocationTypeHost : cudaMemLocationTypeDevice;
    where.id = device < 0 ? 0 : device;
    const cudaError_t err = cudaMemPrefetchAsync(ptr, (size_t)bytes, where, 0, (cudaStream_t)stream);
#else
    const cudaError_t err =
        cudaMemPrefetchAsync(ptr, (size_t)bytes, device < 0 ? cudaCpuDeviceId : device, (cudaStream_t)stream);
#endif
    if (err != cudaSuccess) {
        cudaGetLastError();
        return qk::fail(QCKPT_E_INVALID, "prefetching %lld bytes to %s %d: %s", (long long)bytes,
                        device < 0 ? "host" : "device", device, cudaGetErrorString(err));
    }
    return QCKPT_OK;
}

extern "C" qckpt_status qckpt_cuda_is_managed(const void *ptr, int32_t *managed) {
    if (!managed) return qk::fail(QCKPT_E_INVALID, "NULL output pointer");
    *managed = 0;
    if (!ptr) return QCKPT_OK;
    cudaPointerAttributes attr;
    const cudaError_t err = cudaPointerGetAttributes(&attr, ptr);
    if (err != cudaSuccess) {
        cudaGetLastError();
        return qk::fail(QCKPT_E_INVALID, "querying pointer attributes: %s", cudaGetErrorString(err));
    }
    *managed = attr.type == cudaMemoryTypeManaged;
    return QCKPT_OK;
}
