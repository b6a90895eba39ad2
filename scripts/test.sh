#!/usr/bin/env bash
# The test command: installs what is missing, starts the local stack (real Kafka,
# PostgreSQL, MongoDB protocol, Prefect), lints, and runs every test against it.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh tests/test_codec.py -x`; without
# any, the suite runs as two pytest processes at once (see below).
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
if [ "$#" -gt 0 ]; then
  .venv/bin/python -m pytest "$@"
  exit
fi
# The whole suite in two processes at once: the tests that need no service (parsers,
# properties, manifests: CPU) and those marked `beside` (the stack, but only their own
# topics, schemas, databases or brokers) beside the tests that need the stack (mostly
# waiting on it). The first ones' output follows the
# second's. Both must pass.
quiet_log="$(mktemp)"
.venv/bin/python -m pytest -m "not services" >"$quiet_log" 2>&1 &
quiet=$!
status=0
.venv/bin/python -m pytest -m services || status=$?
wait "$quiet" || status=$?
echo "=== tests that need no service ==="
cat "$quiet_log"
rm -f "$quiet_log"
exit "$status"
