"""``staralign data check``: every kind of problem found in one pass, with file and line."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from staralign.cli import main
from staralign.data.annotations import AnnotationError, read_annotations
from staralign.data.check import check_dataset

HEADER = "image_path\tlandmarks_5pts\tlandmarks_target\tscale\tcenter_w\tcenter_h\n"


def _face(rng: np.random.Generator, n: int = 29) -> np.ndarray:
    return rng.uniform(60, 140, (n, 2)).round(2)


def _row(image: str, lm: np.ndarray, scale: float | None = None, centre=None) -> str:
    (x0, y0), (x1, y1) = np.nanmin(lm, 0), np.nanmax(lm, 0)
    scale = max(x1 - x0, y1 - y0) / 200 * 1.1 if scale is None else scale
    cw, ch = ((x0 + x1) / 2, (y0 + y1) / 2) if centre is None else centre
    return "\t".join([image, "", ",".join(f"{v:g}" for v in lm.reshape(-1)), f"{scale:g}", f"{cw:g}", f"{ch:g}"])


def _dataset(tmp: Path, rows: list[str]) -> Path:
    p = tmp / "annot.tsv"
    p.write_text(HEADER + "\n".join(rows) + "\n", encoding="utf-8")
    return p


def _images(tmp: Path, names: list[str]) -> None:
    rng = np.random.default_rng(0)
    for n in names:
        cv2.imwrite(str(tmp / n), rng.integers(0, 256, (200, 200, 3), dtype=np.uint8))


def test_clean_dataset_passes(tmp_path, capsys):
    rng = np.random.default_rng(1)
    _images(tmp_path, ["a.png", "b.png"])
    p = _dataset(tmp_path, [_row("a.png", _face(rng)), _row("b.png", _face(rng))])
    assert main(["data", "check", str(p), "--image-dir", str(tmp_path), "--definition", "COFW"]) == 0
    assert "2 row(s), no problems found" in capsys.readouterr().out


def test_every_problem_is_reported(tmp_path, capsys):
    rng = np.random.default_rng(2)
    _images(tmp_path, ["ok.png", "far.png", "dup.png", "scale.png", "centre.png"])
    shutil.copy(tmp_path / "dup.png", tmp_path / "copy.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG but not really")
    ok, dup = _face(rng), _face(rng)
    far = _face(rng)
    far[3] = (900.0, 100.0)
    with_nan = _face(rng)
    with_nan[5, 1] = np.nan
    short = _face(rng)[:28]
    rows = [
        _row("ok.png", ok),                                  # line 2: fine
        _row("ok.png", short),                               # 3: 28 points
        _row("ok.png", with_nan),                            # 4: NaN
        _row("missing.png", _face(rng)),                     # 5: no such file
        _row("broken.png", _face(rng)),                      # 6: unreadable
        _row("far.png", far),                                # 7: point far outside
        _row("ok.png", ok),                                  # 8: duplicate of line 2
        _row("dup.png", dup),                                # 9
        _row("copy.png", dup),                               # 10: same content as dup.png, same face
        _row("scale.png", _face(rng), scale=40.0),           # 11: crop 8000 px
        _row("centre.png", _face(rng), centre=(400.0, 100.0)),  # 12: centre far away
    ]
    p = _dataset(tmp_path, rows)
    status = main(["data", "check", str(p), "--image-dir", str(tmp_path), "--definition", "COFW"])
    out, err = capsys.readouterr()
    assert status == 1
    expect = {
        3: "field 'landmarks_target': expected 58 numbers",
        4: "NaN",
        5: "missing.png: no such file",
        6: "broken.png: not a readable image",
        7: "1 point(s) more than",
        8: "duplicate of line 2",
        10: "same content as dup.png (line 9)",
        11: "field 'scale'",
        12: "field 'center_w'",
    }
    lines = out.splitlines()
    for line, text in expect.items():
        hits = [x for x in lines if x.startswith(f"{p}:{line}:")]
        assert any(text in h for h in hits), (line, text, hits)
    assert not any(x.startswith(f"{p}:2:") or x.startswith(f"{p}:9:") for x in lines)
    assert "problem(s) in 9 row(s) of 11" in err


def test_counts_without_a_definition_use_the_majority(tmp_path):
    rng = np.random.default_rng(3)
    _images(tmp_path, ["a.png"])
    p = _dataset(tmp_path, [_row("a.png", _face(rng, 10)), _row("a.png", _face(rng, 10)),
                            _row("a.png", _face(rng, 9))])
    problems, nrows = check_dataset(p, tmp_path)
    assert nrows == 3 and [(x.line, x.field) for x in problems] == [(4, "landmarks_target")]
    problems, _ = check_dataset(p, tmp_path, check_images=False)
    assert len(problems) == 1


def test_reading_skips_rows_off_the_majority_count(tmp_path, capsys):
    rng = np.random.default_rng(4)
    rows = [_row("a.png", _face(rng, 9)), _row("b.png", _face(rng, 10)), _row("c.png", _face(rng, 10)),
            _row("d.png", _face(rng, 10), scale=-1.0), _row("e.png", _face(rng, 8))]
    p = _dataset(tmp_path, rows[:2])
    with pytest.raises(AnnotationError, match=r":3: field 'landmarks_target': 10 points here but 9 on line 2"):
        read_annotations(p)  # without skipping, mixed counts still fail
    p = _dataset(tmp_path, rows)
    file = read_annotations(p, skip_bad_rows=True)
    assert [a.image_path for a in file] == ["b.png", "c.png"]
    assert [(e.source, e.line, e.field) for e in file.skipped] == [
        (str(p), 2, "landmarks_target"), (str(p), 5, "scale"), (str(p), 6, "landmarks_target")]
    assert "9 points, but 2 of 4 rows have 10" in str(file.skipped[0])
    # The check reports them all, each with file and line.
    assert main(["data", "check", str(p), "--no-images"]) == 1
    out, err = capsys.readouterr()
    assert [x.split(": ")[0] for x in out.splitlines()] == [f"{p}:{n}" for n in (2, 5, 6)]
    assert "3 problem(s) in 3 row(s) of 5" in err


def test_missing_annotation_file(tmp_path, capsys):
    assert main(["data", "check", str(tmp_path / "nope.tsv")]) == 2
    assert "no such annotation file" in capsys.readouterr().err
