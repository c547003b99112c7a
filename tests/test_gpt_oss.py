"""GPT-OSS (gpt_oss): fused 3-D experts stored input-major with gate/up interleaved in their
columns, biases everywhere, attention sinks; the tensor_expr nodes that express that layout
(select/stack, transpose, strided/interleave), bit-exact HF -> MCore -> HF round trips, the
MXFP4 pre-stage and bad input."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from convert_checkpoint import tensor_expr as te
from convert_checkpoint.converters.mxfp4_dequantizer import dequantize
from fixtures import assert_fails, load_hf_tensors
from helpers import DictReader, assert_same_tensors, expr_leaf, hf_to_mcore, mcore_to_hf, rank_files
from tiny_models import TinySpec

_leaf = expr_leaf


def _every_window(expr, full, reader):
    """Every narrow of ``expr`` (each dim, start, length) materializes to that window of ``full``."""
    assert expr.shape == tuple(full.shape)
    assert torch.equal(te.materialize(expr, reader), full)
    for dim in range(full.dim()):
        for start in range(full.shape[dim]):
            for length in range(1, full.shape[dim] - start + 1):
                got = te.materialize(te.narrow(expr, dim, start, length), reader)
                assert torch.equal(got, full.narrow(dim, start, length)), (dim, start, length)


def test_select_stack_transpose_strided_interleave_narrow_exactly():
    x = torch.arange(3 * 4 * 6, dtype=torch.float32).reshape(3, 4, 6)
    reader = DictReader({"x": x})
    leaf = _leaf("x", x)
    _every_window(te.select(leaf, 0, 1), x[1], reader)
    _every_window(te.select(leaf, 2, 5), x[:, :, 5], reader)
    _every_window(te.transpose(te.select(leaf, 0, 2)), x[2].T, reader)
    _every_window(te.transpose(leaf, 0, 2), x.transpose(0, 2), reader)
    _every_window(te.strided(leaf, 2, 1, 2), x[:, :, 1::2], reader)
    _every_window(te.strided(leaf, 2, 0, 4), x[:, :, 0::4], reader)
    _every_window(te.strided(leaf, 1, 1, 2, 1), x[:, 1:2], reader)
    gate, up = te.strided(te.select(leaf, 0, 0), 1, 0, 2), te.strided(te.select(leaf, 0, 0), 1, 1, 2)
    fc1 = te.cat([te.transpose(gate), te.transpose(up)], 0)  # Megatron's [gate; up] rows
    _every_window(fc1, torch.cat([x[0][:, 0::2].T, x[0][:, 1::2].T]), reader)
    a, b = torch.randn(5, 3), torch.randn(5, 3)
    r2 = DictReader({"a": a, "b": b})
    woven = torch.stack([a, b], 2).flatten(1)  # columns a0 b0 a1 b1 ...
    _every_window(te.interleave([_leaf("a", a), _leaf("b", b)], 1), woven, r2)
    _every_window(te.interleave([_leaf("a", a), _leaf("b", b)], 0), torch.stack([a, b], 1).flatten(0, 1), r2)
    _every_window(te.stack([_leaf("a", a), _leaf("b", b)], 1), torch.stack([a, b], 1), r2)
    _every_window(te.stack([te.transpose(_leaf("a", a)), te.transpose(_leaf("b", b))], 0), torch.stack([a.T, b.T]), r2)


def test_layout_nodes_invert_each_other():
    """Each node and its inverse give back the source values; select/stack and a strided cut of an
    interleave reduce to plain windows."""
    x = torch.randn(2, 4, 6)
    leaf = _leaf("x", x)
    experts = [te.select(leaf, 0, e) for e in range(2)]
    assert te.stack(experts, 0) == te.cat([te.narrow(leaf, 0, e, 1) for e in range(2)], 0)  # windows only
    assert te.transpose(te.transpose(experts[1])) == experts[1]
    strands = [te.strided(experts[0], 1, j, 2) for j in range(2)]
    assert torch.equal(te.materialize(te.interleave(strands, 1), DictReader({"x": x})), x[0])
    woven = te.interleave([_leaf("a", torch.zeros(3, 2)), _leaf("b", torch.zeros(3, 2))], 1)
    assert te.strided(woven, 1, 1, 2) == _leaf("b", torch.zeros(3, 2))
    assert te.describe(te.transpose(experts[1])) == "f:x[1:2,:,:].squeeze(0).T(0, 1)"


def test_layout_node_errors():
    leaf = _leaf("x", torch.zeros(4, 6))
    with pytest.raises(ValueError):
        te.strided(leaf, 1, 6, 2)
    with pytest.raises(ValueError):
        te.strided(leaf, 1, 1, 2, 4)
    with pytest.raises(ValueError):
        te.interleave([leaf, _leaf("y", torch.zeros(4, 5))], 1)
    with pytest.raises(ValueError):
        te.stack([leaf, _leaf("y", torch.zeros(4, 5))], 0)


# --- the family: round trips, where tensors land, MXFP4, bad input -------------------------------

GPT_OSS = TinySpec("gpt_oss", dtype=torch.bfloat16)  # 4 layers, 4 experts of 32, 8 heads in 4 groups

# (tp, pp, custom layers, ep, etp or None, grouped, transformer_impl)
# Expert biases: megatron-core builds them only at ETP 1, so TP 2 comes with --expert_tensor_parallel_size 1.
LAYOUTS = [
    (1, 1, None, 1, None, False, "local"),
    (2, 1, None, 2, 1, True, "transformer_engine"),
    (2, 2, "3,1", 2, 1, False, "local"),
    (1, 2, "1,3", 2, None, False, "transformer_engine"),
    (2, 2, "1,3", 1, 1, True, "local"),
]


def _layout_id(layout) -> str:
    tp, pp, custom, ep, etp, grouped, impl = layout
    return (f"tp{tp}pp{pp}{'-' + custom.replace(',', '_') if custom else ''}ep{ep}etp{etp or '=tp'}"
            f"{'-gg' if grouped else ''}-{'te' if impl == 'transformer_engine' else 'local'}")


def _to_mcore(hf_dir: str, mcore: str, layout, **flags) -> None:
    tp, pp, custom, ep, etp, grouped, impl = layout
    assert hf_to_mcore(hf_dir, mcore, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                       custom_pipeline_layers=custom, expert_parallel_size=ep, expert_tensor_parallel_size=etp,
                       transformer_impl=impl, **{"moe-grouped-gemm": grouped}, **flags) == 0


@pytest.mark.parametrize("layout", LAYOUTS, ids=_layout_id)
def test_round_trip_bit_exact(tiny_hf, tmp_path, layout):
    hf_dir = tiny_hf(GPT_OSS)
    mcore, back = str(tmp_path / "mcore"), str(tmp_path / "back")
    _to_mcore(hf_dir, mcore, layout)
    assert mcore_to_hf(mcore, back) == 0
    hf = load_hf_tensors(hf_dir)
    assert hf["model.layers.0.mlp.experts.gate_up_proj"].dtype == torch.bfloat16
    assert_same_tensors(hf, load_hf_tensors(back))  # the interleaved 3-D layout rebuilt bit for bit
    assert json.load(open(os.path.join(back, "config.json"))) == json.load(open(os.path.join(hf_dir, "config.json")))
    args = next(iter(rank_files(mcore).values()))["args"]
    assert args.convert_checkpoint_family == "gpt_oss"
    # Megatron's own args for what is not a weight (the settings the megatron-core test builds with)
    config = json.load(open(os.path.join(hf_dir, "config.json")))
    assert args.add_bias_linear and args.softmax_type == "learnable" and args.glu_linear_offset == 1.0
    assert args.activation_func_clamp_value == config["swiglu_limit"]
    assert args.window_size == (config["sliding_window"] - 1, 0)
    assert args.window_attn_skip_freq == [int(t == "sliding_attention") for t in config["layer_types"]]


def _megatron_fc1(gate_up: torch.Tensor) -> torch.Tensor:
    """Megatron's [gate; up] rows (out x in) from one HF expert [in, 2I], column by column."""
    gate = [gate_up[:, c] for c in range(0, gate_up.shape[1], 2)]
    up = [gate_up[:, c] for c in range(1, gate_up.shape[1], 2)]
    return torch.stack(gate + up)


