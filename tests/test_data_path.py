"""The byte-range data path: runs planned from expressions, moved file to file or through one
batched read, and the ``.pt`` zip written in place. Every tensor kind must give the bytes the
tensor path gives; the zip must be what torch.save writes, for torch, Megatron and zipfile."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import zipfile

import pytest
import torch
from safetensors.torch import save_file

from convert_checkpoint import dtypes, materialize
from convert_checkpoint import tensor_expr as tx
from convert_checkpoint.byteplan import plan_runs
from convert_checkpoint.endpoints.mcore_legacy import McoreReader, McoreSource, load_file
from convert_checkpoint.formats import torch_zip
from convert_checkpoint.formats.direct_io import RangeMover
from convert_checkpoint.formats.safetensors_io import SafetensorsReader, read_header
from convert_checkpoint.materialize import FileContext
from convert_checkpoint.tensor_expr import TensorRef
from fixtures import read_tree
from helpers import cli_to_mcore
from tiny_models import TinySpec

SOURCE = {  # a mix of dtypes and ranks, sizes that are not multiples of anything
    "w": torch.randn(48, 40).to(torch.bfloat16),
    "big": torch.randn(3000, 600).to(torch.bfloat16),  # 3.6 MB: runs long enough to copy file to file
    "e": torch.randn(4, 10, 6),
    "i": torch.arange(37, dtype=torch.int64),
    "s": torch.tensor(2.5),
    "z": torch.empty(0, 5, dtype=torch.bfloat16),
}


def _leaf(name: str, offsets=None, shape=None, file="a.safetensors") -> tx.Leaf:
    t = SOURCE[name]
    leaf = tx.source(TensorRef(file, name), t.dtype, tuple(t.shape))
    if offsets is not None:
        for dim, (o, n) in enumerate(zip(offsets, shape)):
            leaf = tx.narrow(leaf, dim, o, n)
    return leaf


def _exprs() -> dict[str, tx.Expr]:
    w = _leaf("w")
    return {
        "whole": w,
        "rows": tx.narrow(w, 0, 8, 16),  # a TP row split
        "cols": tx.narrow(w, 1, 20, 20),  # a column split: a run per row
        "qkv": tx.cat([tx.narrow(w, 0, 0, 4), tx.narrow(w, 0, 16, 2), tx.narrow(w, 0, 32, 2),
                       tx.narrow(w, 0, 4, 4), tx.narrow(w, 0, 18, 2), tx.narrow(w, 0, 34, 2)]),  # query groups
        "gather": tx.cat([tx.narrow(w, 1, 0, 10), tx.narrow(w, 1, 30, 10)], dim=1),  # TP concatenation on the way back
        "expert": tx.narrow(_leaf("e"), 0, 2, 1),
        "expert_cols": tx.narrow(tx.narrow(_leaf("e"), 0, 1, 2), 2, 3, 3),
        "nested": tx.cat([tx.cat([tx.narrow(w, 1, 0, 5), tx.narrow(w, 1, 35, 5)], dim=1),
                          tx.cat([tx.narrow(w, 1, 10, 5), tx.narrow(w, 1, 5, 5)], dim=1)], dim=0),
        "big_rows": tx.narrow(_leaf("big"), 0, 1000, 2000),
        "big_cat": tx.cat([tx.narrow(_leaf("big"), 0, 2000, 1000), tx.narrow(_leaf("big"), 0, 0, 1000)]),
        "ints": tx.narrow(_leaf("i"), 0, 5, 30),
        "scalar": _leaf("s"),
        "empty": _leaf("z"),
    }


@pytest.fixture()
def safetensors_source(tmp_path):
    save_file(SOURCE, str(tmp_path / "a.safetensors"))
    entries = {"a.safetensors": read_header(str(tmp_path / "a.safetensors"))}
    return SafetensorsReader(str(tmp_path), entries)


def _through_ranges(expr: tx.Expr, reader, tmp_path, copy_min: int, monkeypatch, copy_range: bool = True,
                    window: int = 64 << 20) -> bytes:
    """The tensor's bytes as FileContext.write puts them at offset 13 of a file."""
    monkeypatch.setattr(materialize, "COPY_MIN", copy_min)
    monkeypatch.setattr(materialize, "_GATHER_WINDOW", window)
    ctx = FileContext("out", reader, None)
    ctx._mover = RangeMover(copy_range)
    path = tmp_path / f"out-{copy_min}-{copy_range}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    try:
        ctx.write("t", expr, fd, 13)
    finally:
        os.close(fd)
        ctx.close()
    assert ctx.moved == {"t"}, "this expression should have gone through the range path"
    return path.read_bytes()[13:]


