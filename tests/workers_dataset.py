"""A dataset that augments in DataLoader workers with a ReferencePolicy, importable by spawned workers."""

from __future__ import annotations

import torch

from diffaug import ReferencePolicy


class Augmented(torch.utils.data.Dataset):
    def __init__(self, policy: ReferencePolicy) -> None:
        self.policy = policy

    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.policy(torch.full((3, 16, 16), 0.5))
