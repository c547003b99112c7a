#!/usr/bin/env bash
# Idempotent set-up of .venv-llmc/, the isolated environment that holds llm-compressor, the reference
# for compat/llmcompressor_check.py. llmcompressor 0.14.0.1 pins compressed-tensors==0.19.0 and
# transformers<=5.17.0, which clash with the project's own (compressed-tensors>=0.20, transformers 5.2x),
# so it never goes into .venv or the project's dependencies.
#
# torch==2.13.0 goes in first (the exact version takes the CPU wheel already on disk; any other
# spelling pulls CUDA builds), and stays pinned by a constraint while llmcompressor's own
# requirements resolve (its range torch>=2.10,<=2.14 admits 2.13.0).
#
# Exit status: 0 when the venv is ready (then $VENV/.ready exists); 3 when it cannot be created
# (no network, package not found), which compat/llmcompressor_check.py turns into a "SKIPPED: ..."
# line; 1 when it installs but llmcompressor does not import (a real failure).
set -uo pipefail
cd "$(dirname "$0")/.."
VENV=${LLMC_VENV:-.venv-llmc}
LLMC_VERSION=0.14.0.1
PY=$VENV/bin/python
start=$(date +%s)

ready() {
  [ -x "$PY" ] && "$PY" - "$LLMC_VERSION" <<'PYEOF' >/dev/null 2>&1
import sys
from importlib.metadata import version
import torch
assert version("llmcompressor") == sys.argv[1], version("llmcompressor")
assert torch.__version__.startswith("2.13.0"), torch.__version__
from llmcompressor import model_free_ptq  # noqa: F401
PYEOF
}

# compat/llmcompressor_check.py runs this script when $VENV/.ready is missing.
if ready; then
  touch "$VENV/.ready"
  echo "llmcompressor setup: $VENV already ready ($(( $(date +%s) - start )) s)"
  exit 0
fi

rm -f "$VENV/.ready"
if [ ! -x "$PY" ]; then
  python3 -m venv "$VENV" || { echo "llmcompressor setup: cannot create $VENV"; exit 3; }
fi
pipi() { "$PY" -m pip install -q "$@" 2>&1 | grep -v "^WARNING: Location"; return "${PIPESTATUS[0]}"; }
pipi --upgrade pip || true
pipi torch==2.13.0 || { echo "llmcompressor setup: pip install torch==2.13.0 failed"; exit 3; }
cons=$(mktemp); trap 'rm -f "$cons"' EXIT
echo "torch==2.13.0" > "$cons"
# compressed-tensors and transformers spelled out as llmcompressor 0.14.0.1 pins them, so a later
# change to its metadata cannot silently move the reference.
pipi -c "$cons" "llmcompressor==$LLMC_VERSION" "compressed-tensors==0.19.0" "transformers>=5.15.0,<=5.17.0" \
  || { echo "llmcompressor setup: pip install llmcompressor==$LLMC_VERSION failed"; exit 3; }
if ! ready; then
  echo "llmcompressor setup: $VENV built but 'from llmcompressor import model_free_ptq' fails:"
  "$PY" -c "from llmcompressor import model_free_ptq" 2>&1 | tail -5
  exit 1
fi
touch "$VENV/.ready"
"$PY" -c "import torch, transformers, compressed_tensors, llmcompressor; from importlib.metadata import version; print('llmcompressor setup ok: torch', torch.__version__, 'llmcompressor', version('llmcompressor'), 'compressed-tensors', compressed_tensors.__version__, 'transformers', transformers.__version__)"
echo "llmcompressor setup: $(( $(date +%s) - start )) s"
