"""Training checks its data before the first step (every problem listed at once), and errors
during a run (a corrupt image, a full or read-only disk) are one line naming the file, what
to do and the last complete checkpoint, with a non-zero exit and no traceback."""

from __future__ import annotations

import errno
import multiprocessing
import shutil
from pathlib import Path

import pytest

from staralign.cli import main
from staralign.config import save_yaml

from .test_engine import tiny_config


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    from staralign.data.synth import generate_dataset

    out = tmp_path_factory.mktemp("synth")
    generate_dataset(out, train=8, test=4, ambiguity=0.0, seed=5, size=96)
    return out


@pytest.fixture
def data(pristine, tmp_path) -> Path:
    out = tmp_path / "data"
    shutil.copytree(pristine, out)
    return out


def _train(data: Path, tmp_path: Path, *args: str, epochs: int = 1, workers: int = 0) -> int:
    cfg = tiny_config(data, optim={"epochs": epochs}, data={"workers": workers}, runtime={"tensorboard": False})
    save_yaml(cfg, tmp_path / "cfg.yaml")
    return main(["train", "--preset", "tiny", "--config", str(tmp_path / "cfg.yaml"), *args])


def _one_error_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [x for x in err.splitlines() if "error:" in x]
    assert len(lines) == 1, err
    return lines[0]


def test_every_data_problem_is_listed_before_the_first_step(data, tmp_path, capsys):
    lines = (data / "train.tsv").read_text().splitlines()
    header, rows = lines[0], lines[1:]
    missing_row = rows[1].replace(rows[1].split("\t")[0], "images/train/gone.jpg", 1)
    rows += ["images/train/x.jpg\t1,2\t3", missing_row]
    (data / "train.tsv").write_text("\n".join([header, *rows]) + "\n")
    corrupt = data / rows[2].split("\t")[0]
    corrupt.write_bytes(b"\xff\xd8\xff" + b"not really a jpeg" * 10)
    run = tmp_path / "run"
    status = _train(data, tmp_path, "--out", str(run))
    err = capsys.readouterr().err
    assert status != 0
    assert "Traceback" not in err
    assert "3 problem(s)" in err, err
    assert f"train.tsv:{len(rows)}:" in err  # the malformed row, by line
    assert "gone.jpg: no such file" in err
    assert f"{corrupt}:" in err
    assert "training WFLW" not in err, "the problems were found only after training started"
    assert "--skip-bad-rows" in err  # row problems: skipping them is an option
    assert not (run / "train_state.pt").exists() and not (run / "config.yaml").exists()
    # Nothing was left that makes the next attempt refuse the folder.
    (data / "train.tsv").write_text("\n".join([header, *lines[1:]]) + "\n")
    shutil.copy(data / rows[3].split("\t")[0], corrupt)
    assert _train(data, tmp_path, "--out", str(run)) == 0, capsys.readouterr().err


def test_zero_rows_is_a_clear_error(data, tmp_path, capsys):
    header = (data / "train.tsv").read_text().splitlines()[0]
    (data / "train.tsv").write_text(header + "\n")
    status = _train(data, tmp_path, "--out", str(tmp_path / "run"))
    err = capsys.readouterr().err
    assert status != 0 and "Traceback" not in err
    assert "no usable rows" in err and "batch-size" not in err


def test_a_missing_annotation_file_is_listed_without_the_skip_rows_hint(data, tmp_path, capsys):
    (data / "test.tsv").unlink()
    status = _train(data, tmp_path, "--out", str(tmp_path / "run"))
    err = capsys.readouterr().err
    assert status != 0 and "Traceback" not in err
    assert "test.tsv' not found" in err and "--skip-bad-rows" not in err  # no row to skip


