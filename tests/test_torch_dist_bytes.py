"""torch_dist as a byte move: no torch, no tensors, the same files torch's loader reads.

A ``.distcp`` chunk is one ``torch.save`` archive; ours are laid out by ``formats/torch_zip``
with the chunk's bytes copied in place, ``.metadata`` is pickled from stand-ins of torch's
metadata classes, and reading indexes each chunk's archive (``torch_zip_index`` over a window
of the file) to move its bytes. These tests hold those pieces to torch's own: torch's
``Metadata`` objects, torch's DCP loader, torch.load of every blob, and conversions run with
torch unimportable.
"""
from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as tdcp
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)

from convert_checkpoint import dtypes
from convert_checkpoint.byteplan import plan_runs
from convert_checkpoint.formats import dcp, torch_zip_index
from convert_checkpoint.tensor_expr import TensorRef, narrow, source
from fixtures import load_hf_tensors, read_tree
from helpers import assert_same_tensors, hf_to_mcore, mcore_to_hf, without_torch
from tiny_models import TinySpec

KEEP_OUT = {"conversion_manifest.json", "conversion_report.json"}
DIST = ["--ckpt_format", "torch_dist"]


def _torch_metadata(md: dcp.DistMetadata) -> Metadata:
    """The Metadata torch's own classes give for ``md`` (what the stand-in pickle must load as)."""
    state: dict = {}
    storage = {}
    for fqn in md.names:
        entry = md.tensors.get(fqn)
        if entry is None:
            state[fqn] = BytesStorageMetadata()
            info = md.storage[(fqn, None)]
            storage[MetadataIndex(fqn)] = _StorageInfo(info.relative_path, info.offset, info.length)
            continue
        chunks = [ChunkStorageMetadata(torch.Size(o), torch.Size(s)) for o, s in entry.chunks]
        state[fqn] = TensorStorageMetadata(TensorProperties(dtype=entry.dtype.torch), torch.Size(entry.shape), chunks)
        for o, _ in entry.chunks:
            info = md.storage[(fqn, o)]
            storage[MetadataIndex(fqn, torch.Size(o))] = _StorageInfo(info.relative_path, info.offset, info.length)
    return Metadata(state, planner_data=None, storage_data=storage, storage_meta=StorageMeta(), version=dcp.DCP_VERSION)


@pytest.mark.parametrize("workers, spec", [
    ("1", TinySpec("llama", vocab_size=256, dtype=torch.bfloat16)),
    ("2", TinySpec("qwen3_moe", vocab_size=256, dtype=torch.bfloat16, tied=True)),
], ids=["llama-1", "qwen3_moe-tied-2"])
def test_torch_dist_both_ways_without_torch(tiny_hf, tmp_path, workers, spec):
    """HF -> torch_dist -> HF with torch unimportable (one process, forked workers, several
    data files): the files are a run with torch's, byte for byte, torch's DCP loader reads
    every tensor as the source's, every blob is a zip whose CRCs check, and the way back is
    bit-exact."""
    hf = tiny_hf(spec)
    free, with_torch = tmp_path / "free", tmp_path / "with_torch"
    proc = without_torch("--load_platform", "huggingface", "--save_platform", "mcore", "--load_ckpt_path", hf,
                          "--save_ckpt_path", str(free), "--max_workers", workers, "--max_shard_size", "100KB", *DIST)
    assert proc.returncode == 0, proc.stderr
    assert hf_to_mcore(hf, str(with_torch), ckpt_format="torch_dist", max_shard_size="100KB") == 0
    assert read_tree(str(free), KEEP_OUT) == read_tree(str(with_torch), KEEP_OUT)
    release = free / "release"
    assert len(list(release.glob("__0_*.distcp"))) > 1

    # torch's reader: every chunk blob through torch.load, into tensors of .metadata's shapes
    md = tdcp.FileSystemReader(str(release)).read_metadata()
    state = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype)
             for k, m in md.state_dict_metadata.items() if isinstance(m, TensorStorageMetadata)}
    tdcp.load(state, storage_reader=tdcp.FileSystemReader(str(release)))
    source = load_hf_tensors(hf)
    assert torch.equal(state["embedding.word_embeddings.weight"], source["model.embed_tokens.weight"])
    qkv = state["decoder.layers.self_attention.linear_qkv.weight"]
    assert qkv.shape[0] == spec.num_layers and qkv.dtype == torch.bfloat16
    for index, info in md.storage_data.items():
        blob = (release / info.relative_path).read_bytes()[info.offset:info.offset + info.length]
        with zipfile.ZipFile(io.BytesIO(blob)) as z:
            assert z.testzip() is None, index.fqn

    back_free = tmp_path / "back_free"
    proc = without_torch("--load_platform", "mcore", "--save_platform", "huggingface", "--load_ckpt_path", str(free),
                          "--save_ckpt_path", str(back_free), "--max_workers", workers)
    assert proc.returncode == 0, proc.stderr
    assert_same_tensors(source, load_hf_tensors(str(back_free)))
    assert mcore_to_hf(str(with_torch), str(tmp_path / "back_torch")) == 0
    assert read_tree(str(back_free), KEEP_OUT) == read_tree(str(tmp_path / "back_torch"), KEEP_OUT)


