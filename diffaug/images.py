"""Reading image files: the one reader of Stage I (``fit``) and the distillation data (``distill.data``).

Every image comes out RGB. 16-bit images (PNG's I;16 modes) are scaled from 65535, not clipped at 255 as PIL's
``convert("RGB")`` would (which makes them almost all white). A file too large to be an image PIL will decode
(its decompression-bomb guard) and a file that is not an image raise a DiffAugError naming the file.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .errors import DiffAugError

__all__ = ["IMAGE_SUFFIXES", "open_rgb", "read_image", "shipped_images_dir"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def shipped_images_dir() -> Path:
    """The licence-clean photos that ship with diffaug."""
    return Path(str(resources.files("diffaug.data"))) / "natural"


def open_rgb(path: str | Path) -> Image.Image:
    """The image at ``path`` as an 8-bit RGB PIL image, 16-bit ones scaled from 65535."""
    try:
        with Image.open(path) as image:
            if image.mode in _SIXTEEN_BIT:
                values = np.asarray(image, dtype=np.float64)
                eight = np.clip(np.round(values * (255 / 65535)), 0, 255).astype(np.uint8)
                return Image.fromarray(eight, mode="L").convert("RGB")
            return image.convert("RGB")
    except Image.DecompressionBombError as error:
        raise DiffAugError(f"images must be small enough to decode safely; {path} is too large ({error})") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise DiffAugError(f"images must be readable image files; {path} is not ({error})") from None


def read_image(path: str | Path) -> Tensor:
    """The image at ``path`` as a float (3, H, W) tensor in [0, 1] (16-bit images at their full precision)."""
    try:
        with Image.open(path) as image:
            if image.mode in _SIXTEEN_BIT:
                gray = torch.from_numpy(np.asarray(image, dtype=np.float64).copy()).div(65535).clamp(0, 1).float()
                return gray.expand(3, -1, -1).contiguous()
            array = np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    except Image.DecompressionBombError as error:
        raise DiffAugError(f"images must be small enough to decode safely; {path} is too large ({error})") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise DiffAugError(f"images must be readable image files; {path} is not ({error})") from None
    return torch.from_numpy(array).permute(2, 0, 1).float().div(255)
