#!/usr/bin/env bash
# One command on a fresh machine: set up .venv, then run the round-trip demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/setup
.venv/bin/python examples/demo.py "$@"
