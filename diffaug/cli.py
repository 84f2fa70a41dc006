"""The ``diffaug`` console script: a thin argparse layer over the library; defaults come from the library.

Exit status: 0 done, 2 a bad flag (argparse's message), 1 a failure at run time (one line "diffaug CMD: error:
..."), 130 interrupted (Ctrl-C; nothing half-written is left).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from .errors import DiffAugError
from .files import write_atomic
from .fit import MIN_IMAGE_SIZE, FitSettings
from .ops import MAGNITUDE_OPS

_FIT = FitSettings()


def _at_least(least: int) -> Callable[[str], int]:
    """An argparse type: an int >= ``least`` (zero and negative counts are errors, never replaced by defaults)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an int >= {least}; got {text!r}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"must be an int >= {least}; got {text!r}")
        return value

    return parse


def _open_fraction(text: str) -> float:
    """An argparse type: a number strictly between 0 and 1 (NaN is not one)."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be a number strictly between 0 and 1; got {text!r}")
    return value


def _image_format(out: Path) -> str:
    from PIL import Image

    extensions = Image.registered_extensions()
    if out.suffix.lower() not in extensions:
        raise DiffAugError(f"out must end in an image extension such as .png or .jpg; got {str(out)!r}")
    if out.is_dir():
        raise DiffAugError(f"out must be an image file to write; got {str(out)!r}, which is a folder")
    return extensions[out.suffix.lower()]


def _demo(args: argparse.Namespace) -> None:
    import numpy as np
    import torch
    from PIL import Image

    from .fit import load_images, random_crops
    from .policy import PolicyAugmenter

    out = Path(args.out)
    image_format = _image_format(out)  # before any work
    fit_images, held_images = load_images(args.images)
    generator = torch.Generator().manual_seed(args.seed)
    x = random_crops(fit_images + held_images, args.count, args.size, generator, max_zoom=2.0)
    augmenter = PolicyAugmenter(seed=args.seed, magnitude=args.magnitude).eval()
    with torch.no_grad():
        rows = [x] + [augmenter(x) for _ in range(args.rows)]
    grid = torch.cat([torch.cat(list(row), dim=-1) for row in rows], dim=-2)  # (3, rows * S, count * S)
    picture = Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    write_atomic(out, lambda temporary: picture.save(temporary, format=image_format))
    print(f"wrote {out}: top row the {args.count} originals, then {args.rows} draws of PolicyAugmenter (eval mode)")


def _fit_priors(args: argparse.Namespace) -> None:
    from .fit import fit_priors, format_report

    settings = FitSettings(
        steps=args.steps,
        batch_size=args.batch_size,
        image_size=args.image_size,
        refine_iterations=args.refine_iterations,
        seed=args.seed,
        device=args.device,
    )
    folder, records = fit_priors(
        ops=args.ops, arch=args.arch, settings=settings, images=args.images, out=args.out,
        overwrite_shipped=args.overwrite_shipped,
    )
    print(format_report(records, settings.image_size))
    print(f"wrote {folder}; use it with PolicyAugmenter(priors={str(folder)!r}) or diffaug.load_priors(...)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffaug", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="augment real photos with a PolicyAugmenter and save a picture")
    demo.add_argument("--out", default="demo.png", help="PNG to write (default: %(default)s)")
    demo.add_argument("--images", default=None, help="folder of images (default: the photos shipped with diffaug)")
    demo.add_argument("--count", type=_at_least(1), default=8, help="images per row (default: %(default)s)")
    demo.add_argument("--rows", type=_at_least(1), default=4, help="augmented rows (default: %(default)s)")
    demo.add_argument("--size", type=_at_least(1), default=96, help="crop side in pixels (default: %(default)s)")
    demo.add_argument("--magnitude", type=_open_fraction, default=0.5,
                      help="initial magnitude, in (0, 1) (default: %(default)s)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=_demo)

    fit = commands.add_parser("fit-priors", help="fit the meta-encoders to the reference ops (Stage I)")
    fit.add_argument("--ops", nargs="+", choices=MAGNITUDE_OPS, default=list(MAGNITUDE_OPS), metavar="OP",
                     help=f"ops to fit (default: all magnitude ops: {' '.join(MAGNITUDE_OPS)})")
    fit.add_argument("--arch", choices=("default", "paper"), default="default")
    fit.add_argument("--steps", type=_at_least(1), default=_FIT.steps, help="Adam steps (default: %(default)s)")
    fit.add_argument("--refine-iterations", type=_at_least(0), default=_FIT.refine_iterations,
                     help="L-BFGS iterations after Adam (default: %(default)s)")
    fit.add_argument("--image-size", type=_at_least(MIN_IMAGE_SIZE), default=_FIT.image_size,
                     help="crop side (default: %(default)s)")
    fit.add_argument("--batch-size", type=_at_least(1), default=_FIT.batch_size, help="(default: %(default)s)")
    fit.add_argument("--images", default=None, help="folder of your images (default: photos shipped with diffaug)")
    fit.add_argument("--device", default=_FIT.device, help="cpu, cuda, cuda:1, ... (default: %(default)s)")
    fit.add_argument("--seed", type=int, default=_FIT.seed)
    fit.add_argument("--out", default="diffaug-priors", help="priors folder to write (default: %(default)s)")
    fit.add_argument("--overwrite-shipped", action="store_true", help="allow --out to be the shipped priors")
    fit.set_defaults(run=_fit_priors)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (DiffAugError, OSError) as error:  # OSError: a file that cannot be written (permissions, full disk)
        print(f"diffaug {args.command}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"diffaug {args.command}: interrupted; nothing was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
