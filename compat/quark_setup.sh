#!/usr/bin/env bash
# Idempotent set-up of .venv-quark/ (ignored by git), the isolated environment that holds amd-quark
# 0.13, the reference for compat/quark_check.py. amd-quark is never a project dependency.
#
# torch==2.13.0 goes in first (the exact version takes the CPU wheel already on disk; any other
# spelling pulls CUDA builds), then amd-quark with what its file-to-file path imports
# (transformers, safetensors), with torch pinned by a constraint.
#
# Exit status: 0 when the venv is ready; 3 when it cannot be created (no network, package not
# found), which .ci/compat reports through compat/quark_check.py's "SKIPPED: ..." line; 1 when it
# installs but quark's file-to-file module does not import (a real failure).
set -uo pipefail
cd "$(dirname "$0")/.."
VENV=${QUARK_VENV:-.venv-quark}
QUARK_VERSION=0.13
PY=$VENV/bin/python
start=$(date +%s)

ready() {
  [ -x "$PY" ] && "$PY" - "$QUARK_VERSION" <<'PYEOF' >/dev/null 2>&1
import sys
from importlib.metadata import version
import torch
assert version("amd-quark") == sys.argv[1], version("amd-quark")
assert torch.__version__.startswith("2.13.0"), torch.__version__
import safetensors  # noqa: F401
from quark.torch.quantization.file2file_quantization import quantize_model_per_safetensor  # noqa: F401
PYEOF
}

if ready; then
  echo "quark setup: $VENV already ready ($(( $(date +%s) - start )) s)"
  exit 0
fi
if [ ! -x "$PY" ]; then
  python3 -m venv "$VENV" || exit 3
fi
constraint=$(mktemp)
echo "torch==2.13.0" > "$constraint"
"$VENV/bin/pip" install -q torch==2.13.0 || { rm -f "$constraint"; exit 3; }
"$VENV/bin/pip" install -q -c "$constraint" "amd-quark==$QUARK_VERSION" transformers safetensors || { rm -f "$constraint"; exit 3; }
rm -f "$constraint"
if ! ready; then
  echo "quark setup: amd-quark $QUARK_VERSION installed in $VENV but its file-to-file module does not import" >&2
  exit 1
fi
echo "quark setup: $VENV ready ($(( $(date +%s) - start )) s)"
