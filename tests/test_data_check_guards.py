"""``data check`` refuses decompression bombs from their headers (as ``predict`` does) and
calls an empty annotation file an error."""

from __future__ import annotations

import shutil
import struct
import zlib
from pathlib import Path

import pytest

from staralign.cli import main


def _png(width: int, height: int) -> bytes:
    """A real, decodable grey PNG of width x height (zeros compress to almost nothing)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = (b"\0" + b"\0" * width) * height
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw, 9))
            + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    from staralign.data.synth import generate_dataset

    out = tmp_path_factory.mktemp("synth")
    generate_dataset(out, train=4, test=2, ambiguity=0.0, seed=5, size=96)
    return out


def test_a_bomb_is_refused_from_its_header_not_decoded(pristine, tmp_path, capsys, monkeypatch):
    data = tmp_path / "data"
    shutil.copytree(pristine, data)
    first = (data / "test.tsv").read_text().splitlines()[1]
    # 20001 px wide: over predict's 20000-a-side limit, yet a tiny, valid file OpenCV decodes.
    (data / "bomb.png").write_bytes(_png(20001, 96))
    (data / "one.tsv").write_text(first.replace(first.split("\t")[0], "bomb.png", 1) + "\n")

    import cv2

    decoded = []
    real = cv2.imdecode
    monkeypatch.setattr(cv2, "imdecode", lambda *a: decoded.append(1) or real(*a))
    status = main(["data", "check", str(data / "one.tsv"), "--image-dir", str(data)])
    out = capsys.readouterr().out
    assert status == 1
    assert "bomb.png" in out and "too large" in out, out
    assert decoded == [], "the bomb was decoded before it was refused"


HEADER = "image_path\tlandmarks_5pts\tlandmarks_target\tscale\tcenter_w\tcenter_h\n"


@pytest.mark.parametrize("text", ["", "\n\n", HEADER])
def test_an_empty_or_header_only_file_is_an_error(tmp_path, capsys, text):
    path = tmp_path / "empty.tsv"
    path.write_text(text)
    status = main(["data", "check", str(path)])
    out = capsys.readouterr()
    assert status == 1
    assert "no annotation rows" in out.out + out.err
