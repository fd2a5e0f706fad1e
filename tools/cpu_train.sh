#!/usr/bin/env bash
# Train the shipped bundles' models on this machine's CPUs (no GPU lent): CIFAR-10, Imagenette,
# then the shared-teacher experiment, one after another so each gets both cores. Resumable.
set -u
cd "$(dirname "$0")/.."
. .venv/bin/activate
export PYTHONUNBUFFERED=1
for r in cifar10-resnet20-bottlefit-cpu imagenette-resnet18-bottlefit-cpu cifar10-sharedteacher-bottlefit-cpu; do
  name=$(grep '^name:' models/recipes/$r.yaml | awk '{print $2}')
  [ -f runs/$name/results.json ] && continue
  edgesplit train models/recipes/$r.yaml --run-dir runs/$name --workers 2 > runs/$name.log 2>&1
done
