#!/usr/bin/env bash
# The whole test suite: installs llmtap, starts the real services the tests need (PostgreSQL,
# Redis, Kafka, an S3-compatible server; see scripts/services.sh), runs lint, types and pytest,
# and stops the services again. Extra arguments go to pytest (e.g. -k kafka, -x).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
scripts/services.sh up
trap 'scripts/services.sh down >/dev/null 2>&1 || true' EXIT
eval "$(scripts/services.sh env)"
echo "== ruff"; .venv/bin/ruff check src tests bench
echo "== mypy"; .venv/bin/mypy
echo "== pytest"
.venv/bin/python -m pytest -ra "$@"
