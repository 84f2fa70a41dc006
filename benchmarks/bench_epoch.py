"""One Distiller epoch per precision, timed: the zoo's resnet56 -> resnet20 on CIFAR-shaped random data with the
padded crop and flip and one Stage II pass, as ``python -m diffaug.distill --data cifar`` trains (part of
``benchmarks/device_check.sh``).

    python benchmarks/bench_epoch.py --device cuda                       # fp32, bf16 and fp16, 2,048 images
    python benchmarks/bench_epoch.py --device cpu --images 64 --amp none bf16 --out epochs.json

Prints, and writes with ``--out``, a JSON report: per precision the epoch's seconds (the first epoch, so CUDA's and
cuDNN's warm-up are in it), the steps (Stage II and Stage III), ms per step and the last Stage III loss.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from diffaug import PolicyAugmenter
from diffaug.distill import Distiller
from diffaug.distill.data import random_crop_flip
from diffaug.distill.models import build_model
from diffaug.files import write_atomic


def epoch(data: TensorDataset, batch_size: int, device: str, amp: str | None) -> dict[str, float]:
    torch.manual_seed(0)
    teacher, student = build_model("resnet56", 100), build_model("resnet20", 100)
    loader = DataLoader(data, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(0))
    distiller = Distiller(teacher, student, PolicyAugmenter(), standard_augment=random_crop_flip, device=device,
                          amp=amp, search_epochs=[0], progress=False)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    start = time.perf_counter()
    history = distiller.fit(loader, 1)
    sync()
    seconds = time.perf_counter() - start
    steps = len(history["search"]) + len(history["train"])
    return {"seconds": seconds, "steps": steps, "ms_per_step": 1e3 * seconds / steps,
            "final_loss": history["train"][-1]["loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="(default: %(default)s)")
    parser.add_argument("--amp", nargs="+", choices=("none", "bf16", "fp16"), default=["none", "bf16", "fp16"],
                        help="precisions, each one epoch (default: %(default)s; fp16 needs CUDA)")
    parser.add_argument("--images", type=int, default=2048, help="training images (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=128, help="(default: %(default)s)")
    parser.add_argument("--out", type=Path, default=None, help="also write the report to this JSON file")
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.rand(args.images, 3, 32, 32, generator=g),
                         torch.randint(0, 100, (args.images,), generator=g))
    where = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    report = {"device": where, "torch": torch.__version__, "epochs": {}}
    for amp in args.amp:
        report["epochs"][amp] = epoch(data, args.batch_size, args.device, None if amp == "none" else amp)
        print(f"{amp}: {json.dumps(report['epochs'][amp])}", flush=True)  # what a time limit would cut off
    text = json.dumps(report, indent=1)
    if args.out is not None:
        write_atomic(args.out, lambda temporary: Path(temporary).write_text(text))
    print(text)


if __name__ == "__main__":
    main()
