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


@ENDPOINTS.register("mcore_dist", "Megatron-Core torch_dist checkpoint: release/ with metadata.json, .metadata, "
                                  "__*_*.distcp and common.pt, global tensors under Megatron's sharded keys; "
                                  "read (as --load_platform mcore, detected) and written (--save_platform mcore "
                                  "--ckpt_format torch_dist); optimizer state skipped")
def _mcore_dist() -> ModuleType:
    from . import mcore_dist

    return mcore_dist


# Megatron's two formats are both ``--load_platform mcore``: which one a directory holds is read off it.
_READ_AS = {"mcore": ("mcore_dist",)}
# The format ``--save_platform X --ckpt_format Y`` writes.
_WRITE_AS = {("mcore", "torch_dist"): "mcore_dist"}


def detect(path: str) -> str:
    """The format of a checkpoint directory (``verify``): the first whose ``looks_like`` agrees;
    Megatron layouts are tried before HF, since a Megatron directory may hold a config.json
    (torch_dist first: its root has a tracker file too)."""
    first = ("mcore_dist", "mcore")
    for name in (*first, *[n for n in ENDPOINTS.names() if n not in first]):
        module = ENDPOINTS.get(name)()
        if getattr(module, "looks_like", None) and module.looks_like(path):
            return name
    return "huggingface"


def source_format(name: str, path: str) -> str:
    """The format read for ``--load_platform name`` at ``path``."""
    for other in _READ_AS.get(name, ()):
        if ENDPOINTS.get(other)().looks_like(path):
            return other
    return name


def target_format(name: str, ckpt_format: str) -> str:
    """The format written for ``--save_platform name --ckpt_format ckpt_format``."""
    return _WRITE_AS.get((name, ckpt_format), name)


def endpoint(name: str, flag: str) -> ModuleType:
    """The module of a registered format; ``flag`` names the option in an error."""
    return ENDPOINTS.get(name, flag)()
