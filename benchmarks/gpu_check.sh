#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py): sampling NPO vs CFG (SD1.5 and SDXL sizes, fp16),
# training step (fp16), memory, and 50-step Self-NPO LoRA runs with fp16 and bf16, in under
# 10 minutes on one GPU; writes OUT/gpu_check.json.
#   bash benchmarks/gpu_check.sh OUT               # on a GPU
#   bash benchmarks/gpu_check.sh OUT --cpu-smoke   # the same script with tiny models on the CPU
set -euo pipefail
out="${1:?usage: gpu_check.sh OUT_DIR [--cpu-smoke]}"
shift
here="$(cd "$(dirname "$0")" && pwd)"
export PYTHONPATH="$here/../src${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1
exec timeout 590 "${PYTHON:-python}" "$here/gpu_check.py" "$out" "$@"