def test_legacy_to_torch_dist_and_back_without_torch(tiny_hf, tmp_path):
    """MCore -> MCore between rank files (TP2 PP2) and torch_dist, torch unimportable: rank
    files -> torch_dist gives the data files and .metadata that HF -> torch_dist gives, and
    torch_dist -> rank files the tensors HF -> MCore gives, dtypes included."""
    hf = tiny_hf(TinySpec("llama", vocab_size=256, dtype=torch.bfloat16))
    layout = ["--tensor_model_parallel_size", "2", "--pipeline_model_parallel_size", "2"]
    legacy, dist = tmp_path / "legacy", tmp_path / "dist"
    assert hf_to_mcore(hf, str(legacy), tensor_model_parallel_size=2, pipeline_model_parallel_size=2) == 0
    assert hf_to_mcore(hf, str(dist), ckpt_format="torch_dist") == 0

    def mcore_to_mcore(src: Path, out: Path, *flags: str) -> None:
        proc = without_torch("--load_platform", "mcore", "--save_platform", "mcore", "--load_ckpt_path", str(src),
                             "--save_ckpt_path", str(out), *flags)
        assert proc.returncode == 0, proc.stderr

    mcore_to_mcore(legacy, tmp_path / "legacy_to_dist", *DIST)
    data = KEEP_OUT | {"release/common.pt"}  # its args record the layout the rank files had
    assert read_tree(str(tmp_path / "legacy_to_dist"), data) == read_tree(str(dist), data)
    mcore_to_mcore(dist, tmp_path / "dist_to_legacy", *layout)
    ranks = sorted(p.relative_to(legacy) for p in legacy.rglob("model_optim_rng.pt"))
    assert len(ranks) == 4 and ranks == sorted(p.relative_to(tmp_path / "dist_to_legacy")
                                               for p in (tmp_path / "dist_to_legacy").rglob("model_optim_rng.pt"))
    for rank in ranks:  # the args differ (they come from common.pt); the tensors may not
        got = torch.load(tmp_path / "dist_to_legacy" / rank, weights_only=False)["model"]
        want = torch.load(legacy / rank, weights_only=False)["model"]
        assert got.keys() == want.keys()
        for name, t in want.items():
            if isinstance(t, torch.Tensor):
                assert got[name].dtype == t.dtype and torch.equal(got[name], t), (rank, name)


