"""Which legacy rank files exist under expert parallelism, and which expert shard each holds.

Megatron orders global ranks tp-cp-ep-dp-pp in two generators: the dense one (TP, DP, PP)
and the expert one (ETP, EP, expert-DP, PP). Both keep PP outermost, so inside one pipeline
stage local rank r has dense TP rank ``r % tp``, expert-TP rank ``r % etp`` and EP rank
``(r // etp) % ep``. A legacy file is named by (TP rank, PP rank, EP rank); the pattern repeats
every ``lcm(tp, etp * ep)`` ranks, the smallest world that holds the layout. (The incumbent
only walks ``max(tp, etp * ep)`` ranks and so misses files when neither divides the other.)

Tested against megatron-core's RankGenerator (tests/test_expert_layout.py).
"""
from __future__ import annotations

import math

from ..errors import ConversionError


def expert_rank_files(tp: int, ep: int, etp: int) -> dict[tuple[int, int], int]:
    """(TP rank, EP rank) of every file of one pipeline stage -> the ETP rank of its experts."""
    if min(tp, ep, etp) < 1:
        raise ConversionError("tensor, expert and expert-tensor parallel sizes must be >= 1")
    files: dict[tuple[int, int], int] = {}
    for rank in range(math.lcm(tp, etp * ep)):
        key = (rank % tp, (rank // etp) % ep)
        etp_rank = rank % etp
        if files.setdefault(key, etp_rank) != etp_rank:
            raise ConversionError(
                f"--expert_tensor_parallel_size {etp} with --tensor_model_parallel_size {tp} and "
                f"--expert_parallel_size {ep}: Megatron would save two different expert shards into "
                f"mp_rank_{key[0]:02d}_..._{key[1]:03d}, which a legacy checkpoint cannot hold"
            )
    return files
