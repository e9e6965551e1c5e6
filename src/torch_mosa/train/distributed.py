"""Multi-process training from the torchrun environment: process group, DDP or FSDP2 wrapping, gradient sync.

One process (no RANK/WORLD_SIZE in the environment) needs none of this and gets the model back unwrapped.
"""

from __future__ import annotations

import contextlib
import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Only the main process writes logs, metrics and checkpoints."""
        return self.rank == 0


def setup_distributed(device_type: str) -> DistInfo:
    """Join the process group described by torchrun's RANK / LOCAL_RANK / WORLD_SIZE (gloo on CPU, nccl on CUDA),
    or describe the one the caller already initialized."""
    if dist.is_initialized():
        return DistInfo(rank=dist.get_rank(), local_rank=int(os.environ.get("LOCAL_RANK", "0")),
                        world_size=dist.get_world_size())
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return DistInfo()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size)


def teardown_distributed(clean_exit: bool = True) -> None:
    """Leave the process group. FSDP and DDP wrappers hold the group through reference cycles that outlive the
    training loop; collected later, at interpreter exit, they would destroy the group's C++ side during finalization
    (gloo then aborts the process). So collect them now, while the group is whole. On a clean exit all ranks first
    meet, so none closes its connections while a peer still uses them; after an error a peer may never arrive."""
    if not dist.is_initialized():
        return
    gc.collect()
    if clean_exit:
        dist.barrier()
    dist.destroy_process_group()


def shard_fsdp(model: nn.Module, device_type: str) -> None:
    """FSDP2: shard each transformer block, then the root (embeddings, final norm, head), in place.

    On CUDA the parameters are gathered in bfloat16 and gradients reduced in float32, which replaces autocast.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp_policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                 if device_type == "cuda" else MixedPrecisionPolicy())
    for block in model.blocks:
        fully_shard(block, mp_policy=mp_policy)
    fully_shard(model, mp_policy=mp_policy)


def wrap_ddp(model: nn.Module, info: DistInfo, device_type: str) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[info.local_rank] if device_type == "cuda" else None)


def gradient_sync(model: nn.Module, sync: bool):
    """A context in which backward all-reduces gradients only if `sync` (the last micro-step of a step)."""
    if sync:
        return contextlib.nullcontext()
    if hasattr(model, "no_sync"):  # DDP
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        return _fsdp_no_sync(model)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(model):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def all_reduce_mean(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The mean of `value` over ranks (the value itself with one process)."""
    if info.world_size == 1:
        return value
    value = value.clone()
    dist.all_reduce(value)
    return value / info.world_size


def barrier(info: DistInfo) -> None:
    if info.world_size > 1:
        dist.barrier()
