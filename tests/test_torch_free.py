"""Conversions that only move bytes never import torch, and give the bytes they gave with it.

Importing torch costs seconds of start-up (5-7 s for a cold CUDA build), more than copying a
small checkpoint. Planning works on ``dtypes.DType``, rank files are indexed by
``formats/torch_zip_index`` and written by ``formats/torch_zip`` with stand-in globals, so a
pure byte move runs without torch; anything that computes still imports it (lazily).
"""
from __future__ import annotations

import argparse
import os
import zipfile

import pytest
import torch

from convert_checkpoint import dtypes
from convert_checkpoint.endpoints.mcore_legacy import load_file
from convert_checkpoint.formats import stand_in_pickle, torch_zip_index
from convert_checkpoint.formats.torch_zip_index import NotPlain, StoredTensor, read_index
from convert_checkpoint.quant import te_pickle
from fixtures import read_tree
from helpers import hf_to_mcore, mcore_to_hf, without_torch
from tiny_models import TinySpec

KEEP_OUT = {"conversion_manifest.json", "conversion_report.json"}


@pytest.mark.parametrize("workers, spec", [
    ("1", TinySpec("llama", vocab_size=256, dtype=torch.bfloat16)),
    ("2", TinySpec("llama", vocab_size=256, dtype=torch.bfloat16)),
    ("2", TinySpec("qwen2", tied=True, vocab_size=256, dtype=torch.bfloat16)),  # the tied lm_head compared as bytes
], ids=["llama-1", "llama-2", "qwen2-tied-2"])
def test_hf_to_mcore_and_backwithout_torch(tiny_hf, tmp_path, workers, spec):
    """Both directions, one process and forked workers: no torch, and the files are byte for
    byte those of a run in a process that has torch (the stand-in pickle is torch.save's).
    bf16 with a vocab that needs no padding at TP 2: every tensor only moves."""
    hf = tiny_hf(spec)
    layout = ["--tensor_model_parallel_size", "2", "--pipeline_model_parallel_size", "2"]
    free, with_torch = str(tmp_path / "free"), str(tmp_path / "with_torch")
    proc = without_torch("--load_platform", "huggingface", "--save_platform", "mcore", "--load_ckpt_path", hf,
                          "--save_ckpt_path", free, "--max_workers", workers, *layout)
    assert proc.returncode == 0, proc.stderr
    assert hf_to_mcore(hf, with_torch, tensor_model_parallel_size=2, pipeline_model_parallel_size=2) == 0
    assert read_tree(free, KEEP_OUT) == read_tree(with_torch, KEEP_OUT)

    back_free, back_torch = str(tmp_path / "back_free"), str(tmp_path / "back_torch")
    proc = without_torch("--load_platform", "mcore", "--save_platform", "huggingface", "--load_ckpt_path", free,
                          "--save_ckpt_path", back_free, "--max_workers", workers)
    assert proc.returncode == 0, proc.stderr
    assert mcore_to_hf(with_torch, back_torch) == 0
    assert read_tree(back_free, KEEP_OUT) == read_tree(back_torch, KEEP_OUT)
    back, source = _tensors(back_free), _tensors(hf)
    assert back.keys() == source.keys()
    for name, t in source.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name


def _tensors(root: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file as load_safetensors

    out: dict[str, torch.Tensor] = {}
    for name in sorted(os.listdir(root)):
        if name.endswith(".safetensors"):
            out.update(load_safetensors(os.path.join(root, name)))
    return out


def test_a_conversion_that_computes_still_imports_torch(tiny_hf, tmp_path):
    """The refusal hook is real: quantizing needs torch, and the run says so."""
    hf = tiny_hf(TinySpec("llama"))
    proc = without_torch("quantize", hf, str(tmp_path / "out"), "--scheme", "FP8_DYNAMIC")
    assert proc.returncode != 0 and "torch imported during a conversion" in proc.stderr


# --- the rank-file index ----------------------------------------------------------------------

def _bytes_at(path: str, t: StoredTensor) -> bytes:
    with open(path, "rb") as f:
        f.seek(t.offset)
        return f.read(t.numel() * t.dtype.itemsize)


def test_index_finds_every_tensor_where_torch_maps_it(tmp_path):
    base = torch.randn(6, 8)
    tensors = {
        "bf16": torch.randn(5, 7).to(torch.bfloat16),
        "fp32": base,
        "row_view": base[2:4],  # shares base's storage, at an offset
        "transposed": base.t(),  # not contiguous
        "int64": torch.arange(11),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5, dtype=torch.float16),
        "empty": torch.empty(0, 4, dtype=torch.bfloat16),
        "int8": torch.randint(-128, 127, (9,), dtype=torch.int8),
    }
    path = str(tmp_path / "model_optim_rng.pt")
    torch.save({"model": tensors, "args": argparse.Namespace(tensor_model_parallel_size=1), "iteration": 3}, path)
    index = read_index(path)
    assert vars(index["args"]) == {"tensor_model_parallel_size": 1} and index["iteration"] == 3
    for name, t in tensors.items():
        got = index["model"][name]
        assert isinstance(got, StoredTensor), name
        assert (got.dtype, got.shape, got.stride) == (dtypes.of(t.dtype), tuple(t.shape), t.stride()), name
        assert got.is_contiguous == t.is_contiguous(), name
        if t.is_contiguous():
            assert _bytes_at(path, got) == t.reshape(-1).view(torch.uint8).numpy().tobytes(), name
    assert index["model"]["row_view"].offset == index["model"]["fp32"].offset + 2 * 8 * 4


