"""Stage I: fit each meta-encoder to its reference op (Eq. 3) and measure how faithful it is.

Training images are random crops of real photos (by default the licence-clean ones that ship in
``diffaug/data/natural``, two of them held out for measuring), zoomed by up to 4x so that a 32 px crop holds
CIFAR-like detail. Magnitudes are uniform over the op's whole range, and a quarter of them at the ends (|m| = 1)
because relaxed-Bernoulli magnitudes (tau = 0.05) sit near 0 and 1 in Stage II.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from .encoders import MetaEncoder, build_encoder
from .errors import DiffAugError
from .images import IMAGE_SUFFIXES, read_image, shipped_images_dir
from .ops import MAGNITUDE_OPS, get_op

__all__ = [
    "FitSettings",
    "fit_encoder",
    "fit_priors",
    "evaluate_encoder",
    "load_images",
    "random_crops",
    "sample_magnitudes",
]

HELD_OUT = ("coffee.png", "rocket.png")  # shipped photos never used for fitting, only for measuring
# Held-out PSNR (dB) each encoder must reach at the fitting size (the project's targets; affine ops: 45 at 3x).
FIDELITY_TARGETS = {
    "Brightness": 45.0, "Color": 45.0, "Contrast": 45.0, "Sharpness": 45.0, "Posterize": 42.0, "Solarize": 30.0,
    "ShearX": 50.0, "ShearY": 50.0, "TranslateX": 50.0, "TranslateY": 50.0, "Rotate": 50.0,
}


# Sharpness's 3x3 filter leaves an image under 3 px as it is, so a smaller fit would teach its encoder nothing.
MIN_IMAGE_SIZE = 3


@dataclass(frozen=True)
class FitSettings:
    """Settings of one Stage I fit; defaults are those of the shipped priors."""

    steps: int = 400
    batch_size: int = 64
    image_size: int = 32
    lr: float = 1e-2
    refine_iterations: int = 150
    refine_batch_size: int = 256
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        # Zero steps or an empty batch do not fit anything: they would write priors worse than none, or a
        # "diverged" error about a loss that was never computed.
        for name, least in (("steps", 1), ("batch_size", 1), ("image_size", MIN_IMAGE_SIZE),
                            ("refine_iterations", 0), ("refine_batch_size", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise DiffAugError(f"{name} must be an int >= {least}; got {value!r}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not 0 < self.lr < math.inf:
            raise DiffAugError(f"lr must be a positive finite number; got {self.lr!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise DiffAugError(f"seed must be an int; got {self.seed!r}")
        check_device(self.device)


def check_device(device: object) -> torch.device:
    """``device`` as a torch.device, refused with ``DiffAugError`` before any work if it is not one this machine
    has (a CUDA device without CUDA, an index beyond the GPUs)."""
    try:
        parsed = torch.device(device)  # type: ignore[arg-type]
    except (RuntimeError, TypeError):
        raise DiffAugError(f"device must be a torch device such as 'cpu', 'cuda' or 'cuda:1'; got {device!r}") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise DiffAugError(f"device must be one this machine has; got {device!r}, and torch sees no CUDA device "
                               "(use --device cpu)")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise DiffAugError(f"device must be one this machine has; got {device!r}, and torch sees "
                               f"{torch.cuda.device_count()} CUDA device(s)")
    elif parsed.type != "cpu" and not (parsed.type == "mps" and torch.backends.mps.is_available()):
        raise DiffAugError(f"device must be 'cpu' or a CUDA device this machine has; got {device!r}")
    return parsed


def load_images(folder: str | Path | None = None) -> tuple[list[Tensor], list[Tensor]]:
    """(fit images, held-out images) as float (3, H, W) tensors in [0, 1].

    ``folder=None`` uses the shipped photos with ``HELD_OUT`` held out. For a folder of the user's, every fifth
    image (sorted by name, at least one when there are two or more) is held out; a folder with a single image
    is both fitted and measured on, which the report says.
    """
    root = shipped_images_dir() if folder is None else Path(folder)
    if not root.is_dir():
        raise DiffAugError(f"images must be a folder of images; got {str(root)!r}, which is not a folder")
    paths = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise DiffAugError(f"images folder {root} must contain images ({', '.join(IMAGE_SUFFIXES)}); it has none")
    if folder is None:
        held = [p for p in paths if p.name in HELD_OUT]
        fit = [p for p in paths if p.name not in HELD_OUT]
    elif len(paths) == 1:
        fit = held = paths
    else:
        held = paths[4::5] or paths[-1:]
        fit = [p for p in paths if p not in held]
    return [read_image(p) for p in fit], [read_image(p) for p in held]


def random_crops(
    images: Sequence[Tensor], count: int, size: int, generator: torch.Generator, max_zoom: float = 4.0
) -> Tensor:
    """``count`` square crops of side ``size``: a random image, a random zoom in [1, max_zoom] (log-uniform; a crop
    of ``zoom * size`` pixels resized with antialiasing), a random place."""
    crops = []
    for _ in range(count):
        image = images[int(torch.randint(len(images), (1,), generator=generator))]
        height, width = image.shape[-2:]
        zoom = math.exp(float(torch.rand((), generator=generator)) * math.log(max_zoom))
        side = max(1, min(height, width, round(size * zoom)))
        top = int(torch.randint(height - side + 1, (1,), generator=generator))
        left = int(torch.randint(width - side + 1, (1,), generator=generator))
        crop = image[None, :, top : top + side, left : left + side]
        if side != size:
            crop = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        crops.append(crop.clamp(0.0, 1.0))
    return torch.cat(crops)


def sample_magnitudes(count: int, signed: bool, generator: torch.Generator, ends: float = 0.25) -> Tensor:
    """Uniform over [-1, 1] (signed) or [0, 1]; a fraction ``ends`` of them at |m| = 1."""
    m = torch.rand(count, generator=generator)
    m = torch.where(torch.rand(count, generator=generator) < ends, torch.ones_like(m), m)
    if signed:
        m = m * torch.where(torch.rand(count, generator=generator) < 0.5, -1.0, 1.0)
    return m


def _pool_size(image_size: int) -> int:
    # About 100 MB of crops whatever the size: 4096 at 32 px, 256 at 224 px.
    return max(256, min(4096, (25 * 2**20) // (3 * image_size * image_size)))


def fit_encoder(
    op: str,
    arch: str,
    pool: Tensor,
    settings: FitSettings = FitSettings(),
    progress: Callable[[int, float, int], None] | None = None,
) -> MetaEncoder:
    """Fit a fresh encoder of ``op`` to the reference op on crops from ``pool`` (N, 3, S, S); returns it on the CPU.

    Eq. 3 is minimised in two phases: Adam on random batches (``steps``), then L-BFGS in float64 on one fixed
    batch (``refine_iterations``). Image MSE is flat near the optimum (a matrix off by 1e-3 px changes it by
    1e-7), where Adam's noise floor stops at about 40 dB; L-BFGS takes the smooth encoders past 60 dB. The
    refined weights are kept only if they lower the loss on a second, held-apart batch.
    """
    spec = get_op(op)
    generator = torch.Generator().manual_seed(settings.seed)
    torch.manual_seed(settings.seed)
    device = torch.device(settings.device)
    encoder = build_encoder(op, arch).to(device).train()
    pool = pool.to(device)

    def batch(size: int, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor, Tensor]:
        x = pool[torch.randint(pool.shape[0], (size,), generator=generator).to(device)].to(dtype)
        m = sample_magnitudes(size, spec.signed, generator).to(device, dtype)
        with torch.no_grad():
            target = spec.reference(x, m, torch.zeros(size, 2, device=device, dtype=dtype))
        return x, m, target

    def loss_on(x: Tensor, m: Tensor, target: Tensor) -> Tensor:
        return F.mse_loss(encoder.transform(x, m), target)

    optimiser = torch.optim.Adam(encoder.parameters(), lr=settings.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, settings.steps, eta_min=settings.lr / 100)
    total = settings.steps + settings.refine_iterations
    for step in range(settings.steps):
        loss = loss_on(*batch(settings.batch_size))
        if not torch.isfinite(loss):
            raise DiffAugError(f"fitting {op} ({arch}) diverged at step {step}: loss {loss.item()}; try a lower lr")
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        if progress is not None:
            progress(step, loss.item(), total)

    if settings.refine_iterations > 0:
        encoder.double()
        fixed, check = batch(settings.refine_batch_size, torch.float64), batch(settings.refine_batch_size, torch.float64)
        before = {k: v.clone() for k, v in encoder.state_dict().items()}
        with torch.no_grad():
            check_before = loss_on(*check).item()
        lbfgs = torch.optim.LBFGS(
            encoder.parameters(), lr=1, max_iter=settings.refine_iterations, history_size=50,
            tolerance_grad=1e-12, tolerance_change=1e-16, line_search_fn="strong_wolfe",
        )
        calls = 0

        def closure() -> Tensor:
            nonlocal calls
            lbfgs.zero_grad(set_to_none=True)
            loss = loss_on(*fixed)
            loss.backward()
            if progress is not None:  # L-BFGS evaluates more often than it iterates (line search)
                progress(settings.steps + min(calls, settings.refine_iterations - 2), loss.item(), total)
            calls += 1
            return loss

        lbfgs.step(closure)
        with torch.no_grad():
            check_after = loss_on(*check).item()
        if not check_after < check_before:  # also catches NaN
            encoder.load_state_dict(before)
        if progress is not None:
            progress(total - 1, min(check_before, check_after), total)
        encoder.float()
    return encoder.cpu().eval()


def _psnr(mse: float) -> float:
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


def _derivative(fn: Callable[[Tensor], Tensor], m: Tensor) -> Tensor:
    """d fn(m)_i / d m_i for every sample i at once: fn acts per sample, so J @ 1 holds them all.

    J @ 1 comes from two reverse passes (grid_sample has no forward-mode derivative): g(v) = J^T v is linear in
    v, and its gradient w.r.t. v is J @ 1.
    """
    with torch.enable_grad():
        m = m.detach().requires_grad_()
        out = fn(m)
        v = torch.zeros_like(out, requires_grad=True)
        (vjp,) = torch.autograd.grad(out, m, v, create_graph=True)
        (jvp,) = torch.autograd.grad(vjp, v, torch.ones_like(m), allow_unused=True)
    return torch.zeros_like(out) if jvp is None else jvp.detach()


def _finite_difference(fn: Callable[[Tensor], Tensor], m: Tensor, step: float = 1e-3) -> Tensor:
    return (fn(m + step) - fn(m - step)) / (2 * step)


def _mean_cosine(a: Tensor, b: Tensor) -> float:
    a, b = a.flatten(1).double(), b.flatten(1).double()
    usable = (a.norm(dim=1) > 0) & (b.norm(dim=1) > 0)
    if not bool(usable.any()):
        return float("nan")
    return float(F.cosine_similarity(a[usable], b[usable], dim=1).mean())


def evaluate_encoder(
    encoder: MetaEncoder, images: Sequence[Tensor], size: int, count: int = 256, seed: int = 1234
) -> dict[str, float]:
    """Fidelity of ``encoder`` to its reference op on ``count`` crops of side ``size``.

    Returns PSNR (dB) of the encoder and of doing nothing; the cosine between the encoder's derivative w.r.t. m
    and the reference's central finite difference; and the same cosine for the reference's own autograd
    derivative (the ceiling set by bilinear sampling; NaN where the reference is flat in m, as for Posterize and
    Solarize, whose finite difference is also reported as the target).
    """
    spec = get_op(encoder.op)
    generator = torch.Generator().manual_seed(seed)
    x = random_crops(images, count, size, generator).double()
    m = sample_magnitudes(count, spec.signed, generator, ends=0.0).double()
    # Derivatives are measured away from the ends, where a central difference would leave the range.
    m_inner = m.clamp(-0.98, 0.98) if spec.signed else m.clamp(0.02, 0.98)
    position = torch.zeros(count, 2, dtype=torch.float64)
    encoder = encoder.double()
    try:
        with torch.no_grad():
            target = spec.reference(x, m, position)
            error = F.mse_loss(encoder.transform(x, m), target).item()
            identity = F.mse_loss(x, target).item()
        reference_fd = _finite_difference(lambda t: spec.reference(x, t, position), m_inner)
        encoder_grad = _derivative(lambda t: encoder.transform(x, t), m_inner)
        smooth = spec.name not in ("Posterize", "Solarize")
        reference_grad = _derivative(lambda t: spec.reference(x, t, position), m_inner) if smooth else None
    finally:
        encoder.float()
    return {
        "psnr": _psnr(error),
        "identity_psnr": _psnr(identity),
        "grad_cosine": _mean_cosine(encoder_grad, reference_fd),
        "grad_ceiling": _mean_cosine(reference_grad, reference_fd) if reference_grad is not None else float("nan"),
    }


def _progress_bar(label: str, stream: TextIO | None) -> Callable[[int, float, int], None]:
    """A tqdm bar for one op's fit (step, running loss, rate); silent when ``stream`` is None."""
    bar: list[Any] = []

    def report(step: int, loss: float, total: int) -> None:
        if stream is None:
            return
        if not bar:
            bar.append(tqdm(total=total, desc=f"{label:<12}", file=stream, dynamic_ncols=True))
        bar[0].set_postfix(loss=f"{loss:.2e}", refresh=False)
        bar[0].update(step + 1 - bar[0].n)
        if step + 1 == total:
            bar[0].close()

    return report