def test_metadata_pickle_is_torchs(tiny_hf, tmp_path):
    """The stand-in ``.metadata`` unpickles (with torch) into objects equal to torch's own
    classes built from the same entries (every field compared: dataclass equality), and
    reading torch's own pickle of those objects without torch gives the entries back. (Not byte for byte: the C pickler
    memoizes equal strings only where they are one object.)"""
    out = tmp_path / "dist"
    assert hf_to_mcore(tiny_hf(TinySpec("qwen3_moe", mlp_only_layers=(0, 2))), str(out), ckpt_format="torch_dist",
                       tensor_model_parallel_size=2) == 0
    ours = (out / "release" / ".metadata").read_bytes()
    md = dcp.read_metadata(str(out / "release"))
    assert any(n not in md.tensors for n in md.names)  # _extra_state objects are in it too
    expected = _torch_metadata(md)
    assert pickle.loads(ours) == expected
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / ".metadata").write_bytes(pickle.dumps(expected))  # torch's objects, as torch pickles them
    assert dcp.read_metadata(str(theirs)) == md


def test_a_blob_inside_a_file_is_indexed_and_moved_from_any_offset(tmp_path):
    """torch_zip_index reads an archive stored at an odd offset of a file (its offsets stay the
    file's), and byte runs from a tensor that starts at an odd byte copy the right bytes."""
    t = torch.arange(4 * 6, dtype=torch.float32).reshape(4, 6)
    buf = io.BytesIO()
    torch.save(t, buf)
    blob = buf.getvalue()
    path = tmp_path / "data.distcp"
    path.write_bytes(b"xyz" + blob + b"tail")
    stored = torch_zip_index.read_index(str(path), 3, len(blob))
    assert stored.shape == (4, 6) and stored.dtype == dtypes.FLOAT32 and stored.offset % 4 == 3
    raw = path.read_bytes()
    assert raw[stored.offset:stored.offset + t.nbytes] == t.numpy().tobytes()

    leaf = source(TensorRef("data.distcp", "t"), dtypes.FLOAT32, (4, 6))
    window = narrow(narrow(leaf, 0, 1, 2), 1, 2, 3)  # two rows of three columns: a run per row
    runs = plan_runs(window, lambda _: (str(path), stored.offset))
    assert runs is not None and len(runs) == 2
    got = b"".join(raw[r.src_offset:r.src_offset + r.length] for r in runs)
    assert got == t[1:3, 2:5].contiguous().numpy().tobytes()
    with pytest.raises(torch_zip_index.NotPlain):  # a window that is not the archive
        torch_zip_index.read_index(str(path), 0, len(blob))


def test_a_torch_dist_byte_move_holds_no_memory(tiny_hf, tmp_path):
    """A chunk that only moves is counted as nothing held (as a rank file's tensors are): both
    directions plan 0 bytes per file and run with --max_memory 1KB; a chunk that computes (the
    vocabulary padded for TP 2) counts its bytes."""
    from convert_checkpoint.options import parse_options
    from convert_checkpoint.pipeline import build_plan

    def plan(*argv: str):
        opts = parse_options(list(argv))
        return build_plan(opts.plan_request(None), opts)

    hf = tiny_hf(TinySpec("llama", vocab_size=256, dtype=torch.bfloat16))
    dist, back = str(tmp_path / "dist"), str(tmp_path / "back")
    to_dist = plan("--load_platform", "huggingface", "--save_platform", "mcore", "--load_ckpt_path", hf,
                   "--save_ckpt_path", dist, *DIST)
    assert to_dist.files and all(to_dist.memory_bytes(f) == 0 for f in to_dist.files)
    assert hf_to_mcore(hf, dist, ckpt_format="torch_dist", max_memory="1KB", max_workers=2) == 0
    from_dist = plan("--load_platform", "mcore", "--save_platform", "huggingface", "--load_ckpt_path", dist,
                     "--save_ckpt_path", back)
    assert all(from_dist.memory_bytes(f) == 0 for f in from_dist.files)
    assert mcore_to_hf(dist, back, max_memory="1KB", max_workers=2) == 0
    assert_same_tensors(load_hf_tensors(hf), load_hf_tensors(back))
    padded = plan("--load_platform", "huggingface", "--save_platform", "mcore", "--load_ckpt_path",
                  tiny_hf(TinySpec("llama", dtype=torch.bfloat16)), "--save_ckpt_path", str(tmp_path / "padded"),
                  "--tensor_model_parallel_size", "2", *DIST)
    assert sum(padded.memory_bytes(f) for f in padded.files) > 0
