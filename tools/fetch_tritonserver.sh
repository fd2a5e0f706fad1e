#!/usr/bin/env bash
# The Triton Inference Server binary from PyTriton's wheel (PyPI: nvidia-pytriton), for the tests of
# `edgesplit triton-export` and `edgesplit serve --backend triton` (tests/test_triton_*.py).
#
# The wheel carries tritonserver with the python backend only (no onnxruntime backend), built with
# CUDA but running on a CPU-only machine. Only the server's files are unpacked (pip installing the
# wheel would pin numpy<2 in the environment); the python backend stub matching this interpreter is
# put where the backend looks for it, with a Python home of its own (stub-home/, below). Prints the
# folder holding bin/ and backends/; the tests find it there by default, or through
# EDGESPLIT_TRITONSERVER.
#
#   tools/fetch_tritonserver.sh [DEST]     (default: ${EDGESPLIT_CACHE:-~/.cache/edgesplit}/pytriton-VERSION)
set -euo pipefail
VERSION=${PYTRITON_VERSION:-0.7.0}
PY=${PYTHON:-python}
DEST=${1:-${EDGESPLIT_CACHE:-$HOME/.cache/edgesplit}/pytriton-$VERSION}
SERVER="$DEST/pytriton/tritonserver"
if [ -x "$SERVER/bin/tritonserver" ]; then
  echo "$SERVER"
  exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp" "$DEST.tmp"' EXIT
"$PY" -m pip download --quiet --no-deps --only-binary=:all: "nvidia-pytriton==$VERSION" -d "$tmp" >&2
rm -rf "$DEST.tmp"
mkdir -p "$DEST.tmp"
unzip -q "$tmp"/nvidia_pytriton-*.whl 'pytriton/tritonserver/*' 'nvidia_pytriton.libs/*' -d "$DEST.tmp"
pyver=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
stub="$DEST.tmp/pytriton/tritonserver/python_backend_stubs/$pyver/triton_python_backend_stub"
if [ ! -f "$stub" ]; then
  echo "fetch_tritonserver: PyTriton $VERSION has no python backend stub for Python $pyver" >&2
  exit 1
fi
cp "$stub" "$DEST.tmp/pytriton/tritonserver/backends/python/"
# The stub embeds this interpreter's libpython, which would load this environment's numpy 2, and
# the stub (built against numpy 1) then sends empty outputs ("output tensor shape does not match
# size"). So the stub gets a Python home of its own: this interpreter's standard library (links)
# and a site-packages with numpy<2 and this environment's onnxruntime version. The embedded
# interpreter finds its home from `python3` on PATH (bin/python3 is only that marker), so the
# tests put stub-home/bin first on tritonserver's PATH.
home="$DEST.tmp/pytriton/tritonserver/stub-home"
stdlib=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
mkdir -p "$home/bin" "$home/lib/python$pyver/site-packages"
for f in "$stdlib"/*; do
  [ "$(basename "$f")" = site-packages ] || ln -s "$f" "$home/lib/python$pyver/$(basename "$f")"
done
printf '#!/bin/sh\n# marker: the python backend stub takes this folder as its Python home\nexit 1\n' >"$home/bin/python3"
chmod +x "$home/bin/python3"
ort=$("$PY" -c 'import onnxruntime; print(onnxruntime.__version__)')
"$PY" -m pip install --quiet --no-warn-conflicts --target "$home/lib/python$pyver/site-packages" \
  "numpy<2" "onnxruntime==$ort" >&2
rm -rf "$DEST"
mv "$DEST.tmp" "$DEST"
echo "$SERVER"
