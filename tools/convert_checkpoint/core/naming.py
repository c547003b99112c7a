"""Tensor-name ordering shared by the endpoints and the model mapping."""
from __future__ import annotations

import re


def natural_key(name: str) -> list[int | str]:
    """``layers.10`` after ``layers.9``: digit runs compare as numbers."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]
