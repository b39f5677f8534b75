#!/usr/bin/env bash
# The whole test suite: installs llmtap, starts the real services the tests need (PostgreSQL,
# Redis, Kafka, an S3-compatible server, ElasticMQ for SQS, chromium for the browser tests;
# see scripts/services.sh), runs lint, types and pytest,
# and stops the services again. Extra arguments go to pytest (e.g. -k kafka, -x).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
# Fresh service state every run (caches are kept): topics and tables left by earlier runs
# would slow Kafka's start-up and could mask a test that depends on leftovers.
scripts/services.sh clean >/dev/null 2>&1 || true
scripts/services.sh up
scripts/services.sh browser
trap 'scripts/services.sh down >/dev/null 2>&1 || true' EXIT
eval "$(scripts/services.sh env)"
echo "== ruff"; .venv/bin/ruff check src tests bench
echo "== mypy"; .venv/bin/mypy
echo "== pytest"
.venv/bin/python -m pytest -ra "$@"
