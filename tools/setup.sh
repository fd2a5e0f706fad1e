#!/usr/bin/env bash
# Create .venv (if missing) and install edgesplit with every extra. torch is pinned to the CPU
# wheel first: a bare 'torch' requirement would otherwise pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
# Tools some tests need when run as root, as CI is: the bandwidth-shaping tests use `ip` and `tc`
# (iproute2), the agent's unit test checks its systemd unit with `systemd-analyze verify` (systemd).
# Install whichever is missing there rather than let those tests fail; nothing to do (no apt-get
# update) when all are present.
missing=()
{ command -v ip && command -v tc; } >/dev/null 2>&1 || missing+=(iproute2)
command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
if [ "$(id -u)" = 0 ] && [ "${#missing[@]}" -gt 0 ]; then
  if command -v apt-get >/dev/null 2>&1; then
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
  else
    echo "setup.sh: install ${missing[*]} with this system's package manager" >&2
  fi
fi
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
python -m pip install -q -e '.[build,server,edge,profile,dev,entropy,federate,ray,triton]'
# The Triton server binary (PyTriton's wheel, python backend, runs on CPU) that the tests of
# triton-export and `serve --backend triton` start; cached, so a second run costs nothing.
bash tools/fetch_tritonserver.sh >/dev/null ||
  echo "setup.sh: no Triton server for this Python (tools/fetch_tritonserver.sh failed): the Triton tests will skip" >&2
