#!/usr/bin/env bash
# Create .venv and install megatron-lite with its test extras, never replacing torch 2.13.0.
# torch goes in first, then everything else under constraints.txt; --no-build-isolation keeps
# packages that build from source (deepspeed) from pulling a second, CUDA-sized torch into their
# build environment.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade "pip>=23" setuptools wheel
.venv/bin/python -m pip install --quiet -c constraints.txt "torch==2.13.0"
.venv/bin/python -m pip install --quiet -c constraints.txt --no-build-isolation -e ".[dev]"
.venv/bin/python -c "import torch, megatron_lite; assert torch.__version__.startswith('2.13.0'), torch.__version__; print('megatron-lite ready, torch', torch.__version__)"