def test_tensors_land_where_megatron_holds_them(tiny_hf, tmp_path):
    """Experts de-interleaved into [gate; up] rows and transposed, EP blocks of whole experts (ETP 1);
    sinks split by heads; biases beside their weights; grouped-GEMM names under TE."""
    hf_dir = tiny_hf(GPT_OSS)
    hf = load_hf_tensors(hf_dir)
    _to_mcore(hf_dir, str(tmp_path / "m"), (2, 1, None, 2, 1, False, "local"))
    files = rank_files(str(tmp_path / "m"))
    layer = "model.layers.2."
    gate_up, gate_up_bias = hf[layer + "mlp.experts.gate_up_proj"], hf[layer + "mlp.experts.gate_up_proj_bias"]
    down, down_bias = hf[layer + "mlp.experts.down_proj"], hf[layer + "mlp.experts.down_proj_bias"]
    assert sorted(files) == ["mp_rank_00_000", "mp_rank_01_001"]  # EP 2 x ETP 1 over the TP 2 ranks
    for tp, ep in ((0, 0), (1, 1)):
        sd = files[f"mp_rank_{tp:02d}_{ep:03d}"]["model"]
        for local in range(2):
            e = ep * 2 + local
            p = f"decoder.layers.2.mlp.experts.local_experts.{local}."
            assert torch.equal(sd[p + "linear_fc1.weight"], _megatron_fc1(gate_up[e]))  # ETP 1: whole experts
            assert torch.equal(sd[p + "linear_fc1.bias"], _megatron_fc1(gate_up_bias[e][None])[:, 0])
            assert torch.equal(sd[p + "linear_fc2.weight"], down[e].T)
            assert torch.equal(sd[p + "linear_fc2.bias"], down_bias[e])
        a = "decoder.layers.2.self_attention."
        assert torch.equal(sd[a + "core_attention.softmax_offset"], hf[layer + "self_attn.sinks"][tp * 4:(tp + 1) * 4])
        assert torch.equal(sd[a + "linear_proj.bias"], hf[layer + "self_attn.o_proj.bias"])
        assert torch.equal(sd["decoder.layers.2.mlp.router.bias"], hf[layer + "mlp.router.bias"])
        assert "decoder.layers.2.self_attention.core_attention._extra_state" not in sd
    _to_mcore(hf_dir, str(tmp_path / "te"), (1, 1, None, 2, None, True, "transformer_engine"))
    sd = rank_files(str(tmp_path / "te"))["mp_rank_00_001"]["model"]
    assert torch.equal(sd["decoder.layers.2.mlp.experts.linear_fc1.weight1"], _megatron_fc1(gate_up[3]))
    assert torch.equal(sd["decoder.layers.2.mlp.experts.linear_fc2.bias0"], down_bias[2])
    assert "decoder.layers.2.self_attention.linear_qkv.layer_norm_weight" in sd


