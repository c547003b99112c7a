"""convert_checkpoint: streaming HuggingFace <-> Megatron-Core checkpoint converter."""

__version__ = "0.1.0"
