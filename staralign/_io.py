"""Atomic file writes: a file is either the old one or the complete new one, never half written.

Every file the project writes for keeps (checkpoints, training state, configs, annotation
files, exports, reports) goes through :func:`atomic_path`: the data is written to a
temporary file beside the target, flushed to disk, and renamed over the target; the
folder is synced so the rename survives a power cut.  On any error the temporary file
is removed and the target is left as it was.  JSON the project writes is strict
(:func:`finite_json`): NaN or infinity, which JSON cannot hold, become null.

The rename only makes sense for a regular file.  A symbolic link is followed (its target is
replaced, the link stays a link); a device node, FIFO or socket (``--json /dev/null``,
``--json /dev/stdout``) is written through in place, never replaced by a regular file.
Outputs never replace an input: :func:`avoid_inputs` gives an output that would land on an
input another name beside it.  A write that fails because the disk is full, read-only or
not ours raises :class:`WriteError`, one line naming the file and what to do.
"""

from __future__ import annotations

import errno
import math
import os
import shutil
import stat
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

__all__ = ["FileProblem", "WriteError", "atomic_path", "atomic_write", "avoid_inputs", "finite_json", "is_temporary",
           "same_file"]


# errno values a user fixes by freeing space, choosing another folder or fixing permissions.
_DISK_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
                errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
                errno.EPERM: "operation not permitted"}


class FileProblem(OSError):
    """A file the user must fix or replace (an unreadable image, a disk that is full): the
    message is one line naming the file.  The command line prints any of these without a
    traceback (:func:`staralign.cli.user_message`), whichever package raised it."""


class WriteError(FileProblem):
    """A file could not be written for a reason the user can fix (full or read-only disk,
    permissions); the message is one line naming the file."""

    def __init__(self, path: str | os.PathLike, reason: str, code: int = errno.EIO) -> None:
        super().__init__(code, f"cannot write {path}: {reason}")
        self.path, self.reason = str(path), reason

    def __str__(self) -> str:
        return self.args[1]


def _write_failure(path: Path, exc: BaseException) -> WriteError | None:
    """``exc`` (raised while writing ``path``) as a :class:`WriteError`, or None if it is not a
    disk problem.  torch's zip writer reports a full disk as a RuntimeError ("unexpected pos",
    "failed writing file") without the errno, so the free space is looked at instead."""
    if isinstance(exc, WriteError):
        return exc
    if isinstance(exc, OSError) and exc.errno in _DISK_ERRNOS:
        advice = ("free some space or write elsewhere" if exc.errno in (errno.ENOSPC, errno.EDQUOT)
                  else "choose a folder you can write to")
        return WriteError(path, f"{_DISK_ERRNOS[exc.errno]} ({advice})", exc.errno)
    text = str(exc)
    if isinstance(exc, RuntimeError) and ("unexpected pos" in text or "failed writing file" in text):
        try:
            free = f"{shutil.disk_usage(path.parent).free / 1e6:.0f} MB free there"
        except OSError:
            free = "free space unknown"
        return WriteError(path, f"the write was cut short, most likely a full disk ({free}); "
                                "free some space or write elsewhere", errno.ENOSPC)
    return None


def _is_special(path: Path) -> bool:
    """``path`` exists and is not a regular file (a device, FIFO or socket)."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return False
    return not stat.S_ISREG(mode) and not stat.S_ISDIR(mode)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s new content to; on leaving the block
    without an error it replaces ``path`` (parent folders are created).

    A symlink's target is what gets replaced (the link stays); a device node, FIFO or
    socket is yielded itself and written in place."""
    path = Path(path)
    if path.is_symlink():
        path = Path(os.path.realpath(path))
    if _is_special(path):
        try:
            yield path
        except Exception as exc:
            failure = _write_failure(path, exc)
            if failure is None:
                raise
            raise failure from exc
        return
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        _user_mode(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except Exception as exc:
        failure = _write_failure(path, exc)
        if failure is None:
            raise
        raise failure from exc
    finally:
        with suppress(OSError):  # a read-only folder: there is no temporary file to remove
            tmp.unlink(missing_ok=True)


def is_temporary(name: str) -> bool:
    """Whether ``name`` is one of :func:`atomic_path`'s temporary files (``.NAME.tmpPID``)."""
    if not name.startswith("."):
        return False
    head, sep, pid = name.rpartition(".tmp")
    return bool(sep and head and pid.isdigit())


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether ``a`` and ``b`` name the same existing file (links and ``..`` resolved)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def avoid_inputs(target: Path, inputs: set[Path], tag: str = "annotated") -> Path:
    """``target``, or ``NAME.TAG.EXT`` beside it (then ``NAME.TAG_2.EXT`` ...) when ``target``
    is one of ``inputs`` (resolved paths): an output never replaces what was read."""
    if target.resolve() not in inputs:  # resolved: symlinks and ".." lead to the same path
        return target
    k, candidate = 1, target.with_name(f"{target.stem}.{tag}{target.suffix}")
    while candidate.resolve() in inputs:
        k += 1
        candidate = target.with_name(f"{target.stem}.{tag}_{k}{target.suffix}")
    return candidate


def atomic_write(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` (text is UTF-8 encoded) to ``path`` atomically; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return Path(path)


def _user_mode(path: Path) -> None:
    """Give a finished temporary file the permissions of a newly created file under the user's
    umask (0644 under umask 022): writers such as safetensors create theirs 0600."""
    with suppress(OSError):  # a file system without modes: leave it
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
