#!/usr/bin/env bash
# The amd-quark 0.13 reference environment for compat/quark_check.py, in .venv-quark/ (ignored by
# git; amd-quark is not a project dependency). Idempotent: an existing, complete venv is kept.
# torch is installed first, pinned, so nothing pulls another torch in.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${QUARK_VENV:-.venv-quark}
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import quark, transformers, safetensors, torch; assert torch.__version__.startswith('2.13.0')" 2>/dev/null; then
    exit 0
fi
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q torch==2.13.0
"$VENV/bin/pip" install -q amd-quark==0.13 transformers safetensors
"$VENV/bin/python" -c "import quark, torch; print('amd-quark', quark.__version__, 'torch', torch.__version__)"
