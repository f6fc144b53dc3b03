"""Typed configuration: plain dataclasses, saved as YAML beside every run.

There is no global config object.  A run's configuration is built once (preset,
then YAML file, then command-line overrides), frozen into the run directory as
``config.yaml``, and passed down explicitly.  ``to_dict``/``from_dict`` convert
nested dataclasses to plain data and back, rejecting unknown keys with the
dotted path of the offending field.

Each field carries its own documentation (:func:`setting`): a help sentence, its allowed
values as a ``Literal`` type, and -- for the fields ``staralign train`` offers as flags --
its :class:`Flag`.  The flags are generated from these fields (:mod:`.config_flags`), so a
field and its flag are one declaration, and ``validate`` takes its choice lists from the
same types.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from ._io import atomic_write

__all__ = [
    "ConfigError",
    "DataConfig",
    "Flag",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "RuntimeConfig",
    "TrainConfig",
    "field_choices",
    "from_dict",
    "load_preset",
    "load_yaml",
    "merge",
    "nested",
    "save_yaml",
    "setting",
    "to_dict",
]

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names the field."""


_VALUE_GIVEN = object()  # Flag.const's default: the flag takes a value


@dataclass(frozen=True)
class Flag:
    """How a configuration field is spelt on ``staralign train``'s command line.

    ``names``: the option strings, the first the one shown and reported (default: ``--``
    and the field's name with dashes).  ``const``: the flag takes no value and sets the
    field to this (``--no-aam`` sets ``model.use_aam`` false); a bool field's flag without
    it sets True.  ``help``: the flag's own sentence where the field's does not fit it (a
    negation).  ``spellings``: command-line words for field values, offered in their place
    (``--loss awing`` is ``loss.kind: none``)."""

    names: tuple[str, ...] = ()
    const: Any = _VALUE_GIVEN
    help: str = ""
    spellings: tuple[tuple[str, Any], ...] = ()

    @property
    def takes_value(self) -> bool:
        return self.const is _VALUE_GIVEN


