"""LoongForge's DeepSeek-V3.1 documentation scripts run unchanged but for their LOAD/SAVE lines,
against a LoongForge-style tree (its YAML formats and paths, this tool's ``model.py``), on a
61-layer DeepSeek-V3-shaped tiny FP8 checkpoint: HF FP8 -> MCore FP8 at TP=8 PP=8 EP=32 ETP=1
(grouped GEMM, custom pipeline layers) -> HF FP8 with --fp8_force_no_requant, bit for bit.

Sized so that TP=8 cuts no 128-block: 16 heads of 64+64 (q) and 64+64 (kv) dims, dense and
shared-expert FFN 1024 (8 x 128), routed experts of 128 (fc1 = [gate; up] joins whole blocks)."""
from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

from fixtures import load_hf_tensors
from helpers import assert_same_tensors

REPO = pathlib.Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "examples" / "loongforge"

MODEL_YAML = """\
# deepseek_v3-shaped tiny model, in LoongForge's model YAML format
_target_: loongforge.models.foundation.DeepseekConfig

num_layers: 61
hidden_size: 128
ffn_hidden_size: 1024
num_attention_heads: 16
num_query_groups: 16
num_experts: 32
mtp_num_layers: 1
moe_ffn_hidden_size: 128
moe_shared_expert_intermediate_size: 1024
q_lora_rank: 128
kv_lora_rank: 128
qk_head_dim: 64
qk_pos_emb_head_dim: 64
v_head_dim: 64
moe_layer_freq: ${moe_freq:"[0]*3+[1]*58"}
qk_layernorm: true
vocab_size_in_config_file: 1000

position_embedding_type: "rope"
add_position_embedding: false
rotary_interleaved: false
normalization: "RMSNorm"
swiglu: true
attention_dropout: 0
hidden_dropout: 0
add_bias_linear: false
add_qkv_bias: false
untie_embeddings_and_output_weights: true
apply_rope_fusion: true
multi_latent_attention: true
model_type: "deepseek"

convert_file: ${oc.env:LOONGFORGE_PATH}/configs/models/deepseek3/ckpt_convert/deepseek_v3_convert.yaml
"""


def _tiny_deepseek_v31_fp8(root: pathlib.Path) -> str:
    import torch
    from transformers import AutoModelForCausalLM, DeepseekV3Config

    from tiny_models import add_mtp_layers, make_fp8_checkpoint

    config = DeepseekV3Config(
        hidden_size=128, intermediate_size=1024, num_hidden_layers=61, num_attention_heads=16, num_key_value_heads=16,
        vocab_size=1000, max_position_embeddings=64, rms_norm_eps=1e-6, q_lora_rank=128, kv_lora_rank=128,
        qk_nope_head_dim=64, qk_rope_head_dim=64, v_head_dim=64, n_routed_experts=32, moe_intermediate_size=128,
        n_shared_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2, first_k_dense_replace=3,
        routed_scaling_factor=2.5, norm_topk_prob=True, num_nextn_predict_layers=1, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name else 0.0))
    bf16 = root / "bf16"
    model.to(torch.bfloat16).save_pretrained(bf16)
    add_mtp_layers(str(bf16), 61, 1)
    return make_fp8_checkpoint(str(bf16), str(root / "DeepSeek-V3.1"))


def _loongforge_tree(root: pathlib.Path) -> pathlib.Path:
    """A LoongForge checkout as its scripts see it: this tool's tools/ (model.py at its path),
    the deepseek3 model YAML for the tiny model and the shipped convert YAML, both in its format."""
    tree = root / "LoongForge"
    (tree / "configs" / "models" / "deepseek3" / "ckpt_convert").mkdir(parents=True)
    (tree / "tools").symlink_to(REPO / "tools")
    (tree / "configs" / "models" / "deepseek3" / "deepseek_v3.yaml").write_text(MODEL_YAML)
    shutil.copyfile(REPO / "configs" / "models" / "deepseek3" / "ckpt_convert" / "deepseek_v3_convert.yaml",
                    tree / "configs" / "models" / "deepseek3" / "ckpt_convert" / "deepseek_v3_convert.yaml")
    return tree


def _run_script(script: pathlib.Path, load: str, save: str, tree: pathlib.Path, workdir: pathlib.Path) -> None:
    """The script with only its LOAD= and SAVE= lines edited, run by bash with the venv's python."""
    lines = []
    for line in script.read_text().splitlines():
        if line.startswith("LOAD="):
            line = f"LOAD={load}"
        elif line.startswith("SAVE="):
            line = f"SAVE={save}"
        lines.append(line)
    edited = workdir / script.name
    edited.write_text("\n".join(lines) + "\n")
    env = dict(os.environ, LOONGFORGE_PATH=str(tree), MEGATRON_PATH=str(workdir / "no-megatron-needed"),
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    done = subprocess.run(["bash", str(edited)], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]


def test_deepseek_v31_documentation_scripts_round_trip(tmp_path):
    source = _tiny_deepseek_v31_fp8(tmp_path)
    tree = _loongforge_tree(tmp_path)
    mcore, back = tmp_path / "mcore", tmp_path / "back"
    _run_script(SCRIPTS / "deepseek_v3_1_hf_fp8_to_mcore_fp8.sh", source, str(mcore), tree, tmp_path)
    ranks = sorted(os.listdir(mcore / "release"))
    assert len(ranks) == 8 * 32 and ranks[0] == "mp_rank_00_000_000" and ranks[-1] == "mp_rank_07_007_031"
    _run_script(SCRIPTS / "deepseek_v3_1_mcore_fp8_to_hf_fp8.sh", str(mcore), str(back), tree, tmp_path)
    assert_same_tensors(load_hf_tensors(source), load_hf_tensors(str(back)))  # FP8 codes and scales, bit for bit