@pytest.mark.parametrize("value, why", [
    (torch.nn.Parameter(torch.ones(2)), "a parameter"),
    (torch.ones(2, dtype=torch.float8_e4m3fn), "a dtype without a legacy storage class"),
    (torch.device("cpu"), "a torch object other than a dtype"),
])
def test_index_leaves_files_it_does_not_know_to_torch(tmp_path, value, why):
    path = str(tmp_path / "model_optim_rng.pt")
    torch.save({"model": {"w": torch.ones(3)}, "args": argparse.Namespace(x=value)}, path)
    with pytest.raises(NotPlain):
        read_index(path)
    loaded = load_file(path)  # the caller's fallback: torch reads it
    assert torch.equal(loaded["model"]["w"], torch.ones(3)), why


def test_index_keeps_torch_dtypes_in_the_args_by_name(tmp_path):
    """Megatron training checkpoints' args hold torch dtypes: read without torch, by name."""
    path = str(tmp_path / "model_optim_rng.pt")
    torch.save({"model": {"w": torch.ones(3)}, "args": argparse.Namespace(params_dtype=torch.bfloat16,
                                                                          main_grads_dtype=torch.float32)}, path)
    args = read_index(path)["args"]
    assert args.params_dtype == torch_zip_index.TorchDTypeName("bfloat16")
    assert args.main_grads_dtype == torch_zip_index.TorchDTypeName("float32")


def test_index_refuses_foreign_globals_and_te_tensors(tmp_path):
    evil = str(tmp_path / "evil.pt")
    torch.save({"model": {}, "args": stand_in_pickle.Global("posix.system")}, evil, pickle_module=te_pickle.PICKLE_MODULE)
    with pytest.raises(NotPlain, match="posix.system"):
        read_index(evil)
    fp8 = str(tmp_path / "fp8.pt")
    codes = torch.zeros(128, 128, dtype=torch.float8_e4m3fn)
    te_pickle.save({"model": {"w": te_pickle.blockwise_param(codes, torch.ones(1, 1))}}, fp8)
    with pytest.raises(NotPlain):
        read_index(fp8)
    assert isinstance(load_file(fp8)["model"]["w"], te_pickle.Fp8BlockRecord)


def test_index_of_a_training_checkpoint_keeps_foreign_values_inert(tmp_path):
    """numpy's RNG state and Megatron's enums become te_pickle's inert stand-ins, without torch."""
    import numpy as np

    path = str(tmp_path / "model_optim_rng.pt")
    torch.save({"model": {"w": torch.ones(2)}, "rng_state": [{"np": np.random.get_state()}],
                "optimizer": {"state": {0: {"exp_avg": torch.zeros(2)}}}}, path)
    index = read_index(path)
    kind, array = index["rng_state"][0]["np"][:2]
    assert kind == "MT19937" and isinstance(array, te_pickle.ForeignValue) and array.path == "numpy.ndarray"
    assert isinstance(index["optimizer"]["state"][0]["exp_avg"], StoredTensor)
    assert set(load_file(path)) == {"model"}  # the optimizer and RNG state are dropped


def test_index_leaves_big_endian_storages_to_torch(tmp_path):
    """torch.load swaps the bytes of a file saved on a big-endian machine; a byte move would not."""
    path = tmp_path / "model_optim_rng.pt"
    torch.save({"model": {"w": torch.ones(4)}}, path)
    swapped = tmp_path / "big.pt"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(swapped, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            dst.writestr(info, b"big" if info.filename.endswith("/byteorder") else data)
    assert read_index(str(path))["model"]["w"].numel() == 4
    with pytest.raises(NotPlain, match="big-endian"):
        read_index(str(swapped))


def test_index_of_a_corrupt_file_defers_to_torchs_error(tmp_path):
    path = tmp_path / "model_optim_rng.pt"
    torch.save({"model": {"w": torch.ones(1000)}}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(NotPlain):
        read_index(str(path))
    from convert_checkpoint.errors import ConversionError
    with pytest.raises(ConversionError, match="cannot read Megatron checkpoint file"):
        load_file(str(path))


def test_index_refuses_a_tensor_outside_its_storage(tmp_path):
    """A storage record shorter than the tensor claims: never located past the record."""
    path = tmp_path / "model_optim_rng.pt"
    torch.save({"model": {"w": torch.ones(8)}}, path)
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    pkl = next(n for n in names if n.endswith("data.pkl"))
    index = read_index(str(path))
    assert index["model"]["w"].numel() == 8
    records = {"0": (0, 16)}  # 4 floats where the pickle asks for 8
    with zipfile.ZipFile(path) as z:
        data = z.read(pkl)
    with pytest.raises(NotPlain):
        torch_zip_index._IndexUnpickler(data, records).load()


def test_dtypes_cover_the_tensor_dtypes_the_converter_plans():
    for d in dtypes.ALL:
        t = d.torch
        assert dtypes.of(t) is d and dtypes.named(str(t)) is d
        assert torch.empty(0, dtype=t).element_size() == d.itemsize and t.is_floating_point == d.is_floating_point
    with pytest.raises(TypeError):
        dtypes.of(torch.complex64)
    import pickle
    assert all(pickle.loads(pickle.dumps(d)) is d for d in dtypes.ALL)  # one object per type: equality is identity
