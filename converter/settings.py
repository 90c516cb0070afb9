"""The only Python reader of QCKPT_* environment variables; read at call time, never cached.

One test-only switch is read by C instead: QCKPT_OPTIM_NO_VBMI makes the AVX-512 AdamW8bit kernel use
its gather path on a VBMI CPU, so the tests can compare both paths (native/src/optim8.c)."""
import os

from .errors import QuantizationInputError


def default_threads() -> int:
    """Thread count for native kernels: QCKPT_THREADS, else every core this process may use."""
    raw = os.environ.get("QCKPT_THREADS", "").strip()
    if raw:
        try:
            value = int(raw)
        except ValueError:
            raise QuantizationInputError(f"QCKPT_THREADS must be a positive integer, got {raw!r}") from None
        if value < 1:
            raise QuantizationInputError(f"QCKPT_THREADS must be a positive integer, got {raw!r}")
        return value
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS has no sched_getaffinity
        return max(1, os.cpu_count() or 1)


def resolve_threads(threads: int | None) -> int:
    """An explicit `threads=` wins over the environment; validate it."""
    if threads is None:
        return default_threads()
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise QuantizationInputError(f"threads must be a positive integer, got {threads!r}")
    return threads


def forced_isa() -> str | None:
    """QCKPT_ISA=scalar|avx2|avx512|neon pins the CPU kernel variant (for parity tests and benchmarks)."""
    raw = os.environ.get("QCKPT_ISA", "").strip().lower()
    return raw or None


def debug() -> bool:
    """QCKPT_DEBUG=1 makes the CLI print tracebacks."""
    return os.environ.get("QCKPT_DEBUG", "").strip() not in ("", "0", "false", "no")
