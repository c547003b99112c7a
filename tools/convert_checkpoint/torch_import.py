"""``torch``, imported the first time one of its attributes is used.

A conversion that only moves bytes never touches torch, and importing it costs seconds
(a cold CUDA build: 5-7 s, more than copying a small checkpoint). Modules whose torch use is
all inside functions import this instead::

    if TYPE_CHECKING:
        import torch
    else:
        from ..torch_import import torch
"""
from __future__ import annotations

import importlib
import sys
from types import ModuleType
from typing import Any


class _Torch:
    """Forwards attribute access to the real module, importing it on first use."""

    def __getattr__(self, name: str) -> Any:
        return getattr(_real(), name)

    def __repr__(self) -> str:
        return "<torch, imported on first use>"


def _real() -> ModuleType:
    return sys.modules.get("torch") or importlib.import_module("torch")


def load() -> None:
    """Import torch now (before forking workers that will all need it)."""
    _real()


def imported() -> bool:
    """Whether torch has been imported in this process (by anyone)."""
    return "torch" in sys.modules


torch: Any = _Torch()
