"""Quantized checkpoints built in the tests from a random bf16 model.

compressed-tensors formats are made by the library's own compressors (its qparams and
``compress``); AutoAWQ and ModelOpt NVFP4 are written from their documented layouts
(``formats.md`` §5-§6), since neither tool installs here. Every fixture puts some scales in a
second shard, away from their weights, so cross-shard dependencies are always exercised.
"""
from __future__ import annotations

import json
import os
import re
import shutil

import torch
from safetensors.torch import save_file

from fixtures import load_hf_tensors

# The linear layers a quantizer targets in a Llama-style model (not the LM head or embeddings).
LINEAR = re.compile(r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight")
SCALE_SHARD = "model-00002-of-00002.safetensors"
MAIN_SHARD = "model-00001-of-00002.safetensors"


def write_two_shards(src_dir: str, path: str, main: dict, scales: dict, quantization_config: dict, extra_files: dict | None = None) -> str:
    os.makedirs(path, exist_ok=True)
    for name in os.listdir(src_dir):
        if not name.endswith(".safetensors") and not name.endswith(".index.json"):
            shutil.copyfile(os.path.join(src_dir, name), os.path.join(path, name))
    files = {MAIN_SHARD: main, SCALE_SHARD: scales}
    for file, tensors in files.items():
        save_file(tensors, os.path.join(path, file), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {n: f for f, t in files.items() for n in t}}
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f)
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    config["quantization_config"] = quantization_config
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    for name, data in (extra_files or {}).items():
        with open(os.path.join(path, name), "w") as f:
            json.dump(data, f, indent=2)
    return path


def _quantize_linears(bf16_dir: str, quantize, scale_params: tuple[str, ...]) -> tuple[dict, dict]:
    """Each linear weight replaced by ``quantize(weight)`` (local names -> tensors); odd layers'
    ``scale_params`` go to the second shard."""
    main, scales = {}, {}
    for name, value in load_hf_tensors(bf16_dir).items():
        if LINEAR.fullmatch(name):
            module = name.rpartition(".")[0]
            layer = int(name.split(".")[2])
            _split({f"{module}.{k}": v for k, v in quantize(value).items()}, scale_params, main, scales, layer % 2 == 1)
        else:
            main[name] = value
    return main, scales


def _split(module_tensors: dict[str, torch.Tensor], scale_params: tuple[str, ...], into_main: dict, into_scales: dict, second: bool) -> None:
    for key, value in module_tensors.items():
        (into_scales if second and key.rpartition(".")[2] in scale_params else into_main)[key] = value.contiguous()


# --- compressed-tensors (the library's compressors) ---------------------------------------

def ct_scheme(preset: str, group_size: int | None = None):
    from compressed_tensors.compressors.format import infer_module_format
    from compressed_tensors.quantization import preset_name_to_scheme

    scheme = preset_name_to_scheme(preset, ["Linear"])
    if group_size is not None:
        scheme.weights.group_size = group_size
    scheme.format = infer_module_format(torch.nn.Linear, scheme)
    return scheme


