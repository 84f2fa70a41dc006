"""Runs small Distiller jobs in a fresh process, for the resume and DDP tests:
``python tests/distill_worker.py MODE OUT [TASK]``, TASK "classification" (default) or "localisation".

MODE "elastic" runs under ``torchrun --max-restarts``: it resumes from OUT/checkpoint.pt when there is one, and with
KILL_MID_EPOCH=1 rank 1 kills itself (SIGKILL) in the middle of epoch 1's Stage III on the first attempt."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler

from diffaug import PolicyAugmenter
from diffaug.distill import Distiller, Localisation, end_distributed_process
from diffaug.distill.data import mnist5k, small_models
from diffaug.distill.dense import dense_models, digit_scenes

TASK = sys.argv[3] if len(sys.argv) > 3 else "classification"


def make(seed: int = 0) -> tuple[Distiller, DataLoader]:
    torch.set_num_threads(1)
    if TASK == "localisation":  # a task with parameters of its own (the mimic adapter) and moving targets
        train = digit_scenes("localisation", seed=seed, sizes=(120, 10, 10)).train
        teacher, student = dense_models("localisation", seed=seed)
        task = Localisation(student.feature_channels, teacher.feature_channels, (32, 32))
        augmenter = PolicyAugmenter(geometry="composed")
    else:
        train, _ = mnist5k(train_size=120, seed=seed)
        teacher, student = small_models(1, 10, seed=seed)
        task, augmenter = "classification", PolicyAugmenter()
    distiller = Distiller(teacher, student, augmenter, task=task, lr=0.05, search_epochs=[0, 1], search_steps=2,
                          search_lr=0.5, seed=seed, progress=False)
    if distiller.world > 1:
        sampler = DistributedSampler(train, shuffle=True, seed=seed)
        loader = DataLoader(train, batch_size=20, sampler=sampler)
    else:
        loader = DataLoader(train, batch_size=20, shuffle=True, generator=torch.Generator())
    return distiller, loader


class KilledMidEpoch:
    """A loader that kills this process at the second batch of the second pass over it in ``epoch`` (the first
    pass of that epoch is Stage II's): an abrupt failure mid-Stage III, as a lost node would be."""

    def __init__(self, loader: DataLoader, distiller: Distiller, epoch: int) -> None:
        self.loader, self.distiller, self.epoch, self.passes = loader, distiller, epoch, 0

    def __getattr__(self, name: str) -> Any:  # sampler, generator: what the Distiller reorders per epoch
        return getattr(self.loader, name)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        self.passes += self.distiller.epoch == self.epoch
        for index, batch in enumerate(self.loader):
            if self.distiller.epoch == self.epoch and self.passes == 2 and index == 1:
                os.kill(os.getpid(), signal.SIGKILL)
            yield batch


def main() -> None:
    mode, out = sys.argv[1], sys.argv[2]
    if mode == "straight":  # 3 epochs in one go
        distiller, loader = make()
        distiller.fit(loader, 3)
    elif mode == "first":  # 1 epoch, then a checkpoint
        distiller, loader = make()
        distiller.fit(loader, 1, checkpoint=os.path.join(out, "checkpoint.pt"))
        return
    elif mode == "resume":  # a fresh process: load, then 2 more epochs
        distiller, loader = make()
        distiller.load(os.path.join(out, "checkpoint.pt"))
        distiller.fit(loader, 3)
    elif mode == "elastic":
        torch.distributed.init_process_group("gloo")
        distiller, loader = make()
        checkpoint = os.path.join(out, "checkpoint.pt")
        if os.path.isfile(checkpoint):
            distiller.load(checkpoint)
        first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        if os.environ.get("KILL_MID_EPOCH") == "1" and first_attempt and distiller.rank == 1:
            loader = KilledMidEpoch(loader, distiller, epoch=1)
        distiller.fit(loader, 3, checkpoint=checkpoint)
        if distiller.rank == 0:
            torch.save({"student": distiller.student.state_dict(), "augmenter": distiller.augmenter.state_dict(),
                        "history": distiller.history, "attempts": int(os.environ["TORCHELASTIC_RESTART_COUNT"]) + 1},
                       os.path.join(out, "elastic.pt"))
        end_distributed_process()
    elif mode == "ddp":
        torch.distributed.init_process_group("gloo")
        distiller, loader = make()
        first_draw = distiller.augmenter.sample(4, generator=distiller.generator).selected
        distiller.fit(loader, 2)
        torch.save({"augmenter": distiller.augmenter.state_dict(), "first_draw": first_draw,
                    "student": distiller.student.state_dict(), "task": distiller.task.state_dict()},
                   os.path.join(out, f"rank{distiller.rank}.pt"))
        end_distributed_process()
    else:
        raise SystemExit(f"unknown mode {mode}")
    torch.save({"student": distiller.student.state_dict(), "augmenter": distiller.augmenter.state_dict(),
                "task": distiller.task.state_dict(), "history": distiller.history}, os.path.join(out, f"{mode}.pt"))


if __name__ == "__main__":
    main()
