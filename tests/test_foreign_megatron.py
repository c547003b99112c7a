"""Megatron checkpoints this tool did not write (issue 14, item 4): rank files written the way
LoongForge writes them (its args carry no architecture record of ours) and Megatron training
checkpoints (iteration directory, full Megatron args, optimizer and RNG state). MCore->HF needs
--hf_config_path, --config_file or --convert_file; the choice is checked against the args and
the tensor shapes; nothing outside the allow-list is unpickled."""
from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil

import numpy as np
import pytest
import torch

from convert_checkpoint.config.family import CONFIG_ROOT
from convert_checkpoint.endpoints.mcore_legacy import load_file
from convert_checkpoint.formats import stand_in_pickle
from convert_checkpoint.formats.torch_zip_index import StoredTensor, TorchDTypeName
from convert_checkpoint.quant import te_pickle
from fixtures import load_hf_tensors
from helpers import assert_same_tensors, convert, hf_to_mcore, mcore_to_hf, without_torch
from tiny_models import TinySpec

LLAMA = TinySpec("llama", dtype=torch.bfloat16)
MOE = TinySpec("qwen3_moe", dtype=torch.bfloat16)
# The three layouts of shared/reference/incumbent-layouts, on tiny models of the same families.
LAYOUTS = {
    "llama_tp2pp2": (LLAMA, dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2)),
    "moe_tp2pp2ep2_gg": (MOE, {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2,
                               "expert_parallel_size": 2, "moe-grouped-gemm": True}),
    "moe_tp2ep4etp1": (MOE, dict(tensor_model_parallel_size=2, expert_parallel_size=4, expert_tensor_parallel_size=1)),
}
ARCH_YAML = {  # our architecture YAML (README "Architecture YAML") for the two tiny models
    "llama": "num_layers: 4\nhidden_size: 64\nffn_hidden_size: 128\nnum_attention_heads: 8\nnum_query_groups: 4\n"
             "kv_channels: 8\nvocab_size: 250\n",
    "qwen3_moe": "num_layers: 4\nhidden_size: 64\nffn_hidden_size: 128\nnum_attention_heads: 8\nnum_query_groups: 4\n"
                 "kv_channels: 16\nvocab_size: 250\nnum_experts: 4\nmoe_ffn_hidden_size: 32\n",
}


def convert_yaml(family: str) -> str:
    return os.path.join(CONFIG_ROOT, family, "ckpt_convert", f"{family}_convert.yaml")


def rank_paths(mcore: str) -> list[str]:
    tracker = open(os.path.join(mcore, "latest_checkpointed_iteration.txt")).read().strip()
    root = os.path.join(mcore, "release" if tracker == "release" else f"iter_{int(tracker):07d}")
    return [os.path.join(root, d, "model_optim_rng.pt") for d in sorted(os.listdir(root))]


