"""A run directory's housekeeping: who owns it, whether it may be started again, and what a
resume cuts back.

* One process per run: :class:`RunLock` creates ``run.lock`` holding the owner's PID and
  host; a second ``train`` on the same folder is refused naming that PID.  A lock left by a
  process that no longer exists (SIGKILL, power cut) is taken over, and said so.
* A finished or partial run is never overwritten by accident: :func:`prepare_new_run`
  refuses a folder that holds a run unless asked to overwrite it (then the run's files go).
* At start, temporary files of killed writers (``.NAME.tmpPID``) are removed
  (:func:`remove_stale_temporaries`), and on resume ``metrics.jsonl`` is cut back to the
  resumed step (:func:`truncate_metrics`) so replayed steps are not logged twice; the
  TensorBoard writer is given the same step as ``purge_step``.
* Errors a user can act on (a corrupt image, a full or read-only disk, a torch save cut
  short) become one :class:`RunFailure` line naming the file, what to do, and the last
  complete checkpoint (:func:`run_failure`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
from pathlib import Path

from .._io import _write_failure, atomic_write, is_temporary

__all__ = ["LOCK_FILE", "RUN_FILES", "RunDirError", "RunFailure", "RunLock", "holds_run", "prepare_new_run",
           "remove_stale_temporaries", "run_failure", "start_run", "truncate_metrics"]

log = logging.getLogger("staralign.train")

LOCK_FILE = "run.lock"
# What a run writes (trainer.py's module docstring); --overwrite removes exactly these.
RUN_FILES = ("config.yaml", "train.log", "metrics.jsonl", "train_state.pt", "last.safetensors",
             "last_ema.safetensors", "best.safetensors")
RUN_FOLDERS = ("tb",)


class RunDirError(ValueError):
    """The run directory cannot be used as asked (held by another process, or holds a run)."""


class RunFailure(RuntimeError):
    """A run stopped on an error the user can fix; the message is one line."""


# --------------------------------------------------------------------------- ownership


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    """``run.lock`` in ``run_dir`` for as long as the ``with`` block runs (see the module docstring)."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self.held = False
        self.took_over_from: int | None = None  # PID of a dead holder whose lock was taken over

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = f"{os.getpid()} {socket.gethostname()}\n"
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                pid, host = self._holder()
                if pid is not None and (host != socket.gethostname() or _alive(pid)) and pid != os.getpid():
                    where = "" if host == socket.gethostname() else f" on {host}"
                    raise RunDirError(f"{self.path.parent}: in use by another staralign process (PID {pid}{where}); "
                                      f"wait for it to finish or stop it (if it is gone, delete {self.path})"
                                      ) from None
                # The holder is dead (or the file is unreadable): take the lock over.
                self.took_over_from = pid
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(me)
            self.held = True
            return
        raise RunDirError(f"{self.path}: cannot take the run lock (another process keeps creating it)")

    def log_takeover(self) -> None:
        """Say (once logging is set up) that a dead process's lock was taken over."""
        if self.took_over_from is not None:
            log.info("%s: took over the lock of process %s, which no longer runs", self.path.parent,
                     self.took_over_from)

    def _holder(self) -> tuple[int | None, str]:
        try:
            fields = self.path.read_text().split()
            return int(fields[0]), (fields[1] if len(fields) > 1 else socket.gethostname())
        except (OSError, ValueError, IndexError):
            return None, socket.gethostname()

    def release(self) -> None:
        if self.held:
            pid, _ = self._holder()
            if pid == os.getpid():
                self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


# --------------------------------------------------------------------------- starting and resuming


def holds_run(run_dir: str | os.PathLike) -> bool:
    """Whether ``run_dir`` holds (part of) a run: a config, a state or weights."""
    d = Path(run_dir)
    return any((d / name).exists() for name in ("config.yaml", "train_state.pt", "last.safetensors",
                                                "best.safetensors"))


def prepare_new_run(run_dir: str | os.PathLike, overwrite: bool = False) -> None:
    """Refuse to start a new run in a folder that holds one, unless ``overwrite``: then the
    old run's files (:data:`RUN_FILES`, ``tb/``) are removed first; other files stay."""
    d = Path(run_dir)
    if not holds_run(d):
        return
    if not overwrite:
        raise RunDirError(f"{d} already holds a run; continue it with --resume {d}, start a new one in "
                          "another folder, or replace it with --overwrite")
    log.info("%s: --overwrite: removing the previous run's files", d)
    for name in RUN_FILES:
        (d / name).unlink(missing_ok=True)
    for name in RUN_FOLDERS:
        shutil.rmtree(d / name, ignore_errors=True)


