"""``staralign data ...``: dataset tools.

Each tool lives in its own module, which provides ``add_arguments(parser)`` and
``run(args) -> int``; :func:`register` adds each the one way every command is added
(see :mod:`staralign.cli`).  The tools keep their heavy imports inside ``run``.
"""

from __future__ import annotations

import argparse

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``data`` and its tools to the ``staralign`` parser."""
    from . import check, converters
    from .synth import cli as synth

    p = subparsers.add_parser("data", help="dataset tools: convert, check, synth")
    tools = p.add_subparsers(dest="data_command", metavar="TOOL", required=True)

    text = "convert the official WFLW / 300W / COFW downloads to STAR .tsv files"
    t = tools.add_parser("convert", help=text, description=text)
    converters.add_arguments(t)
    t.set_defaults(func=converters.run)

    text = "validate an annotation file and its images; lists every problem, exit 1 if any"
    t = tools.add_parser("check", help=text, description=text)
    check.add_arguments(t)
    t.set_defaults(func=check.run)

    text = "generate synthetic faces with exact 98-point labels (and optional label ambiguity)"
    t = tools.add_parser("synth", help=text, description=text)
    synth.add_arguments(t)
    t.set_defaults(func=synth.run)
