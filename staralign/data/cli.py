"""``staralign data ...``: dataset tools.

Each sub-command lives in its own module, which defines ``add_arguments(parser)``
and ``run(args) -> int``; ``SUBCOMMANDS`` maps the name to (module, help), so a
new tool is one line here.  Modules are imported only when the parser is built
for ``data`` and keep their heavy imports inside ``run``.
"""

from __future__ import annotations

import argparse
import importlib

__all__ = ["SUBCOMMANDS", "register"]

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "convert": ("staralign.data.converters",
                "convert the official WFLW / 300W / COFW downloads to STAR .tsv files"),
    "check": ("staralign.data.check",
              "validate an annotation file and its images; lists every problem, exit 1 if any"),
    "synth": ("staralign.data.synth.cli",
              "generate synthetic faces with exact 98-point labels (and optional label ambiguity)"),
}


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``data`` and its sub-commands to the ``staralign`` parser."""
    p = subparsers.add_parser("data", help="dataset tools: " + ", ".join(SUBCOMMANDS))
    dsub = p.add_subparsers(dest="data_command", metavar="TOOL", required=True)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        sp = dsub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(sp)
        sp.set_defaults(func=module.run)
