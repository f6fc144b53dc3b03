"""The ``staralign`` command line.

Each feature area owns its sub-command: a module listed in ``COMMAND_MODULES``
defines ``register(subparsers)``, which adds its parser and sets ``func`` to a
callable taking the parsed arguments and returning an exit status.  Modules keep
heavy imports inside their run functions so ``staralign --help`` stays quick.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from . import __version__

COMMAND_MODULES = [
    "staralign.bench",
    "staralign.data.cli",
    "staralign.engine.cli",
    "staralign.engine.test_cli",
    "staralign.experiments.cli",
    "staralign.inference.cli",
    "staralign.web.cli",
]


class UserError(Exception):
    """An error the user can fix (bad file, bad flag); printed without a traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="staralign",
        description="STAR loss facial landmark detection: train, evaluate, run and export.",
    )
    parser.add_argument("--version", action="version", version=f"staralign {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        if os.environ.get("STARALIGN_DEBUG") and exc.__cause__ is not None:
            raise  # the traceback of what went wrong underneath, when asked for
        print(f"staralign {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a full or read-only disk, an unreadable image: one line (_failures.py)
        from ._failures import user_message

        message = user_message(exc)
        if message is None or os.environ.get("STARALIGN_DEBUG"):
            raise
        print(f"staralign {args.command}: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
