#!/usr/bin/env bash
# Set up .venv with everything selfnpo needs, offline-friendly and idempotent.
# torch is installed first and pinned so that no dependency pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q --disable-pip-version-check --upgrade pip >/dev/null 2>&1 || true
python -c "import torch" 2>/dev/null || pip install -q --disable-pip-version-check "torch==${TORCH_VERSION:-2.13.0}"
pip install -q --disable-pip-version-check -c constraints.txt -e ".[dev]"
# only its bundled CLIP BPE vocabulary is used (never imported): no dependencies
python -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('open_clip') is None)" 2>/dev/null \
  || pip install -q --disable-pip-version-check --no-deps open_clip_torch==3.3.0
