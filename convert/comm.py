"""Who am I among the conversion ranks: mpiexec (mpi4py), torchrun, or a single process.

Conversion ranks only exchange small Python objects (plans, write records), so the interface is
three calls: ``barrier``, ``allgather`` and ``bcast``. Rank and world come from the launcher;
nothing here depends on a GPU or on a shared torch.distributed group for the tensor data.
"""
from __future__ import annotations

import os


class Comm:
    rank, size = 0, 1

    def barrier(self) -> None:
        pass

    def allgather(self, obj) -> list:
        return [obj]

    def bcast(self, obj, root: int = 0):
        return obj

    def close(self) -> None:
        pass


class MPIComm(Comm):
    def __init__(self):
        from mpi4py import MPI

        self._c = MPI.COMM_WORLD
        self.rank, self.size = self._c.Get_rank(), self._c.Get_size()

    def barrier(self):
        self._c.barrier()

    def allgather(self, obj):
        return self._c.allgather(obj)

    def bcast(self, obj, root=0):
        return self._c.bcast(obj, root=root)


class TorchComm(Comm):
    def __init__(self):
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo")
        self._d = dist
        self.rank, self.size = dist.get_rank(), dist.get_world_size()

    def barrier(self):
        self._d.barrier()

    def allgather(self, obj):
        out = [None] * self.size
        self._d.all_gather_object(out, obj)
        return out

    def bcast(self, obj, root=0):
        box = [obj]
        self._d.broadcast_object_list(box, src=root)
        return box[0]

    def close(self):
        """Tear the gloo group down before exit: a live group at interpreter exit can abort."""
        if self._d.is_initialized():
            self._d.destroy_process_group()


MPI_ENV = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "MPI_LOCALRANKID")


def from_launcher() -> Comm:
    if any(v in os.environ for v in MPI_ENV):
        return MPIComm()
    if "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ):
        return TorchComm()
    return Comm()


def assign_by_bytes(sizes: list[int], ranks: int) -> list[int]:
    """Owner rank per item: largest first onto the least-loaded rank (deterministic)."""
    load = [0] * ranks
    owner = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(ranks), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += sizes[i]
    return owner
