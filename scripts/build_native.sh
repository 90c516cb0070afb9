#!/usr/bin/env bash
# Rebuild the native CPU extension in place after editing native/ (what `pip install -e .` does).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python setup.py -q build_ext --inplace 2>&1 | grep -vE "Warning|warn|^\s*$|!!|\*\*\*|deprecated|Please|See https|By 20|or your builds|corresp|setuptools" || true
python -c "import converter.kernels.cpu as c; print('native CPU extension OK, best ISA:', c.best_isa())"
