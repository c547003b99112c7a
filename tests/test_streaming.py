"""Each output file reads only the source tensors (and rows) it needs."""
from __future__ import annotations

import re

from convert_checkpoint import execute
from convert_checkpoint.formats.safetensors_io import SafetensorsReader
from convert_checkpoint.endpoints.mcore_legacy import McoreReader
from helpers import hf_to_mcore, mcore_to_hf
from tiny_models import TinySpec


def _record_reads(monkeypatch, reader_cls):
    """(output file, source tensor, offsets, shape) for every window read: read into a tensor, or
    located in its file for a byte-range copy."""
    reads: list[tuple[str, str, tuple, tuple]] = []
    current = {"file": None}
    original_build, original_read, original_locate = execute._build_file, reader_cls.read_into, reader_cls.locate

    def build(out, *a, **k):
        current["file"] = out.relpath
        return original_build(out, *a, **k)

    def read_into(self, leaf, out):
        reads.append((current["file"], leaf.ref.describe(), leaf.offsets, leaf.shape))
        return original_read(self, leaf, out)

    def locate(self, leaf):
        reads.append((current["file"], leaf.ref.describe(), leaf.offsets, leaf.shape))
        return original_locate(self, leaf)

    monkeypatch.setattr(execute, "_build_file", build)
    monkeypatch.setattr(reader_cls, "read_into", read_into)
    monkeypatch.setattr(reader_cls, "locate", locate)
    return reads


def test_hf_to_mcore_reads_only_its_stage_and_rows(tiny_hf, tmp_path, monkeypatch):
    reads = _record_reads(monkeypatch, SafetensorsReader)
    assert hf_to_mcore(tiny_hf(TinySpec("llama")), str(tmp_path / "m"), tensor_model_parallel_size=2,
                       pipeline_model_parallel_size=2) == 0
    for file, name, offsets, shape in reads:
        layer = re.search(r"layers\.(\d+)\.", name)
        stage = int(file.split("_")[3][:3])
        if layer:
            assert int(layer.group(1)) // 2 == stage, (file, name)  # 2 layers per stage
        elif "embed_tokens" in name:
            assert stage == 0, (file, name)
        else:
            assert stage == 1, (file, name)  # final norm, lm_head
        if "q_proj" in name:  # TP rank t reads only its query groups' rows
            tp = int(file.split("_")[2])
            assert offsets[0] // 32 == tp and shape[0] <= 32, (file, name, offsets, shape)
    # Nothing is read twice for the same file.
    assert len(reads) == len(set(reads))


def test_mcore_to_hf_reads_each_shard_once(tiny_hf, tmp_path, monkeypatch):
    mcore = str(tmp_path / "m")
    assert hf_to_mcore(tiny_hf(TinySpec("qwen2")), mcore, tensor_model_parallel_size=2, pipeline_model_parallel_size=2) == 0
    reads = _record_reads(monkeypatch, McoreReader)
    assert mcore_to_hf(mcore, str(tmp_path / "hf"), max_shard_size="100KB") == 0
    shard_names = {(name, offsets, shape) for _, name, offsets, shape in reads}
    # Each HF tensor is assembled from windows of the rank files; no window is read twice.
    assert len(shard_names) == len(reads)
    # Replicated tensors (norms) are read from TP rank 0 only.
    norms = [name for _, name, _, _ in reads if "layer_norm_weight" in name or "final_layernorm" in name]
    assert norms and all(name.startswith("mp_rank_00_") for name in norms), norms
