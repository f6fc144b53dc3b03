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

from ._io import atomic_write

__all__ = [
    "ConfigError",
    "DataConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "RuntimeConfig",
    "TrainConfig",
    "from_dict",
    "load_preset",
    "load_yaml",
    "merge",
    "save_yaml",
    "to_dict",
]

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
    stem_channels: tuple[int, int] = (64, 128)  # widths of the stem's two stages (the original's: 64, 128)
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
        if len(self.stem_channels) != 2 or any(c < 4 or c % 2 for c in self.stem_channels):
            raise ConfigError(f"model.stem_channels: must be two even numbers >= 4, got {self.stem_channels}")
        unit = 4 * 2 ** self.nlevels
        if self.input_size < unit or self.input_size % unit:
            raise ConfigError(
                f"model.input_size: must be a positive multiple of {unit} (4 * 2^nlevels), "
                f"got {self.input_size}"
            )

    @property
    def heatmap_size(self) -> int:
        return self.input_size // 4


LANDMARK_LOSSES = ("star", "star_v1", "smoothl1", "l1", "l2", "wing", "none")


TARGET_PLACEMENTS = ("auto", "worker", "mixed", "device")
AMP_MODES = ("none", "bf16", "fp16")


@dataclass
class DataConfig:
    """Where the data is and how it is read."""

    image_dir: str = ""
    annot_dir: str = ""
    train_file: str = "train.tsv"
    val_file: str = "test.tsv"
    aug_prob: float = 1.0  # share of training samples that get flip/geometry/texture augmentation
    workers: int = 4  # DataLoader worker processes per training process
    # Where point/edge map targets are built (all exact, a speed choice only): in the loader
    # workers ("worker"), on the training device ("device"), or "mixed": edge maps in the
    # workers (a rasteriser: slow on a GPU, small to send) and point maps on the device (one
    # fused kernel there, but N maps a sample to send).  "auto": mixed on CUDA, else worker.
    targets: str = "auto"
    # Send training crops from the workers as 8-bit pixels and normalise them on the device
    # (a quarter of the bytes through shared memory, pinning and the bus; bit-identical).
    uint8_images: bool = True
    skip_bad_rows: bool = False  # skip (and count) malformed annotation rows instead of stopping
    val_batch_size: int = 32

    def validate(self) -> None:
        if self.targets not in TARGET_PLACEMENTS:
            raise ConfigError(f"data.targets: must be one of {', '.join(TARGET_PLACEMENTS)}, got {self.targets!r}")
        if not 0 <= self.aug_prob <= 1:
            raise ConfigError(f"data.aug_prob: must be in [0, 1], got {self.aug_prob}")
        if self.workers < 0:
            raise ConfigError(f"data.workers: must be >= 0, got {self.workers}")


@dataclass
class LossConfig:
    """The training objective (see ``staralign.losses.recipe``); defaults are the authors' recipe."""

    kind: str = "star"  # star (v2) | star_v1 | smoothl1 | l1 | l2 | wing (on soft-argmax) | none
    star_w: float = 1.0
    star_dist: str = "smoothl1"
    landmark_weight: float = 1.0
    map_weight: float = 10.0  # AWing on point maps and on edge maps; 0 disables

    def validate(self) -> None:
        if self.kind not in LANDMARK_LOSSES:
            raise ConfigError(f"loss.kind: {self.kind!r} is not one of {', '.join(LANDMARK_LOSSES)}")
        if self.kind == "none" and self.map_weight <= 0:
            raise ConfigError("loss: kind 'none' with map_weight 0 leaves nothing to train")
        if self.star_dist not in ("smoothl1", "l1", "l2", "wing"):
            raise ConfigError(f"loss.star_dist: {self.star_dist!r} is not one of smoothl1, l1, l2, wing")