def _tensor_bytes(expr: tx.Expr, reader) -> bytes:
    return tx.materialize(expr, reader).contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("name", list(_exprs()))
def test_every_move_gives_the_tensor_path_bytes(name, safetensors_source, tmp_path, monkeypatch):
    expr = _exprs()[name]
    want = _tensor_bytes(expr, safetensors_source)
    assert plan_runs(expr, safetensors_source.locate) is not None
    # file to file; its fallback; batched reads; batched reads a few rows at a time
    for copy_min, copy_range, window in ((0, True, 1 << 26), (0, False, 1 << 26), (1 << 40, True, 1 << 26), (1 << 40, True, 100)):
        got = _through_ranges(expr, safetensors_source, tmp_path, copy_min, monkeypatch, copy_range, window)
        assert got == want, (name, copy_min, copy_range, window)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64,
                                   torch.float8_e4m3fn, torch.float8_e5m2])
def test_nonfinite_by_bit_pattern_counts_as_torch_does(dtype):
    values = torch.tensor([0.0, -1.5, 2.0, float("nan"), float("inf"), float("-inf"), 3.0, -float("nan")] * 5)
    t = values.to(dtype)  # e4m3fn has no Inf: those become NaN
    raw = memoryview(t.view(torch.uint8).numpy().tobytes())
    want = int((~torch.isfinite(t.float())).sum())
    assert materialize.nonfinite_in_bytes(dtypes.of(dtype), raw) == materialize.nonfinite_count(t) == want >= 10
    finite = torch.randn(1000).to(dtype)
    assert materialize.nonfinite_in_bytes(dtypes.of(dtype), memoryview(finite.view(torch.uint8).numpy().tobytes())) == 0
    cut = raw[:len(raw) - 1]  # a partial last element is not counted
    assert materialize.nonfinite_in_bytes(dtypes.of(dtype), cut) == int((~torch.isfinite(t[:-1].float())).sum())


def test_readback_follows_writes_made_in_any_order(tmp_path):
    """The read-back hashes in file order while threads write regions out of order; it ends
    with the file's sha256, and stops (Aborted) when the writer gives up."""
    import hashlib
    import random
    import threading

    from convert_checkpoint.formats.direct_io import Aborted, Completion, hash_regions, pwrite_all

    blobs = [os.urandom(random.Random(i).randrange(1, 50000)) for i in range(40)]
    offsets = [sum(len(b) for b in blobs[:i]) for i in range(len(blobs))]
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    try:
        done = Completion()
        seen = []
        result = {}
        reader = threading.Thread(target=lambda: result.update(sha=hash_regions(
            fd, [(o, len(b), i) for i, (o, b) in enumerate(zip(offsets, blobs))], lambda k, c: seen.append(k), done.wait)))
        reader.start()
        for i in reversed(range(len(blobs))):  # the last region first: the reader waits for region 0
            pwrite_all(fd, blobs[i], offsets[i])
            done.mark(i)
        reader.join(timeout=30)
        assert not reader.is_alive() and result["sha"] == hashlib.sha256(b"".join(blobs)).hexdigest()
        assert sorted(set(seen)) == list(range(len(blobs))) and seen == sorted(seen)  # in file order
        stuck = Completion()
        errors = []

        def read() -> None:
            try:
                hash_regions(fd, [(0, len(blobs[0]), 0)], None, stuck.wait)
            except Aborted:
                errors.append("aborted")

        waiting = threading.Thread(target=read)
        waiting.start()
        stuck.abort()
        waiting.join(timeout=30)
        assert errors == ["aborted"]
    finally:
        os.close(fd)


