#!/usr/bin/env bash
# The test command: installs what is missing, starts the local stack (real Kafka,
# PostgreSQL, MongoDB protocol, Prefect), lints, and runs every test against it.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh tests/test_codec.py -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/local/go/bin"
bash scripts/bootstrap.sh

started_here=0
if ! .venv/bin/python -m stack status >/dev/null 2>&1; then started_here=1; fi
.venv/bin/python -m stack up
stop_stack() {
  if [ "$started_here" = 1 ] || [ "${CI:-}" = true ]; then .venv/bin/python -m stack down; fi
}
trap stop_stack EXIT

.venv/bin/ruff check .
.venv/bin/python -m pytest "$@"
