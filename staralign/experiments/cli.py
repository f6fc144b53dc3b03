"""``staralign demo`` and ``staralign experiment ambiguity``."""

from __future__ import annotations

import argparse

from .ambiguity import METHODS  # light: the module imports numpy at the top, torch only when run


def _run_demo(args: argparse.Namespace) -> int:
    from ..cli import UserError
    from .demo import run_demo

    try:
        run_demo(args.out, minutes=args.minutes, train=args.train, test=args.test, seed=args.seed,
                 device=args.device, workers=args.workers)
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    return 0


def _run_ambiguity(args: argparse.Namespace) -> int:
    from ..cli import UserError
    from .ambiguity import run_ambiguity_experiment

    try:
        run_ambiguity_experiment(args.out, seeds=args.seeds, sigma=args.sigma, train=args.train, test=args.test,
                                 epochs=args.epochs, methods=tuple(args.methods), device=args.device,
                                 workers=args.workers, resume=args.resume)
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "demo", help="draw synthetic faces, train the tiny preset, evaluate, write a report",
        description="The whole job on this machine within a time budget: measure the machine, draw a "
                    "synthetic 98-point face dataset sized to the budget, train the tiny preset, evaluate it "
                    "against the mean-shape baseline and write a report (metrics, CED plot, per-landmark "
                    "errors, prediction grids) into --out.  A second run into the same --out removes the "
                    "previous demo's files and starts clean.")
    p.add_argument("--out", default="demo_out",
                   help="output folder (data/, run/, report/); a folder with other content is refused")
    p.add_argument("--minutes", type=float, default=10.0,
                   help="time budget for the whole demo, data and report included")
    p.add_argument("--train", type=int, default=None,
                   help="synthetic training faces (default: as many as the budget allows, up to 1500)")
    p.add_argument("--test", type=int, default=200, help="synthetic test faces (fewer when the budget is short)")
    p.add_argument("--seed", type=int, default=0, help="seed of the drawn faces and of training")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--workers", type=int, default=1, help="data loader processes")
    p.set_defaults(func=_run_demo)

    e = sub.add_parser("experiment", help="experiments on synthetic data",
                       description="Experiments on synthetic data, with their own reports.")
    esub = e.add_subparsers(dest="experiment", metavar="NAME", required=True)
    a = esub.add_parser("ambiguity", help="STAR vs baselines on labels with contour ambiguity",
                       description="Train STAR and baseline losses on synthetic faces whose training labels slide "
                                   "along the face contours, over several seeds, and compare their errors along "
                                   "and across the contours (docs/experiments.md).")
    a.add_argument("--out", required=True, help="output folder (data, one run per method and seed, results)")
    a.add_argument("--seeds", type=int, default=3, help="seeds per method")
    a.add_argument("--sigma", type=float, default=0.05,
                   help="training label noise along contours, in inter-ocular distances")
    a.add_argument("--train", type=int, default=1500, help="synthetic training faces")
    a.add_argument("--test", type=int, default=300, help="synthetic test faces (exact labels)")
    a.add_argument("--epochs", type=int, default=8, help="epochs per run")
    a.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS),
                   help="losses compared")
    a.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    a.add_argument("--workers", type=int, default=1, help="data loader processes")
    a.add_argument("--resume", action="store_true",
                   help="continue an interrupted experiment in --out (reuse data, finished and partial runs)")
    a.set_defaults(func=_run_ambiguity)
