"""Converters: rewrite quantized HF checkpoints (the compressed-tensors Converter protocol).

``protocol`` the protocol and the chain; ``groups`` which tensors are converted together;
``registry`` built-ins and ``--converter`` specs; ``fp8_block_dequantizer`` ours; ``library``
compressed-tensors' converters adapted; ``source`` a HF source seen through a chain.
"""
from .protocol import Converter, ConverterChain

__all__ = ["Converter", "ConverterChain"]
