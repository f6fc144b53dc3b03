"""``staralign data synth``: write a synthetic dataset from the command line.

The image formats offered are the writer's own (:data:`.dataset.IMAGE_FORMATS`); the
rest of the generator is imported only when ``run`` is called.
"""

from __future__ import annotations

import argparse

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``staralign data synth``."""
    from .dataset import IMAGE_FORMATS

    parser.add_argument("--out", required=True, help="output folder (created if missing)")
    parser.add_argument("--train", type=int, default=1000, help="training faces (default 1000)")
    parser.add_argument("--test", type=int, default=200, help="test faces (default 200)")
    parser.add_argument("--ambiguity", type=float, default=0.0, metavar="SIGMA",
                        help="label noise along contours for training labels, std in "
                             "inter-ocular distances (default 0: exact labels)")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    parser.add_argument("--workers", type=int, default=1, help="processes (default 1)")
    parser.add_argument("--format", dest="image_format", choices=IMAGE_FORMATS, default="jpg",
                        help="jpg (quality 95, 4:4:4; default) or png (lossless, slower, larger)")
    parser.add_argument("--quiet", action="store_true", help="no progress output")


def run(args: argparse.Namespace) -> int:
    """Run ``staralign data synth`` with parsed arguments; returns the exit status."""
    from ...cli import UserError
    from .dataset import generate_dataset

    quiet = getattr(args, "quiet", False)
    try:
        summary = generate_dataset(args.out, train=args.train, test=args.test,
                                   ambiguity=args.ambiguity, seed=args.seed, size=args.size,
                                   workers=max(1, args.workers),
                                   image_format=getattr(args, "image_format", "jpg"),
                                   progress=not quiet)
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    if not quiet:
        print(f"synth: wrote {summary['train']} train + {summary['test']} test faces to "
              f"{summary['out_dir']} in {summary['seconds']:.1f} s "
              f"({summary['images_per_second']:.0f} faces/s)")
    return 0
