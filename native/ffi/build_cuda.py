"""cffi builder (out-of-line API mode) for converter._native_cuda, the CUDA kernels of native/cuda.

nvcc compiles native/cuda/*.cu to position-independent objects (sm_80, sm_86, sm_89, sm_90 machine code
plus compute_90 PTX for newer GPUs); cffi then compiles its C glue with the host compiler and links those
objects with the static CUDA runtime, so the extension needs no libcudart at run time (torch's CUDA
context is the driver's primary context, which every runtime shares).

    python native/ffi/build_cuda.py          # build in place: converter/_native_cuda*.so
    python native/ffi/build_cuda.py --check  # compile the .cu files only (CI: catches build errors)
    QCKPT_CUDA_ARCHES=90 python native/ffi/build_cuda.py  # fewer targets: a faster build for one known GPU

`ffibuilder` is a callable for setup.py's cffi_modules (list it only when find_nvcc() finds nvcc).
The cdef is read from native/cuda/qckpt_cuda.h itself, so the compiler checks Python's view of the ABI.
"""
from __future__ import annotations

import concurrent.futures
import os
import pathlib
import re
import shutil
import subprocess
import sys

NATIVE = pathlib.Path(__file__).resolve().parent.parent
ROOT = NATIVE.parent
CUDA_SRC = NATIVE / "cuda"
HEADER = CUDA_SRC / "qckpt_cuda.h"
BUILD = ROOT / "build" / "cuda"

ARCHES = ("80", "86", "89", "90")
# Byte-exact arithmetic: no contraction, IEEE division and square root, no flush to zero.
NVCC_FLAGS = ["-O3", "-std=c++17", "-fmad=false", "-prec-div=true", "-prec-sqrt=true", "-ftz=false",
              "-Xcompiler", "-fPIC", "-lineinfo"]


def selected_arches() -> tuple:
    """ARCHES, or the comma-separated list in QCKPT_CUDA_ARCHES (gpu_check.sh builds for the card it runs on)."""
    chosen = tuple(a.strip() for a in os.environ.get("QCKPT_CUDA_ARCHES", "").split(",") if a.strip())
    return chosen or ARCHES


def gencode_flags(arches=ARCHES, hopper_features: bool = False) -> list[str]:
    """-gencode flags: SASS for each arch and PTX for the last. hopper_features (files named *_sm90a.cu, whose
    wgmma/TMA instructions exist only on sm_90a) builds 90 as sm_90a and defines QCKPT_HAVE_SM90A, without
    which their launchers decline every call: their PTX stays plain compute_90, where the kernels are traps."""
    def sass(a: str) -> str:
        a = a + "a" if hopper_features and a == "90" else a
        return f"-gencode=arch=compute_{a},code=sm_{a}"
    flags = [sass(a) for a in arches] + [f"-gencode=arch=compute_{arches[-1]},code=compute_{arches[-1]}"]
    return flags + (["-DQCKPT_HAVE_SM90A=1"] if hopper_features and "90" in arches else [])


def nvcc_major(nvcc: str) -> int:
    """The toolkit's major version (0 when `nvcc --version` does not say)."""
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    found = re.search(r"release (\d+)\.", out)
    return int(found.group(1)) if found else 0


def find_nvcc() -> str | None:
    """$NVCC, nvcc on PATH, or the toolkit under $CUDA_HOME / $CUDA_PATH / /usr/local/cuda."""
    candidates = [os.environ.get("NVCC"), shutil.which("nvcc")]
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(os.path.join(os.environ[var], "bin", "nvcc"))
    candidates.append("/usr/local/cuda/bin/nvcc")
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def cuda_lib_dir(nvcc: str) -> str | None:
    """The folder holding libcudart_static.a, found from the compiler's own search paths."""
    out = subprocess.run([nvcc, "--dryrun", "-o", "/dev/null", "x.cu"], capture_output=True, text=True).stderr
    dirs = re.findall(r"-L\"?([^\s\"]+)", out)
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    roots += [str(pathlib.Path(d).parent) for d in dirs]
    dirs += [os.path.join(r, sub) for r in roots if r for sub in ("lib64", "lib", "targets/x86_64-linux/lib")]
    return next((d for d in dirs if os.path.exists(os.path.join(d, "libcudart_static.a"))), None)


