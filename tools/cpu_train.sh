#!/usr/bin/env bash
# Train the shipped bundles' models on this machine's CPUs (no GPU lent), resumably.
# Two chains run side by side, one torch thread each (on two cores, two single-threaded jobs get
# more done than one job with two threads, and never oversubscribe the cores):
#   chain A: CIFAR-10 (shipped), then Imagenette (shipped);  chain B: the shared-teacher experiment.
set -u
cd "$(dirname "$0")/.."
. .venv/bin/activate
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
train() {
  local r=$1 name
  name=$(grep '^name:' models/recipes/$r.yaml | awk '{print $2}')
  [ -f runs/$name/results.json ] && return 0
  edgesplit train models/recipes/$r.yaml --run-dir runs/$name --workers 1 >> runs/$name.log 2>&1
}
chain_a() { train cifar10-resnet20-bottlefit-cpu; train imagenette-resnet18-bottlefit-cpu; }
chain_b() { train cifar10-sharedteacher-bottlefit-cpu; }
chain_a & chain_b & wait