def test_a_failed_copy_stops_the_file_without_hanging(tmp_path, safetensors_source, monkeypatch):
    """A copy thread that fails (the source ends early) fails the file: the error comes out of
    the writer, the read-back waiting for that tensor stops, nothing hangs."""
    import threading

    from convert_checkpoint.endpoints.file_writers import write_safetensors
    from convert_checkpoint.formats.safetensors_io import PlannedTensor, plan_layout

    src = tmp_path / "a.safetensors"
    os.truncate(src, os.path.getsize(src) - 1000)  # the header still promises the last tensor's bytes
    exprs = {n: _exprs()[n] for n in ("whole", "big_rows", "cols")} | {"last": _leaf("z"), "tail": _leaf("big")}
    layout = plan_layout([PlannedTensor(n, e.dtype, tuple(e.shape)) for n, e in exprs.items()])
    for copy_min in (0, 1 << 40):  # the failing run copied file to file, or read in a batch
        monkeypatch.setattr(materialize, "COPY_MIN", copy_min)
        errors = []

        def write() -> None:
            ctx = FileContext("out", safetensors_source, None, io_threads=3)
            try:
                write_safetensors(str(tmp_path / "out.safetensors"), layout, exprs, ctx)
            except OSError as e:
                errors.append(e)
            finally:
                ctx.close()

        writer = threading.Thread(target=write)
        writer.start()
        writer.join(timeout=60)
        assert not writer.is_alive() and len(errors) == 1, (copy_min, errors)


def test_runs_are_merged_and_computing_expressions_have_none(safetensors_source):
    w = _leaf("w")
    (run,) = plan_runs(tx.narrow(w, 0, 8, 16), safetensors_source.locate)  # rows: one run
    assert (run.dst_offset, run.length) == (0, 16 * 40 * 2)
    assert len(plan_runs(tx.narrow(w, 1, 20, 20), safetensors_source.locate)) == 48  # a run per row
    assert len(plan_runs(tx.cat([tx.narrow(w, 0, 0, 4), tx.narrow(w, 0, 4, 4)]), safetensors_source.locate)) == 1
    assert plan_runs(tx.cast(w, torch.float32), safetensors_source.locate) is None
    assert plan_runs(tx.repeat(tx.narrow(w, 0, 0, 1), 0, 3), safetensors_source.locate) is None
    assert plan_runs(w, lambda leaf: None) is None  # a source that is not plainly in a file


def test_rank_file_sources_are_located_exactly(tmp_path, monkeypatch):
    """Windows of tensors in a torch.save'd rank file (found through the file's memory map)."""
    path = tmp_path / "mp_rank_00" / "model_optim_rng.pt"
    path.parent.mkdir()
    torch.save({"model": {k: v for k, v in SOURCE.items()}, "args": argparse.Namespace()}, path)
    src = McoreSource(str(tmp_path), None)
    src.files["mp_rank_00/model_optim_rng.pt"] = load_file(str(path))
    reader = McoreReader(src)
    for name, expr in _exprs().items():
        expr = _rebase(expr)
        want = _tensor_bytes(expr, reader)
        assert _through_ranges(expr, reader, tmp_path, 0, monkeypatch) == want, name
        assert _through_ranges(expr, reader, tmp_path, 1 << 40, monkeypatch) == want, name


def _rebase(expr: tx.Expr) -> tx.Expr:
    """The same expression over the rank file's tensors."""
    if isinstance(expr, tx.Leaf):
        return tx.Leaf(TensorRef("mp_rank_00/model_optim_rng.pt", expr.ref.name, "model"), expr.dtype,
                       expr.source_shape, expr.offsets, expr.shape)
    assert isinstance(expr, tx.Cat)
    return tx.Cat(expr.dim, tuple(_rebase(p) for p in expr.parts), expr.shape, expr.dtype)


