"""Loading and saving network weights.

Two formats are read:

* the authors' checkpoints (``torch.save`` of ``{"net": state_dict, "net_ema":
  ..., "epoch": ...}``), also with DataParallel/DDP ``module.`` or
  ``torch.compile`` ``_orig_mod.`` key prefixes, and bare state dicts.  The
  network's shape is inferred from the keys and the landmark definition from
  the head sizes (98 WFLW, 68 300W, 29 COFW) unless one is given;
* our own: a ``.safetensors`` file of the weights whose metadata holds the
  full ``ModelConfig`` and landmark definition, so the file alone rebuilds the
  model (custom landmark sets included).  Training state (optimiser, EMA,
  schedule) is not in it: the training engine keeps that separately.

``torch.load`` always runs with ``weights_only=True`` unless the caller opts in
to full unpickling, which can execute arbitrary code; a file that is neither a
safetensors file nor a PyTorch archive or pickle is "not a checkpoint" before
``torch.load`` sees it (:func:`safe_torch_load`, also used for training state).

A file's claims are checked before anything is built (:func:`check_architecture`): a
network's stacks, levels, channels, input size and point count within
:data:`ARCH_LIMITS`, and the weights present for exactly the stacks it claims, so a
crafted header cannot make the loader build a giant model or allocate terabytes.
"""

from __future__ import annotations

import json
import pickle
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .._io import atomic_write
from ..config import ConfigError, ModelConfig, from_dict, to_dict
from ..definitions import (
    DefinitionError,
    LandmarkDefinition,
    definition_for_num_points,
    get_definition,
)
from ..metadata import parse_record
from .hourglass import StackedHourglassNet
from .layers import EdgeToPoint

__all__ = [
    "CheckpointError",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "infer_model_config",
    "load_model",
    "read_state_dict",
    "safe_torch_load",
    "save_model",
    "unwrap",
]

FORMAT_NAME = "staralign.model"
FORMAT_VERSION = 1
METADATA_KEY = "staralign"
# Input size assumed for checkpoints that do not record one (the official recipe's).
DEFAULT_INPUT_SIZE = 256
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# What a loadable network may claim (the paper's model: 4 stacks, 4 levels, 256 channels,
# input 256, 98 points); far beyond any real model, far below what exhausts a machine.
ARCH_LIMITS = {"nstack": 16, "nlevels": 6, "channels": 2048, "stem_channels": 2048, "input_size": 2048,
               "num_points": 2000, "num_edges": 2000}


class CheckpointError(ValueError):
    """A file is not a usable checkpoint; the message names the file (and the key, if one)."""


# --------------------------------------------------------------------------- reading


def _is_safetensors(path: Path) -> bool:
    # safetensors: 8-byte little-endian header length, then a JSON header.
    with path.open("rb") as fh:
        head = fh.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        return False
    (header_len,) = struct.unpack("<Q", head[:8])
    return header_len + 8 <= path.stat().st_size


def _read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, Any] | None]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            metadata = fh.metadata() or {}
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable safetensors file: {exc}") from exc
    if METADATA_KEY not in metadata:
        return tensors, None  # weights only: the shape is inferred like a bare state dict
    info = parse_record(metadata[METADATA_KEY], source=str(path), key=METADATA_KEY,
                        format_name=FORMAT_NAME, max_version=FORMAT_VERSION, error=CheckpointError)
    return tensors, info


def _looks_like_torch(path: Path) -> bool:
    """A zip archive (``torch.save`` since 1.6) or a pickle (older ``torch.save``)."""
    with path.open("rb") as fh:
        head = fh.read(4)
    return head[:4] == b"PK\x03\x04" or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5)


