"""Quark-format quantization (converters/quantize_quark.py) against an independent implementation
of Quark's formulas (model_free_quant.md §2.4, written again here in plain torch), the
``quantization_config`` amd-quark 0.13 writes, and bad input as one-line errors.

Byte equality with amd-quark itself is checked by compat/quark_check.py (its own venv).
"""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from convert_checkpoint import convert_checkpoint
from convert_checkpoint.converters.quantize_quark import SCHEMES, QuarkQuantizer, build
from convert_checkpoint.errors import ConversionError
from fixtures import load_hf_tensors

EPS32 = torch.finfo(torch.float32).eps
FP4 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
AWQ = [0, 2, 4, 6, 1, 3, 5, 7]


def weight(out: int, cols: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, cols, generator=g) * 0.05
    w[0] = 0  # an all-zero row
    w[1] = w[1] * 1e-6  # tiny
    w[2] = w[2] * 400  # large
    w[3, : min(cols, 64)] = torch.tensor([6.0, 0.25, -0.75, 1.25, 3.5, -5.0, 0.5, 2.5] * 8)[: min(cols, 64)]  # ties
    return w.to(torch.bfloat16)


# --- independent reference math ----------------------------------------------------------

def ref_fp8_tensor(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    amax = w.float().abs().max()
    s = amax / 448.0 if amax > 0 else torch.tensor(EPS32)
    x = (w.float() / s).to(w.dtype)  # fp32 quotient rounded once to the weight dtype
    return x.clamp(-448, 448).to(torch.float8_e4m3fn), s.reshape(())


def unpack_nibbles(packed: torch.Tensor, order: list[int]) -> torch.Tensor:
    """int32 words -> signed 4-bit codes, element ``order[i]`` of each 8 from nibble ``i``."""
    rows, words = packed.shape
    out = torch.zeros(rows, words * 8, dtype=torch.int64)
    p = packed.to(torch.int64) & 0xFFFFFFFF
    for i in range(8):
        nib = (p >> (4 * i)) & 0xF
        out[:, order[i]::8] = torch.where(nib >= 8, nib - 16, nib)
    return out


def ref_int4(x: torch.Tensor, amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and fp32 scale: s = max(amax/7.5, eps) in amax's dtype; RNE of x * (1/s)."""
    s = torch.clamp(amax / 7.5, min=EPS32).float()
    q = torch.round(x.float() * (1.0 / s)).clamp(-8, 7)
    return q.to(torch.int64), s


def ref_mx_exponent(amax: float) -> int:
    """Quark's even_round: the power of two of amax, rounded up from 1.75·2^e, minus emax 2."""
    if amax == 0:
        return -127
    e = int(torch.floor(torch.log2(torch.tensor(amax, dtype=torch.float64))).item())
    if amax / 2.0 ** e >= 1.75:
        e += 1
    return max(-127, min(127, e - 2))


def ref_fp4_value(x: float) -> float:
    """Nearest E2M1 value, ties to the even code, saturating at ±6."""
    a = min(abs(x), 6.0)
    d = (FP4 - a).abs()
    best = torch.nonzero(d == d.min()).flatten().tolist()
    idx = best[0] if len(best) == 1 else next(i for i in best if i % 2 == 0)
    return float(FP4[idx]) * (-1 if x < 0 else 1)


# --- per scheme ------------------------------------------------------------------------------

def quantize(scheme: str, w: torch.Tensor, name: str = "model.layers.0.mlp.up_proj.weight", **kw):
    (c,) = build(scheme, [], []) if not kw else [QuarkQuantizer(scheme, **kw)]
    meta = c.validate({name: torch.empty(w.shape, dtype=w.dtype, device="meta")})
    out = c.process({name: w})
    assert {k: (v.dtype, tuple(v.shape)) for k, v in out.items()} == \
           {k: (v.dtype, tuple(v.shape)) for k, v in meta.items()}, "validate must announce what process writes"
    return out


def test_fp8_per_tensor():
    w = weight(64, 96)
    out = quantize("fp8", w)
    q, s = ref_fp8_tensor(w)
    n = "model.layers.0.mlp.up_proj.weight"
    assert out[f"{n}_scale"].dtype == torch.float32 and out[f"{n}_scale"].shape == ()
    assert torch.equal(out[f"{n}_scale"], s)
    assert torch.equal(out[n].view(torch.uint8), q.view(torch.uint8))


def test_ptpc_fp8_per_channel():
    w = weight(64, 96)
    n = "model.layers.0.mlp.up_proj.weight"
    out = quantize("ptpc_fp8", w)
    amax = w.float().abs().amax(1)
    s = torch.where(amax > 0, amax / 448.0, torch.tensor(EPS32))
    x = w / s.to(torch.bfloat16)[:, None]  # codes from the scale rounded to bf16
    q = x.clamp(-448, 448).to(torch.float8_e4m3fn)
    assert out[f"{n}_scale"].dtype == torch.float32 and torch.equal(out[f"{n}_scale"], s)  # stored unrounded
    assert torch.equal(out[n].view(torch.uint8), q.view(torch.uint8))


def test_int4_wo_128():
    w = weight(40, 256)
    n = "model.layers.0.mlp.up_proj.weight"
    out = quantize("int4_wo_128", w)
    packed, scale = out[n], out[f"{n}_scale"]
    assert packed.dtype == torch.int32 and packed.shape == (256, 5)  # (in, out/8)
    assert scale.dtype == torch.float32 and scale.shape == (40, 2)  # (out, in/128)
    g = w.reshape(40, 2, 128)
    q, s = ref_int4(g, g.abs().amax(2, keepdim=True))  # amax in bf16, /7.5 in bf16
    s = s.squeeze(2)
    assert torch.equal(scale, s)
    codes = unpack_nibbles(packed, list(range(8)))[:, :40].t()  # natural order, transposed back
    assert torch.equal(codes, q.reshape(40, 256))
    assert torch.all(s[0] == EPS32)  # an all-zero group: eps, codes 0

    (c,) = build("int4_wo_128", [], [], int4_layout="vllm")
    vllm = c.process({n: w})
    assert torch.equal(vllm[f"{n}_scale"], scale.t())
    assert torch.equal(unpack_nibbles(vllm[n], AWQ)[:, :40].t(), q.reshape(40, 256))


def test_mxfp4():
    w = weight(16, 96)
    n = "model.layers.0.mlp.up_proj.weight"
    out = quantize("mxfp4", w)
    packed, e8m0 = out[n], out[f"{n}_scale"]
    assert packed.dtype == torch.uint8 and packed.shape == (16, 48)
    assert e8m0.dtype == torch.uint8 and e8m0.shape == (16, 3)
    codes = torch.stack([packed & 0xF, packed >> 4], -1).reshape(16, 96).to(torch.int64)
    values = FP4[codes & 7] * torch.where(codes >= 8, -1.0, 1.0)
    g = w.float().reshape(16, 3, 32)
    for r in range(16):
        for b in range(3):
            exp = ref_mx_exponent(float(g[r, b].abs().max()))
            assert int(e8m0[r, b]) == max(exp, -126) + 127, (r, b)  # the byte of 2^-127 clamps to 2^-126
            for j in range(32):
                want = ref_fp4_value(float(g[r, b, j]) / 2.0 ** exp)
                assert float(values[r, b * 32 + j]) == want, (r, b, j)
    assert not torch.any(codes == 8), "zero is written as +0"


def test_int4_fp8_progressive():
    w = weight(24, 100)  # 100 columns: the last int32 word is zero-padded
    n = "model.layers.0.mlp.up_proj.weight"
    out = quantize("int4_fp8", w)
    w8, s1 = ref_fp8_tensor(w)
    v = w8.float()
    q, s2 = ref_int4(v, v.abs().amax(1, keepdim=True))
    assert torch.equal(out[f"{n}_scale"], s1) and out[f"{n}_scale"].shape == ()
    assert out[f"{n}_scale_2"].shape == (24,) and torch.equal(out[f"{n}_scale_2"], s2.flatten())
    assert out[n].dtype == torch.int32 and out[n].shape == (24, 13)  # (out, ceil(in/8)), AWQ order
    assert torch.equal(unpack_nibbles(out[n], AWQ)[:, :100], q)
    assert torch.all(unpack_nibbles(out[n], AWQ)[:, 100:] == 0)


# --- config, selection, pipeline --------------------------------------------------------------

INT4_FP8_GLOBAL = {  # amd-quark 0.13's QConfig(global_quant_config=int4_fp8).to_dict()["global_quant_config"]
    "input_tensors": {"dtype": "fp8_e4m3", "is_dynamic": True, "qscheme": "per_tensor", "ch_axis": None,
                      "group_size": None, "block_size": None, "symmetric": True, "round_method": "half_even",
                      "scale_type": "float32", "zero_point_type": "int32", "scale_format": None,
                      "scale_calculation_mode": None, "mx_element_dtype": None,
                      "observer_cls": "PerTensorMinMaxObserver", "is_scale_quant": False,
                      "enable_buffer_reuse": False, "max_input_numel": 4194304},
    "output_tensors": None,
    "weight": [
        {"dtype": "fp8_e4m3", "is_dynamic": False, "qscheme": "per_tensor", "ch_axis": None, "group_size": None,
         "block_size": None, "symmetric": True, "round_method": "half_even", "scale_type": "float32",
         "zero_point_type": "int32", "scale_format": None, "scale_calculation_mode": None, "mx_element_dtype": None,
         "observer_cls": "PerTensorMinMaxObserver", "is_scale_quant": False, "enable_buffer_reuse": False,
         "max_input_numel": 4194304},
        {"dtype": "int4", "is_dynamic": False, "qscheme": "per_channel", "ch_axis": 0, "group_size": None,
         "block_size": None, "symmetric": True, "round_method": "half_even", "scale_type": "float32",
         "zero_point_type": "int32", "scale_format": None, "scale_calculation_mode": None, "mx_element_dtype": None,
         "observer_cls": "PerChannelMinMaxObserver", "is_scale_quant": False, "enable_buffer_reuse": False,
         "max_input_numel": 4194304}],
    "bias": None, "target_device": None}


def make_checkpoint(path, extra: dict | None = None, config: dict | None = None) -> str:
    h = 128
    t = {"model.embed_tokens.weight": weight(64, h, 1), "lm_head.weight": weight(64, h, 2),
         "model.norm.weight": torch.ones(h, dtype=torch.bfloat16),
         "model.layers.0.input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
         "model.layers.0.self_attn.q_proj.weight": weight(h, h, 3),
         "model.layers.0.self_attn.q_proj.bias": torch.zeros(h, dtype=torch.bfloat16),
         "model.layers.0.self_attn.q_a_layernorm.weight": torch.ones(32, dtype=torch.bfloat16),
         "model.layers.0.mlp.gate.weight": weight(4, h, 4),
         "model.layers.0.mlp.shared_expert_gate.weight": weight(8, h, 5),
         "model.layers.0.mlp.experts.0.up_proj.weight": weight(32, h, 6),
         "model.layers.0.mlp.experts.0.down_proj.weight": weight(h, 32, 7),
         "model.layers.1.eh_proj.weight": weight(h, 2 * h, 8)}
    t.update(extra or {})
    root = str(path)
    os.makedirs(root, exist_ok=True)
    save_file(t, os.path.join(root, "model.safetensors"))
    cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "torch_dtype": "bfloat16"}
    cfg.update(config or {})
    with open(os.path.join(root, "config.json"), "w") as f:
        json.dump(cfg, f)
    return root


@pytest.mark.parametrize("scheme", SCHEMES)
def test_pipeline_and_config(tmp_path, scheme):
    if scheme == "int4_wo_128":  # experts.0.down_proj has 32 inputs: not a multiple of 128
        ignore = ["re:.*down_proj"]
    else:
        ignore = []
    src = make_checkpoint(tmp_path / "src", config={"text_config": {"quantization_config": {"quant_method": "fp8"}}})
    dst = str(tmp_path / "dst")
    convert_checkpoint(src, dst, build(scheme, [], ignore), progress=False)
    before, after = load_hf_tensors(src), load_hf_tensors(dst)
    kept = ["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight", "model.layers.0.mlp.gate.weight",
            "model.layers.0.mlp.shared_expert_gate.weight", "model.layers.1.eh_proj.weight",
            "model.layers.0.self_attn.q_a_layernorm.weight", "model.layers.0.self_attn.q_proj.bias"]
    for name in kept:
        assert torch.equal(after[name], before[name]), name
    q = "model.layers.0.self_attn.q_proj.weight"
    c = QuarkQuantizer(scheme)
    for name, t in c.quantize(q, before[q]).items():
        assert torch.equal(after[name], t), name
    with open(os.path.join(dst, "config.json")) as f:
        config = json.load(f)
    assert "quantization_config" not in config["text_config"]  # nested ones are dropped, as Quark does
    qc = config["quantization_config"]
    assert qc["quant_method"] == "quark" and qc["version"] == "0.13"
    assert qc["export"] == {"kv_cache_group": [], "min_kv_scale": 0.0, "pack_method": "reorder",
                            "weight_format": "real_quantized", "weight_merge_groups": None}
    want_exclude = ["lm_head", "model.layers.0.mlp.gate", "model.layers.0.mlp.shared_expert_gate",
                    "model.layers.1.eh_proj"] + (["model.layers.0.mlp.experts.0.down_proj"] if ignore else [])
    assert qc["exclude"] == sorted(want_exclude)
    weight_cfg = qc["global_quant_config"]["weight"]
    if scheme == "int4_fp8":
        assert qc["global_quant_config"] == INT4_FP8_GLOBAL
    else:
        want = {"fp8": ("fp8_e4m3", "per_tensor"), "ptpc_fp8": ("fp8_e4m3", "per_channel"),
                "mxfp4": ("fp4", "per_group"), "int4_wo_128": ("int4", "per_group")}[scheme]
        assert (weight_cfg["dtype"], weight_cfg["qscheme"]) == want
    assert set(qc) == {"global_quant_config", "exclude", "algo_config", "softmax_quant_spec", "quant_method",
                       "layer_type_quant_config", "layer_quant_config", "kv_cache_quant_config",
                       "kv_cache_post_rope", "quant_mode", "version", "export"}


def test_targets_and_ignore(tmp_path):
    src = make_checkpoint(tmp_path / "src")
    dst = str(tmp_path / "dst")
    convert_checkpoint(src, dst, build("ptpc_fp8", ["re:.*experts.*", "lm_head"], ["re:.*down_proj"]), progress=False)
    after = load_hf_tensors(dst)
    assert after["model.layers.0.mlp.experts.0.up_proj.weight"].dtype == torch.float8_e4m3fn
    assert after["lm_head.weight"].dtype == torch.float8_e4m3fn  # named exactly: overrides the default set
    assert after["model.layers.0.mlp.experts.0.down_proj.weight"].dtype == torch.bfloat16
    assert after["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16
    with open(os.path.join(dst, "config.json")) as f:
        exclude = json.load(f)["quantization_config"]["exclude"]
    assert exclude == ["model.layers.0.mlp.experts.0.down_proj", "model.layers.0.mlp.gate",
                       "model.layers.0.mlp.shared_expert_gate", "model.layers.0.self_attn.q_proj",
                       "model.layers.1.eh_proj"]


@pytest.mark.parametrize("scheme, extra, targets, fragments", [
    ("mxfp4", {"model.layers.0.mlp.up_proj.weight": weight(16, 48)}, [],
     ["model.layers.0.mlp.up_proj.weight", "48", "group size 32"]),
    ("int4_wo_128", {}, [], ["model.layers.0.mlp.experts.0.down_proj.weight", "32", "group size 128"]),
    ("fp8", {"model.layers.0.mlp.up_proj.weight": torch.ones(128, dtype=torch.bfloat16)},
     ["model.layers.0.mlp.up_proj"], ["model.layers.0.mlp.up_proj.weight", "1-D"]),
    ("fp8", {"model.layers.0.mlp.experts.weight": torch.ones(2, 8, 128, dtype=torch.bfloat16)},
     ["re:.*experts$"], ["model.layers.0.mlp.experts.weight", "3-D"]),
    ("ptpc_fp8", {}, ["model.norm"], ["model.norm.weight", "norm"]),
    ("fp8", {"model.layers.0.mlp.up_proj.weight": torch.ones(8, 128, dtype=torch.int8)}, [],
     ["model.layers.0.mlp.up_proj.weight", "int8"]),
])
def test_bad_input_one_line(tmp_path, scheme, extra, targets, fragments):
    src = make_checkpoint(tmp_path / "src", extra)
    dst = str(tmp_path / "dst")
    with pytest.raises(ConversionError) as e:
        convert_checkpoint(src, dst, build(scheme, targets, []), progress=False)
    message = str(e.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    assert not os.path.exists(dst) or os.listdir(dst) == []


def test_unknown_scheme():
    with pytest.raises(ConversionError, match="unknown Quark scheme 'nvfp4'"):
        build("nvfp4", [], [])


def test_fused_3d_weight_left_and_excluded():
    """A 3-D ``*.weight`` (fused experts) is not quantized by default, and is listed in ``exclude``
    so that no loader takes it for quantized; named in ``targets`` it is an error (above)."""
    (c,) = build("fp8", [], [])
    fused = torch.ones(2, 8, 128, dtype=torch.bfloat16)
    out = c.process({"model.layers.0.mlp.experts.weight": fused})
    assert torch.equal(out["model.layers.0.mlp.experts.weight"], fused)
    assert c.update_config(None)["exclude"] == ["model.layers.0.mlp.experts"]