def ct_compress(weight: torch.Tensor, scheme) -> dict[str, torch.Tensor]:
    """The library's qparams (min/max per its strategy) and ``compress`` for one weight."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam

    args = scheme.weights
    strategy = str(getattr(args.strategy, "value", args.strategy))
    if strategy in ("group", "tensor_group"):
        v = weight.reshape(weight.shape[0], -1, args.group_size)
        lo, hi = v.amin(-1), v.amax(-1)
    elif strategy == "channel":
        lo, hi = weight.amin(-1, keepdim=True), weight.amax(-1, keepdim=True)
    else:
        lo, hi = weight.amin().reshape(1), weight.amax().reshape(1)
    global_scale = generate_gparam(weight.amin(), weight.amax()) if strategy == "tensor_group" else None
    scale, zero = calculate_qparams(lo, hi, args, global_scale=global_scale)
    state = {"weight": weight, "weight_scale": scale, "weight_zero_point": zero}
    if global_scale is not None:
        state["weight_global_scale"] = global_scale
    compressor = BaseCompressor.get_value_from_registry(scheme.format)
    return compressor.compress(state, scheme)


def make_ct_checkpoint(bf16_dir: str, path: str, preset: str = "W4A16", group_size: int | None = 32) -> str:
    """A compressed-tensors checkpoint of ``preset``; odd layers keep their scales in shard 2."""
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus

    scheme = ct_scheme(preset, group_size)
    main, scales = _quantize_linears(bf16_dir, lambda w: ct_compress(w.to(torch.bfloat16), scheme),
                                     ("weight_scale", "weight_zero_point", "weight_global_scale", "weight_shape"))
    config = QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"], format=scheme.format,
                                quantization_status=QuantizationStatus.COMPRESSED)
    from compressed_tensors import __version__

    qc = json.loads(json.dumps(config.model_dump(), default=lambda v: getattr(v, "value", str(v))))
    qc["version"] = __version__
    return write_two_shards(bf16_dir, path, main, scales, qc)


def ct_reference(path: str, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """The library's own decompressor on each module of a compressed-tensors checkpoint."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig

    with open(os.path.join(path, "config.json")) as f:
        qc = dict(json.load(f)["quantization_config"])
    qc.pop("version", None)
    (scheme,) = QuantizationConfig.model_validate(qc).config_groups.values()
    compressor = BaseCompressor.get_value_from_registry(scheme.format)
    params = compressor.compression_param_names(scheme)
    tensors = load_hf_tensors(path)
    out = {}
    modules = sorted({n.rpartition(".")[0] for n in tensors if n.endswith("." + params[0]) and LINEAR.fullmatch(
        n.rpartition(".")[0] + ".weight")})
    for module in modules:
        state = {p: tensors.pop(f"{module}.{p}") for p in params if f"{module}.{p}" in tensors}
        out[f"{module}.weight"] = compressor.decompress(state, scheme)["weight"].to(dtype)
    out.update(tensors)
    return out


# --- AutoAWQ GEMM (formats.md §6) --------------------------------------------------------

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # nibble i of a word holds logical column 8c + AWQ_ORDER[i]