def safe_torch_load(path: str | Path, what: str = "checkpoint", map_location: Any = "cpu",
                    allow_pickle: bool = False, error: type[Exception] | None = None) -> Any:
    """``torch.load`` of ``path`` with ``weights_only`` (unless ``allow_pickle``), raising
    ``error`` (default :class:`CheckpointError`) as one line: "not a WHAT" for a file that is
    no PyTorch file at all, the ``--allow-pickle`` hint only for a real pickle of Python objects."""
    path, error = Path(path), error or CheckpointError
    if not _looks_like_torch(path):
        raise error(f"{path}: not a {what} (neither a safetensors file nor a PyTorch file)")
    try:
        return torch.load(path, map_location=map_location, weights_only=not allow_pickle)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if not allow_pickle and "unsupported global" in text.lower() and what == "checkpoint":
            raise error(
                f"{path}: this file needs full unpickling (it stores Python objects besides "
                "tensors), and unpickling can run arbitrary code, so it is refused by default. "
                "If you trust where the file came from, opt in with allow_pickle=True "
                "(command line: --allow-pickle)."
            ) from exc
        if not allow_pickle and "unsupported global" in text.lower():
            refused = next((x.strip() for x in text.splitlines() if "unsupported global" in x.lower()), "")
            raise error(f"{path}: refused: it stores Python objects besides tensors, which could run code "
                        f"when loaded ({refused})") from exc
        raise error(f"{path}: not a {what}: {_first_line(text)}") from exc
    except Exception as exc:  # torch.load raises many types on foreign files
        raise error(f"{path}: not a {what} ({type(exc).__name__}: {_first_line(str(exc))})") from exc


def _first_line(text: str) -> str:
    """The line of a (torch) error message that says what went wrong, not its boilerplate."""
    boiler = ("Weights only load failed", "Check the documentation", "Please file an issue", "In PyTorch 2.6")
    lines = [x.strip() for x in text.splitlines() if x.strip()]
    return next((x for x in lines if not x.startswith(boiler)), lines[0] if lines else "")


def _torch_load(path: Path, allow_pickle: bool) -> Any:
    return safe_torch_load(path, "checkpoint", allow_pickle=allow_pickle)


def check_architecture(config: ModelConfig, state: Mapping[str, Tensor], path: Path,
                       num_points: int | None = None, num_edges: int | None = None) -> None:
    """Refuse a network beyond :data:`ARCH_LIMITS`, or whose weights cover other stacks than
    it claims -- before anything is built or allocated."""
    claims = {"nstack": config.nstack, "nlevels": config.nlevels, "channels": config.channels,
              "stem_channels": max(config.stem_channels, default=0), "input_size": config.input_size,
              "num_points": num_points or 0, "num_edges": num_edges or 0}
    for key, value in claims.items():
        if not isinstance(value, int) or value > ARCH_LIMITS[key]:
            raise CheckpointError(f"{path}: claims {key} {value}, beyond what staralign loads "
                                  f"(at most {ARCH_LIMITS[key]}): not a usable checkpoint")
    stacks = {k.split(".")[1] for k in state if k.startswith("hgs.") and k.count(".") > 1}
    if stacks != {str(i) for i in range(config.nstack)}:
        raise CheckpointError(f"{path}: claims {config.nstack} stack(s) but holds weights for "
                              f"{len(stacks)}: not a consistent checkpoint")


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())
    )


