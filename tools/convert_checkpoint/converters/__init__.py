"""Converters: rewrite quantized HF checkpoints (the compressed-tensors Converter protocol).

``protocol`` the protocol and the chain; ``groups`` which tensors are converted together;
``registry`` built-ins and ``--converter`` specs; ``fp8_block_dequantizer`` ours; ``library``
compressed-tensors' converters adapted; ``source`` a HF checkpoint seen through a chain.
"""
from typing import Any

__all__ = ["Converter", "ConverterChain"]


def __getattr__(name: str) -> Any:
    # Lazy: the registry (read by `--help`) must not pull torch in through the protocol.
    if name in __all__:
        from . import protocol

        return getattr(protocol, name)
    raise AttributeError(name)