def cu_sources() -> list[pathlib.Path]:
    return sorted(CUDA_SRC.glob("*.cu"))


def compile_objects(nvcc: str, out_dir: pathlib.Path = BUILD, arches=ARCHES) -> list[str]:
    """nvcc -c every .cu (in parallel); raises CalledProcessError with nvcc's message on failure."""
    out_dir.mkdir(parents=True, exist_ok=True)
    includes = [f"-I{NATIVE / 'include'}", f"-I{CUDA_SRC}"]
    hopper_toolkit = nvcc_major(nvcc) >= 12

    def one(src: pathlib.Path) -> str:
        obj = out_dir / (src.stem + ".o")
        hopper = src.stem.endswith("_sm90a") and hopper_toolkit  # sm_90a and TMA need CUDA 12
        cmd = [nvcc, *NVCC_FLAGS, *gencode_flags(arches, hopper), *includes, "-c", str(src), "-o", str(obj)]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        return str(obj)

    workers = max(1, min(len(cu_sources()), os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return list(pool.map(one, cu_sources()))


def link_check(nvcc: str, objs: list, out_dir: pathlib.Path) -> None:
    """Link the objects into a throwaway shared library: a symbol defined twice (a non-template kernel in a
    header that two .cu files include) or never defined fails here, not first on the GPU host. Raises
    CalledProcessError with the linker's message."""
    subprocess.run([nvcc, "-shared", "-Xlinker", "--no-undefined", *objs, "-o", str(out_dir / "link_check.so")],
                   check=True, capture_output=True, text=True)


def cdef_from_header(text: str) -> str:
    """The header minus comments, preprocessor lines and the C++ guard; qckpt_status comes from qckpt.h."""
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    text = re.sub(r"#ifdef __cplusplus.*?#endif", "", text, flags=re.S)
    body = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    return "typedef int... qckpt_status;\n" + body


def make_builder(nvcc: str):
    from cffi import FFI

    lib_dir = cuda_lib_dir(nvcc)
    if lib_dir is None:
        raise RuntimeError(f"libcudart_static.a not found for {nvcc}")
    ffi = FFI()
    ffi.cdef(cdef_from_header(HEADER.read_text()))
    ffi.set_source(
        "converter._native_cuda",
        '#include "qckpt_cuda.h"',
        include_dirs=[str(NATIVE / "include"), str(CUDA_SRC)],
        extra_objects=compile_objects(nvcc, arches=selected_arches()),
        library_dirs=[lib_dir],
        libraries=["cudart_static", "rt", "pthread", "dl", "stdc++"],
    )
    return ffi


def ffibuilder():
    """For setup.py's cffi_modules (cffi calls a callable it finds there): compile the .cu files with
    nvcc and return the FFI. List it only where find_nvcc() is not None; importing this module compiles
    nothing."""
    nvcc = find_nvcc()
    if nvcc is None:
        raise RuntimeError("nvcc not found: the CUDA extension cannot be built here")
    return make_builder(nvcc)


def build_in_place() -> pathlib.Path:
    """Build converter/_native_cuda*.so next to converter/_native_cpu (what `pip install -e .` would do)."""
    nvcc = find_nvcc()
    if nvcc is None:
        raise SystemExit("nvcc not found: the CUDA extension is optional and was not built")
    tmp = BUILD / "ffi"
    so = pathlib.Path(make_builder(nvcc).compile(tmpdir=str(tmp)))
    target = ROOT / "converter" / so.name
    shutil.copy2(so, target.with_suffix(".tmp"))
    os.replace(target.with_suffix(".tmp"), target)
    return target


if __name__ == "__main__":
    if "--check" in sys.argv:
        found = find_nvcc()
        if found is None:
            print("nvcc not found: CUDA compile check skipped")
            raise SystemExit(0)
        objs = compile_objects(found, BUILD / "check", arches=("80",) if "--quick" in sys.argv else ARCHES)
        link_check(found, objs, BUILD / "check")
        print(f"compiled and linked {len(objs)} CUDA sources with {found}")
    else:
        print(f"built {build_in_place()}")