@dataclass
class OptimConfig:
    """Optimiser, schedule and batch; defaults are the authors' recipe."""

    epochs: int = 500
    batch_size: int = 32  # per process (per GPU); the global batch is batch_size * world size
    optimizer: str = "adam"  # adam (the original's) | adamw | sgd
    lr: float = 1e-3
    momentum: float = 0.9  # sgd only
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0  # the original's Adam gets none
    milestones: list[int] = dataclasses.field(default_factory=lambda: [200, 350, 450])
    gamma: float = 0.1
    ema: bool = True
    ema_decay: float | None = None  # None: 0.5 ** (global batch / 10000), as the original
    grad_clip: float = 0.0  # max gradient norm; 0 = off (the original has none)

    def validate(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"optim.epochs: must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"optim.batch_size: must be >= 1, got {self.batch_size}")
        if self.lr <= 0:
            raise ConfigError(f"optim.lr: must be positive, got {self.lr}")
        if self.optimizer not in ("adam", "adamw", "sgd"):
            raise ConfigError(f"optim.optimizer: must be adam, adamw or sgd, got {self.optimizer!r}")
        if self.ema_decay is not None and not 0 <= self.ema_decay < 1:
            raise ConfigError(f"optim.ema_decay: must be in [0, 1), got {self.ema_decay}")


@dataclass
class RuntimeConfig:
    """How a run executes: device, seed, speed switches, logging and limits."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 0
    amp: str = "none"  # none | bf16 | fp16 (autocast on CUDA; changes numerics, so off by default)
    channels_last: bool = False
    compile: bool = False
    cuda_graphs: bool = False  # the whole training step as one CUDA graph (one process, amp none/bf16)
    cudnn_benchmark: bool = False
    detect_anomaly: bool = False  # the original leaves it on; it costs ~38% of a step
    sync_bn: bool = False  # synchronise BatchNorm statistics across processes
    on_nonfinite: str = "stop"  # stop | skip: a NaN/Inf loss stops the run, or skips the batch
    max_skipped: int = 100  # with on_nonfinite=skip, stop after this many skipped batches
    log_every: int = 10  # steps between log lines
    save_every_steps: int = 0  # also checkpoint mid-epoch every N steps (0: end of epoch only)
    time_budget_minutes: float = 0.0  # stop cleanly (checkpointed) once exceeded; 0 = no limit
    tensorboard: bool = True

    def validate(self) -> None:
        if self.amp not in AMP_MODES:
            raise ConfigError(f"runtime.amp: must be none, bf16 or fp16, got {self.amp!r}")
        if self.on_nonfinite not in ("stop", "skip"):
            raise ConfigError(f"runtime.on_nonfinite: must be stop or skip, got {self.on_nonfinite!r}")
        if self.cuda_graphs and self.amp == "fp16":
            raise ConfigError("runtime.cuda_graphs: works with amp none or bf16, not fp16 "
                              "(fp16's loss scaler decides on the host)")


@dataclass
class TrainConfig:
    """Everything a training run needs; saved as ``config.yaml`` in the run directory."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)  # model.definition names the landmarks
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    runtime: RuntimeConfig = dataclasses.field(default_factory=RuntimeConfig)

    def validate(self) -> None:
        self.model.validate()
        self.data.validate()
        self.loss.validate()
        self.optim.validate()
        self.runtime.validate()
        if self.runtime.cuda_graphs and self.optim.optimizer not in ("adam", "adamw"):
            raise ConfigError(f"runtime.cuda_graphs: needs optim.optimizer adam or adamw, not {self.optim.optimizer!r}")


PRESETS = ("paper", "tiny")


def load_preset(name: str) -> TrainConfig:
    """A named preset (``paper``: the authors' recipe; ``tiny``: trains on a CPU in minutes)."""
    from importlib import resources

    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    text = (resources.files("staralign") / "resources" / "presets" / f"{name}.yaml").read_text(encoding="utf-8")
    try:
        return from_dict(TrainConfig, yaml.safe_load(text) or {})
    except ConfigError as exc:
        raise ConfigError(f"<preset {name}>: {exc}") from exc


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
    atomic_write(path, yaml.safe_dump(to_dict(obj), sort_keys=False))


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
