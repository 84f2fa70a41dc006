"""Every use of torch.distributed in diffaug.distill, so that the stages, the trainer and the command stay free of
rank logic: one process is a world of one, and each helper is then a no-op (or the identity)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler


__all__ = ["all_gather", "average_gradients", "barrier", "broadcast_", "destroy", "end_distributed_process",
           "join_from_environment", "rank", "sum_", "train_loader", "wrap", "world"]


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank; 0 without a process group."""
    return dist.get_rank() if _active() else 0


def world() -> int:
    """The number of ranks; 1 without a process group."""
    return dist.get_world_size() if _active() else 1


def join_from_environment(device: str) -> str:
    """Join the torchrun job this process belongs to (WORLD_SIZE > 1), if it has not joined yet: gloo on the CPU,
    nccl on CUDA with each rank on ``cuda:LOCAL_RANK``. Returns the device this rank should use."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not _active():
        if device.startswith("cuda"):
            local = int(os.environ.get("LOCAL_RANK", "0"))
            device = f"cuda:{local}"
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return device


def destroy() -> None:
    """Leave the process group, if there is one."""
    if _active():
        dist.destroy_process_group()


def wrap(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` under DistributedDataParallel when there are several ranks (which then averages its gradients);
    the module itself otherwise."""
    if world() == 1:
        return module
    return nn.parallel.DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


def broadcast_(tensors: Iterable[Tensor]) -> None:
    """Give every rank rank 0's values of ``tensors``, in place."""
    if world() > 1:
        for tensor in tensors:
            dist.broadcast(tensor, src=0)


def average_gradients(parameters: Iterable[nn.Parameter]) -> None:
    """Average the parameters' gradients over the ranks, in place (those DDP does not average for us)."""
    size = world()
    if size > 1:
        for p in parameters:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= size


def sum_(tensor: Tensor) -> Tensor:
    """The sum of ``tensor`` over the ranks, in place."""
    if world() > 1:
        dist.all_reduce(tensor)
    return tensor


def all_gather(value: Any) -> list[Any]:
    """Every rank's ``value``, in rank order (a one-element list in one process)."""
    if world() == 1:
        return [value]
    values: list[Any] = [None] * world()
    dist.all_gather_object(values, value)
    return values


def barrier() -> None:
    if world() > 1:
        dist.barrier()


def train_loader(dataset: Dataset, batch_size: int, seed: int, drop_last: bool, **options: Any) -> DataLoader:
    """A shuffled loader of this rank's share of ``dataset`` in batches of ``batch_size``: a DistributedSampler
    under several ranks (whole batches only), else a generator; the trainer reseeds either per epoch, so a resumed
    run sees the same batches."""
    if world() > 1:
        sampler = DistributedSampler(dataset, shuffle=True, seed=seed, drop_last=True)
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True, **options)
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=torch.Generator(), drop_last=drop_last,
                      **options)


def end_distributed_process(code: int = 0) -> NoReturn:
    """End a torchrun worker that has finished its work: destroy the process group (if there is one), flush
    stdout and stderr, and exit with ``code`` at once, without the interpreter's finalisation.

    Why: a DistributedDataParallel wrapper leaves references to its process group behind (its constructor raises
    the group's reference count by more than deleting it lowers it), so no ``del`` frees the group and its threads
    can still be running when the interpreter finalises. There they occasionally abort a worker that has written
    all its results ("terminate called without an active exception", SIGABRT), rarely and mostly on a loaded
    machine. ``os._exit`` runs no finaliser and no atexit handler: close or write your files before (the
    Distiller writes its checkpoint and history atomically and closes them)."""
    destroy()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
