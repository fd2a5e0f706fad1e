#!/usr/bin/env bash
# The project's test command (README, .ci/run): set up, then run the whole suite on real data.
# pytest's exit code 5 (no tests collected) is a failure here, never a pass.
set -uo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh || { echo "setup failed"; exit 1; }
. .venv/bin/activate
python -m pytest -q -ra "$@"
rc=$?
if [ $rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi
exit $rc
