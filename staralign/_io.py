"""Atomic file writes: a file is either the old one or the complete new one, never half written.

Every file the project writes for keeps (checkpoints, training state, configs, annotation
files, exports, reports) goes through :func:`atomic_path`: the data is written to a
temporary file beside the target, flushed to disk, and renamed over the target; the
folder is synced so the rename survives a power cut.  On any error the temporary file
is removed and the target is left as it was.  JSON the project writes is strict
(:func:`finite_json`): NaN or infinity, which JSON cannot hold, become null.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["atomic_path", "atomic_write", "finite_json"]


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s new content to; on leaving the block
    without an error it replaces ``path`` (parent folders are created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        _user_mode(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` (text is UTF-8 encoded) to ``path`` atomically; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return Path(path)


def _user_mode(path: Path) -> None:
    """Give a finished temporary file the permissions of a newly created file under the user's
    umask (0644 under umask 022): writers such as safetensors create theirs 0600."""
    with contextlib.suppress(OSError):  # a file system without modes: leave it
        os.chmod(path, 0o666 & ~_umask())


def _umask() -> int:
    """The process umask, read without changing it where the system allows (Linux)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: read by setting, then put back at once
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not possible on some systems (Windows); the rename itself is atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def finite_json(value: Any) -> Any:
    """``value`` with every non-finite float (also in nested dicts, lists, tuples) as None:
    strict JSON has no NaN or infinity, and browsers' parsers reject them."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value
