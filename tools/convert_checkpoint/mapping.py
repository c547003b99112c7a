"""The model mapping: HuggingFace names <-> canonical tensors, through the family's module
convertors. Pure planning: expressions only, no data read (except ``check_copies``)."""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch
else:
    from .torch_import import torch

from . import dtypes
from . import tensor_expr as tx
from .byteplan import plan_runs
from .config.arch import ModelArch
from .config.family import LAYER_KINDS, FamilySpec
from .config.vision import vision_arch
from .core.canonical import CanonicalTensor
from .core.naming import natural_key
from .core.plan import ModelInfo
from .endpoints.base import HFSource
from .errors import ConversionError
from .formats.direct_io import RangeMover
from .layout.placement import MTP_INNER_LAYER, VISION_DEEPSTACK_PREFIX, VISION_LAYER_PREFIX
from .module_convertor import ModuleConvertor, create
from .module_convertor.moe import RoutedExperts
from .tensor_expr import Expr, LeafReader, dtype_name


def _layer_convertors(family: FamilySpec, arch: ModelArch, layer: int, hf_prefix: str, mcore_prefix: str) -> list[ModuleConvertor]:
    kinds = ("moe" if arch.is_moe_layer(layer) else "dense",
             "linear_attention" if arch.is_linear_attention_layer(layer) else "full_attention")
    return [create(spec, arch, hf_prefix, mcore_prefix) for spec in family.layer_modules
            if spec.when is None or spec.when in kinds or (spec.when not in LAYER_KINDS and getattr(arch, spec.when))]


def _vision_convertors(family: FamilySpec, arch: ModelArch) -> list[ModuleConvertor]:
    """The vision tower: canonical ``vision_model.*`` (blocks, patch embedding) and ``adapter.*``
    (the merger) names, sized by the tower's own architecture."""
    spec = family.vision
    if spec is None:
        return []
    vision = vision_arch(arch)
    convertors = [create(m, vision, "", "") for m in spec.global_modules]
    for layer in range(vision.num_layers):
        hf_prefix = spec.layer_prefix.format(layer=layer)
        convertors += [create(m, vision, hf_prefix, f"{VISION_LAYER_PREFIX}{layer}.") for m in spec.layer_modules
                       if m.when is None or (m.when not in LAYER_KINDS and getattr(vision, m.when))]
    deepstack = spec.deepstack_prefix
    for k in range(len(vision.deepstack_visual_indexes) if deepstack else 0):
        assert deepstack is not None
        hf_prefix = deepstack.format(index=k)
        convertors += [create(m, vision, hf_prefix, f"{VISION_DEEPSTACK_PREFIX}{k}.") for m in spec.deepstack_modules]
    return convertors


def build_convertors(family: FamilySpec, arch: ModelArch) -> list[ModuleConvertor]:
    convertors = [create(spec, arch, "", "") for spec in family.global_modules] + _vision_convertors(family, arch)
    for layer in range(arch.num_layers):
        hf_prefix = family.layer_prefix.format(layer=layer)
        convertors += _layer_convertors(family, arch, layer, hf_prefix, f"decoder.layers.{layer}.")
    if arch.mtp_num_layers and family.mtp is None:
        raise ConversionError(f"model family {family.name} has no multi-token-prediction layers (mtp_num_layers {arch.mtp_num_layers})")
    for k in range(arch.mtp_num_layers):
        assert family.mtp is not None
        # HF stores MTP layer k as decoder layer num_layers + k; it is as MoE as the last layer.
        layer = arch.num_layers + k
        hf_prefix = family.mtp.layer_prefix.format(layer=layer, mtp=k)
        module_prefix = (family.mtp.module_prefix or family.mtp.layer_prefix).format(layer=layer, mtp=k)
        first = (family.mtp.module_prefix or family.mtp.layer_prefix).format(layer=arch.num_layers, mtp=0)
        if k and module_prefix == first:
            raise ConversionError(f"model family {family.name} stores one set of MTP tensors ({module_prefix}*), "
                                  f"so it cannot hold {arch.mtp_num_layers} MTP layers")
        mcore_prefix = f"mtp.layers.{k}."
        convertors += [create(spec, arch, module_prefix, mcore_prefix) for spec in family.mtp.modules]
        convertors += _layer_convertors(family, arch, layer, hf_prefix, f"{mcore_prefix}{MTP_INNER_LAYER}.")
    return convertors


