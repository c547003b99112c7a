"""The EP/ETP rank-file rule agrees with megatron-core's own rank generator."""
from __future__ import annotations

import itertools
import math

import pytest

from convert_checkpoint.errors import ConversionError
from convert_checkpoint.layout.expert_parallel import expert_rank_files


def _megatron_files(tp, pp, ep, etp):
    """(tp rank, pp rank, ep rank) -> set of ETP ranks, over the smallest world, per megatron-core."""
    from megatron.core.parallel_state import RankGenerator

    world = pp * math.lcm(tp, etp * ep)
    dense = RankGenerator(tp=tp, ep=1, dp=world // (tp * pp), pp=pp, cp=1, order="tp-cp-ep-dp-pp")
    expert = RankGenerator(tp=etp, ep=ep, dp=world // (etp * ep * pp), pp=pp, cp=1, order="tp-cp-ep-dp-pp")

    def index_in(gen, token):
        return {r: i for group in gen.get_ranks(token) for i, r in enumerate(group)}

    tp_of, pp_of = index_in(dense, "tp"), index_in(dense, "pp")
    ep_of, etp_of = index_in(expert, "ep"), index_in(expert, "tp")
    files: dict[tuple[int, int, int], set[int]] = {}
    for r in range(world):
        files.setdefault((tp_of[r], pp_of[r], ep_of[r]), set()).add(etp_of[r])
    return files


@pytest.mark.parametrize("tp,pp,ep,etp", [
    c for c in itertools.product((1, 2, 4, 8), (1, 2), (1, 2, 4, 32), (1, 2, 4)) if math.lcm(c[0], c[2] * c[3]) <= 256
])
def test_rank_file_set_matches_megatron(tp, pp, ep, etp):
    theirs = _megatron_files(tp, pp, ep, etp)
    conflict = any(len(etps) > 1 for etps in theirs.values())
    if conflict:
        with pytest.raises(ConversionError, match="two different expert shards"):
            expert_rank_files(tp, ep, etp)
        return
    ours = expert_rank_files(tp, ep, etp)
    assert {(t, p, e): {x} for (t, e), x in ours.items() for p in range(pp)} == theirs


def test_known_layouts():
    # The incumbent's TP=2 EP=4 ETP=1 listing: mp_rank_00_000, 00_002, 01_001, 01_003.
    assert sorted(expert_rank_files(2, 4, 1)) == [(0, 0), (0, 2), (1, 1), (1, 3)]
    # DeepSeek-V3 scripts: TP=8 EP=32 ETP=1 -> 32 files per stage, file (e mod 8, e).
    assert sorted(expert_rank_files(8, 32, 1)) == sorted((e % 8, e) for e in range(32))
    # ETP = TP: every (t, e) pair, each holding ETP shard t.
    assert expert_rank_files(2, 2, 2) == {(0, 0): 0, (1, 0): 1, (0, 1): 0, (1, 1): 1}
