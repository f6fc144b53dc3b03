"""Run folders: one process each (run.lock), never overwritten by accident (--overwrite), and
resumes that always work (no state yet, stale temporaries, logs cut back to the resumed
step, absolute paths, --resume with --epochs and the other resumable settings)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from staralign.cli import main
from staralign.config import TrainConfig, load_yaml, save_yaml
from staralign.engine.rundir import LOCK_FILE, RunDirError
from staralign.engine.trainer import train

from .test_engine import tiny_config


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from staralign.data.synth import generate_dataset

    out = tmp_path_factory.mktemp("synth")
    generate_dataset(out, train=8, test=4, ambiguity=0.0, seed=5, size=96)
    return out


def _cfg(data: Path, epochs: int = 1, **runtime) -> TrainConfig:
    return tiny_config(data, optim={"epochs": epochs}, runtime={"tensorboard": False, **runtime})


def _records(run: Path, kind: str) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def _cli_train(cfg: TrainConfig, tmp_path: Path, *args: str) -> int:
    path = tmp_path / "cfg.yaml"
    save_yaml(cfg, path)
    return main(["train", "--preset", "tiny", "--config", str(path), *args])


# --------------------------------------------------------------------------- one process per run


def test_a_run_folder_held_by_a_live_process_is_refused_with_its_pid(data, tmp_path, capsys):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        run = tmp_path / "run"
        run.mkdir()
        (run / LOCK_FILE).write_text(f"{holder.pid} {os.uname().nodename}\n")
        with pytest.raises(RunDirError, match=f"PID {holder.pid}"):
            train(_cfg(data), run)
        assert not (run / "train_state.pt").exists()
        assert _cli_train(_cfg(data), tmp_path, "--out", str(run)) != 0
        assert f"PID {holder.pid}" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()


def test_a_stale_lock_of_a_dead_process_is_taken_over_and_released(data, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_FILE).write_text(f"{dead.pid} {os.uname().nodename}\n")
    train(_cfg(data), run)
    assert (run / "train_state.pt").exists()
    assert not (run / LOCK_FILE).exists(), "the lock outlived its run"
    assert "no longer runs" in (run / "train.log").read_text()


# --------------------------------------------------------------------------- never overwritten by accident


def test_out_on_an_existing_run_refuses_unless_overwrite(data, tmp_path, capsys):
    run = tmp_path / "run"
    assert _cli_train(_cfg(data), tmp_path, "--out", str(run)) == 0
    before = {n: (run / n).read_bytes() for n in ("best.safetensors", "train_state.pt", "metrics.jsonl")}
    capsys.readouterr()
    status = _cli_train(_cfg(data), tmp_path, "--out", str(run), "--lr", "0.5")
    err = capsys.readouterr().err
    assert status != 0
    assert "already holds a run" in err and "--resume" in err and "--overwrite" in err
    assert {n: (run / n).read_bytes() for n in before} == before, "the finished run was touched"
    # --overwrite with data that cannot train: refused by the data check, the old run untouched.
    bad = tmp_path / "no-data"
    bad.mkdir()
    assert _cli_train(tiny_config(bad, optim={"epochs": 1}, runtime={"tensorboard": False}), tmp_path,
                      "--out", str(run), "--overwrite") != 0
    assert "nothing was trained" in capsys.readouterr().err
    assert {n: (run / n).read_bytes() for n in before} == before, "--overwrite cleared a run it could not replace"
    # --overwrite replaces it: the old run's logs are gone, not appended to.
    assert _cli_train(_cfg(data, seed=9), tmp_path, "--out", str(run), "--overwrite") == 0
    assert [v["epoch"] for v in _records(run, "val")] == [1]
    assert load_yaml(TrainConfig, run / "config.yaml").runtime.seed == 9


# --------------------------------------------------------------------------- resume always works


def test_a_run_killed_before_its_first_state_restarts_from_scratch(data, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    save_yaml(_cfg(data), run / "config.yaml")
    # What a kill before the first checkpoint leaves: the config, half a log line, a temporary file.
    (run / "metrics.jsonl").write_text('{"kind": "train", "epoch": 1, "step": 2, "global_step": 2, "lo')
    (run / ".train_state.pt.tmp12345").write_bytes(b"\0" * 1000)
    assert main(["train", "--resume", str(run)]) == 0, capsys.readouterr().err
    assert "starting it from scratch" in (run / "train.log").read_text()
    assert not (run / ".train_state.pt.tmp12345").exists()
    assert [v["epoch"] for v in _records(run, "val")] == [1]
    assert all(r.get("loss") is not None for r in _records(run, "train"))


def test_stale_temporaries_are_removed_when_a_run_starts(data, tmp_path):
    run = tmp_path / "run"
    train(_cfg(data), run)
    stale = [run / ".last.safetensors.tmp999999", run / ".train_state.pt.tmp4242"]
    for p in stale:
        p.write_bytes(b"x" * 100)
    keep = run / "notes.tmp1.txt"
    keep.write_text("mine")
    cfg = _cfg(data, epochs=2)
    save_yaml(cfg, run / "config.yaml")
    train(cfg, run, resume=True)
    assert not any(p.exists() for p in stale)
    assert keep.exists()


def test_metrics_and_tensorboard_are_cut_back_to_the_resumed_step(data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    run = tmp_path / "run"
    cfg = tiny_config(data, optim={"epochs": 1}, runtime={"tensorboard": True, "log_every": 1})
    train(cfg, run)
    steps = len(_records(run, "train"))
    # A killed process went on past the saved state: it logged epoch 2 (steps and validation).
    with open(run / "metrics.jsonl", "a") as fh:
        for s in range(1, steps + 1):
            record = {"kind": "train", "epoch": 2, "step": s, "global_step": steps + s, "loss": -1.0}
            fh.write(json.dumps(record) + "\n")
        fh.write(json.dumps({"kind": "val", "epoch": 2, "nme": -1.0}) + "\n")
    w = SummaryWriter(str(run / "tb"))
    for s in range(steps + 1, 2 * steps + 1):
        w.add_scalar("train/loss", -1.0, s)
    w.add_scalar("val/nme", -1.0, 2 * steps)
    w.close()

    cfg2 = tiny_config(data, optim={"epochs": 2}, runtime={"tensorboard": True, "log_every": 1})
    save_yaml(cfg2, run / "config.yaml")
    train(cfg2, run, resume=True)
    vals = _records(run, "val")
    assert [v["epoch"] for v in vals] == [1, 2] and all(v["nme"] > 0 for v in vals)
    gsteps = [r["global_step"] for r in _records(run, "train")]
    assert gsteps == list(range(1, 2 * steps + 1)), gsteps
    assert all(r["loss"] > 0 for r in _records(run, "train"))
    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == list(range(1, 2 * steps + 1))
    assert all(e.value > 0 for e in loss), "the killed process's events survived the resume"
    assert [round(e.value, 5) for e in acc.Scalars("val/nme")] == [round(v["nme"], 5) for v in vals]


def test_relative_folders_are_saved_absolute_and_resume_from_anywhere(data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(data.parent)
    run = tmp_path / "run"
    cfg_path = tmp_path / "cfg.yaml"
    save_yaml(_cfg(data), cfg_path)
    assert main(["train", "--preset", "tiny", "--config", str(cfg_path), "--image-dir", data.name,
                 "--annot-dir", data.name, "--out", str(run)]) == 0, capsys.readouterr().err
    saved = load_yaml(TrainConfig, run / "config.yaml")
    assert saved.data.annot_dir == str(data) and saved.data.image_dir == str(data)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["train", "--resume", str(run), "--epochs", "2"]) == 0, capsys.readouterr().err
    assert [v["epoch"] for v in _records(run, "val")] == [1, 2]


def test_resume_extends_a_finished_run_and_logs_each_change(data, tmp_path, capsys):
    run = tmp_path / "run"
    assert _cli_train(_cfg(data), tmp_path, "--out", str(run)) == 0
    status = main(["train", "--resume", str(run), "--epochs", "2", "--workers", "0", "--device", "cpu",
                   "--save-every-steps", "1", "--time-budget-minutes", "30"])
    assert status == 0, capsys.readouterr().err
    log = (run / "train.log").read_text()
    assert "resume: optim.epochs: 1 -> 2" in log
    assert "resume: runtime.save_every_steps: 0 -> 1" in log
    assert "resume: runtime.time_budget_minutes: 0.0 -> 30.0" in log
    saved = load_yaml(TrainConfig, run / "config.yaml")
    assert saved.optim.epochs == 2 and saved.runtime.save_every_steps == 1  # the next resume keeps them
    assert [v["epoch"] for v in _records(run, "val")] == [1, 2]
    capsys.readouterr()
    # Model, definition and loss changes are still refused, named as typed.
    status = main(["train", "--resume", str(run), "--epochs", "3", "--nstack", "4", "--loss", "l2",
                   "--data-definition", "300W"])
    err = capsys.readouterr().err
    assert status != 0
    assert all(f in err for f in ("--nstack", "--loss", "--data-definition")) and "--epochs" not in err
    assert load_yaml(TrainConfig, run / "config.yaml").optim.epochs == 2
