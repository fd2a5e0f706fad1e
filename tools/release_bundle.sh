#!/usr/bin/env bash
# Export a trained run into models/NAME, then record its eval (and e2e bench) JSON in docs/bench/.
#   tools/release_bundle.sh RUN_NAME DATA [JPEG_FRAMES]
# e.g. tools/release_bundle.sh cifar10-resnet20-bottlefit cifar10:test 2000
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
name=$1; data=$2; jpeg=${3:-2000}
edgesplit export runs/$name/student.pt --out models/$name --check-frames 256
edgesplit inspect models/$name
edgesplit eval --bundle models/$name --data "$data" --jpeg-frames "$jpeg" --threads 1 --json > docs/bench/eval-$name.json
python - "$name" <<'PY'
import json, sys
r = json.load(open(f"docs/bench/eval-{sys.argv[1]}.json"))
print({k: r[k] for k in ("frames", "accuracy", "teacher_accuracy", "bytes_per_frame", "input_jpeg_bytes_median",
                         "jpeg_accuracy_at_bytes", "jpeg_min_bytes")})
PY
