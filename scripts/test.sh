#!/usr/bin/env bash
# Set up (once) and run the whole test suite on a CPU machine. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The compat folder holds a CPU-only `sitecustomize` (no torchvision here); on PYTHONPATH so that
# vLLM's subprocesses load it too. See genrecal_cache/compat/sitecustomize.py.
export PYTHONPATH="$PWD/genrecal_cache/compat${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# pytest exits 5 when no test ran; set -e turns that (like any failure) into a failed run.
.venv/bin/python -m pytest -q "$@"
