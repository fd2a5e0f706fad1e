#!/usr/bin/env bash
# The server daemon on a GPU: frames/s at 32 agents with and without batching (torch tail on CUDA),
# next to the tail engine alone and the bare torch program at the same batch sizes.
#
#   tools/gpu_server_bench.sh prepare   # here, on the CPU machine: stage .gpu/server-bench (about 35 MB)
#   tools/gpu_server_bench.sh run       # on the GPU machine, carrying .gpu/server-bench; results in $OUT
#
# "prepare" copies the shipped Imagenette bundle and the student it was exported from
# (runs/NAME/student.pt, not in git), one Imagenette val shard (the frames the agents send, through
# the bundle's head, and their expected logits), and downloads wheels for what the GPU image lacks:
# pyzmq and zstandard (msgpack too, pinned to the version used here), for its Python 3.12.
# "run" installs the wheels into /tmp/site, adds tail.pt2 to a copy of the bundle with the GPU
# machine's own torch (a torch.export program is not portable to an older torch), then runs
# `edgesplit bench server --backend torch --device cuda` (servers with --max-batch 32 and
# --max-batch 1, agents 1 and 32, with --bare-torch) at fp32 and bf16, and bf16 with CUDA graphs
# and 4 requests in flight per agent. The machine has 16 cores, so unlike the 2-core CPU box the
# load generator does not compete with the daemon. Targets (issue 4): batched >= 4x unbatched
# frames/s at 32 agents; runtime tail (engine) >= 0.9x bare torch at the same batch.
# $OUT gets one JSON per run and a summary table.
#
# Device budget: about 5 minutes of runs after the machine starts. Call with timeout_s 600 and
# carry .gpu/server-bench.
set -uo pipefail
cd "$(dirname "$0")/.."
S=.gpu/server-bench
N=imagenette-resnet18-bottlefit

if [ "${1:-}" = prepare ]; then
  set -e
  data=${EDGESPLIT_DATA:-../shared/data}
  [ -f runs/$N/student.pt ] || { echo "runs/$N/student.pt is missing: train or fetch the run first" >&2; exit 1; }
  rm -rf $S && mkdir -p $S/bundles $S/students $S/data/imagenette-224 $S/wheels
  cp -r models/$N $S/bundles/$N
  cp runs/$N/student.pt $S/students/$N.pt
  cp $data/imagenette-224/val-00000.tar.gz $S/data/imagenette-224/
  PIP=${PIP:-.venv/bin/pip}
  plats=""
  for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    plats="$plats --platform $p"
  done
  $PIP download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $plats -d $S/wheels \
    "pyzmq==$($PIP show pyzmq | sed -n 's/^Version: //p')" \
    "zstandard==$($PIP show zstandard | sed -n 's/^Version: //p')" \
    "msgpack==$($PIP show msgpack | sed -n 's/^Version: //p')"
  ls $S/wheels
  du -sh $S
  exit 0
fi
[ "${1:-}" = run ] || { echo "usage: $0 prepare|run" >&2; exit 2; }
[ -d $S/bundles ] || { echo "$S is missing: run '$0 prepare' and carry $S" >&2; exit 1; }
: "${OUT:?OUT must name the results folder}"
PY=${PYTHON:-python3}
$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $S/wheels/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD EDGESPLIT_DATA=$PWD/$S/data PYTHONUNBUFFERED=1
W=/tmp/server-bench && rm -rf $W && mkdir -p $W
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee $OUT/summary.txt
$PY -c "import torch, zmq; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'pyzmq', zmq.__version__)" | tee -a $OUT/summary.txt

# 1. tail.pt2 from the student, written into a copy of the bundle (the manifest is re-hashed).
cp -r $S/bundles/$N $W/$N
$PY tools/add_torch_tail.py $W/$N $S/students/$N.pt || exit 1

# 2. The daemon with and without batching, the engine alone and bare torch; one JSON per run.
bench() {  # name, then bench server flags
  local name=$1; shift
  timeout 170 $PY -m edgesplit bench server --bundle $W/$N --backend torch --device cuda --agents 1,32 \
    --seconds 4 --warmup-s 2 --engine-seconds 1 --threads 4 --bare-torch --tolerance 0.1 --json "$@" \
    > $OUT/server-gpu-$name.json 2> $W/$name.err \
    || { echo "FAILED: $name $*"; tail -n 20 $W/$name.err; } | tee -a $OUT/summary.txt
}
bench fp32 --precision fp32
bench bf16 --precision bf16
bench bf16-cudagraphs-w4 --precision bf16 --accel cudagraphs --window 4

# 3. Summary: per run, frames/s at 32 agents batched vs unbatched, and engine / bare torch.
$PY - $OUT/server-gpu-*.json <<'PY' | tee -a $OUT/summary.txt
import json, sys
for path in sys.argv[1:]:
    try:
        r = json.load(open(path))
    except ValueError:
        continue
    a = r["at_max_agents"]
    print(f"{path.rsplit('/', 1)[-1]:<38} {r['precision']} {r['accel']} window {r['window']}: {a['agents']} agents batched "
          f"{a['batched_frames_per_s']} fps (batch {a['batch_size_p50']}), unbatched {a['unbatched_frames_per_s']} fps, "
          f"x{a['batched_over_unbatched']}; daemon/engine {a['efficiency']}")
    for e in r["engine"]:
        b = e["batch"]
        print(f"    batch {b:>3}: engine {e['frames_per_s']:9.0f} fps, bare torch "
              f"{next(x['frames_per_s'] for x in r['bare_torch'] if x['batch'] == b):9.0f} fps, "
              f"engine/bare x{r['engine_over_bare_torch'][str(b)]}")
PY
ls -la $OUT
