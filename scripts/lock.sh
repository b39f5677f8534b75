#!/usr/bin/env bash
# Regenerate constraints.txt: resolve `.[all,dev,bench]` afresh within pyproject.toml's ranges (the
# newest versions they allow) in a throwaway venv, and pin exactly what was installed. Run it
# after changing a range, run the suite (scripts/test.sh), and commit both files together.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PY" -m venv "$tmp/venv"
"$tmp/venv/bin/python" -m pip install -q --upgrade pip
"$tmp/venv/bin/python" -m pip install -q '.[all,dev,bench]'  # no -c: this is where the pins come from
{
  sed -n '/^#/p' constraints.txt  # keep the header
  "$tmp/venv/bin/python" -m pip freeze --exclude llmtap
} >"$tmp/constraints.txt"
mv "$tmp/constraints.txt" constraints.txt
echo "constraints.txt: $(grep -vc '^#' constraints.txt) pins"
