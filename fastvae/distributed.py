"""torch.distributed set-up for ``torchrun``: NCCL on GPUs, gloo on CPUs; a no-op in a plain process."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from fastvae.backends import resolve_device

# A collective that waits longer than this fails instead of hanging (a dead rank is noticed by torchrun
# first, which stops the others; this is the second line of defence).
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=5)


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def setup(device_name: str) -> DistInfo:
    """Join the process group torchrun describes in the environment (WORLD_SIZE > 1), else run alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device_name)
    if world <= 1:
        return DistInfo(device=device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        # torchrun keeps one key-value store across worker restarts; without a per-attempt namespace a
        # restarted rank can read the previous attempt's (dead) peer addresses and fail to connect.
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        base = dist.TCPStore(
            os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
            timeout=COLLECTIVE_TIMEOUT,
        )  # fmt: skip
        store = dist.PrefixStore(f"fastvae/attempt-{attempt}", base)
        dist.init_process_group(
            backend=backend, store=store, rank=rank, world_size=world, timeout=COLLECTIVE_TIMEOUT, **kwargs
        )
    return DistInfo(rank, world, local_rank, device)


def teardown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
