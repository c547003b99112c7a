"""No silent replacement: HF tensors that Megatron stores once (an MTP layer's embedding and LM
head copies, a tied lm_head) are dropped only when bit-identical to what Megatron keeps; and
every tensor comes back HF -> MCore -> HF in the dtype it came in (a bf16 router bias too)."""
from __future__ import annotations

import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from fixtures import assert_fails, load_hf_tensors
from helpers import assert_same_tensors, convert, hf_to_mcore, mcore_to_hf
from tiny_models import TinySpec

DEEPSEEK_MTP = TinySpec("deepseek_v3", mtp_layers=1, dtype=torch.bfloat16)


def _copy_with(tiny_hf, tmp_path, spec, edit, capsys):
    path = str(tmp_path / "hf")
    shutil.copytree(tiny_hf(spec), path)
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})
    capsys.readouterr()  # the model generator's own output
    return path


def _bump(tensors, name, row=7):
    t = tensors[name].clone()
    t[row, 3] += 1
    tensors[name] = t


@pytest.mark.parametrize("copy, of", [("model.layers.4.embed_tokens.weight", "embedding.word_embeddings.weight"),
                                      ("model.layers.4.shared_head.head.weight", "output_layer.weight")])
def test_mtp_copy_that_differs_stops_the_conversion(tiny_hf, tmp_path, capsys, copy, of):
    hf = _copy_with(tiny_hf, tmp_path, DEEPSEEK_MTP, lambda t: _bump(t, copy), capsys)
    out = str(tmp_path / "out")
    assert_fails(capsys, hf_to_mcore(hf, out, expert_parallel_size=2), out,
                           f"tensor {copy} differs from {of}", "rows 0-")


def test_mtp_copy_in_another_dtype_stops_the_conversion(tiny_hf, tmp_path, capsys):
    name = "model.layers.4.embed_tokens.weight"
    hf = _copy_with(tiny_hf, tmp_path, DEEPSEEK_MTP, lambda t: t.__setitem__(name, t[name].float()), capsys)
    out = str(tmp_path / "out")
    assert_fails(capsys, hf_to_mcore(hf, out), out, f"tensor {name} is float32 but embedding")


def test_equal_mtp_copies_are_checked_and_dropped(tiny_hf, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert hf_to_mcore(tiny_hf(DEEPSEEK_MTP), out, dry_run=True) == 0
    assert "2 MTP copies of the embedding / LM head (e.g. model.layers.4.embed_tokens.weight) were checked equal" \
        in capsys.readouterr().out


def test_tied_lm_head_that_differs_stops_the_conversion(tiny_hf, tmp_path, capsys):
    def add_lm_head(t, differ):
        t["lm_head.weight"] = t["model.embed_tokens.weight"].clone()
        if differ:
            _bump(t, "lm_head.weight", row=249)

    out = str(tmp_path / "out")
    differing = _copy_with(tiny_hf, tmp_path, TinySpec("llama", tied=True), lambda t: add_lm_head(t, True), capsys)
    assert_fails(capsys, hf_to_mcore(differing, out), out,
                           "tensor lm_head.weight differs from embedding.word_embeddings.weight (first at rows 0-249)")
    shutil.rmtree(os.path.dirname(differing) + "/hf")
    equal = _copy_with(tiny_hf, tmp_path, TinySpec("llama", tied=True), lambda t: add_lm_head(t, False), capsys)
    assert hf_to_mcore(equal, out, pipeline_model_parallel_size=2) == 0
    assert "the HF lm_head.weight copy was checked equal to the embedding and dropped" in capsys.readouterr().err


def test_bf16_router_bias_comes_back_bf16(tiny_hf, tmp_path):
    """Megatron holds router.expert_bias in fp32; the source dtype is recorded in the rank files'
    args and restored, so HF -> MCore -> HF (and through MCore -> MCore) gives back every
    tensor in its own dtype, bit for bit."""
    hf_dir = tiny_hf(DEEPSEEK_MTP)
    hf = load_hf_tensors(hf_dir)
    bias = "model.layers.1.mlp.gate.e_score_correction_bias"
    assert hf[bias].dtype == torch.bfloat16
    a, b, back = (str(tmp_path / n) for n in ("a", "b", "back"))
    assert hf_to_mcore(hf_dir, a, tensor_model_parallel_size=2, expert_parallel_size=2) == 0
    args = torch.load(os.path.join(a, "release", "mp_rank_00_000", "model_optim_rng.pt"), weights_only=False)["args"]
    assert args.convert_checkpoint_hf_dtypes[bias] == "bfloat16"
    assert len(args.convert_checkpoint_hf_dtypes) == 4  # 3 MoE layers + the MTP layer
    assert convert("--load_platform", "mcore", "--save_platform", "mcore", "--load_ckpt_path", a,
                   "--save_ckpt_path", b, "--pipeline_model_parallel_size", "2") == 0
    assert mcore_to_hf(b, back) == 0
    assert_same_tensors(hf, load_hf_tensors(back))


class _TensorsOnly:
    """A reader without ``locate``: the copy check materializes tensors instead of byte runs."""

    def __init__(self, inner):
        self.read_into, self.whole, self.close = inner.read_into, inner.whole, inner.close


@pytest.mark.parametrize("path", ["byte runs", "tensors"])
def test_copy_check_reads_chunk_by_chunk_and_finds_a_late_difference(tmp_path, path, monkeypatch):
    """The check reuses its two buffers for every chunk (no fresh allocation per chunk); a
    difference in the last chunk only is still found, and equal copies of odd sizes pass; both
    through byte runs of the files (no torch) and through tensors."""
    from convert_checkpoint import tensor_expr as tx
    from convert_checkpoint.errors import ConversionError
    from convert_checkpoint.formats.safetensors_io import SafetensorsReader, read_header
    from convert_checkpoint.mapping import Copy, check_copies
    from convert_checkpoint.tensor_expr import TensorRef

    main = torch.randn(37, 11).to(torch.bfloat16)
    late = main.clone()
    late[36, 10] += 1
    save_file({"main": main, "same": main.clone(), "late": late, "small": main[:5].clone()}, str(tmp_path / "a.safetensors"))

    def leaf(name, rows=37):
        return tx.source(TensorRef("a.safetensors", name), torch.bfloat16, (rows, 11))

    if path == "byte runs":  # no tensor is built
        monkeypatch.setattr(tx, "materialize_into", lambda *a: pytest.fail("materialized a tensor"))

    def reader():
        inner = SafetensorsReader(str(tmp_path), {"a.safetensors": read_header(str(tmp_path / "a.safetensors"))})
        return inner if path == "byte runs" else _TensorsOnly(inner)

    check_copies([Copy("same", leaf("same"), "main", leaf("main"), True),
                  Copy("small", leaf("small", 5), "main", tx.narrow(leaf("main"), 0, 0, 5), True)], reader(),
                 chunk_bytes=3 * 22)  # 3 rows a chunk
    with pytest.raises(ConversionError, match=r"tensor late differs from main \(first at rows 36-36\)"):
        check_copies([Copy("late", leaf("late"), "main", leaf("main"), True)], reader(), chunk_bytes=3 * 22)
