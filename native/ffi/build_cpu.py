"""cffi builder (out-of-line API mode) for converter._native_cpu.

The cdef is read from native/include/qckpt.h itself, so the C compiler checks every declaration that
Python relies on against the real definitions in native/src.
"""
import os
import pathlib
import platform
import re

from cffi import FFI

NATIVE = pathlib.Path(__file__).resolve().parent.parent
HEADER = NATIVE / "include" / "qckpt.h"


def cdef_from_header(text: str) -> str:
    """The header minus comments, preprocessor lines and the C++ guard, which cffi cannot parse."""
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    text = re.sub(r"#ifdef __cplusplus.*?#endif", "", text, flags=re.S)
    return "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))


def _compile_args():
    args = ["-O3", "-std=c11", "-pthread", "-ffp-contract=off", "-fno-strict-aliasing"]
    # Variants are chosen at run time with function target attributes: no -march here, so the
    # extension runs on any CPU of the architecture. QCKPT_CFLAGS lets a packager add flags.
    args += os.environ.get("QCKPT_CFLAGS", "").split()
    return args


def _sources():
    # Paths relative to the project root: setuptools refuses absolute source paths.
    root = NATIVE.parent
    return sorted(str(p.relative_to(root)) for p in (NATIVE / "src").glob("*.c"))


ffibuilder = FFI()
ffibuilder.cdef(cdef_from_header(HEADER.read_text()))
ffibuilder.set_source(
    "converter._native_cpu",
    '#include "qckpt.h"',
    sources=_sources(),
    include_dirs=[str(NATIVE / "include")],
    extra_compile_args=_compile_args() if platform.system() != "Windows" else [],
    extra_link_args=["-pthread"] if platform.system() != "Windows" else [],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