def awq_pack(values: torch.Tensor) -> torch.Tensor:
    """[rows, cols] of 0..15 -> int32 [rows, cols/8] in AutoAWQ's interleaved nibble order."""
    rows, cols = values.shape
    v = values.to(torch.int64).reshape(rows, cols // 8, 8)[:, :, AWQ_ORDER]
    word = torch.zeros(rows, cols // 8, dtype=torch.int64)
    for i in range(8):
        word |= v[:, :, i] << (4 * i)
    return word.to(torch.int32)  # wraps like the C int32 AutoAWQ writes


def awq_quantize(weight: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """AutoAWQ's zero-point quantizer on W [out, in]: q [in, out], zeros [in/G, out], scales fp16 [in/G, out]."""
    w = weight.float().t().contiguous()  # [in, out]
    g = w.reshape(-1, group, w.shape[1])
    hi, lo = g.amax(1), g.amin(1)
    scales = ((hi - lo).clamp(min=1e-5) / 15).to(torch.float16)
    s = scales.float()
    zeros = (-torch.round(lo / s)).clamp(0, 15)
    q = (torch.round(g / s[:, None, :]) + zeros[:, None, :]).clamp(0, 15).reshape(w.shape)
    return q.to(torch.int32), zeros.to(torch.int32), scales


def awq_dequantize(q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, group: int) -> torch.Tensor:
    """AutoAWQ's formula, in its fp16: W[o, i] = (q[i, o] - z[i//G, o]) * s[i//G, o]."""
    z = zeros.repeat_interleave(group, 0)
    s = scales.repeat_interleave(group, 0)
    return ((q - z).to(torch.float16) * s).t().contiguous()


def make_awq_checkpoint(bf16_dir: str, path: str, group: int = 32) -> tuple[str, dict[str, torch.Tensor]]:
    """AutoAWQ GEMM checkpoint; returns it and the dequantized weights by AWQ's own formula."""
    tensors = load_hf_tensors(bf16_dir)
    main, scales_shard, reference = {}, {}, {}
    for name, value in tensors.items():
        if LINEAR.fullmatch(name):
            module = name.rpartition(".")[0]
            q, zeros, scales = awq_quantize(value, group)
            layer = int(name.split(".")[2])
            packed = {f"{module}.qweight": awq_pack(q), f"{module}.qzeros": awq_pack(zeros), f"{module}.scales": scales}
            _split(packed, ("qzeros", "scales"), main, scales_shard, layer % 2 == 1)
            reference[name] = awq_dequantize(q, zeros, scales, group)
        else:
            main[name] = value.to(torch.float16)
            reference[name] = main[name]
    qc = {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True, "version": "gemm",
          "modules_to_not_convert": None}
    return write_two_shards(bf16_dir, path, main, scales_shard, qc), reference


# --- ModelOpt NVFP4 (formats.md §5) ------------------------------------------------------

E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def e2m1_codes(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest E2M1 value, ties to the even code; sign in bit 3."""
    mag = x.abs().clamp(max=6.0)
    dist = (mag[..., None] - E2M1).abs()
    best = dist.min(-1, keepdim=True).values
    tied = dist == best
    even = tied & (torch.arange(8) % 2 == 0)
    code = torch.where(even.any(-1), even.float().argmax(-1), tied.float().argmax(-1))
    return (code | ((x < 0) & (code > 0)).long() << 3).to(torch.uint8)


def e2m1_values(codes: torch.Tensor) -> torch.Tensor:
    values = E2M1[(codes & 7).long()]
    return torch.where(codes & 8 > 0, -values, values)


def modelopt_quantize(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    w = weight.float()
    s2 = w.abs().amax() / (6 * 448)
    blocks = w.reshape(w.shape[0], -1, 16)
    sb = (blocks.abs().amax(-1) / (6 * s2)).to(torch.float8_e4m3fn)
    sb = torch.where(sb.float() == 0, torch.ones_like(sb.float()), sb.float()).to(torch.float8_e4m3fn)
    codes = e2m1_codes(blocks / (sb.float()[..., None] * s2)).reshape(w.shape)
    packed = (codes[:, 1::2] << 4) | codes[:, 0::2]
    return {"weight": packed, "weight_scale": sb, "weight_scale_2": s2.reshape(()),
            "input_scale": torch.tensor(0.0123, dtype=torch.float32).reshape(())}


def modelopt_dequantize(t: dict[str, torch.Tensor]) -> torch.Tensor:
    packed = t["weight"]
    codes = torch.stack([packed & 0xF, packed >> 4], -1).reshape(packed.shape[0], -1)
    scale = t["weight_scale"].float().repeat_interleave(16, 1)
    return e2m1_values(codes) * scale * t["weight_scale_2"]


def make_modelopt_checkpoint(bf16_dir: str, path: str) -> str:
    main, scales = _quantize_linears(bf16_dir, modelopt_quantize, ("weight_scale", "weight_scale_2", "input_scale"))
    group = {"num_bits": 4, "type": "float", "group_size": 16, "dynamic": False}
    qc = {"quant_method": "modelopt", "quant_algo": "NVFP4",
          "config_groups": {"group_0": {"weights": group, "input_activations": group, "targets": ["Linear"]}},
          "ignore": ["lm_head"]}
    hf_quant = {"producer": {"name": "modelopt", "version": "0.0"},
                "quantization": {"quant_algo": "NVFP4", "group_size": 16, "kv_cache_quant_algo": None, "exclude_modules": ["lm_head"]}}
    return write_two_shards(bf16_dir, path, main, scales, qc, {"hf_quant_config.json": hf_quant})
