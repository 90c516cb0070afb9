/* optim8.cu -- launchers of the fused AdamW steps (kernels/optim8.cuh): the device side of
 * qckpt_adamw8bit_step / qckpt_adamw32_step, with the CPU functions' argument checks. */
#include <algorithm>
#include <cstdio>

#include "kernels/optim8.cuh"

namespace {

qckpt_status check_common(void *param, int32_t param_dtype, const void *grad, int32_t grad_dtype, int64_t n,
                          const qckpt_adamw_hparams *hp) {
    if (!param || !grad || !hp) return qk::fail(QCKPT_E_INVALID, "NULL data pointer");
    if (n <= 0) return qk::fail(QCKPT_E_INVALID, "element count must be positive, got %lld", (long long)n);
    if (param_dtype != QCKPT_F32 && param_dtype != QCKPT_F16 && param_dtype != QCKPT_BF16)
        return qk::fail(QCKPT_E_INVALID, "unknown parameter dtype %d", param_dtype);
    if (grad_dtype != QCKPT_F32 && grad_dtype != QCKPT_F16 && grad_dtype != QCKPT_BF16)
        return qk::fail(QCKPT_E_INVALID, "unknown gradient dtype %d", grad_dtype);
    return QCKPT_OK;
}

template <typename P, typename G>
void launch_adam8(void *param, const void *grad, const qk::Adam8Args &a, cudaStream_t stream) {
    P *p = static_cast<P *>(param);
    const G *g = static_cast<const G *>(grad);
    const int64_t nb = qk::ceil_div(a.n, a.blocksize);
    if (a.blocksize == 256 && qk::aligned(param, 16) && qk::aligned(grad, 16) && qk::aligned(a.m_codes, 8) &&
        qk::aligned(a.v_codes, 8)) {
        const int64_t blocks = std::min<int64_t>(qk::ceil_div(nb, 8), int64_t(qk::sm_count()) * 8);
        qk::adam8_warp256_kernel<P, G><<<(unsigned)blocks, 256, 0, stream>>>(p, g, a);
        return;
    }
    const int threads = a.blocksize >= 256 ? 256 : 32 * (int)qk::ceil_div(a.blocksize, 32);
    const int64_t per_sm = std::min(32, 2048 / threads); /* resident thread blocks per SM at most */
    const int64_t blocks = std::min<int64_t>(nb, int64_t(qk::sm_count()) * per_sm);
    qk::adam8_block_kernel<P, G><<<(unsigned)blocks, threads, 0, stream>>>(p, g, a);
}

}  // namespace

extern "C" qckpt_status qckpt_cuda_adamw8bit_step(void *param, int32_t param_dtype, const void *grad,
                                                  int32_t grad_dtype, int64_t n, uint8_t *m_codes, float *m_absmax,
                                                  const float *m_map, uint8_t *v_codes, float *v_absmax,
                                                  const float *v_map, int64_t blocksize,
                                                  const qckpt_adamw_hparams *hp, void *stream) {
    qckpt_status st = check_common(param, param_dtype, grad, grad_dtype, n, hp);
    if (st != QCKPT_OK) return st;
    if (!m_codes || !m_absmax || !m_map || !v_codes || !v_absmax || !v_map)
        return qk::fail(QCKPT_E_INVALID, "NULL state pointer");
    if (blocksize < 1 || blocksize > qk::kOptimMaxBlock)
        return qk::fail(QCKPT_E_INVALID, "blocksize must be in [1, %d], got %lld", qk::kOptimMaxBlock,
                        (long long)blocksize);
    const qk::Adam8Args a{n, blocksize, m_codes, v_codes, m_absmax, v_absmax, m_map, v_map, *hp};
    const cudaStream_t s = (cudaStream_t)stream;
    QK_DISPATCH_DTYPE(param_dtype, P, QK_DISPATCH_DTYPE(grad_dtype, G, launch_adam8<P, G>(param, grad, a, s)));
    return qk::check_launch("adamw8bit_step");
}

extern "C" qckpt_status qckpt_cuda_adamw32_step(void *param, int32_t param_dtype, const void *grad,
                                                int32_t grad_dtype, int64_t n, float *m, float *v,
                                                const qckpt_adamw_hparams *hp, void *stream) {
    qckpt_status st = check_common(param, param_dtype, grad, grad_dtype, n, hp);
    if (st != QCKPT_OK) return st;
    if (!m || !v) return qk::fail(QCKPT_E_INVALID, "NULL state pointer");
    const int64_t blocks = std::min<int64_t>(qk::ceil_div(n, 256), int64_t(qk::sm_count()) * 16);
    const qckpt_adamw_hparams h = *hp;
    const cudaStream_t s = (cudaStream_t)stream;
    QK_DISPATCH_DTYPE(param_dtype, P, QK_DISPATCH_DTYPE(grad_dtype, G,
        qk::adam32_kernel<P, G><<<(unsigned)blocks, 256, 0, s>>>(static_cast<P *>(param),
                                                                 static_cast<const G *>(grad), n, m, v, h)));
    return qk::check_launch("adamw32_step");
}

