#!/usr/bin/env bash
# Idempotent setup of a development/run environment in .venv:
#   torch==2.13.0 first (CPU wheel; plain `torch` would pull a multi-GB CUDA build),
#   then the project with its dev extras, then the offline SmolLM2-135M-Instruct model.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
"$VPY" -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null
if ! "$VPY" -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null; then
  "$VPY" -m pip install -q --disable-pip-version-check torch==2.13.0
fi
"$VPY" -m pip install -q --disable-pip-version-check -e ".[dev]"
.venv/bin/rscaffold models fetch