def _write_zip(path, payload, tensors, archive="model_optim_rng") -> str:
    layout = torch_zip.plan(payload, archive)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    try:
        torch_zip.write_fixed(fd, layout)
        for r in layout.tensor_records:
            data = tensors[r.slot.name].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            torch_zip.pwrite_all(fd, data, r.data_offset)
        return torch_zip.Finisher(fd, layout).run()
    finally:
        os.close(fd)


def _payload(tensors):
    slots = {k: torch_zip.TensorSlot(k, dtypes.of(v.dtype), tuple(v.shape)) for k, v in tensors.items()}
    return {"model": {**slots, "absent": None}, "checkpoint_version": 3.0, "iteration": 0,
            "args": argparse.Namespace(tensor_model_parallel_size=2, params_dtype=torch.bfloat16)}


@pytest.mark.parametrize("zip64", [False, True])
def test_pt_writer_is_read_by_torch_and_zipfile(tmp_path, monkeypatch, zip64):
    if zip64:  # every size and offset takes the zip64 fields, as a >4 GiB rank file's do
        monkeypatch.setattr(torch_zip, "ZIP64_AT", 1)
    path = tmp_path / "model_optim_rng.pt"
    sha = _write_zip(path, _payload(SOURCE), SOURCE)
    import hashlib
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest()
    with zipfile.ZipFile(path) as z:
        assert z.testzip() is None  # every CRC-32 is right
        names = [i.filename for i in z.infolist()]
        assert all(i.header_offset >= 0 for i in z.infolist())
    assert names[0] == "model_optim_rng/data.pkl" and names[-1] == "model_optim_rng/.data/serialization_id"
    for weights_only in (True, False):
        for mmap in (False, True):
            # Megatron's args are a Namespace (allowed globally, as te_pickle does: a context manager
            # would take it off the list again on exit)
            torch.serialization.add_safe_globals([argparse.Namespace])
            loaded = torch.load(path, weights_only=weights_only, mmap=mmap)
            for k, v in SOURCE.items():
                assert loaded["model"][k].dtype == v.dtype and torch.equal(loaded["model"][k], v), (k, weights_only, mmap)
                assert loaded["model"][k].is_contiguous()
            assert loaded["model"]["absent"] is None and loaded["args"].tensor_model_parallel_size == 2
            assert loaded["args"].params_dtype == torch.bfloat16 and loaded["iteration"] == 0


def test_pt_writer_pickle_is_torch_saves(tmp_path):
    """data.pkl byte for byte as torch.save writes it for the same payload."""
    path = tmp_path / "model_optim_rng.pt"
    _write_zip(path, _payload(SOURCE), SOURCE)
    ref = tmp_path / "ref.pt"
    torch.save({"model": {**SOURCE, "absent": None}, "checkpoint_version": 3.0, "iteration": 0,
                "args": argparse.Namespace(tensor_model_parallel_size=2, params_dtype=torch.bfloat16)}, ref)
    with zipfile.ZipFile(path) as ours, zipfile.ZipFile(ref) as theirs:
        assert ours.read("model_optim_rng/data.pkl") == theirs.read("ref/data.pkl")
        for name in ("byteorder", "version", ".format_version", ".storage_alignment"):
            assert ours.read(f"model_optim_rng/{name}") == theirs.read(f"ref/{name}")
        # the data records are aligned as torch aligns them (mmap loads rely on it)
        for info in ours.infolist():
            if "/data/" in info.filename:
                raw = path.read_bytes()[info.header_offset + 26:info.header_offset + 30]
                start = info.header_offset + 30 + int.from_bytes(raw[:2], "little") + int.from_bytes(raw[2:], "little")
                assert start % 64 == 0


def test_pt_writer_crc_catches_a_changed_byte(tmp_path):
    path = tmp_path / "model_optim_rng.pt"
    _write_zip(path, _payload(SOURCE), SOURCE)
    with zipfile.ZipFile(path) as z:
        info = z.getinfo("model_optim_rng/data/1")
    raw = bytearray(path.read_bytes())
    raw[info.header_offset + 200] ^= 1  # inside data/1 (the 3.6 MB tensor)
    path.write_bytes(bytes(raw))
    with zipfile.ZipFile(path) as z:
        assert z.testzip() == "model_optim_rng/data/1"


