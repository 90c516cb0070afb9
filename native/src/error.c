/* error.c -- the per-thread message behind qckpt_last_error(). Kernels never print or exit. */
#include <stdarg.h>
#include <stdio.h>

#include "internal.h"

static _Thread_local char last_error[512];

const char *qckpt_last_error(void) { return last_error; }

void qckpt_clear_error(void) { last_error[0] = '\0'; }

qckpt_status qckpt_fail(qckpt_status status, const char *fmt, ...) {
    va_list args;
    va_start(args, fmt);
    vsnprintf(last_error, sizeof last_error, fmt, args);
    va_end(args);
    return status;
}
