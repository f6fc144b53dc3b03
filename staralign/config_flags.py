"""Command-line flags generated from the configuration dataclasses.

The configuration is the single source of its flags (timm's idea): a field that is offered
on the command line says so in its own declaration (:func:`staralign.config.setting` with a
:class:`staralign.config.Flag`), and everything else comes from the field -- the help
sentence, the choices from its ``Literal`` type, the value type from its annotation.  Adding
a flag is one edit, to the field.

Every flag's argparse destination is the field's dotted path (``optim.lr``), so what was
given maps back onto the configuration by that name (:func:`overrides_from_flags`, then
:func:`staralign.config.merge`), and a bad value is reported under that name.  Flags
default to None, "not given": a flag given wins over the preset and the YAML file, one not
given keeps their value.  Flags are grouped by configuration section, in field order.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Iterator
from typing import Any

from .config import Flag, field_choices

__all__ = ["ConfigFlag", "add_config_flags", "config_flags", "overrides_from_flags"]


@dataclasses.dataclass(frozen=True)
class ConfigFlag:
    """One field offered as a flag: where it lives (``path``, dotted) and how it is spelt."""

    path: str
    section: str  # the dotted path of the dataclass holding the field ("" at the top)
    owner: type  # that dataclass
    field: dataclasses.Field
    type: Any
    flag: Flag

    @property
    def names(self) -> tuple[str, ...]:
        return self.flag.names or ("--" + self.field.name.replace("_", "-"),)

    @property
    def help(self) -> str:
        return self.flag.help or self.field.metadata.get("help", "")

    @property
    def choices(self) -> tuple[Any, ...]:
        """The values offered: the field's, with spelt ones in place of the values they stand for."""
        allowed = field_choices(self.owner, self.field.name)
        if not allowed:
            return ()
        spelt = {value for _, value in self.flag.spellings}
        return tuple(v for v in allowed if v not in spelt) + tuple(word for word, _ in self.flag.spellings)

    def value(self, given: Any) -> Any:
        """The field value a given command-line value stands for."""
        return dict(self.flag.spellings).get(given, given)


def config_flags(cls: type, prefix: str = "") -> Iterator[ConfigFlag]:
    """Every field of dataclass ``cls`` (nested sections included, in field order) that has a flag."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path = f"{prefix}.{f.name}" if prefix else f.name
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from config_flags(tp, path)
        elif f.metadata.get("flag") is not None:
            yield ConfigFlag(path, prefix, cls, f, tp, f.metadata["flag"])


def _value_type(tp: Any) -> Any:
    """argparse's ``type`` for a field annotation (``X | None`` read as ``X``): int and float
    are converted, anything else is passed on as the text given."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = args[0] if len(args) == 1 else tp
    return tp if tp in (int, float) else None


def add_config_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add a flag for every flagged field of ``cls``, one argument group per section (titled
    with the section's dotted name, described by the first sentence of its docstring)."""
    from .cli import plain_doc

    groups: dict[str, argparse._ArgumentGroup] = {}
    for item in config_flags(cls):
        if item.section not in groups:
            groups[item.section] = (parser.add_argument_group(item.section, plain_doc(item.owner.__doc__) + ".")
                                    if item.section else parser)
        group = groups[item.section]
        kwargs: dict[str, Any] = {"dest": item.path, "default": None, "help": item.help}
        if item.flag.takes_value and item.type is not bool:
            choices = item.choices
            if choices:
                kwargs["choices"] = choices
            else:
                kwargs["metavar"] = item.field.name.upper()
                kwargs["type"] = _value_type(item.type)
            group.add_argument(*item.names, **kwargs)
        else:
            const = True if item.flag.takes_value else item.flag.const
            group.add_argument(*item.names, action="store_const", const=const, **kwargs)


def overrides_from_flags(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The fields set by the flags that were given, by dotted name (``{"optim.lr": 0.01}``)."""
    out: dict[str, Any] = {}
    for item in config_flags(cls):
        given = getattr(args, item.path, None)
        if given is not None:
            out[item.path] = item.value(given)
    return out
