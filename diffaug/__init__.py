"""diffaug: differentiable AutoAugment ops and learnable augmentation policies for PyTorch (TST, Stage I-III).

>>> import torch
>>> from diffaug import PolicyAugmenter
>>> aug = PolicyAugmenter(seed=0)
>>> aug(torch.rand(4, 3, 32, 32)).shape
torch.Size([4, 3, 32, 32])
"""

from .encoders import ARCHS, MetaEncoder, build_encoder
from .errors import DiffAugError
from .ops import MAGNITUDE_OPS, OPS, apply_op
from .policy import PolicyAugmenter, PolicySample, ReferencePolicy
from .priors import load_priors

__version__ = "0.1.0"

__all__ = [
    "ARCHS",
    "MAGNITUDE_OPS",
    "OPS",
    "DiffAugError",
    "MetaEncoder",
    "PolicyAugmenter",
    "PolicySample",
    "ReferencePolicy",
    "apply_op",
    "build_encoder",
    "load_priors",
    "__version__",
]
