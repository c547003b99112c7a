"""--device: which GPUs a value names, and how the executor spreads files over them.

The spreading is checked with the executor's own pool loop and stand-in futures (this machine
has no GPU); benchmarks/quantize_cuda_check.py runs it on real GPUs.
"""
from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass

import pytest

from convert_checkpoint import devices, execute
from convert_checkpoint.errors import ConversionError


@dataclass(frozen=True)
class OutputFile:  # what the pool reads of a planned file
    relpath: str
    nbytes: int


@pytest.fixture
def four_gpus(monkeypatch):
    monkeypatch.setattr(devices, "cuda_device_count", lambda: 4)


def test_device_values(four_gpus):
    assert devices.parse_device("cpu") == ()
    assert devices.parse_device("cuda") == (0, 1, 2, 3)
    assert devices.parse_device("cuda:2") == (2,)
    assert devices.parse_device("cuda:3,1") == (3, 1)
    assert devices.parse_device("cuda:0,cuda:2") == (0, 2)
    assert devices.math_device("cpu") == "cpu" and devices.math_device("cuda:0,1") == "cuda"


@pytest.mark.parametrize("value, message", [
    ("cuda:4", "cuda:4 does not exist (4 CUDA devices)"),
    ("cuda:1,1", "name each CUDA device once"),
    ("gpu", "is not cpu, cuda"),
    ("cuda:x", "is not cpu, cuda"),
    ("cuda:1,", "is not cpu, cuda"),
])
def test_bad_device_values(four_gpus, value, message):
    with pytest.raises(ConversionError, match=message.replace("(", r"\(").replace(")", r"\)")):
        devices.parse_device(value)


def test_no_cuda(monkeypatch):
    monkeypatch.setattr(devices, "cuda_device_count", lambda: 0)
    with pytest.raises(ConversionError, match="CUDA is not available"):
        devices.parse_device("cuda")
    assert devices.parse_device("cuda:1", require=False) == ()  # the run goes on; whoever needs a GPU says so


def test_pool_spreads_files_by_planned_bytes_in_flight():
    sizes = [900, 800, 500, 400, 300, 100]
    files = [OutputFile(relpath=f"f{i}", nbytes=n) for i, n in enumerate(sizes)]
    placed: dict[str, int] = {}
    pending: list[Future] = []

    def submit(f, gpu):
        placed[f.relpath] = gpu
        fut: Future = Future()
        pending.append(fut)
        if len(pending) > 2:  # the oldest job finishes once three are in flight
            pending.pop(0).set_result(None)
        return fut

    def finished(_result):
        while pending:  # let the rest finish as the loop waits
            pending.pop(0).set_result(None)

    execute._run_pool(files, 3, None, submit, finished, gpus=(0, 1))
    # 900 -> gpu0, 800 -> gpu1, 500 -> gpu1 (800 < 900), then each next file where fewer bytes are held
    assert placed["f0"] == 0 and placed["f1"] == 1 and placed["f2"] == 1
    assert set(placed) == {f.relpath for f in files}
    assert set(placed.values()) == {0, 1}


def test_pool_without_gpus_passes_none():
    files = [OutputFile(relpath="a", nbytes=1), OutputFile(relpath="b", nbytes=2)]
    seen = []

    def submit(f, gpu):
        seen.append(gpu)
        fut: Future = Future()
        fut.set_result(None)
        return fut

    execute._run_pool(files, 2, None, submit, lambda r: None)
    assert seen == [None, None]


def test_load_balances_and_releases():
    load = devices.DeviceLoad((1, 0))
    assert [load.take(n) for n in (10, 10, 5)] == [0, 1, 0]
    load.release(1, 10)
    assert load.take(1) == 1
