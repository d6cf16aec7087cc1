"""Where a process runs: its rank, the world, its device (torchrun sets the environment).

One process is the world of one; every helper here is then a plain call, so the loop
has one code path for single-process and DistributedDataParallel runs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ...errors import UsageError


@dataclass
class Context:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def _resolve_device(spec: str, local_rank: int) -> torch.device:
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise UsageError(f"--device {spec!r} is not a device (cpu, cuda, cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA device is available")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device


def _init_context(device_spec: str) -> Context:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = _resolve_device(device_spec, local_rank)
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            if device.type == "cuda":
                torch.cuda.set_device(device)
            dist.init_process_group(backend=backend)
    elif device.type == "cuda":
        torch.cuda.set_device(device)
    return Context(rank, world, local_rank, device)


def _agree(ctx: Context, fn):
    """Run ``fn`` on rank 0 and hand its result (or its UsageError) to every rank."""
    if not ctx.distributed:
        return fn()
    import torch.distributed as dist

    box: list[Any] = [None]
    if ctx.main:
        try:
            box[0] = ("ok", fn())
        except UsageError as exc:
            box[0] = ("error", str(exc))
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise UsageError(value)
    return value


def _all_reduce(ctx: Context, t: Tensor) -> Tensor:
    if ctx.distributed:
        import torch.distributed as dist

        dist.all_reduce(t)
    return t