def fit_priors(
    ops: Sequence[str] = MAGNITUDE_OPS,
    arch: str = "default",
    settings: FitSettings = FitSettings(),
    images: str | Path | None = None,
    out: str | Path = "diffaug-priors",
    overwrite_shipped: bool = False,
    stream: TextIO | None = sys.stderr,
) -> tuple[Path, dict[str, dict[str, Any]]]:
    """Fit ``ops``, measure them and write the priors folder ``out`` atomically (nothing is written until every op
    is fitted, so an interruption leaves the previous priors as they were). Returns the folder and the records."""
    from .priors import MANIFEST, read_manifest, save_priors, shipped_priors_dir

    import kornia
    import PIL

    out = Path(out)
    shipped = {shipped_priors_dir(a).resolve() for a in ("default", "paper")}
    if out.resolve() in shipped and not overwrite_shipped:
        raise DiffAugError(
            f"out must not be the priors shipped with diffaug ({out}) unless overwrite_shipped=True "
            "(--overwrite-shipped); got that folder"
        )
    bad = [o for o in ops if o not in MAGNITUDE_OPS]
    if bad:
        raise DiffAugError(f"ops to fit must be magnitude ops from {list(MAGNITUDE_OPS)}; got {bad}")
    if not ops:
        raise DiffAugError(f"ops to fit must name at least one op from {list(MAGNITUDE_OPS)}; got none")
    # Everything that would make the save fail is checked before the fit, which can take many minutes.
    if out.exists() and not out.is_dir():
        raise DiffAugError(f"out must be a priors folder (new or written by fit-priors); got {str(out)!r}, which is "
                           "a file")
    if (out / MANIFEST).exists() and read_manifest(out)["arch"] != arch:
        raise DiffAugError(f"out {str(out)!r} holds {read_manifest(out)['arch']!r} priors; refusing to mix in "
                           f"{arch!r} ones (choose another --out)")
    check_device(settings.device)
    fit_images, held_images = load_images(images)
    crops_generator = torch.Generator().manual_seed(settings.seed)
    pool = random_crops(fit_images, _pool_size(settings.image_size), settings.image_size, crops_generator)
    encoders, records = {}, {}
    for op in ops:
        started = time.perf_counter()
        encoder = fit_encoder(op, arch, pool, settings, _progress_bar(op, stream))
        seconds = time.perf_counter() - started
        at_size = evaluate_encoder(encoder, held_images, settings.image_size)
        at_3x = evaluate_encoder(encoder, held_images, 3 * settings.image_size, count=64)
        encoders[op] = encoder
        records[op] = {
            "family": get_op(op).encoder if arch == "default" else f"paper-{get_op(op).kind}",
            "magnitude_map": get_op(op).parameter_range,
            "signed": get_op(op).signed,
            "fit_seconds": round(seconds, 2),
            "fidelity": {f"{settings.image_size}px": _rounded(at_size), f"{3 * settings.image_size}px": _rounded(at_3x)},
        }
    header = {
        "arch": arch,
        "image_size": settings.image_size,
        "fit": {
            "steps": settings.steps,
            "batch_size": settings.batch_size,
            "lr": settings.lr,
            "seed": settings.seed,
            "device": settings.device,
            "images": "shipped photos" if images is None else str(images),
            "held_out": list(HELD_OUT) if images is None else "every fifth image",
        },
        "versions": {"torch": torch.__version__, "kornia": kornia.__version__, "pillow": PIL.__version__},
    }
    folder = save_priors(out, encoders, records, header)
    return folder, records


def _rounded(metrics: dict[str, float]) -> dict[str, float | None]:
    return {k: (None if math.isnan(v) else round(v, 4)) for k, v in metrics.items()}


def format_report(records: dict[str, dict[str, Any]], image_size: int) -> str:
    """The fidelity table printed at the end of ``diffaug fit-priors``."""
    sizes = (f"{image_size}px", f"{3 * image_size}px")
    lines = [
        f"{'op':<12} {'PSNR ' + sizes[0]:>12} {'PSNR ' + sizes[1]:>12} {'identity':>9} {'grad cos':>9} {'ceiling':>8}",
    ]
    for op, record in records.items():
        a, b = (record["fidelity"][s] for s in sizes)
        cell = lambda v: "   n/a" if v is None else f"{v:.3f}"  # noqa: E731
        lines.append(
            f"{op:<12} {a['psnr']:>12.2f} {b['psnr']:>12.2f} {a['identity_psnr']:>9.2f} "
            f"{cell(a['grad_cosine']):>9} {cell(a['grad_ceiling']):>8}"
        )
    return "\n".join(lines)