namespace {

/* The host copy of a multi-launch table: every entry usable, the firsts consistent; *units = their total. */
qckpt_status check_multi(const qckpt_cuda_adam_tensor *host, const qckpt_cuda_adam_tensor *device, int32_t count,
                         int32_t param_dtype, int32_t grad_dtype, bool eight_bit, int64_t *units) {
    if (!host || !device) return qk::fail(QCKPT_E_INVALID, "NULL tensor table");
    if (count < 1 || count > QCKPT_CUDA_ADAM_MULTI_MAX)
        return qk::fail(QCKPT_E_INVALID, "tensor count must be in [1, %d], got %d", QCKPT_CUDA_ADAM_MULTI_MAX, count);
    int64_t next = 0;
    for (int32_t i = 0; i < count; i++) {
        const qckpt_cuda_adam_tensor &e = host[i];
        qckpt_status st = check_common(e.param, param_dtype, e.grad, grad_dtype, e.n, &e.hp);
        if (st != QCKPT_OK) {
            char why[200]; /* fail() writes the buffer qckpt_cuda_last_error() returns: copy it first */
            snprintf(why, sizeof why, "%s", qckpt_cuda_last_error());
            return qk::fail(st, "tensor %d: %s", i, why);
        }
        if (eight_bit) {
            if (!e.m_codes || !e.m_absmax || !e.v_codes || !e.v_absmax)
                return qk::fail(QCKPT_E_INVALID, "tensor %d: NULL state pointer", i);
            if (!qk::aligned(e.param, 16) || !qk::aligned(e.grad, 16) || !qk::aligned(e.m_codes, 8) ||
                !qk::aligned(e.v_codes, 8))
                return qk::fail(QCKPT_E_INVALID, "tensor %d: param and grad must be 16-byte, codes 8-byte aligned", i);
        } else if (!e.m32 || !e.v32) {
            return qk::fail(QCKPT_E_INVALID, "tensor %d: NULL state pointer", i);
        }
        if (e.first != next)
            return qk::fail(QCKPT_E_INVALID, "tensor %d: first work unit %lld, expected %lld", i, (long long)e.first,
                            (long long)next);
        next += qk::ceil_div(e.n, 256);
    }
    *units = next;
    return QCKPT_OK;
}

unsigned multi_grid(int64_t units) { /* 8 warps a block, a unit a warp */
    return (unsigned)std::min<int64_t>(qk::ceil_div(units, 8), int64_t(qk::sm_count()) * 8);
}

}  // namespace

extern "C" qckpt_status qckpt_cuda_adamw8bit_multi(const qckpt_cuda_adam_tensor *host,
                                                   const qckpt_cuda_adam_tensor *device, int32_t count,
                                                   int32_t param_dtype, int32_t grad_dtype, const float *m_map,
                                                   const float *v_map, void *stream) {
    int64_t units = 0;
    qckpt_status st = check_multi(host, device, count, param_dtype, grad_dtype, true, &units);
    if (st != QCKPT_OK) return st;
    if (!m_map || !v_map) return qk::fail(QCKPT_E_INVALID, "NULL code map");
    const cudaStream_t s = (cudaStream_t)stream;
    QK_DISPATCH_DTYPE(param_dtype, P, QK_DISPATCH_DTYPE(grad_dtype, G,
        qk::adam8_multi_kernel<P, G><<<multi_grid(units), 256, 0, s>>>(device, count, units, m_map, v_map)));
    return qk::check_launch("adamw8bit_multi");
}

extern "C" qckpt_status qckpt_cuda_adamw32_multi(const qckpt_cuda_adam_tensor *host,
                                                 const qckpt_cuda_adam_tensor *device, int32_t count,
                                                 int32_t param_dtype, int32_t grad_dtype, void *stream) {
    int64_t units = 0;
    qckpt_status st = check_multi(host, device, count, param_dtype, grad_dtype, false, &units);
    if (st != QCKPT_OK) return st;
    const cudaStream_t s = (cudaStream_t)stream;
    QK_DISPATCH_DTYPE(param_dtype, P, QK_DISPATCH_DTYPE(grad_dtype, G,
        qk::adam32_multi_kernel<P, G><<<multi_grid(units), 256, 0, s>>>(device, count, units)));
    return qk::check_launch("adamw32_multi");
}