def _select_weights(obj: Any, path: Path, ema: bool) -> Mapping[str, Tensor]:
    """The state dict inside a loaded torch object: ``net``/``net_ema`` or a bare state dict."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{path}: not a checkpoint: expected a mapping of weights, got {type(obj).__name__}"
        )
    if ema:
        if "net_ema" not in obj:
            raise CheckpointError(
                f"{path}: ema=True asks for the EMA weights, but the file has no 'net_ema' "
                f"entry (top-level keys: {_key_list(obj)})"
            )
        weights = obj["net_ema"]
        entry = "net_ema"
    elif "net" in obj:
        weights, entry = obj["net"], "net"
    elif "state_dict" in obj:
        weights, entry = obj["state_dict"], "state_dict"
    elif _is_state_dict(obj):
        return obj
    elif "net_ema" in obj:
        raise CheckpointError(
            f"{path}: the file holds only EMA weights ('net_ema'); load them with ema=True"
        )
    else:
        raise CheckpointError(
            f"{path}: not a STAR checkpoint: expected a 'net' entry or a state dict "
            f"(top-level keys: {_key_list(obj)})"
        )
    if not _is_state_dict(weights):
        raise CheckpointError(f"{path}: entry {entry!r} is not a state dict of tensors")
    return weights


def _key_list(obj: Mapping, limit: int = 8) -> str:
    keys = [repr(k) for k in list(obj)[:limit]]
    return ", ".join(keys) + (", ..." if len(obj) > limit else "") if keys else "none"


def _clean(weights: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Strip DataParallel/DDP/compile prefixes and cast half-precision floats to float32."""
    out: dict[str, Tensor] = {}
    for key, value in weights.items():
        while key.startswith(_WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        if value.is_floating_point() and value.dtype != torch.float32:
            value = value.float()
        out[key] = value
    return out


def read_state_dict(
    path: str | Path, ema: bool = False, allow_pickle: bool = False
) -> tuple[dict[str, Tensor], dict[str, Any] | None]:
    """The cleaned float32 weights of a checkpoint on the CPU, and our metadata (None if absent)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if _is_safetensors(path):
        if ema:
            raise CheckpointError(
                f"{path}: a staralign weights file holds one set of weights; ema=True applies "
                "to training checkpoints with a 'net_ema' entry"
            )
        weights, info = _read_safetensors(path)
    else:
        weights, info = _select_weights(_torch_load(path, allow_pickle), path, ema), None
    return _clean(weights), info


# --------------------------------------------------------------------------- shape inference


def _require(state: Mapping[str, Tensor], key: str, source: str) -> Tensor:
    if key not in state:
        raise CheckpointError(f"{source}: missing key {key!r}: not a STAR hourglass network")
    return state[key]


def infer_model_config(
    state: Mapping[str, Tensor], source: str = "<state dict>"
) -> tuple[ModelConfig, int, int]:
    """(config, num_points, num_edges) of the network that produced ``state``.

    Stacks, depth, width, stem widths, AAM and CoordConv are read off the key set; the input
    size is not recorded in official files and defaults to 256 (the smallest
    valid size at least that large for deep hourglasses).
    """
    heads = _require(state, "out_heatmaps.0.conv.weight", source)
    num_points, channels = int(heads.shape[0]), int(heads.shape[1])
    parts = [k.split(".") for k in state if k.startswith("hgs.")]
    stack_ids = {int(p[1]) for p in parts if len(p) > 2 and p[1].isdigit()}
    if 0 not in stack_ids:
        raise CheckpointError(f"{source}: missing keys 'hgs.0.*': not a STAR hourglass network")
    nlevels = max(p.count("low2") for p in parts if p[1] == "0")
    use_aam = "e2h_transform.weight" in state
    num_edges = int(state["e2h_transform.weight"].shape[1]) if use_aam else 0
    unit = 4 * 2 ** max(nlevels, 1)
    stem = (int(_require(state, "pre.0.conv.weight", source).shape[0]),
            int(_require(state, "pre.1.conv3.conv.weight", source).shape[0]))
    config = ModelConfig(
        nstack=max(stack_ids) + 1,
        nlevels=nlevels,
        channels=channels,
        stem_channels=stem,
        input_size=-(-DEFAULT_INPUT_SIZE // unit) * unit,
        use_aam=use_aam,
        add_coord="hgs.0.coordconv.conv.weight" in state,
    )
    return config, num_points, num_edges


# --------------------------------------------------------------------------- loading


def _resolve_definition(
    given: str | Path | LandmarkDefinition | None,
    stored: dict[str, Any] | None,
    num_points: int,
    path: Path,
) -> LandmarkDefinition:
    try:
        if given is not None:
            return get_definition(given)
        if stored is not None:
            return LandmarkDefinition.from_dict(stored, source=f"{path} (stored definition)")
        return definition_for_num_points(num_points)
    except DefinitionError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc


def _check_weights(
    model: StackedHourglassNet, state: Mapping[str, Tensor], path: Path
) -> None:
    """Same keys and shapes as the model, and an edge-to-point map matching the definition."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{path}: missing key {missing[0]!r}{more}")
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise CheckpointError(f"{path}: unexpected key {unexpected[0]!r}{more}")
    for key, want in expected.items():
        got = state[key]
        if got.shape != want.shape:
            raise CheckpointError(
                f"{path}: key {key!r} has shape {list(got.shape)} in the file, "
                f"but the model needs {list(want.shape)}"
            )
    if not model.use_aam:
        return
    edge_to_point = EdgeToPoint(model.definition)
    for name, want in edge_to_point.named_buffers():
        key = f"e2h_transform.{name}"
        if not torch.equal(state[key], want):
            raise CheckpointError(
                f"{path}: key {key!r} does not match the edges of landmark definition "
                f"{model.definition.name!r}; "
                "pass the definition the network was trained with"
            )


