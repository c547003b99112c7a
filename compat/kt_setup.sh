#!/usr/bin/env bash
# Idempotent set-up of .venv-kt/ (ignored by git), the isolated environment that holds kt-kernel
# 0.7.2, the reference for compat/kt_check.py. kt-kernel is never a project dependency.
#
# torch==2.13.0 goes in first (the exact version takes the CPU wheel already on disk; any other
# spelling pulls CUDA builds); kt-kernel's wheel pins an older torch, so it goes in with --no-deps,
# next to the few modules its converter script imports (gguf, safetensors, numpy, pyyaml).
#
# Exit status: 0 when the venv is ready; 3 when it cannot be created (no network, package not
# found), which .ci/compat reports through compat/kt_check.py's "SKIPPED: ..." line; 1 when it
# installs but kt_kernel does not import (a real failure).
set -uo pipefail
cd "$(dirname "$0")/.."
VENV=${KT_VENV:-.venv-kt}
KT_VERSION=0.7.2
PY=$VENV/bin/python
start=$(date +%s)

ready() {
  [ -x "$PY" ] && "$PY" - "$KT_VERSION" <<'PYEOF' >/dev/null 2>&1
import sys
from importlib.metadata import version
import torch
assert version("kt-kernel") == sys.argv[1], version("kt-kernel")
assert torch.__version__.startswith("2.13.0"), torch.__version__
import safetensors, numpy, gguf, yaml  # noqa: F401,E401
import kt_kernel  # noqa: F401
PYEOF
}

if ready && [ -s "$VENV/convert_cpu_weights.py" ]; then
  echo "kt setup: $VENV already ready ($(( $(date +%s) - start )) s)"
  exit 0
fi
if [ ! -x "$PY" ]; then
  python3 -m venv "$VENV" || exit 3
fi
"$VENV/bin/pip" install -q torch==2.13.0 || exit 3
"$VENV/bin/pip" install -q gguf safetensors numpy pyyaml || exit 3
"$VENV/bin/pip" install -q --no-deps "kt-kernel==$KT_VERSION" || exit 3
# The converter script is not in the wheel: it lives in kvcache-ai/ktransformers (kt-kernel/scripts/).
# Taken from $KT_CONVERT_SCRIPT, a local git mirror ($KT_MIRROR), or GitHub, at the pinned commit.
SCRIPT=$VENV/convert_cpu_weights.py
KT_COMMIT=95009ea6
KT_MIRROR=${KT_MIRROR:-/work/.mirror/kvcache-ai+ktransformers/repo}
if [ ! -s "$SCRIPT" ]; then
  if [ -n "${KT_CONVERT_SCRIPT:-}" ] && [ -f "$KT_CONVERT_SCRIPT" ]; then
    cp "$KT_CONVERT_SCRIPT" "$SCRIPT"
  elif [ -d "$KT_MIRROR" ] && git --git-dir="$KT_MIRROR" show "$KT_COMMIT:kt-kernel/scripts/convert_cpu_weights.py" > "$SCRIPT.part" 2>/dev/null; then
    mv "$SCRIPT.part" "$SCRIPT"
  elif curl -fsS -m 30 -o "$SCRIPT.part" "https://raw.githubusercontent.com/kvcache-ai/ktransformers/$KT_COMMIT/kt-kernel/scripts/convert_cpu_weights.py"; then
    mv "$SCRIPT.part" "$SCRIPT"
  else
    rm -f "$SCRIPT.part"
    echo "kt setup: cannot obtain kt-kernel's convert_cpu_weights.py (set KT_CONVERT_SCRIPT)" >&2
    exit 3
  fi
fi
if ! ready; then
  echo "kt setup: kt-kernel $KT_VERSION installed in $VENV but kt_kernel does not import:" >&2
  "$PY" -c "import kt_kernel" 2>&1 | tail -3 >&2
  exit 1
fi
echo "kt setup: $VENV ready ($(( $(date +%s) - start )) s)"