def canonical_tensors(convertors: Iterable[ModuleConvertor]) -> list[CanonicalTensor]:
    out: list[CanonicalTensor] = []
    seen: set[str] = set()
    for c in convertors:
        for t in c.canonical():
            if t.name in seen:
                raise ConversionError(f"{c.spec.origin}: canonical tensor {t.name} is produced twice")
            seen.add(t.name)
            out.append(replace(t, fp8=True) if c.fp8_weights and len(t.shape) == 2 else t)
    return out


def check_convert_to_fp8(convert_to_fp8: bool, family: FamilySpec, convertors: Iterable[ModuleConvertor]) -> None:
    if convert_to_fp8 and not any(c.fp8_weights for c in convertors):
        raise ConversionError(
            f"--convert_to_fp8: the {family.name} family ({family.path}) marks no tensor dtype: fp8, so nothing would be quantized"
        )


def fp8_hf_names(convertors: Iterable[ModuleConvertor]) -> set[str]:
    """HF tensors the family YAML marks ``dtype: fp8`` (the modules' weight matrices)."""
    return {n for c in convertors if c.fp8_weights for n, shape in c.hf_shapes().items() if len(shape) == 2}


@dataclass(frozen=True)
class Copy:
    """An HF tensor that Megatron does not store because it duplicates another (an MTP layer's
    embed_tokens / shared_head.head, a tied lm_head): dropped on the way in, only if equal."""

    name: str  # the HF copy
    expr: Expr
    of: str  # the canonical tensor it duplicates
    of_expr: Expr
    in_mtp: bool  # held by a multi-token-prediction layer (else a tied LM head)


@dataclass
class HFMapping:
    canonical: dict[str, Expr]
    copies: list[Copy]
    hf_dtypes: dict[str, str]  # HF tensors the canonical form casts: name -> source dtype


def _check_expert_count(src: HFSource, convertors: list[ModuleConvertor], arch: ModelArch) -> None:
    """A MoE checkpoint must hold exactly the configured number of experts per MoE layer."""
    for conv in convertors:
        if isinstance(conv, RoutedExperts):
            found = conv.experts_present(src.index)
            if found != arch.num_experts:
                raise ConversionError(
                    f"{src.root}: MoE layer {conv.hf_prefix or conv.mcore_prefix} holds {found} routed experts, "
                    f"but the config says num_experts {arch.num_experts}"
                )
            return  # one layer is enough: a layer with a hole fails as a missing tensor below


def gather_hf(src: HFSource, convertors: list[ModuleConvertor], family: FamilySpec, arch: ModelArch) -> HFMapping:
    """Canonical expressions over the HF files; every HF tensor must be consumed or ignored."""
    canonical: dict[str, Expr] = {}
    consumed: set[str] = set()
    copies: list[tuple[str, str, bool]] = []
    _check_expert_count(src, convertors, arch)
    for conv in convertors:
        exprs: dict[str, Expr] = {}
        conv.observe_hf({n: tuple(src.leaf(n).shape) for n in conv.hf_shapes() if n in src.index})
        for name, shape in conv.hf_shapes().items():
            if name not in src.index:
                hint = ""
                if conv.mcore_prefix.startswith("mtp."):
                    hint = "; this is a multi-token-prediction layer: pass --mtp_num_layers 0 if the checkpoint has none"
                raise ConversionError(f"missing tensor {name} in {src.root} (expected by {conv.spec.origin}){hint}")
            leaf = src.leaf(name)
            if leaf.shape != shape:
                raise ConversionError(
                    f"tensor {name} has shape {list(leaf.shape)}, but the config implies {list(shape)}"
                )
            exprs[name] = leaf
            consumed.add(name)
            consumed.update(src.companions(name))
        present_copies = {n: of for n, of in conv.copies().items() if n in src.index}
        consumed |= {n for n in conv.optional_hf() if n in src.index}
        copies += [(n, of, conv.mcore_prefix.startswith("mtp.")) for n, of in present_copies.items()]
        try:
            canonical.update(conv.to_canonical(exprs))
        except ValueError as e:  # mixed dtypes inside one fused tensor
            raise ConversionError(f"{conv.spec.origin}: cannot fuse {', '.join(exprs)}: {e}") from None
    unmapped = sorted((n for n in src.index if n not in consumed and not family.is_ignored(n)), key=natural_key)
    if unmapped:
        more = f" (and {len(unmapped) - 1} more)" if len(unmapped) > 1 else ""
        raise ConversionError(
            f"unmapped tensor {unmapped[0]} in {src.index[unmapped[0]]}{more}: no convertor of family "
            f"'{family.name}' ({family.path}) consumes it and it is not in its ignore list"
        )
    resolved = [Copy(n, src.leaf(n), of, canonical[of], in_mtp) for n, of, in_mtp in copies]
    return HFMapping(canonical, resolved, _cast_dtypes(canonical))


