"""One rule for every file the project writes: atomic for regular files, written through for
devices and FIFOs, symlinks followed (the link stays a link), inputs never replaced, disk
errors as one line."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest

from staralign._io import WriteError, atomic_path, atomic_write, avoid_inputs
from staralign.cli import main


def test_a_symlink_stays_a_symlink_and_its_target_is_written(tmp_path):
    target = tmp_path / "real.json"
    target.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    atomic_write(link, "new")
    assert link.is_symlink(), "the atomic rename replaced the link itself"
    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.json", "real.json"]  # no temporary left


def test_a_symlink_to_a_device_keeps_the_device(tmp_path):
    # The device itself is never at risk here: a link to /dev/null, which must stay a link.
    link = tmp_path / "out.json"
    link.symlink_to(os.devnull)
    atomic_write(link, "{}")
    assert link.is_symlink()
    assert stat.S_ISCHR(os.stat(os.devnull).st_mode)


def test_a_fifo_is_written_through_not_replaced(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got: list[bytes] = []

    def reader() -> None:
        with open(fifo, "rb") as fh:
            got.append(fh.read())

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    try:
        atomic_write(fifo, "hello")
    finally:
        t.join(timeout=10)
        if t.is_alive():  # the old code never opened the FIFO: unblock the reader, still waiting to open it
            # Non-blocking: a plain open would wait forever if the reader finished in between.
            with contextlib.suppress(OSError):
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            t.join(timeout=10)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode), "the FIFO was replaced by a regular file"
    assert got == [b"hello"]


def test_disk_errors_are_one_line_naming_the_file(tmp_path):
    path = tmp_path / "out.bin"
    for code, words in ((errno.ENOSPC, "no space left"), (errno.EROFS, "read-only"),
                        (errno.EACCES, "permission denied")):
        with pytest.raises(WriteError) as info, atomic_path(path):
            raise OSError(code, os.strerror(code))
        assert str(path) in str(info.value) and words in str(info.value) and "\n" not in str(info.value)
    # torch's zip writer reports a full disk as "unexpected pos" without an errno.
    with pytest.raises(WriteError, match="full disk"), atomic_path(path):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 128 vs 64")
    assert list(tmp_path.iterdir()) == []


def test_avoid_inputs_picks_another_name(tmp_path):
    a = tmp_path / "a.jpg"
    a.write_bytes(b"x")
    (tmp_path / "a.annotated.jpg").write_bytes(b"y")
    assert avoid_inputs(a, {a.resolve()}) == tmp_path / "a.annotated.jpg"
    assert avoid_inputs(a, {a.resolve(), (tmp_path / "a.annotated.jpg").resolve()}) == \
        tmp_path / "a.annotated_2.jpg"
    assert avoid_inputs(tmp_path / "b.jpg", {a.resolve()}) == tmp_path / "b.jpg"


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory) -> Path:
    from staralign.config import ModelConfig
    from staralign.models import build_model, save_model

    cfg = ModelConfig(definition="WFLW", nstack=1, nlevels=1, channels=8, stem_channels=(4, 8), input_size=32)
    return save_model(build_model(cfg), tmp_path_factory.mktemp("w") / "tiny.safetensors")


def _photo(path: Path) -> bytes:
    rng = np.random.default_rng(0)
    cv2.imwrite(str(path), rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
    return path.read_bytes()


def test_predict_out_dir_dot_never_replaces_the_photo(tmp_path, monkeypatch, tiny_weights, capsys):
    monkeypatch.chdir(tmp_path)
    original = _photo(tmp_path / "takeo.jpg")
    status = main(["predict", "takeo.jpg", "--weights", str(tiny_weights), "--box", "4,4,60,44",
                   "--out-dir", ".", "--device", "cpu"])
    err = capsys.readouterr().err
    assert status == 0, err
    assert (tmp_path / "takeo.jpg").read_bytes() == original, "the input photo was overwritten"
    assert (tmp_path / "takeo.annotated.jpg").is_file()
    assert "takeo.jpg is an input" in err


def test_predict_on_a_folder_into_its_parent_never_replaces_inputs(tmp_path, monkeypatch, tiny_weights, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "photos").mkdir()
    originals = {n: _photo(tmp_path / "photos" / n) for n in ("a.png", "b.jpg")}
    status = main(["predict", "photos", "--weights", str(tiny_weights), "--box", "4,4,60,44",
                   "--out-dir", ".", "--device", "cpu"])
    assert status == 0, capsys.readouterr().err
    for name, data in originals.items():
        assert (tmp_path / "photos" / name).read_bytes() == data, name
    assert sorted(p.name for p in (tmp_path / "photos").iterdir()) == [
        "a.annotated.png", "a.png", "b.annotated.jpg", "b.jpg"]


def test_predict_json_through_a_link_to_dev_null_keeps_the_device(tmp_path, tiny_weights, capsys):
    # `--json /dev/null` as root replaced the device; through a link a regression costs the link only.
    photo, link = tmp_path / "p.jpg", tmp_path / "null.json"
    _photo(photo)
    link.symlink_to(os.devnull)
    status = main(["predict", str(photo), "--weights", str(tiny_weights), "--box", "4,4,60,44",
                   "--json", str(link), "--device", "cpu"])
    assert status == 0, capsys.readouterr().err
    assert link.is_symlink() and stat.S_ISCHR(os.stat(link).st_mode)


def test_predict_refuses_a_json_report_onto_an_input(tmp_path, tiny_weights, capsys):
    photo = tmp_path / "p.jpg"
    original = _photo(photo)
    status = main(["predict", str(photo), "--weights", str(tiny_weights), "--box", "4,4,60,44",
                   "--json", str(photo), "--device", "cpu"])
    assert status != 0
    assert "is one of the inputs" in capsys.readouterr().err
    assert photo.read_bytes() == original


def test_export_and_test_refuse_to_write_over_the_weights(tiny_weights, tmp_path, capsys):
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(tiny_weights.read_bytes())
    before = weights.read_bytes()
    assert main(["export", "--weights", str(weights), "--onnx", str(weights)]) != 0
    assert "is the --weights file" in capsys.readouterr().err
    assert main(["test", "--weights", str(weights), "--annot-dir", str(tmp_path), "--json", str(weights)]) != 0
    assert "is one of the --weights files" in capsys.readouterr().err
    assert weights.read_bytes() == before


def test_predict_into_a_folder_it_cannot_write_is_one_line(tmp_path, tiny_weights, capsys, monkeypatch):
    import staralign._io as io

    photo = tmp_path / "p.jpg"
    _photo(photo)

    def read_only(*_a, **_k):  # what the atomic rename meets on a read-only file system
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(io.os, "replace", read_only)
    status = main(["predict", str(photo), "--weights", str(tiny_weights), "--box", "4,4,60,44",
                   "--out-dir", str(tmp_path / "out"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert status != 0 and "Traceback" not in err
    (line,) = [x for x in err.splitlines() if "error:" in x]
    assert line.startswith(f"staralign predict: error: cannot write {tmp_path / 'out' / 'p.jpg'}: ")
    assert "read-only" in line
    assert [p.name for p in (tmp_path / "out").iterdir()] == []  # the annotated copy is written atomically


def test_export_by_model_name_refuses_the_cached_file_and_has_no_traceback(tmp_path, capsys, monkeypatch):
    """--weights given as a name (or left out) is resolved before the output check: an --onnx onto
    the cached file is refused, and an existing --onnx is no crash (it once compared with None)."""
    from staralign.hub import cached_path

    cache = tmp_path / "cache"
    monkeypatch.setenv("STARALIGN_CACHE", str(cache))
    cached = cached_path("wflw")
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_bytes(b"not really weights")
    assert main(["export", "--onnx", str(cached)]) != 0
    err = capsys.readouterr().err
    assert "is the --weights file" in err and "Traceback" not in err
    existing = tmp_path / "old.onnx"
    existing.write_bytes(b"an earlier export")
    assert main(["export", "--onnx", str(existing)]) != 0  # the cached file is no checkpoint: one line
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error:" in err
