import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from convert_checkpoint.quant import te_pickle  # noqa: E402
from tiny_models import TinySpec, make_tiny_model  # noqa: E402

# The tests read rank files with weights_only torch.load, as a user does after allow-listing
# Megatron's args and TE's FP8 parameters (the converter itself reads them without torch).
te_pickle.allow_in_torch_load()


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
