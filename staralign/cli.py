"""The ``staralign`` command line.

Each feature area owns its commands, and every command is added one way.  A module
listed in ``COMMAND_MODULES`` defines ``register(subparsers)``, which for each of its
commands

1. adds the parser: ``p = subparsers.add_parser(NAME, help=..., description=...)``
   (without a description, the help line is shown as one);
2. adds its arguments (inline, or through a helper such as a tool module's
   ``add_arguments(p)``; ``staralign train``'s come from the config fields,
   :mod:`staralign.config_flags`);
3. names what runs it: ``p.set_defaults(func=RUN)``, ``RUN(args) -> int`` a named
   module-level function returning the exit status.

A command with tools under it (``data``, ``bench``, ``experiment``, ``models``) gives
its parser sub-parsers in the same ``register`` and adds each tool by the same three
steps.  Modules keep heavy imports inside the ``RUN`` functions so ``staralign --help``
stays quick, and report what the user can fix by raising :class:`UserError`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
from collections.abc import Sequence

from . import __version__

COMMAND_MODULES = [
    "staralign.bench",
    "staralign.data.cli",
    "staralign.engine.cli",
    "staralign.engine.evaluate_cli",
    "staralign.experiments.cli",
    "staralign.hub_cli",
    "staralign.inference.cli",
    "staralign.web.cli",
]


class UserError(Exception):
    """An error the user can fix (bad file, bad flag); printed without a traceback."""


def user_message(exc: BaseException, folder: str | os.PathLike = ".") -> str | None:
    """One line for an error the user, not the code, must fix -- or None (a bug: keep the traceback).

    The one map from such errors to words, used by :func:`main` for every command and by the
    trainer (:func:`staralign.engine.rundir.run_failure`, which adds where the run stands): a
    disk that is full, read-only or not writable (:class:`~staralign._io.WriteError`, or an
    ``OSError`` with such an errno; ``folder`` is named when the error names no file), a file the
    user may not read, an image that cannot be read (every :class:`~staralign._io.FileProblem`).
    """
    import errno
    from pathlib import Path

    from ._io import FileProblem, _write_failure

    if isinstance(exc, FileProblem):
        return str(exc)
    if isinstance(exc, OSError) and exc.errno in (errno.EACCES, errno.EPERM):
        # Reading or writing: the file and the reason say enough.
        return f"{exc.filename or 'a file'}: {exc.strerror or 'permission denied'}"
    if isinstance(exc, OSError):
        failure = _write_failure(Path(exc.filename or folder), exc)
        if failure is not None:
            return str(failure)
    return None


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every command's help: descriptions keep their paragraphs and indented examples (each
    paragraph wrapped to the terminal), and each option's default follows its sentence -- unless
    the sentence already says it, or there is nothing to say (a flag that is off, no default)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text.lower() or action.default is None or action.default is False
                or action.default == argparse.SUPPRESS or action.required or not action.option_strings):
            return text
        return text + " (default: %(default)s)"

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        import textwrap

        out = []
        for block in re.split(r"\n\s*\n", text.strip("\n")):
            if any(line[:1].isspace() for line in block.splitlines()):  # an example: as written
                out.append("\n".join(indent + line for line in block.splitlines()))
            else:
                out.append(textwrap.fill(" ".join(block.split()), width, initial_indent=indent,
                                         subsequent_indent=indent))
        return "\n\n".join(out)


class Parser(argparse.ArgumentParser):
    """``staralign``'s parser class: sub-commands' parsers are made by this class too (argparse
    uses the parent's class), so the help format is set here, once, for every command."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def plain_doc(doc: str | None) -> str:
    """The first sentence of a docstring as help text: Sphinx roles and literals unwrapped
    (``:func:`a.b.c``` -> ``c``, double backquotes -> plain), lines joined."""
    text = " ".join((doc or "").split())
    text = re.sub(r":[a-z]+:`~?(?:[\w.]+\.)?([^`]+)`", r"\1", text)
    text = text.replace("``", "")
    match = re.match(r"(.+?\.)(\s+[A-Z]|$)", text)
    return (match.group(1) if match else text).rstrip(".")


def subcommands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ("staralign",)):
    """Every (command path, parser) under ``parser``, itself first (for help checks and docs)."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from subcommands(child, (*path, name))


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="staralign",
        description="STAR loss facial landmark detection: train, evaluate, run and export.",
    )
    parser.add_argument("--version", action="version", version=f"staralign {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    # A command registered with only a one-line help shows that line as its description too.
    for _, p in subcommands(parser):
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for choice in action._choices_actions:
                    child = action.choices[choice.dest]
                    if not child.description and choice.help:
                        child.description = choice.help[0].upper() + choice.help[1:] + "."
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
    except Exception as exc:  # a full or read-only disk, an unreadable image: one line (user_message)
        message = user_message(exc)
        if message is None or os.environ.get("STARALIGN_DEBUG"):
            raise
        print(f"staralign {args.command}: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
