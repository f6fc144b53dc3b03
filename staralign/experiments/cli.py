"""``staralign demo`` and ``staralign experiment ambiguity`` / ``stability``."""

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


def _run_stability(args: argparse.Namespace) -> int:
    from ..cli import UserError
    from .stability import format_table, run_stability

    try:
        result = run_stability(args.weights, args.out, seeds=args.seeds, frames=args.frames, size=args.size,
                               detect_every=args.detect_every, label_noise=args.label_noise, device=args.device,
                               first_seed=args.first_seed, do_sweep=args.sweep)
    except (ValueError, OSError) as exc:
        raise UserError(str(exc)) from exc
    print(format_table(result), end="")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``demo`` and ``experiment`` (``ambiguity``, ``stability``) to the ``staralign`` parser."""
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

    st = esub.add_parser("stability", help="temporal filters on synthetic face videos: NME, jitter and lag")
    st.add_argument("--weights", required=True, metavar="CKPT", help="a 98-point (WFLW) model to test")
    st.add_argument("--out", default="stability_out", help="output folder (recorded sequences, stability.json/.md)")
    st.add_argument("--seeds", type=int, default=3, help="number of synthetic videos (one face each)")
    st.add_argument("--frames", type=int, default=60, help="frames per video (30 fps)")
    st.add_argument("--size", type=int, default=256, help="frame size in pixels (square)")
    st.add_argument("--detect-every", type=int, default=10, metavar="N",
                    help="face box from the (perfect) detector every N frames, from the landmarks in between")
    st.add_argument("--label-noise", type=float, default=0.0,
                    help="score against labels shifted along contours by this many inter-ocular distances (0: exact)")
    st.add_argument("--first-seed", type=int, default=0,
                    help="seed of the first video (tune and test on different ones)")
    st.add_argument("--sweep", action="store_true",
                    help="try a grid of settings per filter and report the best (lowest NME): for tuning the defaults")
    st.add_argument("--device", default="cpu", help="PyTorch device")
    st.set_defaults(func=_run_stability)
