/* parallel.c -- a fork/join over contiguous ranges with pthreads (no pool: calls are coarse enough
 * that thread start-up, ~20 us, is noise). Exec validation and ISA resolution live here too. */
#define _DEFAULT_SOURCE /* madvise/MADV_HUGEPAGE under -std=c11 */
#include <pthread.h>
#include <stdint.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "internal.h"

typedef struct {
    qckpt_range_fn fn;
    void *ctx;
    int64_t begin, end;
    int32_t worker;
} range_job;

static void *run_job(void *arg) {
    range_job *job = (range_job *)arg;
    job->fn(job->ctx, job->begin, job->end, job->worker);
    return NULL;
}

qckpt_status qckpt_parallel_for(int64_t n_items, int64_t min_grain, int32_t threads, qckpt_range_fn fn, void *ctx) {
    if (n_items <= 0) return QCKPT_OK;
    if (min_grain < 1) min_grain = 1;
    int64_t chunks = qk_ceil_div(n_items, min_grain);
    if (chunks > threads) chunks = threads;
    if (chunks < 1) chunks = 1;
    range_job jobs[QCKPT_MAX_THREADS];
    pthread_t tids[QCKPT_MAX_THREADS];
    int64_t per = n_items / chunks, extra = n_items % chunks, at = 0;
    for (int64_t c = 0; c < chunks; c++) {
        int64_t len = per + (c < extra);
        jobs[c] = (range_job){fn, ctx, at, at + len, (int32_t)c};
        at += len;
    }
    int64_t started = 1;
    qckpt_status status = QCKPT_OK;
    for (int64_t c = 1; c < chunks; c++, started++) {
        if (pthread_create(&tids[c], NULL, run_job, &jobs[c]) != 0) {
            status = qckpt_fail(QCKPT_E_THREAD, "could not start worker thread %lld of %lld", (long long)c,
                                (long long)chunks);
            break;
        }
    }
    /* Run chunk 0 here, then any chunk whose thread failed to start, so the work always completes. */
    run_job(&jobs[0]);
    for (int64_t c = started; c < chunks; c++) run_job(&jobs[c]);
    for (int64_t c = 1; c < started; c++) pthread_join(tids[c], NULL);
    return status == QCKPT_E_THREAD ? QCKPT_OK : status;
}

int32_t qckpt_best_isa(void) {
#ifdef QCKPT_HAVE_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) return QCKPT_ISA_AVX512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c") && __builtin_cpu_supports("fma"))
        return QCKPT_ISA_AVX2;
#endif
#ifdef QCKPT_HAVE_NEON
    return QCKPT_ISA_NEON; /* mandatory on AArch64: no run-time check needed */
#endif
    return QCKPT_ISA_SCALAR;
}

qckpt_status qckpt_resolve_exec(const qckpt_exec *exec, int32_t *threads, int32_t *isa) {
    qckpt_clear_error();
    if (exec == NULL) return qckpt_fail(QCKPT_E_INVALID, "exec settings pointer is NULL");
    if (exec->threads < 1) return qckpt_fail(QCKPT_E_INVALID, "threads must be >= 1, got %d", exec->threads);
    *threads = exec->threads > QCKPT_MAX_THREADS ? QCKPT_MAX_THREADS : exec->threads;
    int32_t best = qckpt_best_isa();
    switch (exec->isa) {
    case QCKPT_ISA_AUTO: *isa = best; return QCKPT_OK;
    case QCKPT_ISA_SCALAR: *isa = QCKPT_ISA_SCALAR; return QCKPT_OK;
    case QCKPT_ISA_AVX2:
    case QCKPT_ISA_AVX512:
        /* x86 variants are ordered: AVX-512 hardware runs AVX2 too, never the reverse. */
        if ((best != QCKPT_ISA_AVX2 && best != QCKPT_ISA_AVX512) || exec->isa > best)
            return qckpt_fail(QCKPT_E_UNSUPPORTED, "ISA variant %d is not supported by this CPU", exec->isa);
        *isa = exec->isa;
        return QCKPT_OK;
    case QCKPT_ISA_NEON:
        if (best != QCKPT_ISA_NEON)
            return qckpt_fail(QCKPT_E_UNSUPPORTED, "ISA variant %d is not supported by this CPU", exec->isa);
        *isa = exec->isa;
        return QCKPT_OK;
    default: return qckpt_fail(QCKPT_E_INVALID, "unknown ISA variant %d", exec->isa);
    }
}

void qk_advise_hugepages(void *p, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    /* First-touch page faults of a fresh output cost more than the kernels (4 KiB faults run at ~4 GB/s
     * here, dequantization at ~40 GB/s). Backing the 2 MiB-aligned interior with transparent huge pages
     * cuts the faults 512-fold. Only the buffer's own interior is advised; failure is harmless. */
    const uintptr_t huge = (uintptr_t)1 << 21;
    if (p == NULL || bytes < (int64_t)(4 * huge)) return;
    uintptr_t begin = ((uintptr_t)p + huge - 1) & ~(huge - 1);
    uintptr_t end = ((uintptr_t)p + (uintptr_t)bytes) & ~(huge - 1);
    if (end > begin) (void)madvise((void *)begin, end - begin, MADV_HUGEPAGE);
#else
    (void)p;
    (void)bytes;
#endif
}
