"""Reading a YAML mapping with errors that name the flag and the file."""
from __future__ import annotations

from typing import Any

import yaml

from ..errors import ConversionError

# libyaml's parser where PyYAML was built with it: the family YAMLs are read at every start.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_mapping(path: str, what: str) -> dict[str, Any]:
    """``what`` names the source in messages, e.g. ``--config_file`` or ``convert YAML``."""
    try:
        with open(path) as f:
            data = yaml.load(f, Loader=_LOADER)  # noqa: S506 (a safe loader)
    except OSError as e:
        raise ConversionError(f"{what} {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConversionError(f"{what} {path}: invalid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConversionError(f"{what} {path}: expected a mapping")
    return data