def remove_stale_temporaries(run_dir: str | os.PathLike) -> list[Path]:
    """Remove the temporary files (``.NAME.tmpPID``) that killed writers left in ``run_dir``.
    Called with the run lock held, so no live writer owns them."""
    removed, size = [], 0
    d = Path(run_dir)
    if not d.is_dir():
        return removed
    for p in d.iterdir():
        if is_temporary(p.name) and p.is_file():
            size += p.stat().st_size
            p.unlink(missing_ok=True)
            removed.append(p)
    if removed:
        log.info("removed %d temporary file(s) left by an interrupted run (%.1f MB)", len(removed),
                 size / 1e6)
    return removed


def start_run(run_dir: Path, lock: RunLock, is_main: bool, resume: bool, changes: list[str]) -> bool:
    """The start of a run, once logging is up: say whether a dead process's lock was taken
    over, remove stale temporaries, log the settings a resume changes.  Returns whether there
    is a state to resume from: a run killed before its first checkpoint starts from scratch."""
    from .state import STATE_FILE

    if is_main:
        lock.log_takeover()
        remove_stale_temporaries(run_dir)
    if not resume:
        return False
    for line in changes:
        log.info("resume: %s", line)
    if not (run_dir / STATE_FILE).exists():
        log.info("%s has no complete training state (stopped before its first checkpoint): "
                 "starting it from scratch", run_dir)
        return False
    return True


def metrics_step(record: dict, steps_per_epoch: int) -> int:
    """The global step a metrics.jsonl record was written at (validation: the epoch's end)."""
    if "global_step" in record:
        return int(record["global_step"])
    return int(record.get("epoch", 0)) * steps_per_epoch


def truncate_metrics(run_dir: str | os.PathLike, global_step: int, steps_per_epoch: int) -> int:
    """Cut ``metrics.jsonl`` back to the records of steps up to ``global_step`` (where the run
    resumes); returns how many records were dropped.  A torn last line (a kill mid-write) goes too."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
            keep = metrics_step(record, steps_per_epoch) <= global_step
        except (ValueError, TypeError, AttributeError):
            keep = False
        if keep:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        atomic_write(path, "".join(x + "\n" for x in kept))
        log.info("metrics.jsonl cut back to step %d (%d record(s) of replayed steps dropped)", global_step, dropped)
    return dropped


# --------------------------------------------------------------------------- failures


def _last_checkpoint(run_dir: Path) -> str:
    from .state import STATE_FILE

    path = run_dir / STATE_FILE
    if not path.exists():
        return "no complete checkpoint yet (the run starts from scratch when resumed)"
    try:
        import torch

        st = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        where = f" (epoch {st['epoch']}, step {st['step']})"
    except Exception:  # noqa: BLE001 - naming the file is enough
        where = ""
    return f"last complete checkpoint {path}{where}; continue with: staralign train --resume {run_dir}"


def run_failure(exc: BaseException, run_dir: str | os.PathLike) -> RunFailure | None:
    """``exc`` as one line a user can act on, or None when it is not such an error (a bug:
    the traceback is wanted).  Covers images that cannot be read (also when a loader worker
    raised it), disks that are full, read-only or not writable, and torch saves cut short."""
    from ..cli import user_message
    from ..data.images import ImageReadError

    run_dir = Path(run_dir)
    if isinstance(exc, RunFailure):
        return exc
    fix_row = "; fix or remove that row (staralign data check lists every problem)"
    if isinstance(exc, ImageReadError):
        what = f"{exc}{fix_row}"
    elif isinstance(exc, RuntimeError) and "Caught ImageReadError" in str(exc):
        # A loader worker's error arrives as text: its last line is the ImageReadError's message.
        last = [x for x in str(exc).splitlines() if x.strip()][-1]
        what = last.split("ImageReadError: ", 1)[-1] + fix_row
    elif isinstance(exc, RuntimeError) and str(exc).startswith("Error(s) in loading state_dict"):
        return RunFailure(f"{run_dir / 'train_state.pt'}: its weights do not fit the model in "
                          f"{run_dir / 'config.yaml'} (was it copied from another run?); restore the run's own "
                          "state or start a new run with --out")
    elif isinstance(exc, RuntimeError) and _write_failure(run_dir / "train_state.pt", exc) is not None:
        what = str(_write_failure(run_dir / "train_state.pt", exc))
    else:  # a full, read-only or forbidden disk: the words every command uses
        what = user_message(exc, run_dir)
    if what is None:
        return None
    return RunFailure(f"training stopped: {what}. {_last_checkpoint(run_dir)}")