def _cli(src: str, out: str, *extra: str, fault: str | None = None):
    return cli_to_mcore(src, out, "--tensor_model_parallel_size", "2", *extra, fault=fault)


def test_resume_after_a_kill_in_the_middle_of_a_range_copy(tiny_hf, tmp_path):
    hf = tiny_hf(TinySpec("llama"))
    whole, killed = str(tmp_path / "whole"), str(tmp_path / "killed")
    assert _cli(hf, whole).returncode == 0
    proc = _cli(hf, killed, fault="kill_in_copy=3")
    assert proc.returncode == -9, proc.stderr
    partial = [n for _, _, names in os.walk(killed) for n in names if ".tmp-" in n]
    assert partial, "the kill should leave a half-written file behind"
    proc = _cli(hf, killed, "--resume")
    assert proc.returncode == 0, proc.stderr
    keep_out = {"conversion_manifest.json", "conversion_report.json"}
    assert read_tree(killed, keep_out) == read_tree(whole, keep_out)
    for rank in ("mp_rank_00", "mp_rank_01"):
        with zipfile.ZipFile(os.path.join(killed, "release", rank, "model_optim_rng.pt")) as z:
            assert z.testzip() is None


def test_rank_files_from_the_range_path_equal_torch_save(tiny_hf, tmp_path, monkeypatch):
    """A rank file written in place holds what torch.save wrote before, entry for entry."""
    from helpers import hf_to_mcore
    hf = tiny_hf(TinySpec("qwen2"))  # q/k/v biases, tied embeddings
    ours, old = str(tmp_path / "ours"), str(tmp_path / "old")
    layout = dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2)
    assert hf_to_mcore(hf, ours, **layout) == 0
    monkeypatch.setattr(torch_zip, "supports", lambda dtype: False)  # every file through torch.save
    assert hf_to_mcore(hf, old, **layout) == 0
    for rank in sorted(os.listdir(os.path.join(old, "release"))):
        a_path, b_path = (os.path.join(d, "release", rank, "model_optim_rng.pt") for d in (ours, old))
        with zipfile.ZipFile(a_path) as z:
            assert z.testzip() is None
        a, b = torch.load(a_path, weights_only=False), torch.load(b_path, weights_only=False)
        assert list(a) == list(b) and list(a["model"]) == list(b["model"])
        for k, v in b["model"].items():
            if v is None:
                assert a["model"][k] is None
            else:
                assert a["model"][k].dtype == v.dtype and torch.equal(a["model"][k], v), (rank, k)
        assert vars(a["args"]) == vars(b["args"]) and a["iteration"] == b["iteration"]
        assert a["checkpoint_version"] == b["checkpoint_version"]


def test_prefetch_reads_the_source_ahead_within_its_budget(tmp_path, monkeypatch):
    from convert_checkpoint import prefetch

    for rel in ("release/mp_rank_01_000/model_optim_rng.pt", "release/mp_rank_00_000/model_optim_rng.pt",
                "model-00010-of-00010.safetensors", "model-00002-of-00010.safetensors", "config.json"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x" * 1000)
    files = prefetch.source_files(str(tmp_path))
    assert [os.path.relpath(f, tmp_path) for f in files] == [
        "model-00002-of-00010.safetensors", "model-00010-of-00010.safetensors",
        "release/mp_rank_00_000/model_optim_rng.pt", "release/mp_rank_01_000/model_optim_rng.pt"]
    assert prefetch.readahead_window(str(tmp_path)) >= 4096
    calls = []
    monkeypatch.setattr(prefetch, "readahead_window", lambda path: 300)  # the kernel's cap per call
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, off, n, advice: calls.append((off, n, advice)))
    assert prefetch.read_ahead(files, 2500) == 2500  # 1000 + 1000 + 500 bytes, in windows of 300
    assert [(o, n) for o, n, _ in calls][:5] == [(0, 300), (300, 300), (600, 300), (900, 100), (0, 300)]
    assert sum(n for _, n, _ in calls) == 2500 and {a for _, _, a in calls} == {os.POSIX_FADV_WILLNEED}
    monkeypatch.undo()
    # on the command line: only with --prefetch, in a child process that reads and exits
    child = prefetch.start_from_argv(["--load_platform", "mcore", "--load_ckpt_path", str(tmp_path), "--prefetch"])
    assert child is not None and child.wait() == 0
    for argv in (["--load_ckpt_path", str(tmp_path)], ["--load_ckpt_path", str(tmp_path), "--prefetch", "--dry_run"],
                 ["--prefetch", "--help"], ["--load_ckpt_path", str(tmp_path / "missing"), "--prefetch"]):
        assert prefetch.start_from_argv(argv) is None
    monkeypatch.setenv("LOCAL_RANK", "1")  # torchrun: one process per machine reads ahead
    assert prefetch.start_from_argv(["--load_ckpt_path", str(tmp_path), "--prefetch"]) is None


