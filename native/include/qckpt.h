/* qckpt.h -- the C ABI between Python (cffi, out-of-line API mode) and the native kernels.
 *
 * This header is the only contract: native/ffi/build_cpu.py feeds it to cffi's cdef, and the compiler
 * checks every declaration against the definitions in native/src. Conventions (STYLE.md):
 *   - every function returns a qckpt_status; QCKPT_OK is 0; nothing prints or exits;
 *   - on failure, qckpt_last_error() returns a message for the calling thread;
 *   - sizes are int64_t; outputs are pointer parameters; arrays are contiguous;
 *   - the arithmetic is IEEE float32 exactly as converter/formats/reference.py defines it, identical on
 *     every ISA variant and for every thread count.
 */
#ifndef QCKPT_H
#define QCKPT_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum {
    QCKPT_OK = 0,
    QCKPT_E_INVALID = 1,    /* a bad argument: size, blocksize, dtype, quant type */
    QCKPT_E_NONFINITE = 2,  /* NaN or inf in an input that is to be quantized */
    QCKPT_E_NOMEM = 3,      /* allocation failed */
    QCKPT_E_THREAD = 4,     /* a worker thread could not be started */
    QCKPT_E_UNSUPPORTED = 5 /* an ISA variant was requested that this CPU or build lacks */
} qckpt_status;

typedef enum { QCKPT_F32 = 0, QCKPT_F16 = 1, QCKPT_BF16 = 2 } qckpt_dtype;

typedef enum { QCKPT_NF4 = 0, QCKPT_FP4 = 1 } qckpt_quant4;

typedef enum {
    QCKPT_ISA_AUTO = 0,   /* the best variant this CPU supports */
    QCKPT_ISA_SCALAR = 1, /* portable C: the reference the SIMD variants must equal byte for byte */
    QCKPT_ISA_AVX2 = 2,   /* AVX2 + F16C */
    QCKPT_ISA_AVX512 = 3, /* AVX-512 F + BW */
    QCKPT_ISA_NEON = 4    /* AArch64 Advanced SIMD (always present there) */
} qckpt_isa;

/* How a call runs: worker count (>= 1) and ISA variant. Passed by every kernel entry point. */
typedef struct {
    int32_t threads;
    int32_t isa;
} qckpt_exec;

/* Message describing the last failure on the calling thread ("" when none). */
const char *qckpt_last_error(void);

/* The variant QCKPT_ISA_AUTO resolves to on this CPU (a qckpt_isa value). */
int32_t qckpt_best_isa(void);

/* Blockwise 4-bit quantization over the flattened input x (n elements of `dtype`).
 *   packed (ceil(n/2),): code[2j] << 4 | code[2j+1]; an odd n pads with the code of 0.0
 *   absmax (ceil(n/blocksize),): float32 max |x| per block
 * blocksize: a power of two in [32, 4096]. Returns QCKPT_E_NONFINITE (with the flat index in the
 * message) if x holds NaN or inf. */
qckpt_status qckpt_quantize_4bit(const void *x, int32_t dtype, int64_t n, int64_t blocksize, int32_t quant_type,
                                 uint8_t *packed, float *absmax, const qckpt_exec *exec);

/* out[i] = cast<out_dtype>(LUT[code_i] * absmax[i / blocksize]), one float32 multiply, RNE cast. */
qckpt_status qckpt_dequantize_4bit(const uint8_t *packed, const float *absmax, int64_t n, int64_t blocksize,
                                   int32_t quant_type, void *out, int32_t out_dtype, const qckpt_exec *exec);

/* Blockwise 8-bit quantization of float32 x against a sorted 256-entry code map: nearest entry by
 * float32 midpoints, exact ties to the even index (CUDA's rule). codes (n,), absmax (ceil(n/blocksize),). */
qckpt_status qckpt_quantize_blockwise8(const float *x, int64_t n, int64_t blocksize, const float *code,
                                       uint8_t *codes, float *absmax, const qckpt_exec *exec);

/* out[i] = code[codes[i]] * absmax[i / blocksize] + offset, two float32 roundings (no FMA). */
qckpt_status qckpt_dequantize_blockwise8(const uint8_t *codes, const float *absmax, int64_t n, int64_t blocksize,
                                         const float *code, float offset, float *out, const qckpt_exec *exec);

