"""Help that reads well: every command described, every option explained with its default, no
Sphinx markup.  Walks every sub-command, so an option added anywhere without help fails here."""

from __future__ import annotations

import argparse
import re

import pytest

from staralign.cli import build_parser, plain_doc, subcommands

MARKUP = re.compile(r":[a-z]+:`|``|`[^`\s]+`_")
SKIP = (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)


def _commands():
    return list(subcommands(build_parser()))


def test_every_command_has_a_description_and_every_option_a_sentence():
    problems = []
    for path, parser in _commands():
        name = " ".join(path)
        if not parser.description or MARKUP.search(parser.description):
            problems.append(f"{name}: description {parser.description!r}")
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for choice in action._choices_actions:
                    cut = choice.help and choice.help.count("(") != choice.help.count(")")  # mid-sentence
                    if not choice.help or MARKUP.search(choice.help) or cut:
                        problems.append(f"{name} {choice.dest}: summary {choice.help!r}")
            elif not isinstance(action, SKIP):
                label = "/".join(action.option_strings) or action.dest
                if not action.help or action.help == argparse.SUPPRESS or len(action.help.split()) < 2:
                    problems.append(f"{name} {label}: no help sentence")
                elif MARKUP.search(action.help):
                    problems.append(f"{name} {label}: markup in {action.help!r}")
    assert not problems, "\n".join(problems)


def test_rendered_help_shows_defaults_and_no_markup():
    commands = _commands()
    assert len(commands) > 15
    for path, parser in commands:
        text = parser.format_help()
        assert not MARKUP.search(text), (path, MARKUP.findall(text))
        assert "(default: None)" not in text, path
    demo = dict(commands)[("staralign", "demo")].format_help()
    assert "(default: 10.0)" in demo and "(default: demo_out)" in demo and "(default: 0)" in demo
    bench = " ".join(dict(commands)[("staralign", "bench")].format_help().split())
    assert "train_step: forward, recipe loss, backward" in bench and "EMA) on synthetic tensors" in bench
    loss = dict(commands)[("staralign", "bench", "loss")].format_help()
    assert "faces per batch (default: 32)" in loss


@pytest.mark.parametrize(("doc", "text"), [
    ("Images/s of the step (:func:`staralign.engine.trainer.train_step`: forward, loss).\n    More here.",
     "Images/s of the step (train_step: forward, loss)"),
    ("Time ``STARLoss`` on :class:`~a.b.Thing` heatmaps.", "Time STARLoss on Thing heatmaps"),
    ("One line, no full stop", "One line, no full stop"),
])
def test_plain_doc(doc, text):
    assert plain_doc(doc) == text
