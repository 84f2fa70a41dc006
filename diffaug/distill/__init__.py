"""TST distillation: the search objective (Eq. 2), the KD loss (Eq. 1) and a reference training loop.

>>> import torch
>>> from diffaug.distill import kd_loss, tst_loss
>>> logits, targets = torch.randn(4, 10), torch.tensor([0, 1, 2, 3])
>>> float(tst_loss(logits, logits, targets)) > 0
True
"""

from .loop import FORMAT_VERSION, Distiller
from .objective import KD_LOSSES, dist_loss, dkd_loss, kd_loss, log_one_minus_softmax, tst_loss
from .parallel import end_distributed_process
from .settings import Run, Search, Settings, StageThree, default_milestones
from .tasks import Classification, Localisation, Segmentation, Task, box_iou
from .trainer import Trainer, train_teacher

__all__ = ["FORMAT_VERSION", "KD_LOSSES", "Classification", "Distiller", "Localisation", "Run", "Search",
           "Segmentation", "Settings", "StageThree", "Task", "Trainer", "box_iou", "default_milestones", "dist_loss",
           "dkd_loss", "end_distributed_process", "kd_loss", "log_one_minus_softmax", "train_teacher", "tst_loss"]