# MXFP4 as published (formats.md §7), restated independently of the converter: the OCP scale
# 2^(floor(log2 amax) - 2) per 32 values along ``in``, each value rounded to the nearest E2M1 code.
_E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def _quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """HF [E, in, out] -> blocks uint8 [E, out, in/32, 16] (low nibble first), scales uint8 [E, out, in/32]."""
    v = w.float().transpose(1, 2).unflatten(-1, (-1, 32))
    amax = v.abs().amax(-1)
    exp = torch.where(amax > 0, torch.floor(torch.log2(amax)) - 2, torch.zeros_like(amax))
    scaled = v / torch.exp2(exp).unsqueeze(-1)
    codes = ((scaled.abs().unsqueeze(-1) - _E2M1).abs().argmin(-1) | ((scaled < 0).long() << 3)).to(torch.uint8)
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).contiguous(), (exp + 127).to(torch.uint8).contiguous()


def _mxfp4_checkpoint(hf_dir: str, path) -> dict[str, torch.Tensor]:
    """An MXFP4 copy of ``hf_dir`` as OpenAI publishes it; returns its tensors."""
    tensors = {}
    for name, value in load_hf_tensors(hf_dir).items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            tensors[name + "_blocks"], tensors[name + "_scales"] = _quantize_mxfp4(value)
        else:
            tensors[name] = value
    os.makedirs(path)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    config = json.load(open(os.path.join(hf_dir, "config.json")))
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    json.dump(config, open(os.path.join(path, "config.json"), "w"))
    return tensors


