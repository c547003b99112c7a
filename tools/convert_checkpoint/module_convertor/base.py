"""Module convertors: one small class per kind of module, chosen by name in the family YAML.

A convertor maps the HF tensors of one module to *canonical* tensors (full, unsharded, in
Megatron-Core local-spec naming with global layer indices) and back. Both directions work on
symbolic expressions (``tensor_expr``), so the same code serves HF->MCore and MCore->HF and
no data is read while planning.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from ..config.arch import ModelArch
from ..config.family import ModuleSpec
from ..core.canonical import CanonicalTensor
from ..errors import ConversionError
from ..registry import Registry
from ..tensor_expr import Expr

CONVERTORS: Registry[type[ModuleConvertor]] = Registry("convertor")


def register(cls: type[ModuleConvertor]) -> type[ModuleConvertor]:
    """Class decorator: the YAML names the convertor by its ``kind``; the first line of its
    docstring is its help (the README table of convertors comes from here)."""
    doc = (cls.__doc__ or cls.kind).strip().splitlines()[0]
    return CONVERTORS.register(cls.kind, doc)(cls)


def convertor_kinds() -> list[str]:
    return CONVERTORS.names()


class ModuleConvertor:
    kind: ClassVar[str]
    help: ClassVar[str]  # one line: HF <-> canonical and the TP split (README table, error messages)
    # Option names the YAML entry may use (besides ``convertor``).
    options: ClassVar[tuple[str, ...]] = ()
    required: ClassVar[tuple[str, ...]] = ()
    # Values the ``dtype`` option may take (where the convertor lists it among its options).
    dtypes: ClassVar[tuple[str, ...]] = ("fp8",)

    def __init__(self, spec: ModuleSpec, arch: ModelArch, hf_prefix: str, mcore_prefix: str):
        unknown = sorted(set(spec.options) - set(self.options))
        if unknown:
            raise ConversionError(f"{spec.origin}: convertor '{self.kind}' does not take option(s) {', '.join(unknown)}")
        missing = [o for o in self.required if o not in spec.options]
        if missing:
            raise ConversionError(f"{spec.origin}: convertor '{self.kind}' needs option(s) {', '.join(missing)}")
        dtype = spec.options.get("dtype")
        if dtype is not None and dtype not in self.dtypes:
            raise ConversionError(f"{spec.origin}: dtype of convertor '{self.kind}' must be one of {', '.join(self.dtypes)}, got {dtype!r}")
        self.spec = spec
        self.arch = arch
        self.hf_prefix = hf_prefix
        self.mcore_prefix = mcore_prefix

    def opt(self, name: str, default: Any = None) -> Any:
        return self.spec.options.get(name, default)

    @property
    def fp8_weights(self) -> bool:
        """``dtype: fp8``: the module's weight matrices (its 2-D tensors) are stored as 128x128
        block-scaled FP8 where the checkpoint is FP8 (DeepSeek's published layout), and are
        quantized from bf16 with ``--convert_to_fp8``."""
        return self.opt("dtype") == "fp8"

    def hf_name(self, suffix: str) -> str:
        return self.hf_prefix + suffix

    def mcore_name(self, suffix: str) -> str:
        return self.mcore_prefix + suffix

    def shape_option(self, default: list) -> tuple[int, ...]:
        shape = self.opt("shape", default)
        if not isinstance(shape, list):
            raise ConversionError(f"{self.spec.origin}: 'shape' must be a list of sizes or size names")
        return tuple(self.arch.size(s) for s in shape)

    # --- the contract -------------------------------------------------------------------
    def hf_shapes(self) -> dict[str, tuple[int, ...]]:
        """HF tensors of this module (read on HF->MCore, written on MCore->HF) with their shapes."""
        raise NotImplementedError

    def observe_hf(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        """HF -> MCore: the shapes of this module's HF tensors as stored, before ``hf_shapes`` is
        checked (a module whose HF storage comes in two layouts picks one here)."""

    def optional_hf(self) -> set[str]:
        """HF tensors that may exist and are dropped on purpose (e.g. a tied lm_head copy)."""
        return set()

    def canonical(self) -> list[CanonicalTensor]:
        raise NotImplementedError

    def copies(self) -> dict[str, str]:
        """HF tensors that duplicate a canonical tensor Megatron stores once (HF name -> canonical
        name): consumed on the way in only when bit-identical, written back as copies."""
        return {}

    def reads(self) -> list[str]:
        """Canonical tensors ``to_hf`` needs: its own, or another module's for a shared copy."""
        return [t.name for t in self.canonical()]

    def to_canonical(self, hf: Mapping[str, Expr]) -> dict[str, Expr]:
        raise NotImplementedError

    def to_hf(self, canonical: Mapping[str, Expr]) -> dict[str, Expr]:
        raise NotImplementedError


def create(spec: ModuleSpec, arch: ModelArch, hf_prefix: str, mcore_prefix: str) -> ModuleConvertor:
    cls = CONVERTORS.get(spec.convertor, spec.origin)
    return cls(spec, arch, hf_prefix, mcore_prefix)
