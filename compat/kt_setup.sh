#!/usr/bin/env bash
# Idempotent set-up of .venv-kt/ (ignored by git), the isolated environment that holds kt-kernel
# 0.7.2, the reference for compat/kt_check.py. kt-kernel is never a project dependency.
#
# torch==2.13.0 goes in first (the exact version takes the CPU wheel already on disk; any other
# spelling pulls CUDA builds); kt-kernel's wheel pins an older torch, so it goes in with --no-deps,
# next to the few modules its converter script imports (gguf, safetensors, numpy, pyyaml).
#
# kt-kernel's convert_cpu_weights.py is not in the wheel. It is optional: taken, when it can be,
# from $KT_CONVERT_SCRIPT, a local git mirror ($KT_MIRROR) or GitHub (not tried when
# KT_NO_NETWORK=1), it adds the script-level comparison; without it (CI, where only package
# registries are reachable) compat/kt_check.py compares with kt-kernel's wheel alone.
#
# Exit status: 0 when the venv is ready (with or without the script); 3 when it cannot be created
# (no network, package not found), which .ci/compat reports through compat/kt_check.py's
# "SKIPPED: ..." line; 1 when it installs but kt_kernel does not import (a real failure).
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

was_ready=0
ready && was_ready=1
if [ "$was_ready" = 0 ]; then
  if [ ! -x "$PY" ]; then
    python3 -m venv "$VENV" || exit 3
  fi
  "$VENV/bin/pip" install -q torch==2.13.0 || exit 3
  "$VENV/bin/pip" install -q gguf safetensors numpy pyyaml || exit 3
  "$VENV/bin/pip" install -q --no-deps "kt-kernel==$KT_VERSION" || exit 3
fi
# The converter script (optional, see above), at the pinned commit.
SCRIPT=$VENV/convert_cpu_weights.py
KT_COMMIT=95009ea6
KT_MIRROR=${KT_MIRROR:-/work/.mirror/kvcache-ai+ktransformers/repo}
script_note="without convert_cpu_weights.py (not in the wheel; no \$KT_CONVERT_SCRIPT, mirror or GitHub): kt_check.py compares with the wheel only"
if [ -s "$SCRIPT" ]; then
  script_note="with convert_cpu_weights.py"
elif [ -n "${KT_CONVERT_SCRIPT:-}" ] && [ -f "$KT_CONVERT_SCRIPT" ]; then
  cp "$KT_CONVERT_SCRIPT" "$SCRIPT" && script_note="with convert_cpu_weights.py from \$KT_CONVERT_SCRIPT"
elif [ -d "$KT_MIRROR" ] && git --git-dir="$KT_MIRROR" show "$KT_COMMIT:kt-kernel/scripts/convert_cpu_weights.py" > "$SCRIPT.part" 2>/dev/null; then
  mv "$SCRIPT.part" "$SCRIPT" && script_note="with convert_cpu_weights.py from $KT_MIRROR"
elif [ "${KT_NO_NETWORK:-0}" != 1 ] && curl -fsS -m 30 -o "$SCRIPT.part" "https://raw.githubusercontent.com/kvcache-ai/ktransformers/$KT_COMMIT/kt-kernel/scripts/convert_cpu_weights.py" 2>/dev/null; then
  mv "$SCRIPT.part" "$SCRIPT" && script_note="with convert_cpu_weights.py from GitHub"
else
  rm -f "$SCRIPT.part"
fi
if [ "$was_ready" = 0 ] && ! ready; then
  echo "kt setup: kt-kernel $KT_VERSION installed in $VENV but kt_kernel does not import:" >&2
  "$PY" -c "import kt_kernel" 2>&1 | tail -3 >&2
  exit 1
fi
echo "kt setup: $VENV ready, $script_note ($(( $(date +%s) - start )) s)"
