"""LoongForge's single-pass VLM flags: ``--vision_patch_convert_file`` (its image-encoder convert
YAML) with ``--convert_file`` (the language model's) picks one of our vision-language families."""
from __future__ import annotations

import os
from collections.abc import Callable

from ...errors import ConversionError

# image-encoder convert YAML stem -> {our language-model family (None: not given) -> our VL family}
_VISION_FILES: dict[str, dict[str | None, str]] = {
    "qwen2_5_vit_convert": {None: "qwen2_5_vl", "qwen2": "qwen2_5_vl", "qwen2_5_vl": "qwen2_5_vl"},
    "qwen3_vit_convert": {None: "qwen3_vl", "qwen3": "qwen3_vl", "qwen3_vl": "qwen3_vl",
                          "qwen3_moe": "qwen3_vl_moe", "qwen3_vl_moe": "qwen3_vl_moe"},
}
# LoongForge's language-model convert YAMLs written for a VLM only (no LLM family of ours by that name)
_VLM_LANGUAGE_FILES = {"qwen3_moe_convert_qwen3vl": "qwen3_moe"}


def language_family(convert_file: str | None, family_name: Callable[[str], str]) -> str | None:
    """Our language-model family of --convert_file (``family_name`` loads an ordinary one)."""
    if convert_file is None:
        return None
    stem = os.path.splitext(os.path.basename(convert_file))[0]
    return _VLM_LANGUAGE_FILES.get(stem) or family_name(convert_file)


def vl_family_name(vision_convert_file: str, language_family: str | None) -> str:
    stem = os.path.splitext(os.path.basename(vision_convert_file))[0]
    if not os.path.isfile(vision_convert_file):
        raise ConversionError(f"--vision_patch_convert_file {vision_convert_file}: no such file")
    table = _VISION_FILES.get(stem)
    if table is None:
        raise ConversionError(f"--vision_patch_convert_file {vision_convert_file}: vision tower {stem!r} is not "
                              f"supported; supported: {', '.join(sorted(_VISION_FILES))}")
    if language_family not in table:
        raise ConversionError(f"--vision_patch_convert_file {vision_convert_file} does not go with a "
                              f"{language_family} language model (--convert_file)")
    return table[language_family]