def loongforge_args(ours: argparse.Namespace, hf_dir: str, save: str) -> argparse.Namespace:
    """The args LoongForge saves: its command line and its YAMLs' common + mcore values, as plain
    attributes (77 in its listings); Megatron size names where its YAMLs use them, none of ours."""
    a = vars(ours)
    ep = a["expert_model_parallel_size"]
    return argparse.Namespace(
        # its command line (arguments.py), as the example scripts pass it
        load_platform="huggingface", save_platform="mcore", load_ckpt_path=hf_dir, save_ckpt_path=save,
        common_config_path=None, model_type_custom=None, adapter_convert_file=None, vision_patch_convert_file=None,
        config_file="/LoongForge/configs/models/x/x.yaml", convert_file="/LoongForge/configs/models/x/ckpt_convert/x.yaml",
        megatron_path="/LoongForge/third_party/Megatron-LM", safetensors=True, no_load_optim=True, no_save_optim=True,
        tensor_model_parallel_size=a["tensor_model_parallel_size"],
        pipeline_model_parallel_size=a["pipeline_model_parallel_size"],
        expert_parallel_size=ep if a["num_experts"] else None,
        expert_tensor_parallel_size=a["expert_tensor_parallel_size"] if a["expert_tensor_parallel_size"] != a[
            "tensor_model_parallel_size"] else None,
        num_virtual_stages_per_pipeline_rank=None, num_layers_per_virtual_pipeline_stage=None,
        custom_pipeline_layers=None, decoder_first_pipeline_num_layers=None, decoder_last_pipeline_num_layers=None,
        moe_grouped_gemm=a["moe_grouped_gemm"], num_experts=a["num_experts"], make_vocab_size_divisible_by=128,
        pad_vocab_size_to=None, max_workers=4, distributed_convert=False, use_distributed_optimizer=False,
        data_parallel_size=None, transformer_impl="transformer_engine", checkpoint_format=None, no_te=False,
        resume_convert=False, cache_path=None, layer_for_test=None, num_experts_for_test=None,
        sub_num_layers_for_save=None, save_sub_checkpoint_by_pp=False, torch_dtype=None, pretrain_as_fp8=False,
        fp8_force_no_requant=False, force_pow_2_scales=True, amax_epsilon=0.0, quant_method="pt", convert_to_fp8=False,
        fp8_quant_transfer_type=None, hf_checkpoint_device="cpu", lora_alpha=None, lora_dim=None, vocab_size_in_config_file=None,
        # its convert YAML's args.common (interpolated from the model YAML) and args.mcore
        num_layers=a["num_layers"], hidden_size=a["hidden_size"], ffn_hidden_size=a["ffn_hidden_size"],
        num_attention_heads=a["num_attention_heads"], num_key_value_heads=a["num_query_groups"],
        kv_channels=a["kv_channels"], vocab_size=a["vocab_size"], moe_ffn_hidden_size=a["moe_ffn_hidden_size"],
        norm_epsilon=a["norm_epsilon"], rotary_base=a["rotary_base"], add_qkv_bias=a["add_qkv_bias"],
        qk_layernorm=a["qk_layernorm"], untie_embeddings_and_output_weights=True,
        use_rotary_position_embeddings=True, add_embedding_padding=True, transpose_mlp_dense=True,
        transpose_query_key_value=True, position_embedding_type="rope", swiglu=True, normalization="RMSNorm",
        layernorm_epsilon=a["norm_epsilon"], add_bias_linear=False, group_query_attention=True,
    )


def make_loongforge_checkpoint(hf_dir: str, out: str, flags: dict) -> str:
    """Our converter's output, rewritten to what LoongForge writes (its listings: model,
    checkpoint_version 3.0, its args, iteration 0; TE names with _extra_state None; padded rows
    copies of the last real row)."""
    assert hf_to_mcore(hf_dir, out, **flags) == 0
    vocab = json.load(open(os.path.join(hf_dir, "config.json")))["vocab_size"]
    for path in rank_paths(out):
        ckpt = torch.load(path, weights_only=True)
        assert sorted(ckpt) == ["args", "checkpoint_version", "iteration", "model"]
        assert ckpt["checkpoint_version"] == 3.0 and ckpt["iteration"] == 0
        ckpt["args"] = loongforge_args(ckpt["args"], hf_dir, out)
        assert not [n for n in vars(ckpt["args"]) if n.startswith("convert_checkpoint")]
        assert all(v is None for n, v in ckpt["model"].items() if n.endswith("._extra_state"))
        for name in ("embedding.word_embeddings.weight", "output_layer.weight"):
            shard = ckpt["model"].get(name)
            tp_rank = int(os.path.basename(os.path.dirname(path)).split("_")[2])
            if shard is not None and (tp_rank + 1) * shard.shape[0] > vocab:  # the shard holding the padded rows
                real = max(vocab - tp_rank * shard.shape[0], 0)
                shard[real:] = shard[real - 1]  # LoongForge copies the last real row (ours already does)
        torch.save(ckpt, path)
    return out


@pytest.fixture(scope="module")
def loongforge(tiny_hf, tmp_path_factory):
    """layout name -> (HF source dir, LoongForge-style Megatron checkpoint), each made once."""
    made: dict[str, tuple[str, str]] = {}

    def get(name: str) -> tuple[str, str]:
        if name not in made:
            spec, flags = LAYOUTS[name]
            hf = tiny_hf(spec)
            made[name] = (hf, make_loongforge_checkpoint(hf, str(tmp_path_factory.mktemp(name) / "mcore"), flags))
        return made[name]

    return get


