"""Module convertors; importing this package registers every convertor kind."""
from . import (  # noqa: F401  (registration side effects)
    attention,
    embedding,
    fused_experts,
    gated_attention,
    gated_delta_net,
    mla,
    mlp,
    moe,
    shared_copy,
    simple,
)
from .base import CanonicalTensor, ModuleConvertor, convertor_kinds, create

__all__ = ["CanonicalTensor", "ModuleConvertor", "convertor_kinds", "create"]