def load_model(
    path: str | Path,
    map_location: str | torch.device = "cpu",
    ema: bool = False,
    definition: str | Path | LandmarkDefinition | None = None,
    allow_pickle: bool = False,
) -> StackedHourglassNet:
    """A float32 model in eval mode on ``map_location``, from an official or staralign file.

    ``ema=True`` takes a training checkpoint's ``net_ema`` weights.  ``definition``
    (name, file or object) overrides the stored or inferred landmark definition.
    ``allow_pickle=True`` permits files that need full unpickling (trusted files only).
    """
    path = Path(path)
    state, info = read_state_dict(path, ema=ema, allow_pickle=allow_pickle)
    if info is not None:
        try:
            config = from_dict(ModelConfig, info.get("config"), "config")
        except (ConfigError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: stored model {exc}") from exc
        check_architecture(config, state, path)  # before validate(): 2 ** nlevels of a crafted nlevels hangs
        try:
            config.validate()
        except ConfigError as exc:
            raise CheckpointError(f"{path}: stored model {exc}") from exc
        stored_definition = info.get("definition")
        num_points = -1
    else:
        config, num_points, num_edges = infer_model_config(state, str(path))
        stored_definition = None
    if info is None:
        check_architecture(config, state, path)
    resolved = _resolve_definition(definition, stored_definition, num_points, path)
    check_architecture(config, state, path, resolved.num_points, resolved.num_edges)
    if info is None:
        if resolved.num_points != num_points or (config.use_aam and resolved.num_edges != num_edges):
            raise CheckpointError(
                f"{path}: the network has {num_points} points and {num_edges} edges, but "
                f"landmark definition {resolved.name!r} has {resolved.num_points} and "
                f"{resolved.num_edges}; pass the matching definition"
            )
        config.definition = str(definition) if isinstance(definition, (str, Path)) else resolved.name
    try:
        # Built without storage (no wasted random init), then given the file's tensors.
        with torch.device("meta"):
            model = StackedHourglassNet(config, resolved)
    except ConfigError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    _check_weights(model, state, path)
    model.load_state_dict(state, assign=True)
    return model.to(map_location).eval()


# --------------------------------------------------------------------------- saving


def unwrap(model: nn.Module) -> nn.Module:
    """The network inside DataParallel/DDP (``.module``) or torch.compile (``._orig_mod``)."""
    while True:
        inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def save_model(model: nn.Module, path: str | Path) -> Path:
    """Write the weights, config and landmark definition as one safetensors file, atomically.

    The file is written beside ``path`` and renamed over it, so a crash never
    leaves a truncated checkpoint under the final name.  It is serialised in memory and written
    by :func:`~staralign._io.atomic_write`: safetensors' own ``save_file`` writes through a
    temporary file of its own (``.tmpXXXXXX``) that a killed process leaves behind, under a
    name the run folder's clean-up cannot know.
    """
    from safetensors.torch import save

    net = unwrap(model)
    config = getattr(net, "config", None)
    definition = getattr(net, "definition", None)
    if not isinstance(config, ModelConfig) or not isinstance(definition, LandmarkDefinition):
        raise TypeError("save_model: expected a staralign network with .config and .definition")
    path = Path(path)
    info = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "config": to_dict(config),
        "definition": definition.to_dict(),
    }
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in net.state_dict().items()}
    atomic_write(path, save(tensors, metadata={METADATA_KEY: json.dumps(info)}))
    return path
