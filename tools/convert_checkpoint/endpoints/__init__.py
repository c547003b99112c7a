"""On-disk checkpoint formats, one module each (see ``base`` for the Source/Target protocol).

A format registers a loader here under the name ``--load_platform`` / ``--save_platform`` take;
the loader returns its module, which provides ``open_source(request)`` (when it can be read)
and ``create_target(request)`` (when it can be written). Loaders import on use, so listing the
formats (``--help``) loads no torch.
"""
from __future__ import annotations

from types import ModuleType

from ..registry import Registry

ENDPOINTS: Registry = Registry("checkpoint format")


@ENDPOINTS.register("huggingface", "HuggingFace safetensors directory: config.json, model-*.safetensors and their "
                                   "index (bf16/fp16/fp32, block FP8; other quantized formats through --converter); "
                                   "read and written")
def _huggingface() -> ModuleType:
    from . import huggingface

    return huggingface


@ENDPOINTS.register("mcore", "Megatron-Core legacy per-rank checkpoint: release/ or iter_*/ with "
                             "mp_rank_TT[_PPP][_EEE]/model_optim_rng.pt, TE or local names, TE block-FP8 "
                             "parameters; read and written")
def _mcore_legacy() -> ModuleType:
    from . import mcore_legacy

    return mcore_legacy


@ENDPOINTS.register("kt_cpu", "KTransformers CPU experts (kt-kernel AMXINT4/AMXINT8, NUMA parts; "
                              "convert-checkpoint kt): routed experts quantized and tiled, other tensors copied; written")
def _kt_cpu() -> ModuleType:
    from . import kt_cpu

    return kt_cpu


def detect(path: str) -> str:
    """The format of a checkpoint directory (``verify``): the first whose ``looks_like`` agrees;
    Megatron layouts are tried before HF, since a Megatron directory may hold a config.json."""
    for name in ("mcore", *[n for n in ENDPOINTS.names() if n != "mcore"]):
        module = ENDPOINTS.get(name)()
        if getattr(module, "looks_like", None) and module.looks_like(path):
            return name
    return "huggingface"


def endpoint(name: str, flag: str) -> ModuleType:
    """The module of a registered format; ``flag`` names the option in an error."""
    return ENDPOINTS.get(name, flag)()
