"""Model-free quantization to compressed-tensors (what llm-compressor's ``model_free_ptq`` writes).

A Converter: each targeted 2-D ``*.weight`` is quantized with compressed-tensors' own math
(``calculate_qparams``, ``generate_gparam``) and packed by the library's compressor for the
scheme's format (``BaseCompressor.compress``); only the min/max reduction (llm-compressor's
memoryless min-max observer) and the fused-set and expert-splitting glue are ours
(``model_free_quant.md`` §1.4-§1.12).

* Rounding: ``fp32`` (default) divides in fp32, one rounding, as llm-compressor does on CUDA;
  ``weight_dtype`` lets the library divide in the weight's dtype, as llm-compressor does on CPU.
  Scales are computed identically in both modes (in the weight's dtype, like the observer).
* NVFP4 global scales are shared across the sets vLLM fuses: q/k/v, gate/up (any prefix:
  ``mlp``, each routed expert, shared experts), w1/w3, MLA ``q_a_proj``/``kv_a_proj_with_mqa``.
  The set's first member depends on the others (``get_dependencies``), so partners stored in
  other shards are read with it; each output still goes to its own source shard.
* Fused 3-D experts (``gate_up_proj`` ``[E, 2I, H]`` or ``[E, H, 2I]``, ``down_proj``
  ``[E, H, I]`` or ``[E, I, H]``) are split into per-expert 2-D ``experts.N.{gate,up,down}_proj``
  weights; the layout is decided from config.json's sizes.
* Not quantized by default: norms, embeddings, ``lm_head`` (and MTP ``shared_head.head``),
  routers and shared-expert gates, MTP ``eh_proj``, vision towers; they are added to the
  config's ``ignore`` so that loaders keep them dense.
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ConversionError
from .names import matches_any, split_param

SCHEMES = ("FP8_DYNAMIC", "FP8_BLOCK", "W8A8", "W8A16", "W4A16", "W4A16_ASYM", "NVFP4A16", "MXFP4A16", "MXFP4",
           "MXFP8A16")
ROUNDINGS = ("fp32", "weight_dtype")
_FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

# Fused sets (vLLM's fused linear layers): (regex with the common prefix as group 1, members in order).
_FUSED_SETS: tuple[tuple[re.Pattern, tuple[str, ...]], ...] = (
    (re.compile(r"^(.*(?:attn|attention))\.(q_proj|k_proj|v_proj)$"), ("q_proj", "k_proj", "v_proj")),
    (re.compile(r"^(.*(?:attn|attention))\.(q_a_proj|kv_a_proj_with_mqa)$"), ("q_a_proj", "kv_a_proj_with_mqa")),
    (re.compile(r"^(.*(?:attn|attention))\.(wq_a|wkv_a_with_mqa)$"), ("wq_a", "wkv_a_with_mqa")),
    (re.compile(r"^(.*)\.(gate_proj|up_proj)$"), ("gate_proj", "up_proj")),
    (re.compile(r"^(.*)\.(w1|w3)$"), ("w1", "w3")),
)
_EMBEDDINGS = {"embed_tokens", "wte", "wpe", "word_embeddings", "embeddings", "embed_positions", "tok_embeddings"}
_ROUTERS = {"gate", "router", "shared_expert_gate"}
_VISION = {"visual", "vision_tower", "vision_model", "vision_encoder", "multi_modal_projector", "mm_projector"}
_EXPERT_PARAMS = ("gate_up_proj", "down_proj")


def default_skip(module: str) -> str | None:
    """Why ``module`` is not quantized by default (None: it is)."""
    parts = module.split(".")
    last = parts[-1]
    if last.endswith("norm"):
        return "norm"
    if last in _EMBEDDINGS:
        return "embedding"
    if last == "lm_head" or module.endswith("shared_head.head"):
        return "lm_head"
    if last in _ROUTERS or last.endswith("_router"):
        return "router/gate"
    if last == "eh_proj":
        return "MTP eh_proj"
    if _VISION.intersection(parts):
        return "vision tower"
    return None


def fused_members(module: str) -> tuple[str, ...]:
    """The modules whose NVFP4 global scale vLLM fuses with ``module`` (itself included), in order."""
    for pattern, members in _FUSED_SETS:
        m = pattern.match(module)
        if m:
            return tuple(f"{m.group(1)}.{member}" for member in members)
    return (module,)


def load_scheme(value: Any, targets: Iterable[str], where: str):
    """A compressed-tensors ``QuantizationScheme`` from a preset name, a dict or a scheme; refuses
    schemes whose activations need calibration (static or local scales)."""
    from compressed_tensors.quantization import QuantizationScheme, is_preset_scheme, preset_name_to_scheme

    targets = list(targets) or ["Linear"]
    if isinstance(value, QuantizationScheme):
        scheme = value.model_copy(update={"targets": targets})
    elif isinstance(value, Mapping):
        try:
            scheme = QuantizationScheme.model_validate({"targets": targets, **value})
        except Exception as e:
            raise ConversionError(f"{where}: not a quantization scheme ({str(e).splitlines()[0]})") from None
    elif isinstance(value, str) and is_preset_scheme(value.upper()):
        scheme = preset_name_to_scheme(value.upper(), targets)
    else:
        raise ConversionError(f"{where}: unknown scheme {value!r} (supported: {', '.join(SCHEMES)})")
    if scheme.weights is None:
        raise ConversionError(f"{where}: scheme {value!r} quantizes no weights")
    for kind in ("input_activations", "output_activations"):
        args = getattr(scheme, kind)
        if args is not None and args.dynamic is not True:
            raise ConversionError(f"{where}: scheme {value!r} needs static {kind.replace('_', ' ')} scales "
                                  "(calibration data), which model-free quantization does not have; "
                                  f"use a dynamic scheme ({', '.join(SCHEMES)})")
    if scheme.weights.dynamic is not False:
        raise ConversionError(f"{where}: scheme {value!r} has dynamic weights; nothing to write")
    return scheme


@dataclass
class _Group:
    key: str
    scheme: Any  # QuantizationScheme with format set
    explicit: bool  # targets name modules (not "Linear")

    @property
    def strategy(self) -> str:
        s = self.scheme.weights.strategy
        return str(getattr(s, "value", s))


class CTQuantizer:
    """Quantizes 2-D weights into compressed-tensors' formats (see the module docstring)."""

    label = "quantize"

    def __init__(self, groups: Mapping[str, Any], ignore: Iterable[str] = (), rounding: str = "fp32",
                 device: str = "cpu", model_config: Mapping | None = None, tensor_names: Iterable[str] = ()):
        from compressed_tensors.compressors.format import infer_module_format

        if rounding not in ROUNDINGS:
            raise ConversionError(f"quantize: rounding {rounding!r} is not one of {', '.join(ROUNDINGS)}")
        self.rounding = rounding
        self.device = device
        self.ignore = list(ignore)
        self.model_config = dict(model_config or {})
        self.groups: list[_Group] = []
        for key, scheme in groups.items():
            fmt = scheme.format or infer_module_format(torch.nn.Linear, scheme)
            scheme = scheme.model_copy(update={"format": getattr(fmt, "value", fmt)})
            explicit = "Linear" not in scheme.targets
            self.groups.append(_Group(key, scheme, explicit))
        self.tensor_names = frozenset(tensor_names)
        self._modules = {split_param(n)[0] for n in self.tensor_names}
        self.skipped: dict[str, str] = {}  # module -> why it is not quantized (filled by validate/process)
        self.quantized: set[str] = set()

    # --- matching --------------------------------------------------------------------------

    def group_for(self, module: str) -> _Group | None:
        if matches_any(module, self.ignore):
            return None
        for g in self.groups:
            if g.explicit:
                if matches_any(module, g.scheme.targets):
                    return g
            elif default_skip(module) is None:
                return g
        return None

    def _why_not(self, module: str) -> str:
        if matches_any(module, self.ignore):
            return "ignored"
        return default_skip(module) or "not targeted"

    # --- protocol --------------------------------------------------------------------------

    def get_dependencies(self, weight_name: str) -> set[str]:
        module, param = split_param(weight_name)
        group = self.group_for(module)
        if group is None or group.strategy != "tensor_group":
            return set()
        members = [m for m in fused_members(module) if m in self._modules and self._same_group(m, group)]
        if len(members) < 2 or members[0] != module:
            return set()  # the set's first member carries the others
        return {f"{m}.{param}" for m in members[1:] if f"{m}.{param}" in self.tensor_names}

    def _same_group(self, module: str, group: _Group) -> bool:
        return self.group_for(module) is group

    def validate(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self._run(tensors, meta=True)

    def process(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self._run(tensors, meta=False)

    def process_on_device(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``process`` with the quantized outputs left on the quantizer's device (the math alone,
        for benchmarks; the writer needs ``process``'s host tensors)."""
        return self._run(tensors, meta=False, to_host=False)

    def update_config(self, config: Any) -> dict:
        from compressed_tensors import __version__ as library_version
        from compressed_tensors.quantization import QuantizationConfig

        formats = {g.scheme.format for g in self.groups}
        ignore = list(self.ignore)
        ignore += sorted(m for m, why in self.skipped.items() if why not in ("ignored", "not targeted", "norm", "not 2-D")
                         and not matches_any(m, self.ignore))
        qc = QuantizationConfig(config_groups={g.key: g.scheme for g in self.groups}, quant_method="compressed-tensors",
                                format=formats.pop() if len(formats) == 1 else "mixed-precision",
                                quantization_status="compressed", ignore=ignore)
        from .protocol import _as_dict

        data = _as_dict(qc) or {}
        data["transform_config"] = {}
        data["version"] = library_version
        return data

    def describe(self) -> list[str]:
        """What is not quantized, by reason (``--dry_run``)."""
        by_reason: dict[str, list[str]] = {}
        for module, why in sorted(self.skipped.items()):
            by_reason.setdefault(why, []).append(module)
        lines = [f"quantize: {len(self.quantized)} weights quantized ({', '.join(g.key for g in self.groups)}, "
                 f"rounding {self.rounding})"]
        for why, modules in sorted(by_reason.items()):
            shown = ", ".join(modules[:8]) + (f" (+{len(modules) - 8} more)" if len(modules) > 8 else "")
            lines.append(f"not quantized ({why}): {shown}")
        return lines

    # --- the work ---------------------------------------------------------------------------

    def _run(self, tensors: dict[str, torch.Tensor], meta: bool, to_host: bool = True) -> dict[str, torch.Tensor]:
        work: dict[str, torch.Tensor] = {}
        for name, t in tensors.items():
            module, param = split_param(name)
            expert_param = next((p for p in _EXPERT_PARAMS if name.endswith(p) or name.endswith(p + ".weight")), None)
            if expert_param and t.dim() == 3:
                split = self._split_experts(name, expert_param, t)
                if any(self.group_for(split_param(n)[0]) is not None for n in split):
                    work.update(split)
                    continue
            work[name] = t
        todo: dict[str, _Group] = {}
        for name, t in work.items():
            module, param = split_param(name)
            if param != "weight":
                continue
            group = self.group_for(module)
            if group is None:
                self.skipped[module] = self._why_not(module) if t.dim() >= 2 else "not 2-D"
                continue
            if t.dim() != 2:
                if group.explicit:
                    raise ConversionError(f"tensor {name} is {t.dim()}-D {list(t.shape)}: only 2-D linear weights "
                                          f"can be quantized (matched by targets {group.scheme.targets})")
                self.skipped[module] = "not 2-D"
                continue
            if t.dtype not in _FLOAT_DTYPES:
                raise ConversionError(f"tensor {name} is already quantized ({str(t.dtype).replace('torch.', '')}); "
                                      "dequantize it first with --converter dequantize")
            self._check_divisible(name, t, group)
            todo[name] = group
        out: dict[str, torch.Tensor] = {}
        if not meta and self.device != "cpu":  # each weight crosses to the device once
            work = {n: _to_device(t, self.device) if n in todo else t for n, t in work.items()}
        global_scales = self._global_scales(work, todo, meta)
        for name, t in work.items():
            group = todo.get(name)
            if group is None:
                out[name] = t
                continue
            module = split_param(name)[0]
            self.quantized.add(module)
            for key, value in self._quantize(t, group, global_scales.get(name), meta, to_host).items():
                out[f"{module}.{key}"] = value
        return out

    def _check_divisible(self, name: str, t: torch.Tensor, group: _Group) -> None:
        args = group.scheme.weights
        size = args.group_size
        if group.strategy in ("group", "tensor_group") and size and t.shape[1] % size:
            raise ConversionError(f"tensor {name} {list(t.shape)}: its {t.shape[1]} columns are not divisible by "
                                  f"the group size {size} of scheme {group.key}")
        if group.scheme.format == "pack-quantized" and not args.symmetric and t.shape[0] % (32 // args.num_bits):
            raise ConversionError(f"tensor {name} {list(t.shape)}: {t.shape[0]} rows cannot be packed by "
                                  f"{32 // args.num_bits} for asymmetric zero points")

    def _global_scales(self, work: dict[str, torch.Tensor], todo: dict[str, _Group], meta: bool) -> dict[str, torch.Tensor]:
        """NVFP4: one global scale per fused set, from the set's max |w| (in the weight's dtype)."""
        from compressed_tensors.quantization.utils import generate_gparam

        from ..quant import ct_fused

        found: dict[str, torch.Tensor] = {}
        for name, group in todo.items():
            if group.strategy != "tensor_group" or name in found:
                continue
            module = split_param(name)[0]
            members = [f"{m}.weight" for m in fused_members(module)]
            members = [m for m in members if todo.get(m) is group] or [name]
            if meta:
                gs = torch.empty(1, dtype=torch.float32, device="meta")
            elif self.device != "cpu":  # the reductions and generate_gparam compiled together
                gs = ct_fused.nvfp4_global_scale([work[m] for m in members])
            else:
                amax = torch.stack([_abs_max(work[m]) for m in members]).amax()
                gs = generate_gparam(-amax.reshape(1), amax.reshape(1))
            for m in members:
                found[m] = gs
        return found

    def _quantize(self, w: torch.Tensor, group: _Group, gs: torch.Tensor | None, meta: bool,
                  to_host: bool) -> dict[str, torch.Tensor]:
        if meta:
            return _meta_outputs(w, group.scheme, group.strategy)
        out = self.quantize_on_device(_to_device(w, self.device), group, gs)
        return {key: _to_host(value) for key, value in out.items()} if to_host else out

    def quantize_on_device(self, w: torch.Tensor, group: _Group, gs: torch.Tensor | None,
                           fused: bool | None = None) -> dict[str, torch.Tensor]:
        """The compressed tensors of one 2-D weight, computed and left on ``w``'s device.

        ``fused``: through ``quant/ct_fused`` (observer, scale and codes compiled together; the
        library's bytes) where it covers the scheme. None: on an accelerator with ``fp32``
        rounding, the case it exists for; True elsewhere runs its formulas eagerly (tests)."""
        from compressed_tensors.compressors import BaseCompressor
        from compressed_tensors.quantization.utils import calculate_qparams

        from ..quant import ct_fused

        scheme = group.scheme
        args = scheme.weights
        accelerator = w.device.type != "cpu"
        if fused is None:
            fused = accelerator and self.rounding == "fp32"
        if fused and self.rounding == "fp32":
            done = ct_fused.quantize(w, scheme, gs, compiled=accelerator)
            if done is not None:
                return done
        if accelerator:
            _library_kernels(fused=self.rounding == "fp32")
        low, high = _min_max(w, args, group.strategy)
        scale, zero_point = calculate_qparams(low, high, args, global_scale=gs)
        state: dict[str, torch.Tensor | None] = {"weight": w, "weight_scale": scale.to(w.dtype)}
        if not args.symmetric:
            state["weight_zero_point"] = zero_point
        if gs is not None:
            state["weight_global_scale"] = gs
        if self.rounding == "fp32" and w.dtype != torch.float32:
            # One rounding in fp32. The library's fused GPU kernels upcast each element in
            # registers (x / s with IEEE division), so only the eager path needs an fp32 copy.
            if not accelerator:
                state["weight"] = w.float()
            state["weight_scale"] = scale.to(w.dtype).float()
        out = BaseCompressor.get_value_from_registry(scheme.format).compress(state, scheme)
        result = {}
        for key, value in out.items():
            if value is None:
                continue
            if key == "weight_scale" and value.dtype == torch.float32 and w.dtype != torch.float32:
                value = value.to(w.dtype)  # back to the weight's dtype, as the library stores it
            result[key] = value.contiguous()
        return result

    def _split_experts(self, name: str, param: str, t: torch.Tensor) -> dict[str, torch.Tensor]:
        """``...experts.gate_up_proj`` -> ``...experts.N.gate_proj.weight`` / ``up_proj`` (and down_proj)."""
        hidden, inter = _expert_sizes(self.model_config)
        experts, a, b = t.shape
        if param == "gate_up_proj":
            plain = any(a == 2 * i and b == hidden for i in inter)
            flipped = any(a == hidden and b == 2 * i for i in inter)
        else:
            plain = any(a == hidden and b == i for i in inter)
            flipped = any(a == i and b == hidden for i in inter)
        if plain == flipped:
            what = "ambiguous (both layouts fit)" if plain else "not [E, 2I, H] or [E, H, 2I]"
            if param == "down_proj":
                what = "ambiguous (both layouts fit)" if plain else "not [E, H, I] or [E, I, H]"
            raise ConversionError(f"fused expert tensor {name} {list(t.shape)}: its layout is {what} for "
                                  f"hidden_size {hidden} and expert intermediate sizes {sorted(inter)}")
        base = name[: name.rindex(param)]
        out = {}
        for e in range(experts):
            piece = t[e] if plain else t[e].transpose(0, 1)
            if param == "gate_up_proj":
                half = piece.shape[0] // 2
                out[f"{base}{e}.gate_proj.weight"] = piece[:half].contiguous()
                out[f"{base}{e}.up_proj.weight"] = piece[half:].contiguous()
            else:
                out[f"{base}{e}.down_proj.weight"] = piece.contiguous()
        return out


def _expert_sizes(config: Mapping) -> tuple[int, set[int]]:
    sources = [config] + [config[k] for k in ("text_config", "language_config") if isinstance(config.get(k), Mapping)]
    hidden = next((c["hidden_size"] for c in sources if isinstance(c.get("hidden_size"), int)), None)
    inter = {c[k] for c in sources for k in ("moe_intermediate_size", "intermediate_size", "expert_intermediate_size")
             if isinstance(c.get(k), int)}
    if hidden is None or not inter:
        raise ConversionError("fused 3-D experts: config.json has no hidden_size and (moe_)intermediate_size "
                              "to tell the expert layout")
    return hidden, inter


def _min_max(w: torch.Tensor, args: Any, strategy: str) -> tuple[torch.Tensor, torch.Tensor]:
    """llm-compressor's memoryless min-max observer, in the weight's dtype (reductions are exact,
    so any order gives its values). One ``aminmax`` pass where it is the faster on CPU (whole
    tensors, small groups); per row, ``amin`` + ``amax`` (7x faster than ``aminmax`` on CPU)."""
    if strategy == "tensor":
        low, high = torch.aminmax(w)
        return low.reshape(1), high.reshape(1)
    if strategy == "channel":
        return w.amin(1, keepdim=True), w.amax(1, keepdim=True)
    if strategy in ("group", "tensor_group"):
        return torch.aminmax(w.reshape(w.shape[0], -1, args.group_size), dim=-1)
    if strategy == "block":
        bh, bw = args.block_structure
        rows, cols = -(-w.shape[0] // bh), -(-w.shape[1] // bw)
        if (rows * bh, cols * bw) != tuple(w.shape):
            w = torch.nn.functional.pad(w, (0, cols * bw - w.shape[1], 0, rows * bh - w.shape[0]))
        blocks = w.view(rows, bh, cols, bw)
        return blocks.amin(dim=(1, 3)), blocks.amax(dim=(1, 3))
    raise ConversionError(f"quantize: weight strategy {strategy} is not supported")


def _to_device(t: torch.Tensor, device: str) -> torch.Tensor:
    """``t`` on ``device``, staged through page-locked host memory when it comes from the host
    (a copy from pageable memory is several times slower and waits for the device)."""
    if t.device.type != "cpu" or device == "cpu":
        return t.to(device)
    staged = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    staged.copy_(t)
    return staged.to(device, non_blocking=True)


def _to_host(t: torch.Tensor) -> torch.Tensor:
    """A device tensor copied into page-locked host memory (cached by torch's host allocator):
    several times faster than a copy into pageable memory."""
    if t.device.type == "cpu":
        return t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t)
    return host


def _abs_max(w: torch.Tensor) -> torch.Tensor:
    """``max |w|`` in one pass (no |w| copy): the larger magnitude of the min and the max."""
    low, high = torch.aminmax(w)
    return torch.maximum(low.abs(), high.abs())


def _meta_outputs(w: torch.Tensor, scheme: Any, strategy: str) -> dict[str, torch.Tensor]:
    """Names, dtypes and shapes the compressor will produce (checked against process)."""
    args = scheme.weights
    out_features, in_features = w.shape
    fmt = scheme.format

    def meta(shape, dtype):
        return torch.empty(tuple(shape), dtype=dtype, device="meta")

    if strategy == "channel":
        scale_shape: tuple[int, ...] = (out_features, 1)
    elif strategy == "tensor":
        scale_shape = (1,)
    elif strategy == "block":
        bh, bw = args.block_structure
        scale_shape = (-(-out_features // bh), -(-in_features // bw))
    else:
        scale_shape = (out_features, in_features // args.group_size)
    if fmt in ("float-quantized", "int-quantized", "naive-quantized"):
        dtype = torch.int8 if str(getattr(args.type, "value", args.type)) == "int" else torch.float8_e4m3fn
        return {"weight_scale": meta(scale_shape, w.dtype), "weight": meta(w.shape, dtype)}
    if fmt == "pack-quantized":
        out = {"weight_scale": meta(scale_shape, w.dtype)}
        if not args.symmetric:
            out["weight_zero_point"] = meta((-(-out_features * args.num_bits // 32), scale_shape[1]), torch.int32)
        out["weight_packed"] = meta((out_features, -(-in_features * args.num_bits // 32)), torch.int32)
        out["weight_shape"] = meta((2,), torch.int64)
        return out
    if fmt == "nvfp4-pack-quantized":
        return {"weight_global_scale": meta((1,), torch.float32), "weight_packed": meta((out_features, in_features // 2), torch.uint8),
                "weight_scale": meta(scale_shape, torch.float8_e4m3fn)}
    if fmt == "mxfp4-pack-quantized":
        return {"weight_packed": meta((out_features, in_features // 2), torch.uint8), "weight_scale": meta(scale_shape, torch.uint8)}
    if fmt == "mxfp8-quantized":
        return {"weight_scale": meta(scale_shape, torch.uint8), "weight": meta(w.shape, torch.float8_e4m3fn)}
    raise ConversionError(f"quantize: format {fmt} is not supported")


def build_quantizer(model_config: Mapping, tensor_names: Iterable[str], source_qc: Mapping | None, *,
                    scheme: Any = None, config: Any = None, targets: Iterable[str] = (), ignore: Iterable[str] = (),
                    rounding: str = "fp32", device: str = "cpu") -> CTQuantizer:
    """The converter for one checkpoint; refuses an already-quantized source (no pre-stage)."""
    if source_qc:
        method = source_qc.get("quant_method", "?")
        raise ConversionError(f"quantize: the checkpoint is already quantized (quant_method {method}); "
                              "put a pre-stage first: --converter dequantize")
    device = _math_device(device)
    if (scheme is None) == (config is None):
        raise ConversionError("quantize: give exactly one of scheme and config")
    groups: dict[str, Any] = {}
    ignore = list(ignore)
    if scheme is not None:
        key = scheme if isinstance(scheme, str) else "config_group_0"
        groups[key] = load_scheme(scheme, targets, "quantize")
    else:
        data = config.model_dump() if hasattr(config, "model_dump") else dict(config)
        for key, value in (data.get("config_groups") or {}).items():
            value = dict(value)
            group_targets = value.pop("targets", None) or list(targets)
            preset = value.pop("scheme", None)
            groups[key] = load_scheme(preset if preset is not None else value, group_targets, f"quantize config group {key}")
        if not groups:
            raise ConversionError("quantize: config has no config_groups")
        ignore += [p for p in data.get("ignore") or () if p not in ignore]
    return CTQuantizer(groups, ignore=ignore, rounding=rounding, device=device, model_config=model_config,
                       tensor_names=tensor_names)


def _library_kernels(fused: bool) -> None:
    """On an accelerator, compressed-tensors' fused Triton kernels divide in fp32 with IEEE
    rounding (``tl.div_rn``): the ``fp32`` rounding's bytes, at memory speed. The ``weight_dtype``
    rounding divides in the weight's dtype, which only the library's eager (torch) kernels do."""
    from compressed_tensors.utils import impl_backend

    impl_backend.ENFORCE_EAGER = not fused


def _math_device(device: str) -> str:
    """Validates ``device`` (cpu, cuda, cuda:N, cuda:N,M; existing GPUs) and names where the math
    runs: one named GPU, or ``cuda`` (the current device, which the executor sets per file when
    the work is spread over several)."""
    from ..devices import parse_device  # counts through NVML: the workers are forked

    gpus = parse_device(device)
    if not gpus:
        return "cpu"
    return f"cuda:{gpus[0]}" if len(gpus) == 1 and device.strip() != "cuda" else "cuda"


def quantize_spec(scheme: Any = None, config: Any = None, targets=(), ignore=(), rounding: str = "fp32",
                  device: str = "cpu", fmt: str = "compressed-tensors", int4_layout: str | None = None) -> str:
    """The ``--converter`` spec of the built-in ``quantize`` (JSON options)."""
    options: dict[str, Any] = {"rounding": rounding, "device": device}
    if fmt != "compressed-tensors":
        options["format"] = fmt
    if int4_layout is not None:
        options["int4_layout"] = int4_layout
    if scheme is not None:
        options["scheme"] = scheme if isinstance(scheme, str) else _dump(scheme)
    if config is not None:
        options["config"] = config if isinstance(config, dict) else _dump(config)
    if targets:
        options["targets"] = list(targets)
    if ignore:
        options["ignore"] = list(ignore)
    return "quantize:" + json.dumps(options, separators=(",", ":"))


def _dump(model: Any) -> dict:
    from .protocol import _as_dict

    data = _as_dict(model)
    if data is None:
        raise ConversionError("quantize: scheme/config is empty")
    data.pop("version", None)
    return data
