#!/usr/bin/env bash
# The project's test command (README, .ci/run): set up, check the habits (ruff lint and format,
# mypy on the contracts and both endpoints: config in pyproject.toml), then run the whole suite on
# real data. A failed check fails the run, but pytest still runs so one run reports everything.
# pytest's exit code 5 (no tests collected) is a failure here, never a pass.
set -uo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh || { echo "setup failed"; exit 1; }
. .venv/bin/activate
checks=0
run_check() {
  echo "== $*"
  "$@" || { echo "FAILED: $*"; checks=1; }
}
run_check ruff check .
run_check ruff format --check .
run_check mypy
python -m pytest -q -ra "$@"
rc=$?
if [ $rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi
if [ $rc -eq 0 ] && [ $checks -ne 0 ]; then echo "tests passed, but a check above failed"; exit 1; fi
exit $rc
