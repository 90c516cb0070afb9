/* qckpt_cuda.h -- the C ABI of the CUDA extension (converter._native_cuda, built from native/cuda by nvcc).
 *
 * Conventions are qckpt.h's: every function returns a qckpt_status (QCKPT_OK is 0) and never prints or
 * exits; qckpt_cuda_last_error() holds the calling thread's message; sizes are int64_t. In addition:
 *   - data pointers are device memory; `stream` (the last parameter) is a cudaStream_t, typed void * so
 *     that this header needs no CUDA header (pass torch.cuda.current_stream().cuda_stream);
 *   - launches are asynchronous: a status covers argument checks and the launch itself;
 *   - NaN/inf found in data to be quantized is recorded on the device in a workspace (first flat index)
 *     and comes back as QCKPT_E_NONFINITE from qckpt_cuda_read_report(), which synchronizes the stream;
 *   - the bytes are those of the CPU library (converter/formats/reference.py): IEEE float32 with no
 *     contraction, reciprocals rounded once, strict compares against the same float32 thresholds.
 */
#ifndef QCKPT_CUDA_H
#define QCKPT_CUDA_H

#include <stdint.h>

#include "qckpt.h" /* qckpt_status, qckpt_dtype, qckpt_quant4 */

#ifdef __cplusplus
extern "C" {
#endif

/* int64 words of a workspace: [0] the bitwise complement of the first non-finite flat index (0: none, so
 * that an all-zero workspace is a fresh one), [1] float32 bits of the last exact mean, [2] a completion
 * counter, [3..258] per-exponent sums of the exact mean. */
enum { QCKPT_CUDA_WORKSPACE_WORDS = 259 };

/* Block scales of a 4-bit weight: plain float32 (absmax != NULL), or double-quantized
 * (absmax == NULL): scale[b] = code[codes[b]] * absmax2[b / blocksize2] + offset, two float32 roundings. */
typedef struct {
    const float *absmax;
    const uint8_t *codes;
    const float *absmax2;
    const float *code; /* 256 entries */
    float offset;
    int64_t blocksize2; /* a power of two */
} qckpt_cuda_scales;

const char *qckpt_cuda_last_error(void);

/* Ready a workspace for a new quantization (no non-finite seen, sums zero). */
qckpt_status qckpt_cuda_workspace_reset(int64_t *workspace, void *stream);

/* Synchronize `stream`, then read the workspace: *bad_index (-1 when none) and *mean. Returns
 * QCKPT_E_NONFINITE when a quantize call on this workspace met NaN or inf. */
qckpt_status qckpt_cuda_read_report(const int64_t *workspace, int64_t *bad_index, float *mean, void *stream);

/* qckpt_quantize_4bit on the device: x (n elements of `dtype`) -> packed (ceil(n/2)), absmax (ceil(n/bs)).
 * x must be 16-byte aligned and packed 4-byte aligned. sum_absmax != 0 also adds the absmax values to the
 * workspace's exact-mean sums (double quantization), for qckpt_cuda_quantize_blockwise8 with center 2:
 * the mean then needs no pass over absmax of its own. */
qckpt_status qckpt_cuda_quantize_4bit(const void *x, int32_t dtype, int64_t n, int64_t blocksize, int32_t quant_type,
                                      uint8_t *packed, float *absmax, int32_t sum_absmax, int64_t *workspace,
                                      void *stream);

/* Exact float32 mean of n non-negative finite values (summed exactly, rounded once, ties to even: as
 * reference.exact_mean_f32), written to the workspace's mean word. n < 2^39. */
qckpt_status qckpt_cuda_exact_mean(const float *values, int64_t n, int64_t *workspace, void *stream);


/* qckpt_quantize_blockwise8 on the device. center 1 first subtracts the workspace's mean from every x (one
 * float32 subtraction); center 2 first computes that mean (exact, as qckpt_cuda_exact_mean) from the sums a
 * qckpt_cuda_quantize_4bit call with sum_absmax left in the workspace, whose n absmax are this call's x, and
 * writes it to the workspace's mean word: the double quantization of absmax. code must be strictly
 * increasing. */
qckpt_status qckpt_cuda_quantize_blockwise8(const float *x, int64_t n, int64_t blocksize, const float *code,
                                            int32_t center, uint8_t *codes, float *absmax, int64_t *workspace,
                                            void *stream);

/* out[i] = code[codes[i]] * absmax[i / blocksize] + offset (float32, two roundings). */
qckpt_status qckpt_cuda_dequantize_blockwise8(const uint8_t *codes, const float *absmax, int64_t n, int64_t blocksize,
                                              const float *code, float offset, float *out, void *stream);

/* qckpt_dequantize_4bit on the device, with plain or double-quantized scales. */
qckpt_status qckpt_cuda_dequantize_4bit(const uint8_t *packed, const qckpt_cuda_scales *scales, int64_t n,
                                        int64_t blocksize, int32_t quant_type, void *out, int32_t out_dtype,
                                        void *stream);

/* qckpt_quantize_int8_rowwise on the device: x (rows, cols) -> q (rows, cols), scb (rows);
 * q = rint(x * ((1.0f / scb) * 127.0f)). */
qckpt_status qckpt_cuda_quantize_int8_rowwise(const void *x, int32_t dtype, int64_t rows, int64_t cols, int8_t *q,
                                              float *scb, int64_t *workspace, void *stream);

/* out[r, c] = cast<out_dtype>((q[r, c] * scb[r]) * (1/127 as float32)). */
qckpt_status qckpt_cuda_dequantize_int8_rowwise(const int8_t *q, const float *scb, int64_t rows, int64_t cols,
                                                void *out, int32_t out_dtype, void *stream);

/* Fused 4-bit dequantize + matmul:
 *   x (batch, k) @ dequant(W (n_out, k))^T -> y (batch, n_out), x and y in `dtype` (QCKPT_BF16 or QCKPT_F16).
 * The prefill kernel dequantizes weights as qckpt_dequantize_4bit does and rounds them to `dtype`; the decode
 * kernel either multiplies the code values rounded to `dtype` and applies each block's float32 scale to their
 * sums, or (one row, up to 8 rows of a tall weight, blocksize 32 or k % 64 == 32) multiplies the scaled weights
 * (code values rounded to `dtype` times the scale, rounded; for bfloat16 a bfloat16 scale). Products on the tensor
 * cores with float32 accumulation; results are deterministic. Two kernels: 1..16 rows (decode; needs k % 32 == 0
 * and n_out * k < 2^36) and 17..QCKPT_CUDA_GEMM_MAX_ROWS rows (prefill; needs k % 64 == 0), which may split k and
 * add the partial sums in `workspace` (qckpt_cuda_gemm_4bit_workspace bytes, 16-byte aligned, of which the first
 * qckpt_cuda_gemm_4bit_workspace_zeroed -- the split-K tile counters -- must be zero on entry; every call
 * leaves them zero, so one zero-filled workspace serves all later calls issued on one stream). x and packed must be 16-byte aligned. Returns QCKPT_E_UNSUPPORTED for inputs outside that (callers fall
 * back to dequantize + GEMM). On compute capability 9.0 the prefill rows run a Hopper kernel that reads the block
 * scales as one float32 per block: `expanded_scales` (from qckpt_cuda_gemm_4bit_expand_scales, kept with the
 * weight) saves re-making them in the workspace on every call; NULL makes them there. */
enum { QCKPT_CUDA_GEMM_MAX_ROWS = 128 };

/* Workspace bytes qckpt_cuda_gemm_4bit needs for these shapes on the current device (0: none);
 * scales_expanded != 0: the calls will pass expanded_scales (no room to make them is needed). */
qckpt_status qckpt_cuda_gemm_4bit_workspace(int64_t batch, int64_t n_out, int64_t k, int32_t scales_expanded,
                                            int64_t *bytes);

/* Leading bytes of a workspace of at least qckpt_cuda_gemm_4bit_workspace bytes that a call of these shapes
 * needs zero on entry: 0 when it does not split k, or when it zeroes them itself (the Hopper kernel without
 * expanded_scales: the kernel that makes them in the workspace clears the counters too); else the tile
 * counters. For a fresh workspace per call, as inside CUDA-graph capture, zeroing just these bytes is enough. */
qckpt_status qckpt_cuda_gemm_4bit_workspace_zeroed(int64_t batch, int64_t n_out, int64_t k, int64_t blocksize,
                                                   int32_t scales_expanded, int64_t *bytes);

qckpt_status qckpt_cuda_gemm_4bit(const void *x, int32_t dtype, int64_t batch, const uint8_t *packed,
                                  const qckpt_cuda_scales *scales, int64_t n_out, int64_t k, int64_t blocksize,
                                  int32_t quant_type, void *y, void *workspace, int64_t workspace_bytes,
                                  const float *expanded_scales, void *stream);

/* Bytes of a weight's expanded scales for qckpt_cuda_gemm_4bit on the current device: 0 when its prefill
 * kernel there does not read them (not compute capability 9.0, or a shape it does not take). */
qckpt_status qckpt_cuda_gemm_4bit_scales_bytes(int64_t n_out, int64_t k, int64_t blocksize, int64_t *bytes);

/* Fill `out` (qckpt_cuda_gemm_4bit_scales_bytes bytes, 16-byte aligned) with the weight's expanded scales,
 * on `stream`. */
qckpt_status qckpt_cuda_gemm_4bit_expand_scales(const qckpt_cuda_scales *scales, int64_t n_out, int64_t k,
                                                int64_t blocksize, float *out, void *stream);

/* ---- 8-bit optimizers (converter/optim; CPU original: qckpt_adamw8bit_step in qckpt.h) ----
 * The same steps on the device, with the same arguments plus the stream: every non-NaN parameter value,
 * code and absmax is the CPU kernel's bit for bit, and a NaN is NaN in the same places (its payload is
 * the hardware's: x86 propagates operand payloads, the GPU writes its canonical NaN). The maps must be
 * strictly increasing: the CPU function checks that, the device cannot without a synchronization, so
 * callers pass maps they have checked (converter.optim's are constants). */
#ifdef QCKPT_CUDA_CDEF_ONLY
/* cffi reads this header, not qckpt.h: the struct is repeated for it; C sees qckpt.h's definition and the
 * cffi build checks this one against it. */
typedef struct {
    float beta1, beta2;
    float one_minus_beta1, one_minus_beta2;
    float eps;
    float step_size;
    float bias_correction2_sqrt;
    float decay;
    int32_t maximize;
} qckpt_adamw_hparams;
#endif

qckpt_status qckpt_cuda_adamw8bit_step(void *param, int32_t param_dtype, const void *grad, int32_t grad_dtype,
                                       int64_t n, uint8_t *m_codes, float *m_absmax, const float *m_map,
                                       uint8_t *v_codes, float *v_absmax, const float *v_map, int64_t blocksize,
                                       const qckpt_adamw_hparams *hp, void *stream);

qckpt_status qckpt_cuda_adamw32_step(void *param, int32_t param_dtype, const void *grad, int32_t grad_dtype,
                                     int64_t n, float *m, float *v, const qckpt_adamw_hparams *hp, void *stream);

/* Unified memory (cudaMallocManaged) for the paged optimizer: the driver pages it between the GPU and the
 * host under memory pressure. alloc: `bytes` placed for `device` (the allocation's device, as torch reads
 * it); QCKPT_E_NOMEM when it cannot. free: synchronizes the device first (cudaFree), NULL is a no-op.
 * prefetch: migrate [ptr, ptr + bytes) to `device` (-1: the host) in stream order. is_managed: *managed is
 * 1 for a pointer into managed memory, else 0. */
qckpt_status qckpt_cuda_managed_alloc(int64_t bytes, int32_t device, void **ptr);
qckpt_status qckpt_cuda_managed_free(void *ptr);
qckpt_status qckpt_cuda_prefetch(const void *ptr, int64_t bytes, int32_t device, void *stream);
qckpt_status qckpt_cuda_is_managed(const void *ptr, int32_t *managed);

/* ---- many AdamW steps in one launch (converter/optim steps every parameter of a device this way) ----
 * One entry per parameter: 8-bit state (m_codes .. v_absmax, blocksize 256) or 32-bit state (m32, v32);
 * `first` is the entry's first 256-element work unit in the launch: entry i's first is the sum of
 * ceil(n / 256) over entries 0..i-1. Each entry has its own hyper-parameters (groups, step counts). */
typedef struct {
    void *param;
    const void *grad;
    int64_t n;
    uint8_t *m_codes, *v_codes;
    float *m_absmax, *v_absmax;
    float *m32, *v32;
    int64_t first;
    qckpt_adamw_hparams hp;
} qckpt_cuda_adam_tensor;

enum { QCKPT_CUDA_ADAM_MULTI_MAX = 512 }; /* entries per launch */

/* qckpt_cuda_adamw8bit_step for `count` parameters, all of param_dtype and grad_dtype, in one launch.
 * `host` (checked here) and `device` (read by the kernel, in device memory) hold the same entries.
 * Needs 16-byte aligned param and grad and 8-byte aligned codes (callers step others one by one). */
qckpt_status qckpt_cuda_adamw8bit_multi(const qckpt_cuda_adam_tensor *host, const qckpt_cuda_adam_tensor *device,
                                        int32_t count, int32_t param_dtype, int32_t grad_dtype, const float *m_map,
                                        const float *v_map, void *stream);

/* qckpt_cuda_adamw32_step for `count` parameters in one launch (as qckpt_cuda_adamw8bit_multi). */
qckpt_status qckpt_cuda_adamw32_multi(const qckpt_cuda_adam_tensor *host, const qckpt_cuda_adam_tensor *device,
                                      int32_t count, int32_t param_dtype, int32_t grad_dtype, void *stream);

#ifdef __cplusplus
}
#endif

#endif /* QCKPT_CUDA_H */
