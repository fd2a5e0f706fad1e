#!/usr/bin/env bash
# Tail engines on a GPU: the CUDA tests, then runtime-engine against bare-torch throughput per batch size.
#
#   tools/gpu_tail_bench.sh prepare   # here, on the CPU machine: stage .gpu/tail-bench (about 20 MB)
#   tools/gpu_tail_bench.sh run       # on the GPU machine, carrying .gpu/tail-bench; results in $OUT
#
# "prepare" copies the shipped bundles, the students they were exported from (runs/NAME/student.pt,
# not in git) and the test data the engine tests read. "run" adds tail.pt2 to each bundle copy with
# the GPU machine's own torch (a torch.export program is not portable to an older torch), runs
# tests/test_engines.py (its CUDA cases run there; TensorRT cases skip: that image has no
# TensorRT), then `edgesplit bench engine` for torch on CUDA at fp32/fp16/bf16, without and with
# CUDA graphs (and torch.compile at fp16), each against the bare torch program at the same batch
# sizes, plus ONNX Runtime on the CPU for reference. The GPU image has no pyzmq: nothing here needs it.
# $OUT gets one JSON-lines file per bundle, the pytest log and a summary table (8 files at most).
set -uo pipefail
cd "$(dirname "$0")/.."
S=.gpu/tail-bench
BUNDLES="cifar10-resnet20-bottlefit imagenette-resnet18-bottlefit"
BATCHES=${BATCHES:-1,4,16,64,256}
SECONDS_PER_BATCH=${SECONDS_PER_BATCH:-0.5}

if [ "${1:-}" = prepare ]; then
  set -e
  data=${EDGESPLIT_DATA:-../shared/data}
  rm -rf $S && mkdir -p $S/bundles $S/students $S/data/cifar10-jpeg $S/data/teachers
  for n in $BUNDLES; do
    [ -f runs/$n/student.pt ] || { echo "runs/$n/student.pt is missing: train or fetch the run first" >&2; exit 1; }
    cp -r models/$n $S/bundles/$n
    cp runs/$n/student.pt $S/students/$n.pt
  done
  cp $data/cifar10-jpeg/test-00000.tar.gz $S/data/cifar10-jpeg/
  cp $data/teachers/resnet56-4bfd9763.th $S/data/teachers/
  du -sh $S
  exit 0
fi
[ "${1:-}" = run ] || { echo "usage: $0 prepare|run" >&2; exit 2; }
[ -d $S/bundles ] || { echo "$S is missing: run '$0 prepare' and carry $S" >&2; exit 1; }
: "${OUT:?OUT must name the results folder}"
export EDGESPLIT_DATA=$PWD/$S/data PYTHONPATH=$PWD PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
W=/tmp/tail-bench && rm -rf $W && mkdir -p $W
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee $OUT/summary.txt
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a $OUT/summary.txt

# 1. tail.pt2 from each student, written into a copy of its bundle (the manifest is re-hashed).
for n in $BUNDLES; do
  cp -r $S/bundles/$n $W/$n
  $PY tools/add_torch_tail.py $W/$n $S/students/$n.pt || exit 1
done

# 2. The engine tests, CUDA cases included.
timeout 300 $PY -m pytest tests/test_engines.py -q -rs -p no:cacheprovider > $OUT/pytest.txt 2>&1
echo "pytest tests/test_engines.py: exit $? ($(tail -n 1 $OUT/pytest.txt))" | tee -a $OUT/summary.txt

# 3. Engine against bare torch, per bundle and configuration; one JSON document per line.
bench() {  # bundle, then bench engine flags
  local n=$1; shift
  timeout 150 $PY -m edgesplit bench engine --bundle $W/$n --batch-sizes $BATCHES --seconds $SECONDS_PER_BATCH \
    --json "$@" > $W/one.json 2> $W/one.err \
    && $PY -c "import json,sys; print(json.dumps(json.load(open(sys.argv[1]))))" $W/one.json >> $OUT/engine-$n.jsonl \
    || { echo "FAILED: $n $*"; tail -n 5 $W/one.err; } | tee -a $OUT/summary.txt
}
for n in $BUNDLES; do
  : > $OUT/engine-$n.jsonl
  bench $n --backend ort --threads 8
  for p in fp32 fp16 bf16; do
    bench $n --backend torch --device cuda --precision $p --bare-torch
    bench $n --backend torch --device cuda --precision $p --accel cudagraphs --bare-torch
  done
  bench $n --backend torch --device cuda --precision fp16 --accel compile
done

# 4. Summary: frames/s per batch size, engine / bare torch.
$PY - $OUT/engine-*.jsonl <<'PY' | tee -a $OUT/summary.txt
import json, sys
for path in sys.argv[1:]:
    for line in open(path):
        r = json.loads(line)
        label = f"{r['bundle']:<32} {r['backend']:<6} {r['device']:<7} {r['precision']:<5} {r['accel']:<10}"
        bare = {b["batch"]: b for b in r.get("bare_torch", [])}
        cells = []
        for e in r["engine"]:
            cell = f"b{e['batch']}: {e['frames_per_s']:9.0f} fps p50 {e['latency_ms_p50']:.3f} ms"
            if e["batch"] in bare:
                cell += f" (bare {bare[e['batch']]['frames_per_s']:.0f}, x{e['frames_per_s'] / bare[e['batch']]['frames_per_s']:.2f})"
            cells.append(cell)
        print(label, f"start {r['engine_start_s']:.1f}s")
        for c in cells:
            print("    " + c)
PY
ls -la $OUT
