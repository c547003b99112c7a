"""The command line: ``convert-checkpoint ...`` or ``python tools/convert_checkpoint/module_convertor/model.py ...``.

Flag names follow the incumbent converter so existing scripts keep working.
"""
from __future__ import annotations

import os
import sys

if __package__ in (None, ""):
    # Run as a script: make the package importable and drop this directory from sys.path so
    # its module names (attention, mlp ...) cannot shadow anything.
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
    sys.path.insert(0, os.path.dirname(os.path.dirname(_here)))

from convert_checkpoint.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
