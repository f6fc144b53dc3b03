"""Fault injection: SIGKILL a tiny training run again and again -- at random moments, and
inside checkpoint writes (a torn temporary file, or just after a rename) -- resuming after
each kill; the run that finally completes equals one that was never interrupted.

Each attempt is a fresh ``staralign train`` process (``--out`` while the folder holds no run
yet, ``--resume`` after), so every kill also leaves what a real one leaves: a stale lock,
temporary files, a metrics log ahead of the saved state.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from staralign.config import save_yaml
from staralign.engine.state import load_state

from .test_engine import tiny_config

REPO = Path(__file__).resolve().parents[1]

# Runs ``staralign`` with os.replace (the commit point of every atomic write) wrapped: the
# FAULT_AT-th write of the process SIGKILLs it, before the rename with the temporary file
# torn in half ("torn") or just after the rename ("renamed").
LAUNCHER = r"""
import os, signal, sys
at, phase, seen = int(os.environ.get("FAULT_AT", "0")), os.environ.get("FAULT_PHASE", ""), [0]
real = os.replace
def replace(src, dst, *a, **k):
    seen[0] += 1
    if seen[0] == at:
        if phase == "torn":
            with open(src, "r+b") as fh:
                fh.truncate(os.path.getsize(src) // 2)
            os.kill(os.getpid(), signal.SIGKILL)
        real(src, dst, *a, **k)
        os.kill(os.getpid(), signal.SIGKILL)
    return real(src, dst, *a, **k)
os.replace = replace
from staralign.cli import main
sys.exit(main(sys.argv[1:]))
"""

KILLS = 6  # kills per test run: half inside writes (torn and renamed in turn), half at random moments


def _start(args: list[str], launcher: Path, fault: tuple[int, str] | None = None) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("FAULT_AT", None)
    if fault:
        env.update(FAULT_AT=str(fault[0]), FAULT_PHASE=fault[1])
    return subprocess.Popen([sys.executable, str(launcher), *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _vals(run: Path) -> list[tuple[int, float]]:
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["epoch"], r["nme"]) for r in records if r["kind"] == "val"]


def _progress(run: Path) -> int:
    """The last global step in ``run``'s metrics.jsonl (0 if none)."""
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return 0
    steps = [0]
    for line in lines:
        with contextlib.suppress(ValueError):  # a line being written
            steps.append(int(json.loads(line).get("global_step", 0)))
    return max(steps)


def _starts(run: Path) -> int:
    """How many times a process has finished setting up in ``run`` (metrics cut back by then)."""
    try:
        return (run / "train.log").read_text().count("training WFLW:")
    except OSError:
        return 0


def _saved_step(run: Path, steps_per_epoch: int) -> int:
    try:
        st = load_state(run)
    except (OSError, ValueError):
        return 0
    return st["epoch"] * steps_per_epoch + st["step"]


def _kill_after_step(proc: subprocess.Popen, run: Path, step: int, extra: float, timeout: float = 300) -> bool:
    """SIGKILL ``proc`` ``extra`` seconds after it logged global step ``step`` (whatever it is doing
    then: the next step, a checkpoint write, validation); False if it ended first."""
    deadline, started = time.monotonic() + timeout, _starts(run)
    while proc.poll() is None and time.monotonic() < deadline:
        if _starts(run) > started and _progress(run) >= step:
            time.sleep(extra)
            if proc.poll() is not None:
                return False
            proc.send_signal(signal.SIGKILL)
            return True
        time.sleep(0.01)
    return False


def _train_steps(run: Path) -> list[tuple[int, float]]:
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["global_step"], r["loss"]) for r in records if r["kind"] == "train"]


def _assert_same_run(ref_dir: Path, run: Path, log: list[str]) -> None:
    """``run`` ended as the uninterrupted ``ref_dir`` did: weights, state and logs."""
    for name in ("last.safetensors", "last_ema.safetensors", "best.safetensors"):
        a, b = _weights(ref_dir / name), _weights(run / name)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), f"{name} differs from the uninterrupted run ({log})"
    ref_state, state = load_state(ref_dir), load_state(run)
    assert (state["epoch"], state["step"], state["best"]) == (ref_state["epoch"], ref_state["step"], ref_state["best"])
    # The logs hold each step and epoch once, with the uninterrupted run's values.
    assert _vals(run) == _vals(ref_dir)
    assert _train_steps(run) == _train_steps(ref_dir)
    left = sorted(p.name for p in run.iterdir() if p.name.startswith(".") or p.name == "run.lock")
    assert left == [], f"left behind: {left}"


@pytest.mark.slow
def test_sigkill_anywhere_then_resume_equals_an_uninterrupted_run(tmp_path):
    from staralign.data.synth import generate_dataset

    data = tmp_path / "data"
    generate_dataset(data, train=8, test=4, ambiguity=0.0, seed=5, size=96)
    cfg = tiny_config(data, optim={"epochs": 3},
                      runtime={"save_every_steps": 1, "tensorboard": False, "log_every": 1})
    cfg_path = tmp_path / "cfg.yaml"
    save_yaml(cfg, cfg_path)
    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER)
    new_run = ["train", "--preset", "tiny", "--config", str(cfg_path), "--out"]

    ref = _start([*new_run, str(tmp_path / "ref")], launcher)
    out, _ = ref.communicate(timeout=300)
    assert ref.returncode == 0, out
    steps_per_epoch = 2  # 8 faces, batches of 4
    total_steps = cfg.optim.epochs * steps_per_epoch

    rng = random.Random(15)
    run = tmp_path / "killed"
    kills, attempts, log = 0, 0, []
    while True:
        attempts += 1
        assert attempts <= 3 * KILLS, f"no end in sight: {log}"
        args = ["train", "--resume", str(run)] if (run / "config.yaml").exists() else [*new_run, str(run)]
        # A moment: after a step beyond the saved state, plus a random fraction of a second.
        when = (rng.randint(min(_saved_step(run, steps_per_epoch) + 1, total_steps), total_steps),
                rng.uniform(0.0, 0.6))
        if kills >= KILLS:
            fault, when = None, None
        elif kills % 2 == 0:
            fault, when = (rng.randint(1, 6), ("torn", "renamed")[kills // 2 % 2]), None
        else:
            fault = None
        proc = _start(args, launcher, fault)
        if when is not None:
            _kill_after_step(proc, run, *when)
        out, _ = proc.communicate(timeout=300)
        if proc.returncode == -signal.SIGKILL:
            kills += 1
            log.append(f"killed in write {fault[0]} ({fault[1]})" if fault else
                       f"killed {when[1]:.2f} s after step {when[0]}")
            # Whatever the moment, what is on disk loads (or there is no state yet).
            if (run / "train_state.pt").exists():
                load_state(run)
            continue
        assert proc.returncode == 0, f"attempt {attempts} after {log}: {out}"
        _assert_same_run(tmp_path / "ref", run, log)
        if kills >= KILLS:
            break
        log.append("finished before the kill")  # start over to spend the remaining kills
        for p in run.iterdir():
            if p.is_file():
                p.unlink()

    print(f"fault injection: {kills} SIGKILLs survived in {attempts} attempts: {'; '.join(log)}")
