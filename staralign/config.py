"""Typed configuration: plain dataclasses, saved as YAML beside every run.

There is no global config object.  A run's configuration is built once (preset,
then YAML file, then command-line overrides), frozen into the run directory as
``config.yaml``, and passed down explicitly.  ``to_dict``/``from_dict`` convert
nested dataclasses to plain data and back, rejecting unknown keys with the
dotted path of the offending field.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

__all__ = ["ConfigError", "ModelConfig", "from_dict", "load_yaml", "save_yaml", "to_dict"]

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names the field."""


@dataclass
class ModelConfig:
    """The network's shape.  The official checkpoints are ``ModelConfig()`` with their definition."""

    definition: str = "WFLW"  # built-in name or path to a definition file
    nstack: int = 4
    nlevels: int = 4  # hourglass depth
    channels: int = 256
    input_size: int = 256  # square input, a multiple of 16; heatmaps are input_size / 4
    use_aam: bool = True  # point/edge map heads gating the heatmaps (the AAM)
    add_coord: bool = True  # CoordConv layers (x, y, r and the boundary channels)

    def validate(self) -> None:
        if self.nstack < 1:
            raise ConfigError(f"model.nstack: must be >= 1, got {self.nstack}")
        if self.nlevels < 1:
            raise ConfigError(f"model.nlevels: must be >= 1, got {self.nlevels}")
        if self.channels < 8 or self.channels % 2:
            raise ConfigError(f"model.channels: must be an even number >= 8, got {self.channels}")
        unit = 4 * 2 ** self.nlevels
        if self.input_size < unit or self.input_size % unit:
            raise ConfigError(
                f"model.input_size: must be a positive multiple of {unit} (4 * 2^nlevels), "
                f"got {self.input_size}"
            )

    @property
    def heatmap_size(self) -> int:
        return self.input_size // 4


def _resolve_type(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp


def to_dict(obj: Any) -> Any:
    """Nested dataclasses, tuples and paths to plain YAML-able data."""
    if is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _convert(value: Any, tp: Any, path: str) -> Any:
    tp = _resolve_type(tp)
    if value is None:
        return None
    if is_dataclass(tp):
        return from_dict(tp, value, path)
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        item_tp = args[0] if args else Any
        items = [_convert(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return str(value)
    return value


def from_dict(cls: type[T], data: Any, path: str = "") -> T:
    """Build dataclass ``cls`` from plain data; unknown keys and wrong types raise ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path or cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls) if f.init}
    for key in data:
        if key not in known:
            where = f"{path}.{key}" if path else key
            raise ConfigError(f"{where}: unknown key (known: {', '.join(known)})")
    kwargs = {k: _convert(v, hints[k], f"{path}.{k}" if path else k) for k, v in data.items()}
    return cls(**kwargs)


def merge(obj: T, overrides: dict[str, Any]) -> T:
    """A copy of dataclass ``obj`` with nested overrides applied (same checks as from_dict)."""
    data = to_dict(obj)

    def deep(dst: dict, src: dict) -> None:
        for k, v in src.items():
            if isinstance(v, dict) and isinstance(dst.get(k), dict):
                deep(dst[k], v)
            else:
                dst[k] = v

    deep(data, overrides)
    return from_dict(type(obj), data)


def save_yaml(obj: Any, path: str | Path) -> None:
    """Write a dataclass (or plain data) as YAML, atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(obj), sort_keys=False), encoding="utf-8")
    tmp.replace(path)


def load_yaml(cls: type[T], path: str | Path) -> T:
    """Read a dataclass from a YAML file; errors name the file and the field."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read config: {exc}") from exc
    try:
        return from_dict(cls, data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def replace(obj: T, **changes: Any) -> T:
    return dataclasses.replace(obj, **changes)
