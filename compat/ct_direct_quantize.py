#!/usr/bin/env python3
"""Harness self-test candidate for compat/llmcompressor_check.py (`--candidate ct`).

Quantizes a bf16 checkpoint with the compressed-tensors (>= 0.20, the project venv) math and
compressors called directly, the recipe of model_free_quant.md §1.12, wrapped in a CT `Converter`
and run through CT's `convert_checkpoint`: min-max weight statistics in the weight dtype,
`calculate_qparams` / `generate_gparam` (NVFP4 global scale shared over q/k/v and gate/up as
llm-compressor's default fused mappings do), then the format's compressor. On CPU this is the
eager, weight-dtype rounding path, i.e. what `convert-checkpoint quantize --rounding weight_dtype`
must reproduce. It is not our quantizer and not shipped: it only shows that the check compares the
right things while ours is missing, and which differences come from CT 0.19 vs 0.20.

  .venv/bin/python compat/ct_direct_quantize.py SRC DST --scheme NAME [--ignore PAT ...]
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

import torch
from compressed_tensors import __version__ as ct_version
from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.compressors.format import infer_module_format
from compressed_tensors.entrypoints.convert import convert_checkpoint
from compressed_tensors.quantization import (
    QuantizationConfig,
    QuantizationStatus,
    QuantizationStrategy,
    preset_name_to_scheme,
)
from compressed_tensors.quantization.utils import (
    calculate_qparams,
    generate_gparam,
    maybe_pad_tensor_for_block_quant,
    strategy_cdiv,
)
from compressed_tensors.utils import match_quantizable_tensors

FUSED = [  # llm-compressor 0.14 default fused sets (microscale.py), primary first
    (r"^(?P<p>.*(attn|attention))\.q_proj\.weight$", ["{p}.k_proj.weight", "{p}.v_proj.weight"]),
    (r"^(?P<p>.*mlp)\.gate_proj\.weight$", ["{p}.up_proj.weight"]),
    (r"^(?P<p>.*)\.w1\.weight$", ["{p}.w3.weight"]),
]


def flatten(w: torch.Tensor, a) -> torch.Tensor:
    if a.strategy == QuantizationStrategy.TENSOR:
        return w.reshape(1, 1, -1)
    if a.strategy == QuantizationStrategy.CHANNEL:
        return w.unsqueeze(-2).unsqueeze(0)
    if a.strategy in (QuantizationStrategy.GROUP, QuantizationStrategy.TENSOR_GROUP):
        return w.unflatten(-1, (-1, a.group_size)).unsqueeze(0)
    if a.strategy == QuantizationStrategy.BLOCK:
        bh, bw = a.block_structure
        w = maybe_pad_tensor_for_block_quant(w, a.block_structure)
        r = strategy_cdiv(w.shape[0], bh, a.strategy, strict=True)
        c = strategy_cdiv(w.shape[1], bw, a.strategy, strict=True)
        return w.reshape(r, bh, c, bw).transpose(1, 2).flatten(-2, -1).unsqueeze(0)
    raise ValueError(a.strategy)


class DirectCT:
    def __init__(self, name: str, ignore: list[str]):
        self.name = name
        self.scheme = preset_name_to_scheme(name, ["Linear"])
        self.ignore = ignore
        self.micro = self.scheme.weights.strategy == QuantizationStrategy.TENSOR_GROUP

    def get_dependencies(self, weight_name: str) -> set[str]:
        if not self.micro:
            return set()
        for pat, partners in FUSED:
            m = re.match(pat, weight_name)
            if m:
                return {t.format(**m.groupdict()) for t in partners}
        return set()

    def _absmax(self, w: torch.Tensor) -> torch.Tensor:
        f = flatten(w, self.scheme.weights)
        return torch.max(f.amax(dim=(0, -1)).max(), -f.amin(dim=(0, -1)).min())

    def process(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        a = self.scheme.weights
        targets = list(match_quantizable_tensors(tensors, self.ignore, self.scheme.targets))
        gs_of: dict[str, torch.Tensor] = {}
        if self.micro:
            groups: dict[str, list[str]] = {n: [n] for _, n in targets}
            for _, n in targets:
                for pat, partners in FUSED:
                    m = re.match(pat, n)
                    if m:
                        members = [n] + [t.format(**m.groupdict()) for t in partners]
                        for x in members:
                            groups[x] = members
            for _, n in targets:
                A = torch.stack([self._absmax(tensors[x]) for x in groups[n] if x in tensors]).max()
                gs_of[n] = generate_gparam(-A.reshape(1), A.reshape(1))
        out = dict(tensors)
        fmt = self.scheme.format or infer_module_format(torch.nn.Linear, self.scheme)
        self.scheme.format = fmt.value if hasattr(fmt, "value") else fmt
        compressor = BaseCompressor.get_value_from_registry(self.scheme.format)
        for module, n in targets:
            w = tensors[n]
            f = flatten(w, a)
            mn, mx = f.amin(dim=(0, -1)), f.amax(dim=(0, -1))
            gs = gs_of.get(n)
            s, zp = calculate_qparams(mn, mx, a, global_scale=gs)
            sd = {"weight": w, "weight_scale": s.to(w.dtype)}
            if not a.symmetric:
                sd["weight_zero_point"] = zp
            if gs is not None:
                sd["weight_global_scale"] = gs
            comp = compressor.compress(sd, self.scheme)
            del out[n]
            out.update({f"{module}.{k}": v.contiguous() for k, v in comp.items()})
        return out

    def validate(self, tensors):
        return self.process(tensors)

    def update_config(self, config):
        return QuantizationConfig(config_groups={self.name: self.scheme}, ignore=list(self.ignore),
                                  quantization_status=QuantizationStatus.COMPRESSED,
                                  format=self.scheme.format)

    def update_model_config(self, model_config: dict) -> dict:
        return model_config


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("src", type=Path)
    ap.add_argument("dst", type=Path)
    ap.add_argument("--scheme", required=True)
    ap.add_argument("--ignore", action="append", default=[])
    args = ap.parse_args()
    conv = DirectCT(args.scheme, args.ignore)
    convert_checkpoint(args.src, args.dst, conv, max_workers=1, device="cpu")
    # convert_checkpoint writes the quantization_config without llm-compressor's extra keys and
    # skips non-weight files; add both as model_free_ptq does (save_utils.update_config).
    for f in args.src.iterdir():
        if f.is_file() and not f.name.endswith((".safetensors", ".safetensors.index.json")) \
                and not (args.dst / f.name).exists():
            shutil.copyfile(f, args.dst / f.name)
    cfg_path = args.dst / "config.json"
    cfg = json.loads(cfg_path.read_text())
    q = conv.update_config(None).model_dump()
    cfg["quantization_config"] = {"version": ct_version, "quant_method": "compressed-tensors",
                                  "transform_config": {}, **q}
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
