"""convert_checkpoint: streaming HuggingFace <-> Megatron-Core checkpoint converter."""
from typing import Any

from ._version import __version__

__all__ = ["Converter", "__version__", "convert_checkpoint", "model_free_ptq"]


def __getattr__(name: str) -> Any:
    # Lazy, so `convert-checkpoint --help` does not import torch.
    if name == "convert_checkpoint":
        from .api import convert_checkpoint

        return convert_checkpoint
    if name == "model_free_ptq":
        from .api import model_free_ptq

        return model_free_ptq
    if name == "Converter":
        from .converters.protocol import Converter

        return Converter
    raise AttributeError(name)
