#!/usr/bin/env bash
# Create .venv (if missing) and install edgesplit with every extra. torch is pinned to the CPU
# wheel first: a bare 'torch' requirement would otherwise pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
python -m pip install -q -e '.[build,server,edge,profile,dev]'
