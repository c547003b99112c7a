import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from tiny_models import TinySpec, make_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
    """Factory: the directory of a tiny HF model for a TinySpec, generated once per session."""
    cache: dict[str, str] = {}
    root = tmp_path_factory.mktemp("hf_models")

    def get(spec: TinySpec) -> str:
        if spec.key not in cache:
            cache[spec.key] = make_tiny_model(spec, str(root / spec.key))
        return cache[spec.key]

    return get
