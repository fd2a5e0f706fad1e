#!/usr/bin/env bash
# Side-by-side regression check of a refactor: the tree at BEFORE (a commit, checked out as a git
# worktree) and the working tree, alternated on one machine with the same venv and data.
#   bash tools/bench_before_after.sh BEFORE_COMMIT OUT_DIR [E2E_ROUNDS]
# Writes OUT_DIR/e2e-{before,after}-N.json and OUT_DIR/server-{before,after}.json.
set -euo pipefail
before_rev=$1; out=$2; rounds=${3:-5}
root=$(cd "$(dirname "$0")/.." && pwd)
. "$root/.venv/bin/activate"
export EDGESPLIT_DATA=${EDGESPLIT_DATA:-$root/../shared/data}
wt=$(mktemp -d)/before
git -C "$root" worktree add -q --detach "$wt" "$before_rev"
trap 'git -C "$root" worktree remove --force "$wt"' EXIT
mkdir -p "$out"
tree() { if [ "$1" = before ]; then echo "$wt"; else echo "$root"; fi; }
for round in $(seq 1 "$rounds"); do
  for side in before after; do
    (cd /tmp && PYTHONPATH=$(tree $side) python -m edgesplit bench e2e \
      --bundle "$root/models/cifar10-resnet20-bottlefit" --frames 1000 --json) > "$out/e2e-$side-$round.json"
  done
done
for side in before after; do
  (cd /tmp && PYTHONPATH=$(tree $side) python -m edgesplit bench server \
    --bundle "$root/models/imagenette-resnet18-bottlefit" --agents 1,4,16,32 --seconds 4 --json) > "$out/server-$side.json"
done
