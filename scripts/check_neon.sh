#!/usr/bin/env bash
# Cross-compile the native library + tests/native/neon_parity.c for AArch64 and run it under qemu:
# the NEON 4-bit variant must equal the scalar variant byte for byte (no ARM hardware needed).
# Needs aarch64-linux-gnu-gcc and qemu-aarch64 (Debian: apt-get install gcc-aarch64-linux-gnu qemu-user).
# Usage: scripts/check_neon.sh [seed]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
CC=${CC_AARCH64:-aarch64-linux-gnu-gcc}
QEMU=${QEMU_AARCH64:-qemu-aarch64}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
# Same flags as native/ffi/build_cpu.py; -static so qemu needs no AArch64 sysroot. All of native/src is
# compiled so that this also proves the whole library builds for AArch64.
"$CC" -O2 -std=c11 -static -ffp-contract=off -fno-strict-aliasing -pthread -Wall -Wextra -Wno-unused-parameter \
    -Inative/include -Inative/src native/src/*.c tests/native/neon_parity.c -lm -o "$out/neon_parity"
"$QEMU" "$out/neon_parity" "${1:-$RANDOM}"
