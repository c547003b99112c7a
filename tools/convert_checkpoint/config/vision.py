"""The vision tower of a vision-language model (Qwen2.5-VL, Qwen3-VL), in the terms the module
convertors use: a ``ModelArch`` for its transformer blocks plus the sizes of its patch embedding
and mergers. Its values travel inside the language model's ``ModelArch.vision``."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from ..errors import ConversionError
from .arch import ModelArch


@dataclass(frozen=True)
class VisionArch(ModelArch):
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    out_hidden_size: int = 0  # the merger's output: the language model's hidden size
    num_position_embeddings: int = 0  # Qwen3-VL's learned position table
    deepstack_visual_indexes: tuple[int, ...] = ()  # Qwen3-VL: blocks whose output feeds a deepstack merger

    @property
    def merger_hidden_size(self) -> int:
        """The merger's input: spatial_merge_size**2 neighbouring patches concatenated."""
        return self.hidden_size * self.spatial_merge_size ** 2


_OWN = {f.name for f in fields(VisionArch)} - {f.name for f in fields(ModelArch)}
_BLOCK = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "normalization", "norm_epsilon",
          "add_qkv_bias")


def vision_arch(arch: ModelArch) -> VisionArch:
    """The vision tower of ``arch`` (which must be a vision-language model)."""
    if arch.vision is None:
        raise ConversionError(f"the {arch.family} architecture has no vision tower")
    values: dict[str, Any] = dict(arch.vision)
    unknown = sorted(set(values) - _OWN - set(_BLOCK))
    if unknown:
        raise ConversionError(f"unknown vision architecture field(s) {', '.join(unknown)}")
    missing = [n for n in _BLOCK[:4] if n not in values]
    if missing:
        raise ConversionError(f"the vision config lacks {', '.join(missing)}")
    heads = values["num_attention_heads"]
    if values["hidden_size"] % heads:
        raise ConversionError(f"vision hidden_size {values['hidden_size']} is not a multiple of its {heads} heads")
    if "deepstack_visual_indexes" in values:
        values["deepstack_visual_indexes"] = tuple(values["deepstack_visual_indexes"] or ())
    return VisionArch(family=f"{arch.family}.vision", vocab_size=1, num_query_groups=heads,
                      kv_channels=values["hidden_size"] // heads, **values)
