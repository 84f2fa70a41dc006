"""TST distillation: the search objective (Eq. 2), the KD loss (Eq. 1) and a reference training loop.

>>> import torch
>>> from diffaug.distill import kd_loss, tst_loss
>>> logits, targets = torch.randn(4, 10), torch.tensor([0, 1, 2, 3])
>>> float(tst_loss(logits, logits, targets)) > 0
True
"""

from .loop import Distiller, default_milestones, end_distributed_process
from .objective import dist_loss, dkd_loss, kd_loss, log_one_minus_softmax, tst_loss
from .tasks import Classification, Localisation, Segmentation, Task, box_iou

__all__ = ["Classification", "Distiller", "Localisation", "Segmentation", "Task", "box_iou", "default_milestones",
           "dist_loss", "dkd_loss", "end_distributed_process", "kd_loss", "log_one_minus_softmax", "tst_loss"]