def setting(default: Any = dataclasses.MISSING, help: str = "", *, flag: Flag | bool = False,
            default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with its help sentence and, when ``flag`` is given (True: the
    default spelling), its command-line :class:`Flag`; choices come from a ``Literal`` type."""
    spec = Flag() if flag is True else (flag or None)
    return dataclasses.field(default=default, default_factory=default_factory,
                             metadata={"help": help, "flag": spec})


def _resolve_type(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp


def field_choices(cls: type, name: str) -> tuple[Any, ...]:
    """The values field ``name`` of dataclass ``cls`` allows (its ``Literal`` type), or ()."""
    tp = _resolve_type(typing.get_type_hints(cls)[name])
    return typing.get_args(tp) if typing.get_origin(tp) is Literal else ()


def _check_choice(config: Any, section: str, name: str) -> None:
    allowed, value = field_choices(type(config), name), getattr(config, name)
    if value not in allowed:
        raise ConfigError(f"{section}.{name}: must be one of {', '.join(allowed)}, got {value!r}")


@dataclass
class ModelConfig:
    """The network's shape.  The official checkpoints are ``ModelConfig()`` with their definition."""

    definition: str = setting("WFLW", "WFLW, 300W, COFW, 300VW, or a landmark definition file",
                              flag=Flag(("--data-definition", "--data_definition")))
    nstack: int = setting(4, "hourglass stacks", flag=True)
    nlevels: int = setting(4, "hourglass depth")
    channels: int = setting(256, "feature channels", flag=True)
    stem_channels: tuple[int, int] = setting((64, 128), "widths of the stem's two stages (the original's: 64, 128)")
    # Square, a multiple of 4 * 2^nlevels; the heatmaps are input_size / 4.
    input_size: int = setting(256, "side of the input crop in pixels", flag=True)
    use_aam: bool = setting(True, "point/edge map heads gating the heatmaps (the AAM)",
                            flag=Flag(("--no-aam",), const=False, help="no point/edge heads"))
    add_coord: bool = setting(True, "CoordConv layers (x, y, r and the boundary channels)")

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


@dataclass
class DataConfig:
    """Where the data is and how it is read."""

    image_dir: str = setting("", "folder the image paths in the annotation files are relative to",
                             flag=Flag(("--image-dir", "--image_dir")))
    annot_dir: str = setting("", "folder with train.tsv / test.tsv (or <definition>/train.tsv as the original)",
                             flag=Flag(("--annot-dir", "--annot_dir")))
    train_file: str = setting("train.tsv", "training annotation file name (default train.tsv)", flag=True)
    val_file: str = setting("test.tsv", "validation annotation file name (default test.tsv)", flag=True)
    aug_prob: float = setting(1.0, "share of training samples that get flip/geometry/texture augmentation")
    workers: int = setting(4, "data loader processes per training process", flag=True)
    # All exact, a speed choice only: edge maps are a rasteriser (slow on a GPU, small to
    # send), point maps one fused kernel on the device (but N maps a sample to send).
    targets: Literal["auto", "worker", "mixed", "device"] = setting(
        "auto", "where point/edge map targets are built: loader workers, mixed (edge maps in the workers, "
        "point maps on the device), or the device; auto = mixed on CUDA, else worker", flag=True)
    # A quarter of the bytes through shared memory, pinning and the bus; bit-identical.
    uint8_images: bool = setting(True, "send training crops from the workers as 8-bit pixels and normalise "
                                       "them on the device")
    # Counted, and reported, instead of stopping at the first.
    skip_bad_rows: bool = setting(False, "skip malformed annotation rows", flag=True)
    val_batch_size: int = setting(32, "faces per validation batch")

    def validate(self) -> None:
        _check_choice(self, "data", "targets")
        if not 0 <= self.aug_prob <= 1:
            raise ConfigError(f"data.aug_prob: must be in [0, 1], got {self.aug_prob}")
        if self.workers < 0:
            raise ConfigError(f"data.workers: must be >= 0, got {self.workers}")


@dataclass
class LossConfig:
    """The training objective (see ``staralign.losses.recipe``); defaults are the authors' recipe."""

    # star (v2) | star_v1 on the fused heatmaps; smoothl1 | l1 | l2 | wing on their soft-argmax;
    # none: no landmark loss, the AWing terms on the point/edge maps alone (the CLI's "awing").
    kind: Literal["star", "star_v1", "smoothl1", "l1", "l2", "wing", "none"] = setting(
        "star", "landmark loss (awing: no landmark loss, the AWing terms on the point/edge maps alone; "
        "kind none in a config file)",
        flag=Flag(("--loss",), spellings=(("awing", "none"),)))
    star_w: float = setting(1.0, "weight of STAR's eigenvalue penalty", flag=True)
    star_dist: Literal["smoothl1", "l1", "l2", "wing"] = setting(
        "smoothl1", "distance STAR applies along each principal direction", flag=True)
    landmark_weight: float = setting(1.0, "weight of the landmark loss")
    map_weight: float = setting(10.0, "weight of AWing on the point maps and on the edge maps; 0 disables")

    def validate(self) -> None:
        _check_choice(self, "loss", "kind")
        if self.kind == "none" and self.map_weight <= 0:
            raise ConfigError("loss: kind 'none' (--loss awing: the AWing terms on the point/edge maps alone) "
                              "with map_weight 0 leaves nothing to train")
        _check_choice(self, "loss", "star_dist")


@dataclass
class OptimConfig:
    """Optimiser, schedule and batch; defaults are the authors' recipe."""

    epochs: int = setting(500, "epochs to train", flag=True)
    # The global batch is batch_size * world size.
    batch_size: int = setting(32, "per process (per GPU)", flag=Flag(("--batch-size", "--batch_size")))
    optimizer: Literal["adam", "adamw", "sgd"] = setting("adam", "adam (the original's), adamw or sgd")
    lr: float = setting(1e-3, "initial learning rate", flag=True)
    momentum: float = setting(0.9, "momentum (sgd only)")
    betas: tuple[float, float] = setting((0.9, 0.999), "Adam's betas")
    weight_decay: float = setting(0.0, "weight decay (the original's Adam gets none)")
    milestones: list[int] = setting(help="epochs at which the learning rate is multiplied by gamma",
                                    default_factory=lambda: [200, 350, 450])
    gamma: float = setting(0.1, "learning rate factor at each milestone")
    ema: bool = setting(True, "exponential moving average of the weights (validated and saved beside the model)",
                        flag=Flag(("--no-ema",), const=False,
                                  help="no exponential moving average of the weights (validated and saved "
                                       "beside the model)"))
    ema_decay: float | None = setting(None, "EMA decay; none: 0.5 ** (global batch / 10000), as the original")
    grad_clip: float = setting(0.0, "max gradient norm; 0 = off (the original has none)")

    def validate(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"optim.epochs: must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"optim.batch_size: must be >= 1, got {self.batch_size}")
        if self.lr <= 0:
            raise ConfigError(f"optim.lr: must be positive, got {self.lr}")
        _check_choice(self, "optim", "optimizer")
        if self.ema_decay is not None and not 0 <= self.ema_decay < 1:
            raise ConfigError(f"optim.ema_decay: must be in [0, 1), got {self.ema_decay}")


@dataclass
class RuntimeConfig:
    """How a run executes: device, seed, speed switches, logging and limits."""

    device: str = setting("auto", "auto, cpu, cuda, cuda:N", flag=True)
    seed: int = setting(0, "seed of initialisation, shuffling, augmentation", flag=True)
    # Changes numerics, so off by default.
    amp: Literal["none", "bf16", "fp16"] = setting("none", "autocast precision", flag=True)
    channels_last: bool = setting(False, "NHWC memory format (faster convolutions on CPUs and tensor cores)",
                                  flag=True)
    compile: bool = setting(False, "torch.compile the network and the loss", flag=True)
    cuda_graphs: bool = setting(False, "capture the whole training step as one CUDA graph (one GPU, amp none "
                                       "or bf16)", flag=True)
    cudnn_benchmark: bool = setting(False, "let cuDNN pick the fastest kernels for the input size", flag=True)
    # The original leaves it on; it costs ~38% of a step.
    detect_anomaly: bool = setting(False, "autograd anomaly detection, as the original (slow: for debugging NaNs)",
                                   flag=True)
    sync_bn: bool = setting(False, "batch-norm statistics synchronised across processes (torchrun)", flag=True)
    on_nonfinite: Literal["stop", "skip"] = setting(
        "stop", "a NaN/Inf loss stops the run, or skips the batch",
        flag=Flag(("--skip-nonfinite",), const="skip",
                  help="skip (and count) batches with a NaN/Inf loss instead of stopping"))
    max_skipped: int = setting(100, "with on_nonfinite skip, stop after this many skipped batches")
    log_every: int = setting(10, "steps between log lines")
    save_every_steps: int = setting(0, "also save the training state every N steps within an epoch (default: "
                                       "at epoch ends only)", flag=True)
    time_budget_minutes: float = setting(0.0, "stop after this many minutes, validated and saved (default: no "
                                              "limit)", flag=True)
    tensorboard: bool = setting(True, "write TensorBoard event files under tb/ (the optional tensorboard package)")

    def validate(self) -> None:
        _check_choice(self, "runtime", "amp")
        _check_choice(self, "runtime", "on_nonfinite")
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
        if self.loss.kind == "none" and not self.model.use_aam:
            raise ConfigError("loss.kind: 'none' (--loss awing) trains the AWing terms on the point/edge maps "
                              "alone, and model.use_aam false (--no-aam) leaves the model without those maps: "
                              "nothing would train")


# The choices of the fields, for code that takes them as plain tuples.
LANDMARK_LOSSES = field_choices(LossConfig, "kind")
TARGET_PLACEMENTS = field_choices(DataConfig, "targets")
AMP_MODES = field_choices(RuntimeConfig, "amp")


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
    if typing.get_origin(tp) is Literal:  # read as its values' type; validate() checks the value
        tp = type(typing.get_args(tp)[0])
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


def nested(overrides: dict[str, Any]) -> dict[str, Any]:
    """Overrides keyed by dotted name (``{"optim.lr": 0.01}``) as nested mappings
    (``{"optim": {"lr": 0.01}}``); keys without a dot, and nested values, pass unchanged."""
    out: dict[str, Any] = {}
    for key, value in overrides.items():
        *parents, last = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        if isinstance(value, dict) and isinstance(node.get(last), dict):
            node[last].update(nested(value))
        else:
            node[last] = nested(value) if isinstance(value, dict) else value
    return out


def merge(obj: T, overrides: dict[str, Any]) -> T:
    """A copy of dataclass ``obj`` with nested overrides applied (same checks as from_dict,
    errors naming the dotted path); overrides by dotted name go through :func:`nested` first."""
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
