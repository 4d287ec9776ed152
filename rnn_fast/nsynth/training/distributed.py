"""One code path for single-process and ``torchrun`` jobs: :func:`distributed_session` yields a
:class:`Distributed` context (rank 0 of 1 when torchrun did not launch the process), and the collectives here do
nothing in a one-process job."""
import contextlib
import os
from dataclasses import dataclass
from typing import Iterator, List

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class Distributed:
    """Where this process sits in a (possibly one-process) job."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@contextlib.contextmanager
def distributed_session(device_type: str) -> Iterator[Distributed]:
    """Joins the process group torchrun describes in ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` (``env://``):
    NCCL for CUDA, gloo for CPU. Without those variables this is a one-process job and nothing is initialised.

    On a clean exit the ranks wait for each other before tearing the group down: a gloo rank that destroys its
    group while a peer is still working (rank 0 writing figures) can abort with ``terminate called without an
    active exception``. After an exception there is no barrier, since the other ranks may never reach it."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        yield Distributed()
        return
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    try:
        yield Distributed(rank, world_size, local_rank)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def wrap_model(model: nn.Module, ctx: Distributed, device: torch.device) -> nn.Module:
    """DistributedDataParallel around ``model`` in a multi-process job, ``model`` itself otherwise."""
    if not ctx.enabled:
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def unwrap_model(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def all_gather_objects(obj, ctx: Distributed) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank."""
    if not ctx.enabled:
        return [obj]
    gathered = [None] * ctx.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def shard_bounds(count: int, ctx: Distributed) -> slice:
    """This rank's contiguous share of ``count`` examples; the shards cover every example exactly once."""
    return slice(count * ctx.rank // ctx.world_size, count * (ctx.rank + 1) // ctx.world_size)


def synchronize_buffers(model: nn.Module, ctx: Distributed) -> None:
    """Rank 0's buffers (BatchNorm running statistics) everywhere: each rank's last training step updated its
    own copy, and every rank must evaluate the model that rank 0 checkpoints."""
    if ctx.enabled:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def sum_over_ranks(totals: torch.Tensor, count: int, ctx: Distributed) -> List[float]:
    """``[*totals, count]`` summed over ranks."""
    values = torch.cat([totals, totals.new_tensor([count])])
    if ctx.enabled:
        dist.all_reduce(values)
    return values.tolist()
