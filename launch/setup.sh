#!/usr/bin/env bash
# Create .venv and install ftprof with its test extras. Safe to re-run.
#   bash launch/setup.sh            # CPU machines: torch 2.13.0 (CPU build where a local wheel exists)
#   FTPROF_TORCH=torch bash launch/setup.sh   # GPU machines: whatever CUDA torch pip resolves
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
# torch first: a plain `torch` requirement would otherwise pull a multi-GB CUDA build onto CPU machines.
.venv/bin/python -m pip install -q "${FTPROF_TORCH:-torch==2.13.0}" 2>&1 | grep -v '^WARNING: Location' || true
.venv/bin/python -m pip install -q -e '.[test]' 2>&1 | grep -v '^WARNING: Location' || true
.venv/bin/python -c "import ftprof, torch, deepspeed, transformers; print('ftprof', ftprof.__version__, '| torch', torch.__version__, '| deepspeed', deepspeed.__version__, '| transformers', transformers.__version__)"
