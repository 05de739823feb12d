#!/usr/bin/env bash
# GPU check of the extraction path, on a machine with a CUDA GPU and this repository:
#
#     bash benchmarks/gpu_check.sh                          # runs in the repository root
#     WHEELS=/path/to/wheels bash benchmarks/gpu_check.sh   # install the dependencies from wheels first
#
# Needs python3 (or $PYTHON) with a CUDA build of torch, transformers, tokenizers, safetensors, numpy, xxhash and
# tqdm; no virtual environment and no install of this package (PYTHONPATH=.), no network (the model is a
# GPT-2-small-size model with seeded random weights, built locally into $EMO_ASSETS_MODEL_CACHE).
# Runs `python -m benchmarks --device cuda` on the baseline dataset repeated 8 times (2,240 sentences, 39k tokens,
# 24 tensors of 768 per token = 2.75 GB per file in fp32): the bare-forward floor, extraction with fp32 and bf16
# compute (including writing, checksum and fsync of the activation file) and a short batch-size sweep, once with
# fp32 storage and once with bf16 storage; prints samples/s (target: >= 2,000 samples/s incl. writes).
# About 2-3 minutes (hard limit per pass: $BENCH_TIMEOUT, default 200 s). Exit status 0 = it ran.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [[ -n "${WHEELS:-}" ]]; then
    "$PYTHON" -m pip install --quiet --no-index --find-links "$WHEELS" \
        torch transformers tokenizers safetensors numpy xxhash tqdm huggingface-hub
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export EMO_ASSETS_MODEL_CACHE="${EMO_ASSETS_MODEL_CACHE:-${TMPDIR:-/tmp}/emo_assets_models}"
export HF_HUB_OFFLINE=1
OUT=${BENCH_OUT:-results/bench/gpu}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PYTHON" -c 'import sys, torch
if not torch.cuda.is_available():
    sys.exit(f"no CUDA device visible to torch {torch.__version__}")
print("torch", torch.__version__, "CUDA", torch.version.cuda, torch.cuda.get_device_name(), flush=True)'
common=(--device cuda --repeat "${REPEAT:-8}" --batch-size "${BATCH:-512}" --reps "${REPS:-3}"
        --sweep "${SWEEP:-128,512,1024}" --sweep-reps 1)
timeout "${BENCH_TIMEOUT:-200}" "$PYTHON" -m benchmarks "${common[@]}" --storage-dtype float32 \
    --skip seed,tl,nnsight,rss,graph --out "$OUT/fp32-storage"
timeout "${BENCH_TIMEOUT:-200}" "$PYTHON" -m benchmarks "${common[@]}" --storage-dtype bfloat16 \
    --skip seed,tl,nnsight,rss,graph,sweep --out "$OUT/bf16-storage"
"$PYTHON" - "$OUT" <<'PY'
import json, sys
from pathlib import Path
target = 2000.0
print(f"\nGPU extraction incl. writing, checksum and fsync (target >= {target:,.0f} samples/s):")
for storage in ("fp32", "bf16"):
    rows = {r["key"]: r for r in json.loads((Path(sys.argv[1]) / f"{storage}-storage" / "latest.json").read_text())["rows"]}
    floor = rows.get("1", {}).get("samples_per_s")
    for key, compute in (("2", "fp32"), ("7", "bf16")):
        rate = (rows.get(key) or {}).get("samples_per_s")
        verdict = "no result" if not rate else ("PASS" if rate >= target else "MISS")
        print(f"  {compute} compute, {storage} storage: {rate or 0:8,.0f} samples/s  {verdict}"
              f"   (bare forward floor {floor or 0:,.0f}/s)")
PY
