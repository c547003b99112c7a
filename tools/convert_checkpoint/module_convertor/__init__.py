"""Module convertors; importing this package registers every convertor kind."""
from . import attention, embedding, fused_experts, mla, mlp, moe, shared_copy, simple  # noqa: F401  (registration side effects)
from .base import CanonicalTensor, ModuleConvertor, convertor_kinds, create

__all__ = ["CanonicalTensor", "ModuleConvertor", "convertor_kinds", "create"]