/* Row-wise int8 (LLM.int8 weights): x (rows, cols) -> scb[r] = max |x[r, :]| (float32),
 * q[r, c] = round_half_even(x[r, c] * ((1.0f / scb[r]) * 127.0f)) (bnb's torch arithmetic); an all-zero
 * row gives zeros. */
qckpt_status qckpt_quantize_int8_rowwise(const void *x, int32_t dtype, int64_t rows, int64_t cols, int8_t *q,
                                         float *scb, const qckpt_exec *exec);

/* out[r, c] = cast<out_dtype>((q[r, c] * scb[r]) * (1/127 as float32)). */
qckpt_status qckpt_dequantize_int8_rowwise(const int8_t *q, const float *scb, int64_t rows, int64_t cols, void *out,
                                           int32_t out_dtype, const qckpt_exec *exec);

/* Fused 4-bit dequantize + matmul for small batches:
 *   W (n_out, k) stored as packed 4-bit blocks over the flattened weight, absmax float32 per block
 *   x (batch, k) float32 row-major  ->  y (batch, n_out) float32 = x @ dequant(W)^T
 * Weights are dequantized to float32 exactly as qckpt_dequantize_4bit does (before any rounding to a
 * compute dtype); accumulation is float32. */
qckpt_status qckpt_gemm_4bit(const float *x, int64_t batch, const uint8_t *packed, const float *absmax,
                             int64_t n_out, int64_t k, int64_t blocksize, int32_t quant_type, float *y,
                             const qckpt_exec *exec);

/* ---- 8-bit optimizers (converter/optim; reference: converter/optim/reference.py) ----
 * One AdamW step (decoupled weight decay, bias correction) for one parameter, fused: dequantize the
 * moments, update them and the parameter, re-quantize the moments. Every scalar below is float32,
 * computed once per step by the caller (in double, rounded once), so C and the reference share them. */
typedef struct {
    float beta1, beta2;                   /* moment decay rates */
    float one_minus_beta1, one_minus_beta2;
    float eps;
    float step_size;             /* lr / (1 - beta1^t) */
    float bias_correction2_sqrt; /* sqrt(1 - beta2^t) */
    float decay;                 /* 1 - lr * weight_decay (exactly 1.0f without weight decay) */
    int32_t maximize;            /* nonzero: ascend, i.e. use -grad */
} qckpt_adamw_hparams;

/* Per element, all float32, each operation rounded once (no FMA), g = grad (negated if maximize):
 *   m = m_map[m_codes] * m_absmax[blk] * beta1 + g * (1-beta1)      (i.e. (m0*beta1) + (g*(1-beta1)))
 *   v = v_map[v_codes] * v_absmax[blk] * beta2 + (g*g) * (1-beta2)
 *   p = p * decay - step_size * (m / (sqrt(v) / bias_correction2_sqrt + eps)), stored RNE in param_dtype
 * then m and v are re-quantized blockwise like qckpt_quantize_blockwise8 (absmax, 1.0f/absmax, nearest
 * map entry by float32 midpoints, ties to the even index, NaN -> 0). Maps: 256 strictly increasing
 * float32 values (signed dynamic map for m, unsigned for v). param (n,) and grad (n,) in any qckpt_dtype;
 * m_codes, v_codes (n,) uint8 and m_absmax, v_absmax (ceil(n/blocksize),) float32 are updated in place.
 * blocksize in [1, 4096]. The result is identical for every ISA variant and thread count. */
qckpt_status qckpt_adamw8bit_step(void *param, int32_t param_dtype, const void *grad, int32_t grad_dtype, int64_t n,
                                  uint8_t *m_codes, float *m_absmax, const float *m_map, uint8_t *v_codes,
                                  float *v_absmax, const float *v_map, int64_t blocksize,
                                  const qckpt_adamw_hparams *hp, const qckpt_exec *exec);

/* The same step with float32 moments m (n,), v (n,) updated in place (small tensors keep 32-bit state). */
qckpt_status qckpt_adamw32_step(void *param, int32_t param_dtype, const void *grad, int32_t grad_dtype, int64_t n,
                                float *m, float *v, const qckpt_adamw_hparams *hp, const qckpt_exec *exec);

#ifdef __cplusplus
}
#endif

#endif /* QCKPT_H */
