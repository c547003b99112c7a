"""Many processes, one conversion: each converts its share of the output files.

Under ``torchrun`` (``WORLD_SIZE``/``RANK`` in the environment) or with ``--world_size`` and
``--rank`` (other launchers; ``MASTER_ADDR``/``MASTER_PORT`` then name rank 0), every process
builds the same plan, takes its share of the files (largest first, to the least loaded rank),
and writes them into the shared output directory. torch.distributed (gloo) provides the
barriers and the gather of results; rank 0 writes the metadata last. Files are independent, so
the output is byte-identical to a single-process run.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

from .errors import ConversionError


@dataclass(frozen=True)
class World:
    size: int = 1
    rank: int = 0

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def share(self, files: list) -> list:
        """This rank's files: largest first, each to the rank with the fewest bytes so far."""
        if self.size == 1:
            return list(files)
        load = [0] * self.size
        mine = []
        for f in sorted(files, key=lambda f: (-f.nbytes, f.relpath)):
            rank = min(range(self.size), key=lambda r: (load[r], r))
            load[rank] += f.nbytes
            if rank == self.rank:
                mine.append(f)
        order = {f.relpath: i for i, f in enumerate(files)}
        return sorted(mine, key=lambda f: order[f.relpath])

    def barrier(self) -> None:
        if self.size > 1:
            import torch.distributed as dist

            dist.barrier()

    def all_gather(self, value) -> list:
        if self.size == 1:
            return [value]
        import torch.distributed as dist

        out = [None] * self.size
        dist.all_gather_object(out, value)
        return out


SINGLE = World()


def world_from(world_size: int | None, rank: int | None) -> World:
    """The flags if given, else torchrun's environment, else one process."""
    if world_size is None and rank is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
    elif world_size is None or rank is None:
        raise ConversionError("--world_size and --rank go together")
    if not 0 <= rank < world_size:
        raise ConversionError(f"--rank {rank} is outside --world_size {world_size}")
    return World(world_size, rank)


def join(world: World, timeout_minutes: int = 60) -> None:
    """Join the process group (gloo: CPU only, no GPU needed)."""
    if world.size == 1:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        return
    for var in ("MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise ConversionError(f"--world_size {world.size}: {var} is not set; set MASTER_ADDR and MASTER_PORT to "
                                  "rank 0's address (torchrun sets them)")
    dist.init_process_group("gloo", rank=world.rank, world_size=world.size,
                            timeout=datetime.timedelta(minutes=timeout_minutes))


def leave(world: World) -> None:
    if world.size > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