def test_mxfp4_experts_dequantize_like_transformers(tiny_hf, tmp_path):
    """--converter dequantize (mxfp4_dequantizer) gives transformers' own dequantized values: the
    Megatron files hold them and the way back writes the bf16 checkpoint transformers would load."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    hf_dir = tiny_hf(GPT_OSS)
    mx = _mxfp4_checkpoint(hf_dir, tmp_path / "mx")
    want = {}
    for name, value in mx.items():
        if name.endswith("_scales"):
            continue
        if name.endswith("_blocks"):
            base = name[: -len("_blocks")]
            want[base] = convert_moe_packed_tensors(value, mx[base + "_scales"], dtype=torch.bfloat16)
            assert torch.equal(want[base], dequantize(value, mx[base + "_scales"], torch.bfloat16))
        else:
            want[name] = value
    assert not torch.equal(want["model.layers.1.mlp.experts.down_proj"], load_hf_tensors(hf_dir)["model.layers.1.mlp.experts.down_proj"])
    _to_mcore(str(tmp_path / "mx"), str(tmp_path / "m"), (2, 1, None, 2, 1, False, "local"), converter="dequantize")
    sd = rank_files(str(tmp_path / "m"))["mp_rank_01_001"]["model"]
    assert torch.equal(sd["decoder.layers.1.mlp.experts.local_experts.1.linear_fc2.weight"],
                       want["model.layers.1.mlp.experts.down_proj"][3].T)
    assert mcore_to_hf(str(tmp_path / "m"), str(tmp_path / "back")) == 0
    assert_same_tensors(want, load_hf_tensors(str(tmp_path / "back")))
    assert "quantization_config" not in json.load(open(tmp_path / "back" / "config.json"))


def test_example_scripts_read_the_published_mxfp4_layout(tiny_hf, tmp_path):
    """examples/gpt_oss on an MXFP4 checkpoint (the bf16 one is run by test_examples.py): the way
    back, with the MXFP4 directory as reference, writes transformers' dequantized bf16 values."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    mx = _mxfp4_checkpoint(tiny_hf(GPT_OSS), tmp_path / "mx")
    want = {n[: -len("_blocks")] if n.endswith("_blocks") else n:
            convert_moe_packed_tensors(v, mx[n[: -len("_blocks")] + "_scales"]) if n.endswith("_blocks") else v
            for n, v in mx.items() if not n.endswith("_scales")}
    env = dict(os.environ, PYTHON=sys.executable, HF_CKPT_PATH=str(tmp_path / "mx"), MCORE_CKPT_PATH=str(tmp_path / "m"),
               MAX_WORKERS="1", TP="2", PP="2", PIPELINE_LAYERS="1,3", EP="2")
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "gpt_oss")
    for name, extra in (("hf_to_mcore.sh", {}), ("mcore_to_hf.sh", {"HF_CKPT_PATH": str(tmp_path / "back"),
                                                                     "HF_REFERENCE_PATH": str(tmp_path / "mx")})):
        proc = subprocess.run(["bash", os.path.join(script, name), "--no_progress"], env=dict(env, **extra),
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
    assert_same_tensors(want, load_hf_tensors(str(tmp_path / "back")))
    assert "quantization_config" not in json.load(open(tmp_path / "back" / "config.json"))


def test_mxfp4_without_a_converter_is_one_line(tiny_hf, tmp_path, capsys):
    _mxfp4_checkpoint(tiny_hf(GPT_OSS), tmp_path / "mx")
    out = str(tmp_path / "out")
    capsys.readouterr()
    assert_fails(capsys, hf_to_mcore(str(tmp_path / "mx"), out), out, "quant_method 'mxfp4'", "--converter dequantize")


def _rewrite(hf_dir: str, path, change) -> str:
    shutil.copytree(hf_dir, path)
    tensors = load_hf_tensors(str(path))
    change(tensors)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    return str(path)


def test_bad_input_is_one_line(tiny_hf, tmp_path, capsys):
    hf_dir = tiny_hf(GPT_OSS)
    key = "model.layers.1.mlp.experts.gate_up_proj"

    def odd(t):  # an odd gate/up column count: gate and up cannot pair up
        t[key] = torch.cat([t[key], t[key][..., :1]], -1)

    out = str(tmp_path / "out")
    capsys.readouterr()
    bad = _rewrite(hf_dir, tmp_path / "odd", odd)
    assert_fails(capsys, hf_to_mcore(bad, out), out, f"tensor {key} has shape [4, 64, 65]", "[4, 64, 64]")

    config = json.load(open(os.path.join(hf_dir, "config.json")))
    fewer = tmp_path / "smaller"
    shutil.copytree(hf_dir, fewer)
    json.dump({**config, "intermediate_size": 16}, open(fewer / "config.json", "w"))  # the config disagrees
    assert_fails(capsys, hf_to_mcore(str(fewer), out), out,
                 "model.layers.0.mlp.experts.gate_up_proj has shape [4, 64, 64], but the config implies [4, 64, 32]")

    mx = tmp_path / "mx"
    _mxfp4_checkpoint(hf_dir, mx)
    scales = "model.layers.0.mlp.experts.gate_up_proj_scales"
    t = load_hf_tensors(str(mx))
    t[scales] = t[scales][..., :1].contiguous()
    save_file(t, os.path.join(mx, "model.safetensors"), metadata={"format": "pt"})
    assert_fails(capsys, hf_to_mcore(str(mx), out, converter="dequantize"), out, scales, "needs uint8 [4, 64, 2]")

    # TP 2 leaves ETP at 2, where megatron-core has no expert biases
    assert_fails(capsys, hf_to_mcore(hf_dir, out, tensor_model_parallel_size=2), out,
                 "need expert tensor parallel size 1", "--expert_tensor_parallel_size 1")


def test_verify_and_mcore_to_mcore(tiny_hf, tmp_path, capsys):
    """`verify` finds HF and MCore (and MCore re-laid out MCore -> MCore) the same model."""
    from helpers import convert

    hf = tiny_hf(GPT_OSS)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert hf_to_mcore(hf, a, tensor_model_parallel_size=2, expert_parallel_size=2, expert_tensor_parallel_size=1,
                       transformer_impl="local") == 0
    assert convert("--load_platform", "mcore", "--save_platform", "mcore", "--load_ckpt_path", a, "--save_ckpt_path", b,
                   pipeline_model_parallel_size=2, custom_pipeline_layers="3,1", expert_parallel_size=4,
                   expert_tensor_parallel_size=1, transformer_impl="transformer_engine", **{"moe-grouped-gemm": True}) == 0
    capsys.readouterr()
    for x, y in ((hf, a), (a, b), (hf, b)):
        assert convert("verify", x, y) == 0
        assert capsys.readouterr().out.strip().endswith("identical")