def _plan_for_workers(tiny_hf, tmp_path, *extra: str, family: str = "llama"):
    from convert_checkpoint.options import parse_options
    from convert_checkpoint.pipeline import build_plan

    opts = parse_options(["--load_platform", "huggingface", "--save_platform", "mcore", "--load_ckpt_path",
                          tiny_hf(TinySpec(family)), "--save_ckpt_path", str(tmp_path / "w"),
                          "--tensor_model_parallel_size", "2", "--pipeline_model_parallel_size", "2", *extra])
    return build_plan(opts.plan_request(None), opts)


def test_auto_workers_take_the_tightest_bound(tiny_hf, tmp_path):
    from convert_checkpoint import workers

    plan = _plan_for_workers(tiny_hf, tmp_path)  # 4 rank files that only move bytes
    assert workers.moves_bytes(plan)
    largest = max(plan.memory_bytes(f) for f in plan.files)
    assert workers.choose(plan, 4, None, cores=2) == workers.WorkerChoice(2, "auto: bounded by 2 cores")
    assert workers.choose(plan, 4, None, cores=64).count == 4  # the files
    assert workers.choose(plan, 3, None, cores=64).reason == "auto: bounded by 3 files"  # a rank's share
    assert workers.choose(plan, 4, 2 * largest + 1, cores=64).count == 2  # memory for two of the largest
    assert workers.choose(plan, 4, 1, cores=64).count == 1  # never fewer than one
    many = type("P", (), {"files": plan.files * 5, "target": plan.target, "source": plan.source, "jobs": plan.jobs})()
    assert workers.choose(many, 20, None, cores=64) == workers.WorkerChoice(
        workers.IO_STREAMS, f"auto: bounded by {workers.IO_STREAMS} streams for a conversion that only moves bytes")
    fp8 = _plan_for_workers(tiny_hf, tmp_path, "--convert_to_fp8", family="deepseek_v3")  # quantizes
    assert not workers.moves_bytes(fp8)
    assert workers.choose(fp8, 20, None, cores=64).reason == "auto: bounded by 20 files"  # cores, not streams


def test_default_is_auto_and_says_why(tiny_hf, tmp_path):
    out = str(tmp_path / "auto")
    cmd = [sys.executable, "-m", "convert_checkpoint", "--load_platform", "huggingface", "--save_platform", "mcore",
           "--load_ckpt_path", tiny_hf(TinySpec("llama")), "--save_ckpt_path", out, "--tensor_model_parallel_size", "2",
           "--no_progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    import json
    report = json.load(open(os.path.join(out, "conversion_report.json")))
    cores = len(os.sched_getaffinity(0))
    assert report["workers"] == min(cores, 2, 8)  # 2 rank files
    assert report["io_threads"] == max(1, 8 // report["workers"])  # 8 copy streams in all
    assert f"workers: {report['workers']} worker" in proc.stderr and "(auto: bounded by" in proc.stderr
    assert f"{report['io_threads']} copy thread" in proc.stderr
    assert report["startup_seconds"] > 0 and report["fsync_seconds"] >= 0
    assert _cli(tiny_hf(TinySpec("llama")), str(tmp_path / "bad"), "--max_workers", "x").returncode == 2
