#!/usr/bin/env bash
# The main command: installs what is missing, brings up the local stack (no Docker, no
# internet) and runs the Tapeline platform on it. Arguments go to `python -m deployments.platform`
# (see --help), e.g. `bash scripts/run.sh --minutes 2` runs for two minutes and reports.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/local/go/bin"
bash scripts/bootstrap.sh
.venv/bin/python -m stack up
exec .venv/bin/python -m deployments.platform "$@"
