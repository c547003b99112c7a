"""convert_checkpoint: streaming HuggingFace <-> Megatron-Core checkpoint converter."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy, so `convert-checkpoint --help` does not import torch.
    if name == "convert_checkpoint":
        from .hf_to_hf import convert_checkpoint

        return convert_checkpoint
    if name == "Converter":
        from .converters.protocol import Converter

        return Converter
    raise AttributeError(name)