def one_error_line(capsys, rc: int, out: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    assert len(err) == 1 and err[0].startswith("convert-checkpoint: error: "), err
    assert not os.path.exists(out), "output was written"
    return err[0]


# --- LoongForge's rank files ----------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_loongforge_rank_files_with_hf_config_path(loongforge, tmp_path, name):
    hf, mcore = loongforge(name)
    back = str(tmp_path / "back")
    assert mcore_to_hf(mcore, back, hf_config_path=hf) == 0
    assert_same_tensors(load_hf_tensors(hf), load_hf_tensors(back))
    assert json.load(open(os.path.join(back, "config.json"))) == json.load(open(os.path.join(hf, "config.json")))


@pytest.mark.parametrize("name, with_family_key", [("llama_tp2pp2", False), ("moe_tp2ep4etp1", True)])
def test_loongforge_rank_files_with_architecture_yaml(loongforge, tmp_path, name, with_family_key):
    """Our architecture YAML with --convert_file, or with a family key."""
    hf, mcore = loongforge(name)
    family = LAYOUTS[name][0].family
    arch = tmp_path / "arch.yaml"
    arch.write_text(ARCH_YAML[family] + (f"family: {family}\n" if with_family_key else ""))
    back = str(tmp_path / "back")
    flags = {"config_file": str(arch)} if with_family_key else {"config_file": str(arch), "convert_file": convert_yaml(family)}
    assert mcore_to_hf(mcore, back, **flags) == 0
    assert_same_tensors(load_hf_tensors(hf), load_hf_tensors(back))


def test_loongforge_rank_files_mcore_to_mcore(loongforge, tmp_path):
    """Re-layout with --hf_config_path; the result is ours (args record the model), so it goes
    back to HF without any flag."""
    hf, mcore = loongforge("moe_tp2pp2ep2_gg")
    relaid = str(tmp_path / "relaid")
    assert convert("--load_platform", "mcore", "--save_platform", "mcore", "--load_ckpt_path", mcore,
                   "--save_ckpt_path", relaid, "--hf_config_path", hf, "--tensor_model_parallel_size", "1",
                   "--expert_parallel_size", "2") == 0
    back = str(tmp_path / "back")
    assert mcore_to_hf(relaid, back) == 0
    assert_same_tensors(load_hf_tensors(hf), load_hf_tensors(back))


def test_without_a_model_description_names_the_three_ways(loongforge, tmp_path, capsys):
    _, mcore = loongforge("llama_tp2pp2")
    out = str(tmp_path / "out")
    line = one_error_line(capsys, mcore_to_hf(mcore, out), out)
    for way in ("--hf_config_path", "--config_file", "--convert_file"):
        assert way in line, line


def _other_model(hf: str, dest, **changes) -> str:
    shutil.copytree(hf, dest)
    config = json.load(open(dest / "config.json"))
    json.dump(dict(config, **changes), open(dest / "config.json", "w"))
    return str(dest)


def test_wrong_hf_config_path_disagrees_with_the_args(loongforge, tmp_path, capsys):
    hf, mcore = loongforge("llama_tp2pp2")
    other = _other_model(hf, tmp_path / "other", intermediate_size=256)
    out = str(tmp_path / "out")
    line = one_error_line(capsys, mcore_to_hf(mcore, out, hf_config_path=other), out)
    assert f"--hf_config_path {other} gives ffn_hidden_size 256, but the checkpoint's saved Megatron args say 128" in line


def test_wrong_hf_config_path_disagrees_with_the_tensors(loongforge, tmp_path, capsys):
    """Args without sizes (only the layout): the tensor shapes catch it, naming the source."""
    hf, mcore = loongforge("llama_tp2pp2")
    bare = str(tmp_path / "bare")
    shutil.copytree(mcore, bare)
    for path in rank_paths(bare):
        ckpt = torch.load(path, weights_only=True)
        ckpt["args"] = argparse.Namespace(tensor_model_parallel_size=2, pipeline_model_parallel_size=2)
        torch.save(ckpt, path)
    other = _other_model(hf, tmp_path / "other", intermediate_size=256)
    out = str(tmp_path / "out")
    line = one_error_line(capsys, mcore_to_hf(bare, out, hf_config_path=other), out)
    assert "tensor model/decoder.layers.0.mlp.linear_fc1.weight in mp_rank_00_000/model_optim_rng.pt has shape " \
           f"[128, 64], expected [256, 64] at TP=2 from --hf_config_path {other}" in line
    # another model's layer count: the chunks disagree
    other = _other_model(hf, tmp_path / "other6", num_hidden_layers=6)
    line = one_error_line(capsys, mcore_to_hf(bare, out, hf_config_path=other), out)
    assert f"hold 4 decoder layers (2,2), but the architecture has num_layers 6 (from --hf_config_path {other})" in line


# --- Megatron training checkpoints ----------------------------------------------------------

class _MegatronEnum:
    """Pickles as Megatron's enum member (``AttnBackend.auto``): REDUCE of its class global."""

    def __init__(self, path: str, value: int):
        self.path, self.value = path, value

    def __reduce__(self):
        return (stand_in_pickle.Global(self.path), (self.value,))


class _Global:
    """Any global, pickled by name (e.g. ``posix.system``), for the refusal test."""

    def __init__(self, path: str, *args):
        self.path, self.args = path, args

    def __reduce__(self):
        return (stand_in_pickle.Global(self.path), self.args)


def megatron_args(**changes) -> argparse.Namespace:
    """What ``megatron/training/arguments.py`` leaves after ``validate_args`` for the tiny Llama at
    TP=2 PP=2 (a plausible subset): every size, the parallel layout, training settings, dtypes, an
    AttnBackend enum. The real vocabulary is the tokenizer's and is not saved (vocab_size None)."""
    values = dict(
        num_layers=4, hidden_size=64, ffn_hidden_size=128, num_attention_heads=8, group_query_attention=True,
        num_query_groups=4, kv_channels=8, max_position_embeddings=64, seq_length=64,
        vocab_size=None, padded_vocab_size=256, make_vocab_size_divisible_by=128,
        normalization="RMSNorm", norm_epsilon=1e-6, swiglu=True, add_bias_linear=False, add_qkv_bias=False,
        qk_layernorm=False, untie_embeddings_and_output_weights=True, position_embedding_type="rope",
        rotary_base=10000, rotary_percent=1.0, apply_rope_fusion=False,
        num_experts=None, moe_ffn_hidden_size=None, moe_layer_freq=1, moe_router_topk=2, moe_grouped_gemm=False,
        multi_latent_attention=False, q_lora_rank=None, kv_lora_rank=32, qk_head_dim=128, qk_pos_emb_head_dim=64,
        v_head_dim=128, mtp_num_layers=None,
        tensor_model_parallel_size=2, pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=None,
        expert_model_parallel_size=1, expert_tensor_parallel_size=2,
        context_parallel_size=1, sequence_parallel=True, world_size=8, rank=0, data_parallel_size=2,
        transformer_impl="transformer_engine", attention_backend=_MegatronEnum(
            "megatron.core.transformer.enums.AttnBackend", 5), use_legacy_models=False, ckpt_format="torch",
        use_dist_ckpt=False, save="/ckpt/run", load="/ckpt/run", save_interval=1000, iteration=1000,
        train_iters=10000, micro_batch_size=1, global_batch_size=16, lr=3e-4, min_lr=3e-5, lr_decay_style="cosine",
        lr_warmup_iters=100, weight_decay=0.1, clip_grad=1.0, optimizer="adam", adam_beta1=0.9, adam_beta2=0.95,
        adam_eps=1e-8, use_distributed_optimizer=False, bf16=True, fp16=False, params_dtype=torch.bfloat16,
        main_grads_dtype=torch.float32, main_params_dtype=torch.float32, exp_avg_dtype=torch.float32,
        seed=1234, consumed_train_samples=16000, tokenizer_type="HuggingFaceTokenizer",
        tokenizer_model="/models/llama", data_path=["/data/text_document"], split="99,1,0", init_method_std=0.02,
        hidden_dropout=0.0, attention_dropout=0.0, recompute_granularity=None, spec=None, fp8=None,
    )
    values.update(changes)
    return argparse.Namespace(**values)


def make_training_checkpoint(mcore: str, out, rng_extra=None, **arg_changes) -> str:
    """A legacy-format Megatron training checkpoint of the tiny Llama at TP=2 PP=2 (the model
    entries of ``mcore``): iter_0001000/, tracker "1000", full args, optimizer, LR scheduler, RNG
    state and FLOP count in each rank file."""
    root = out / "iter_0001000"
    for path in rank_paths(mcore):
        ckpt = torch.load(path, weights_only=True)
        model = dict(ckpt["model"])
        params = [t for t in model.values() if isinstance(t, torch.Tensor)]
        for name in [n for n in model if n.endswith("self_attention.linear_qkv._extra_state")]:
            extra = io.BytesIO()  # TE < 1.6 saved a module's extra state as a BytesIO of torch.save(state)
            torch.save(None, extra)
            model[name.replace("linear_qkv", "core_attention")] = extra  # TE's attention module has one too
        rng = {"random_rng_state": random.getstate(), "np_rng_state": np.random.RandomState(7).get_state(),
               "torch_rng_state": torch.get_rng_state(), "cuda_rng_state": torch.get_rng_state(),
               "rng_tracker_states": {"model-parallel-rng": torch.get_rng_state()}}
        if rng_extra is not None:
            rng["evil"] = rng_extra
        payload = {
            "args": megatron_args(**arg_changes), "checkpoint_version": 3.0, "iteration": 1000,
            "model": model,
            "optimizer": {
                "optimizer": {"state": {i: {"step": torch.tensor(1000.0), "exp_avg": torch.zeros_like(p, dtype=torch.float32),
                                            "exp_avg_sq": torch.ones_like(p, dtype=torch.float32)}
                                        for i, p in enumerate(params)},
                              "param_groups": [{"lr": 2.9e-4, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1,
                                                "amsgrad": False, "foreach": None, "maximize": False, "capturable": False,
                                                "differentiable": False, "fused": None, "params": list(range(len(params)))}]},
                "fp32_from_fp16_params": [[p.float() for p in params]],
                "grad_scaler": None,
            },
            "opt_param_scheduler": {"max_lr": 3e-4, "lr_warmup_steps": 1600, "num_steps": 16000, "lr_decay_style": "cosine",
                                    "lr_decay_steps": 160000, "min_lr": 3e-5, "start_wd": 0.1, "end_wd": 0.1,
                                    "wd_incr_style": "constant", "wd_incr_steps": 160000},
            "rng_state": [rng],
            "num_floating_point_operations_so_far": 1.25e15,
        }
        dest = root / os.path.basename(os.path.dirname(path)) / "model_optim_rng.pt"
        dest.parent.mkdir(parents=True)
        te_pickle.save(payload, str(dest))  # writes the enum's global by its Megatron path
    (out / "latest_checkpointed_iteration.txt").write_text("1000")
    return str(out)


@pytest.fixture(scope="module")
def training(loongforge, tmp_path_factory):
    hf, mcore = loongforge("llama_tp2pp2")
    return hf, make_training_checkpoint(mcore, tmp_path_factory.mktemp("training") / "run")


def test_training_checkpoint_reads_only_the_model_entries(training):
    _, run = training
    for path in rank_paths(run):
        loaded = load_file(path)
        assert sorted(loaded) == ["args", "checkpoint_version", "iteration", "model"]
        assert loaded["iteration"] == 1000
        # indexed without torch (its args' torch dtypes kept by name): the weights' byte offsets
        assert all(isinstance(t, StoredTensor) for n, t in loaded["model"].items() if n.endswith("weight"))
        assert loaded["args"].params_dtype == TorchDTypeName("bfloat16")
    # Unpickled through the allow-list: numpy's array and dtype and Megatron's enum come back as
    # inert stand-ins (no numpy or Megatron code runs), the rest as plain values and tensors.
    raw = te_pickle.load(path)
    assert sorted(raw) == ["args", "checkpoint_version", "iteration", "model", "num_floating_point_operations_so_far",
                           "opt_param_scheduler", "optimizer", "rng_state"]
    kind, array, pos, *_ = raw["rng_state"][0]["np_rng_state"]
    assert kind == "MT19937" and isinstance(array, te_pickle.ForeignValue) and array.path == "numpy.ndarray"
    assert array.state[2].path == "numpy.dtype" and array.state[1] == (624,)
    assert raw["args"].attention_backend.path == "megatron.core.transformer.enums.AttnBackend"
    assert raw["args"].attention_backend.args == (5,) and raw["args"].params_dtype == torch.bfloat16


def test_training_checkpoint_converts_with_hf_config_path(training, tmp_path):
    hf, run = training
    back = str(tmp_path / "back")
    assert mcore_to_hf(run, back, hf_config_path=hf) == 0
    assert_same_tensors(load_hf_tensors(hf), load_hf_tensors(back))
    # the iteration directory itself works too
    back2 = str(tmp_path / "back2")
    assert mcore_to_hf(os.path.join(run, "iter_0001000"), back2, hf_config_path=hf) == 0
    assert_same_tensors(load_hf_tensors(hf), load_hf_tensors(back2))


def test_training_checkpoint_converts_without_torch(training, tmp_path):
    """A training checkpoint (optimizer, RNG state, torch dtypes and Megatron enums in its args) is
    indexed without torch, so its model converts to HF as a pure byte move."""
    hf, run = training
    back = str(tmp_path / "back")
    proc = without_torch("--load_platform", "mcore", "--save_platform", "huggingface", "--load_ckpt_path", run,
                         "--save_ckpt_path", back, "--hf_config_path", hf)
    assert proc.returncode == 0, proc.stderr
    assert_same_tensors(load_hf_tensors(hf), load_hf_tensors(back))


def test_training_checkpoint_args_fill_the_architecture(training, tmp_path, capsys):
    """Megatron's args give every size but the real vocabulary (its tokenizer's, not saved): with
    --convert_file alone that is one error naming the field; a YAML that says vocab_size completes it."""
    hf, run = training
    out = str(tmp_path / "out")
    line = one_error_line(capsys, mcore_to_hf(run, out, convert_file=convert_yaml("llama")), out)
    assert "the checkpoint's Megatron args do not say vocab_size" in line and "--hf_config_path" in line
    arch = tmp_path / "vocab.yaml"
    arch.write_text("vocab_size: 250\n")
    assert mcore_to_hf(run, out, convert_file=convert_yaml("llama"), config_file=str(arch)) == 0
    assert_same_tensors(load_hf_tensors(hf), load_hf_tensors(out))


def test_training_checkpoint_args_cross_check_the_yaml(training, tmp_path, capsys):
    _, run = training
    arch = tmp_path / "arch.yaml"
    arch.write_text(ARCH_YAML["llama"].replace("num_query_groups: 4", "num_query_groups: 2"))
    out = str(tmp_path / "out")
    line = one_error_line(capsys, mcore_to_hf(run, out, convert_file=convert_yaml("llama"), config_file=str(arch)), out)
    assert f"--config_file {arch} gives num_query_groups 2, but the checkpoint's saved Megatron args say 4" in line


def test_training_checkpoint_with_a_foreign_global_is_refused(loongforge, tmp_path, capsys):
    _, mcore = loongforge("llama_tp2pp2")
    run = make_training_checkpoint(mcore, tmp_path / "run", rng_extra=_Global("posix.system", "echo pwned"))
    out = str(tmp_path / "out")
    line = one_error_line(capsys, mcore_to_hf(run, out, hf_config_path=loongforge("llama_tp2pp2")[0]), out)
    assert "references posix.system, which is not on the allow-list" in line
    # the same in the args (a Megatron global not on the list)
    run = make_training_checkpoint(mcore, tmp_path / "run2", attention_backend=_Global(
        "megatron.training.arguments.moe_freq_type", "1"))
    line = one_error_line(capsys, mcore_to_hf(run, out, hf_config_path=loongforge("llama_tp2pp2")[0]), out)
    assert "references megatron.training.arguments.moe_freq_type" in line


@pytest.mark.parametrize("name, model, conv", [
    ("llama_tp2pp2", "llama", "llama3/ckpt_convert/llama3_convert.yaml"),
    ("moe_tp2pp2ep2_gg", "qwen3_moe", "qwen3/ckpt_convert/qwen3_moe_convert.yaml"),
])
def test_loongforge_rank_files_with_its_own_yamls(loongforge, tmp_path, name, model, conv):
    """Its model YAML (config/loongforge reads it) and its convert YAML, as its mcore_to_hf
    scripts pass them: the architecture comes from the model YAML, cross-checked with the args."""
    from test_loongforge_yaml import TINY, shipped, write

    hf, mcore = loongforge(name)
    back = str(tmp_path / "back")
    config_file = write(tmp_path / "lf" / "model.yaml", TINY[model])
    assert mcore_to_hf(mcore, back, config_file=config_file, convert_file=shipped(conv)) == 0
    assert_same_tensors(load_hf_tensors(hf), load_hf_tensors(back))
