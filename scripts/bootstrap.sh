#!/usr/bin/env bash
# Installs what Tapeline needs on a fresh Debian machine, idempotently and from caches:
# Debian packages (PostgreSQL, Java 17, Maven, Go, Prometheus), then a virtualenv with the
# project and its dev tools. Kafka jars (Maven) and FerretDB (Go) are fetched on first
# `python -m stack up` into ~/.cache/tapeline and reused after that.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v java >/dev/null || need+=(openjdk-17-jre-headless)
command -v mvn >/dev/null || need+=(maven)
command -v go >/dev/null || [ -x /usr/local/go/bin/go ] || need+=(golang-go)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
command -v prometheus >/dev/null || need+=(prometheus)
command -v prometheus-pushgateway >/dev/null || need+=(prometheus-pushgateway)
command -v node >/dev/null || need+=(nodejs)  # runs the compose MongoDB init script in a test
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "bootstrap: please install: ${need[*]} (needs root)" >&2
    exit 1
  fi
  echo "bootstrap: apt-get install ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null
  # Debian starts the packaged services; the project runs its own when it needs them.
  for svc in prometheus prometheus-pushgateway; do
    (service "$svc" stop || pkill -x "$svc" || true) >/dev/null 2>&1
  done
fi
export PATH="$PATH:/usr/local/go/bin"

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
stamp=.venv/.tapeline-installed
if [ ! -f "$stamp" ] || ! cmp -s pyproject.toml "$stamp"; then
  echo "bootstrap: pip install -e .[dev] (cached wheels are reused)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[dev]"
  cp pyproject.toml "$stamp"
fi