def _cast_dtypes(canonical: Mapping[str, Expr]) -> dict[str, str]:
    """HF tensors whose canonical form is cast (e.g. a bf16 router bias held in fp32)."""
    out = {}
    for expr in canonical.values():
        for node in tx.casts(expr):
            for leaf in tx.leaves(node.part):
                out[leaf.ref.name] = dtype_name(leaf.dtype)
    return out


def to_hf(convertors: list[ModuleConvertor], canonical: Mapping[str, Expr], model: ModelInfo,
          restore_dtypes: bool = True) -> dict[str, Expr]:
    """HF expressions of the canonical tensors. With ``restore_dtypes``, tensors the Megatron
    side had cast go back to the dtype they came in (recorded when the checkpoint was written);
    without, they keep the family YAML's dtype (DeepSeek's published FP8 layout: fp32 router bias)."""
    out: dict[str, Expr] = {}
    for conv in convertors:
        out.update(conv.to_hf({name: canonical[name] for name in conv.reads()}))
    for name, dtype in (model.hf_dtypes.items() if restore_dtypes else ()):
        if name in out and dtype_name(out[name].dtype) != dtype:
            out[name] = tx.cast(out[name], dtypes.named(dtype))
    return out


def _same_bytes(a: memoryview, b: memoryview) -> bool:
    """Byte equality at memory speed: compared as 8-byte words (5x faster than bytes in numpy),
    the few tail bytes on their own."""
    whole = len(a) - len(a) % 8
    return (len(a) == len(b) and a[whole:] == b[whole:]
            and np.array_equal(np.frombuffer(a[:whole], dtype=np.uint64), np.frombuffer(b[:whole], dtype=np.uint64)))


def check_copies(copies: list[Copy], reader: LeafReader, chunk_bytes: int = 64 << 20) -> None:
    """Each dropped copy must equal the tensor Megatron keeps, bit for bit (read in row chunks).
    Chunks whose bytes lie plainly in the source files are read as byte runs, without torch."""
    # Two buffers reused for every chunk, not a fresh allocation per chunk: first touches of
    # new pages cost about 2 s/GB on VMs, and DeepSeek-V3's copies are 7.4 GB to compare.
    if not copies:
        return
    buffers = [bytearray(), bytearray()]
    locate = getattr(reader, "locate", None)
    mover = RangeMover()

    def read(expr: Expr, which: int) -> memoryview:
        n = tx.nbytes(expr)
        if len(buffers[which]) < n:
            buffers[which] = bytearray(n)
        view = memoryview(buffers[which])[:n]
        runs = plan_runs(expr, locate) if locate is not None else None
        if runs is not None:
            mover.read_into(runs, view)
        elif n:
            out = torch.frombuffer(view, dtype=expr.dtype.torch).view(tuple(expr.shape))
            tx.materialize_into(expr, reader, out)
        return view

    try:
        for c in copies:
            if c.expr.dtype != c.of_expr.dtype:
                raise ConversionError(
                    f"tensor {c.name} is {dtype_name(c.expr.dtype)} but {c.of} is {dtype_name(c.of_expr.dtype)}: "
                    "Megatron stores one copy, so they must be identical")
            rows = c.expr.shape[0]
            row_bytes = max(1, tx.nbytes(c.expr) // max(rows, 1))
            step = max(1, chunk_bytes // row_bytes)
            for first in range(0, rows, step):
                n = min(step, rows - first)
                a = read(tx.narrow(c.expr, 0, first, n), 0)
                b = read(tx.narrow(c.of_expr, 0, first, n), 1)
                if not _same_bytes(a, b):
                    raise ConversionError(
                        f"tensor {c.name} differs from {c.of} (first at rows {first}-{first + n - 1}): Megatron keeps "
                        "one copy, so converting would silently replace it; the checkpoint's copies must be identical")
    finally:
        mover.close()
        reader.close()