@pytest.mark.parametrize("workers", [0, 1])
def test_an_image_that_breaks_mid_run_is_one_line_with_the_last_checkpoint(data, tmp_path, capsys, monkeypatch,
                                                                            workers):
    import staralign.engine.trainer as trainer

    run = tmp_path / "run"
    assert _train(data, tmp_path, "--out", str(run), workers=workers) == 0
    capsys.readouterr()
    # The images go bad after the pre-flight looked at them (a flaky disk, a sync in progress).
    rows = (data / "train.tsv").read_text().splitlines()[1:]
    victims = [data / r.split("\t")[0] for r in rows]
    originals = {v: v.read_bytes() for v in victims}
    checked = trainer.preflight

    def then_break(*a, **k):
        checked(*a, **k)
        for v in victims:
            v.write_bytes(b"garbage")

    monkeypatch.setattr(trainer, "preflight", then_break)
    status = main(["train", "--resume", str(run), "--epochs", "2", "--workers", str(workers)])
    line = _one_error_line(capsys.readouterr().err)
    assert status != 0
    assert "not a readable image" in line and any(str(v) in line for v in victims), line
    assert "train_state.pt (epoch 1, step 0)" in line and f"--resume {run}" in line
    # The failed run's loader workers are gone now, not whenever the garbage collector runs.
    assert not [c for c in multiprocessing.active_children() if c.name.startswith("Process")], \
        multiprocessing.active_children()
    for v, content in originals.items():
        v.write_bytes(content)
    monkeypatch.setenv("STARALIGN_DEBUG", "1")  # the traceback, when asked for
    with pytest.raises(Exception, match="training stopped: .*not a readable image"):
        main(["train", "--resume", str(run), "--epochs", "2", "--workers", str(workers)])


def test_a_full_disk_is_one_line_naming_the_file(data, tmp_path, capsys, monkeypatch):
    import torch

    def full(*_a, **_k):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 128 vs 64")

    monkeypatch.setattr(torch, "save", full)
    run = tmp_path / "run"
    status = _train(data, tmp_path, "--out", str(run))
    line = _one_error_line(capsys.readouterr().err)
    assert status != 0
    assert "train_state.pt" in line and "full disk" in line and "no complete checkpoint yet" in line
    assert not [p for p in run.iterdir() if p.name.startswith(".")], "a temporary file was left behind"


@pytest.mark.slow  # a training run and two predictions end to end: ~11 s on the shared 2-core VM
def test_a_read_only_disk_is_one_line_in_train_and_predict(data, tmp_path, capsys, monkeypatch):
    real_write_bytes = Path.write_bytes

    def read_only(self, *a, **k):  # the weights' temporary file cannot be written
        if "last.safetensors" in self.name:
            raise OSError(errno.EROFS, "Read-only file system")
        return real_write_bytes(self, *a, **k)

    monkeypatch.setattr(Path, "write_bytes", read_only)
    status = _train(data, tmp_path, "--out", str(tmp_path / "run"))
    line = _one_error_line(capsys.readouterr().err)
    assert status != 0 and "last.safetensors" in line and "read-only" in line
    monkeypatch.undo()

    # predict --json onto a read-only folder: the atomic rename is what fails there.
    import os

    import staralign._io as io_mod
    from staralign.config import ModelConfig
    from staralign.models import build_model, save_model

    weights = save_model(build_model(ModelConfig(definition="WFLW", nstack=1, nlevels=1, channels=8,
                                                 stem_channels=(4, 8), input_size=32)), tmp_path / "w.safetensors")
    image = next((data / "images" / "test").iterdir())
    monkeypatch.setattr(io_mod.os, "replace", lambda *a: (_ for _ in ()).throw(OSError(errno.EROFS, "ro")))
    status = main(["predict", str(image), "--weights", str(weights), "--box", "0,0,90,90", "--device", "cpu",
                   "--json", str(tmp_path / "out.json")])
    line = _one_error_line(capsys.readouterr().err)
    assert status != 0 and "out.json" in line and "read-only" in line
    monkeypatch.setenv("STARALIGN_DEBUG", "1")  # the traceback, when asked for
    with pytest.raises(OSError):
        main(["predict", str(image), "--weights", str(weights), "--box", "0,0,90,90", "--device", "cpu",
              "--json", str(tmp_path / "out.json")])
    assert os.environ["STARALIGN_DEBUG"] == "1"
