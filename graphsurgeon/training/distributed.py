"""The few collective operations training needs, each a no-op in a single process.

Methods call these rather than `torch.distributed` directly, so that every method runs the
same code with and without `torchrun`: a gradient method averages its per-task gradient
matrix across ranks before aggregating it (aggregating each rank's own gradients and then
averaging would give a different direction), and a structural method sums its similarity
statistics across ranks before rank 0 decides.

`setup` joins the process group that ``torchrun`` describes in the environment (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``); `teardown` leaves it.
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

__all__ = [
    "ShardedSampler",
    "all_reduce_gradients",
    "all_reduce_mean",
    "all_reduce_sum",
    "any_rank",
    "barrier",
    "broadcast_object",
    "broadcast_tensors",
    "is_distributed",
    "is_main",
    "rank",
    "setup",
    "shard",
    "teardown",
    "world_size",
]

T = TypeVar("T")

_flag_group: Any = None  # the group `any_rank` uses (gloo), created on first use


def setup(device: str | None = None) -> str:
    """Join torchrun's process group if there is one; return the device this rank trains on.

    With ``WORLD_SIZE`` > 1 in the environment, initialises the default process group from it:
    NCCL when training on CUDA (each rank takes GPU ``LOCAL_RANK``: ``device="cuda"`` becomes
    ``cuda:<LOCAL_RANK>``), gloo on the CPU. Without it (a plain ``python`` run) nothing happens,
    so the same script runs alone and under ``torchrun``.
    """
    device = device or "cpu"
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_available() and dist.is_initialized()):
        return device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.device(device).type == "cuda":
        device = f"cuda:{local_rank}" if torch.device(device).index is None else device
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=torch.device(device))
    else:
        dist.init_process_group("gloo")
    return device


def teardown() -> None:
    """Leave the process group `setup` joined (no-op when there is none)."""
    global _flag_group
    _flag_group = None
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    """True inside an initialised process group with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Rank 0 (or the only process): the one that writes checkpoints and decides edits."""
    return rank() == 0


def barrier() -> None:
    """Wait until every rank gets here."""
    if is_distributed():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks, in place; returns it."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Average ``tensor`` over ranks, in place; returns it."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor.div_(dist.get_world_size())
    return tensor


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any rank (e.g. a stop signal that reached
    only some ranks, or reached them at different steps).

    Goes over a gloo group even when training uses NCCL: a CPU flag then costs a CPU round trip
    between the ranks, not a device synchronisation that would stall the GPU's queue each step.
    """
    global _flag_group
    if not is_distributed():
        return flag
    if _flag_group is None:
        _flag_group = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    t = torch.tensor([int(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_flag_group)
    return bool(t.item())


def all_reduce_gradients(params: Sequence[torch.nn.Parameter]) -> None:
    """Average the ``.grad`` of ``params`` over ranks with one collective per dtype and device.

    For methods that compute their own gradients (``reduces_gradients = True``), e.g. for the
    task-specific parameters, whose gradient is not aggregated. The gradients are flattened into
    one buffer so that a network of many small tensors costs one all-reduce, not one per tensor.
    Parameters whose ``.grad`` is ``None`` are skipped: every rank must skip the same ones (true
    when every rank runs the same code on batches of the same shapes).
    """
    if not is_distributed():
        return
    buckets: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            buckets.setdefault((p.grad.dtype, p.grad.device), []).append(p.grad)
    for grads in buckets.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        all_reduce_mean(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (a decision, a tree): picklable objects only."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def broadcast_tensors(tensors: Sequence[torch.Tensor], src: int = 0) -> None:
    """Overwrite ``tensors`` in place with rank ``src``'s values (e.g. BatchNorm statistics)."""
    if is_distributed():
        for t in tensors:
            dist.broadcast(t, src=src)


def shard(items: Sequence[T]) -> Sequence[T]:
    """This rank's share of ``items`` (every ``world_size``-th, from ``rank``): all of them in one
    process. Shares differ in length by at most one; together they hold each item once, which
    is what a sum over a fixed sample (evaluation, similarity statistics) needs."""
    return items[rank() :: world_size()]


class ShardedSampler(Sampler[int]):
    """This rank's share of another sampler's order, so that the ranks' k-th batches together
    are the single-process k-th batch.

    ``torch.utils.data.DistributedSampler`` shuffles from ``seed + epoch``; this one takes the
    order of ``sampler`` (a ``RandomSampler`` on the trainer's generator), which is the same on
    every rank and is drawn exactly as one process draws it: a run on W ranks with batch size
    B/W sees the same global batches as a run in one process with batch size B, and the
    generator's checkpointed state restores the order on resume. The order is padded by
    wrapping around to a multiple of the world size, so every rank gets as many samples.
    """

    def __init__(self, sampler: Sampler[int], size: int) -> None:
        self.sampler = sampler
        self.per_rank = math.ceil(size / world_size())

    def __iter__(self) -> Iterator[int]:
        order = list(self.sampler)
        if not order:
            return iter(())
        total = self.per_rank * world_size()
        order = (order * math.ceil(total / len(order)))[:total]
        return iter(order[rank() :: world_size()])

    def __len__(self) -> int:
        return self.per_rank
