"""Converted checkpoints against a real megatron-core GPTModel on CPU (gloo).

Every rank file written with ``--transformer_impl local`` must load with strict=True into the
model megatron-core builds for that rank, the rank->file mapping must agree with
``parallel_state``, TE-named output must load through megatron-core's own local->TE key map,
and logits must match transformers. Spawning is slow here, so all jobs of one world size run in
a single spawn.
"""
from __future__ import annotations

import pytest

from helpers import hf_to_mcore
from mcore_harness import CheckJob, Layout, assert_all_ok, run_checks
from tiny_models import TinySpec

LLAMA, QWEN2_TIED, QWEN2, QWEN3 = TinySpec("llama"), TinySpec("qwen2", tied=True), TinySpec("qwen2"), TinySpec("qwen3")
LLAMA6 = TinySpec("llama", num_layers=6)

# (spec, tp, pp, vpp, custom layer list or None, transformer_impl, check logits)
WORLD4 = [
    (spec, tp, pp, 1, None, "local", False)
    for spec in (LLAMA, QWEN2_TIED, QWEN3)
    for tp, pp in ((1, 1), (2, 1), (4, 1), (1, 2), (1, 4))
] + [
    (LLAMA, 2, 2, 1, None, "local", True),
    (QWEN2, 2, 2, 1, None, "local", True),
    (QWEN3, 2, 2, 1, None, "local", True),
    (QWEN2_TIED, 2, 2, 1, "3,1", "local", True),
    (QWEN3, 2, 2, 2, None, "local", False),
    (LLAMA6, 1, 2, 2, "2,1,1,2", "local", True),
    (LLAMA, 2, 2, 1, None, "transformer_engine", False),
    (QWEN3, 4, 1, 1, None, "transformer_engine", False),
    (QWEN2_TIED, 1, 2, 2, None, "transformer_engine", False),
]
WORLD6 = [
    (LLAMA, 1, 3, 1, None, "local", True),  # balanced uneven: 2,1,1
    (QWEN3, 2, 3, 1, "1,2,1", "local", False),
    (QWEN2_TIED, 2, 3, 1, "1,1,2", "local", True),
    (LLAMA6, 1, 3, 2, "1,1,1,1,1,1", "local", False),
    (QWEN2, 2, 3, 1, "2,1,1", "transformer_engine", False),
]


def _balanced(num_layers: int, stages: int) -> list[int]:
    base, extra = divmod(num_layers, stages)
    return [base + (1 if s < extra else 0) for s in range(stages)]


def _jobs(cases, tiny_hf, tmp_path) -> list[CheckJob]:
    jobs = []
    for i, (spec, tp, pp, vpp, custom, impl, logits) in enumerate(cases):
        out = str(tmp_path / f"case{i}")
        rc = hf_to_mcore(tiny_hf(spec), out, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                         **{"num-virtual-stages-per-pipeline-rank": vpp if vpp > 1 else None},
                         custom_pipeline_layers=custom, transformer_impl=impl)
        assert rc == 0
        counts = [int(c) for c in custom.split(",")] if custom else _balanced(spec.num_layers, pp * vpp)
        layout = Layout(tp, pp, vpp, tuple(counts))
        jobs.append(CheckJob(tiny_hf(spec), out, layout, te_names=impl == "transformer_engine",
                             check_logits=logits, tied=spec.tied))
    return jobs


@pytest.mark.parametrize("world_size,cases", [(4, WORLD4), (6, WORLD6)], ids=["world4", "world6"])
def test_strict_load_rank_files_and_logits(tiny_hf, tmp_path, world_size, cases):
    jobs = _jobs(cases, tiny_hf, tmp_path)
    results = run_checks(world_size, jobs)
    assert_all_ok(results, jobs, world_size)
    # The logits check really ran where asked (a skipped check must not pass silently).
    for i, job in enumerate(jobs):
        if job.check_logits:
            diffs = [r["max_abs_diff"] for r in results if r["job"] == i and r.get("max_abs_diff") is not None]
            assert diffs and max(diffs) <= 1e-4, (i, diffs)
