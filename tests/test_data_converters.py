"""Converters from the official downloads, on small fixture files the tests write themselves."""

from __future__ import annotations

from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest

from staralign.cli import main
from staralign.data.annotations import read_annotations
from staralign.data.converters import (
    RawFormatError,
    box_to_crop,
    convert_300w,
    convert_cofw,
    convert_wflw,
    read_pts,
)
from staralign.definitions import get_definition

# --------------------------------------------------------------------------- WFLW


def _wflw_line(rng: np.random.Generator, flags: tuple[int, ...], path: str) -> tuple[str, np.ndarray]:
    lm = rng.uniform(50, 150, (98, 2)).round(3)
    box = [40.0, 45.0, 160.0, 170.0]
    tokens = [f"{v:g}" for v in lm.reshape(-1)] + [f"{v:g}" for v in box] + [str(f) for f in flags] + [path]
    return " ".join(tokens), lm


def _wflw_raw(root: Path) -> dict[str, list]:
    folder = root / "WFLW_annotations" / "list_98pt_rect_attr_train_test"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    data = {}
    flags = {"train": [(0, 0, 0, 0, 0, 0), (1, 0, 0, 0, 0, 1)],
             "test": [(1, 0, 0, 0, 0, 0), (0, 1, 1, 0, 0, 0), (1, 0, 0, 1, 1, 1)]}
    for split, fl in flags.items():
        lines = [_wflw_line(rng, f, f"51--Dresses/img_{split}_{i}.jpg") for i, f in enumerate(fl)]
        (folder / f"list_98pt_rect_attr_{split}.txt").write_text("\n".join(t for t, _ in lines) + "\n")
        data[split] = [(lm, f) for (_, lm), f in zip(lines, fl, strict=True)]
    return data


def test_wflw_conversion(tmp_path):
    raw = tmp_path / "WFLW"
    data = _wflw_raw(raw)
    out = tmp_path / "annot"
    counts = convert_wflw(raw, out)
    assert counts["train.tsv"] == 2 and counts["test.tsv"] == 3
    assert {k: v for k, v in counts.items() if k.startswith("test_")} == {
        "test_pose.tsv": 2, "test_expression.tsv": 1, "test_illumination.tsv": 1,
        "test_makeup.tsv": 1, "test_occlusion.tsv": 1, "test_blur.tsv": 1}
    test = read_annotations(out / "test.tsv", 98)
    lm, flags = data["test"][2]
    a = test[2]
    assert np.allclose(a.landmarks, lm, atol=1e-4) and a.tags == flags
    assert a.image_path == "51--Dresses/img_test_2.jpg"
    assert a.scale == pytest.approx(min(120, 125) / 200 * 1.05)
    assert a.center == pytest.approx((100.0, 107.5))
    d = get_definition("WFLW")
    assert np.allclose(a.five_points[0], lm[96]) and np.allclose(a.five_points[3], lm[76])
    blur = read_annotations(out / "test_blur.tsv", 98)
    assert [x.image_path for x in blur] == ["51--Dresses/img_test_2.jpg"]
    assert d.num_points == 98
    # The annotation folder itself works as RAW_DIR.
    assert convert_wflw(raw / "WFLW_annotations", tmp_path / "again")["test.tsv"] == 3


def test_wflw_errors_name_file_line_and_field(tmp_path):
    raw = tmp_path / "raw"
    _wflw_raw(raw)
    f = raw / "WFLW_annotations" / "list_98pt_rect_attr_train_test" / "list_98pt_rect_attr_train.txt"
    lines = f.read_text().splitlines()
    tokens = lines[1].split()
    tokens[7] = "abc"  # landmark 3, y
    f.write_text("\n".join([lines[0], " ".join(tokens)]) + "\n")
    with pytest.raises(RawFormatError, match=r"list_98pt_rect_attr_train\.txt:2: field 'landmark 3 y'"):
        convert_wflw(raw, tmp_path / "out")
    tokens = lines[1].split()
    tokens[200] = "7"  # first attribute flag
    f.write_text(" ".join(tokens) + "\n")
    with pytest.raises(RawFormatError, match=r":1: field 'attribute pose'"):
        convert_wflw(raw, tmp_path / "out")
    f.write_text(" ".join(tokens[:-3]) + "\n")
    with pytest.raises(RawFormatError, match=r":1: expected 207"):
        convert_wflw(raw, tmp_path / "out")


# --------------------------------------------------------------------------- 300W


def _pts_text(lm: np.ndarray) -> str:
    return "version: 1\nn_points: 68\n{\n" + "\n".join(f"{x:.3f} {y:.3f}" for x, y in lm) + "\n}\n"


def _300w_raw(root: Path) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    layout = {"lfpw/trainset": 2, "lfpw/testset": 1, "helen/trainset": 2, "helen/testset": 1,
              "afw": 1, "ibug": 2}
    written = {}
    for folder, count in layout.items():
        (root / folder).mkdir(parents=True)
        for i in range(count):
            stem = f"image_{i:04d}" if folder != "afw" else f"1234_{i}"
            lm = rng.uniform(20, 80, (68, 2)).round(3)
            (root / folder / f"{stem}.pts").write_text(_pts_text(lm))
            ext = ".png" if folder.startswith("lfpw") else ".jpg"
            cv2.imwrite(str(root / folder / f"{stem}{ext}"), np.zeros((100, 100, 3), np.uint8))
            written[f"{folder}/{stem}{ext}"] = lm
    return written


def test_300w_conversion(tmp_path):
    raw = tmp_path / "300W"
    written = _300w_raw(raw)
    counts = convert_300w(raw, tmp_path / "annot")
    assert counts == {"train.tsv": 5, "test_common.tsv": 2, "test_challenge.tsv": 2, "test.tsv": 4}
    train = read_annotations(tmp_path / "annot" / "train.tsv", 68)
    assert [a.image_path for a in train] == ["lfpw/trainset/image_0000.png", "lfpw/trainset/image_0001.png",
                                            "helen/trainset/image_0000.jpg", "helen/trainset/image_0001.jpg",
                                            "afw/1234_0.jpg"]
    a = train[2]
    lm = written[a.image_path]
    assert np.allclose(a.landmarks, lm - 1, atol=1e-3)  # 1-based .pts -> 0-based pixels
    (x0, y0), (x1, y1) = (lm - 1).min(0), (lm - 1).max(0)
    assert a.scale == pytest.approx(min(x1 - x0, y1 - y0) / 200 * 1.05, rel=1e-5)
    assert a.center == pytest.approx(((x0 + x1) / 2, (y0 + y1) / 2), abs=1e-3)
    full = read_annotations(tmp_path / "annot" / "test.tsv", 68)
    assert [a.image_path.split("/")[0] for a in full] == ["lfpw", "helen", "ibug", "ibug"]
    kept = convert_300w(raw, tmp_path / "kept", one_based=False)
    assert kept["test.tsv"] == 4
    assert np.allclose(read_annotations(tmp_path / "kept" / "train.tsv", 68)[2].landmarks, lm, atol=1e-3)


def test_pts_errors(tmp_path):
    f = tmp_path / "x.pts"
    lm = np.ones((68, 2))
    text = _pts_text(lm).splitlines()
    text[10] = "12.0 oops"
    f.write_text("\n".join(text))
    with pytest.raises(RawFormatError, match=r"x\.pts:11: field 'point 7'"):
        read_pts(f, 68)
    f.write_text(_pts_text(lm).replace("n_points: 68", "n_points: 5"))
    with pytest.raises(RawFormatError, match=r"field 'n_points': expected 68"):
        read_pts(f, 68)
    f.write_text(_pts_text(lm).replace("}\n", ""))
    with pytest.raises(RawFormatError, match="no '}'"):
        read_pts(f)
    f.write_text(_pts_text(np.full((68, 2), 3.5)))
    assert np.array_equal(read_pts(f), np.full((68, 2), 3.5))


def test_300w_missing_image(tmp_path):
    raw = tmp_path / "300W"
    _300w_raw(raw)
    (raw / "ibug" / "image_0001.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"image_0001\.pts: no image"):
        convert_300w(raw, tmp_path / "annot")


# --------------------------------------------------------------------------- COFW


def _cofw_mat(path: Path, images: list[np.ndarray], phis: np.ndarray, boxes: np.ndarray,
              names: tuple[str, str, str]) -> None:
    """A MATLAB 7.3 file laid out as MATLAB writes it: a cell array of object references
    into '#refs#', every array stored transposed (column-major)."""
    with h5py.File(path, "w") as f:
        refs = f.create_group("#refs#")
        cell = f.create_dataset(names[0], (1, len(images)), dtype=h5py.ref_dtype)
        for i, img in enumerate(images):
            cell[0, i] = refs.create_dataset(f"img{i}", data=img.T).ref
        f.create_dataset(names[1], data=phis.T)
        f.create_dataset(names[2], data=boxes.T)


def _cofw_raw(root: Path) -> dict[str, tuple]:
    rng = np.random.default_rng(2)
    root.mkdir(parents=True)
    made = {}
    for split, fname, names in (("train", "COFW_train_color.mat", ("IsTr", "phisTr", "bboxesTr")),
                                ("test", "COFW_test_color.mat", ("IsT", "phisT", "bboxesT"))):
        colour = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)  # RGB, H x W
        grey = rng.integers(0, 256, (25, 35), dtype=np.uint8)
        phis = np.concatenate([rng.uniform(5, 25, (2, 58)), rng.integers(0, 2, (2, 29))], 1)
        boxes = np.array([[3.0, 4.0, 20.0, 18.0], [2.0, 2.0, 25.0, 20.0]])
        _cofw_mat(root / fname, [colour, grey], phis, boxes, names)
        made[split] = (colour, grey, phis, boxes)
    return made


def test_cofw_conversion(tmp_path):
    made = _cofw_raw(tmp_path / "COFW")
    out, images = tmp_path / "annot", tmp_path / "imgs"
    counts = convert_cofw(tmp_path / "COFW", out, images)
    assert counts == {"train.tsv": 2, "test.tsv": 2}
    colour, grey, phis, boxes = made["test"]
    png = cv2.imread(str(images / "test" / "0001.png"), cv2.IMREAD_UNCHANGED)
    assert np.array_equal(png, cv2.cvtColor(colour, cv2.COLOR_RGB2BGR))  # orientation and channels
    assert np.array_equal(cv2.imread(str(images / "test" / "0002.png"), cv2.IMREAD_UNCHANGED), grey)
    test = read_annotations(out / "test.tsv", 29)
    assert [a.image_path for a in test] == ["test/0001.png", "test/0002.png"]
    a = test[1]
    assert np.allclose(a.landmarks[:, 0], phis[1, :29] - 1, atol=1e-4)
    assert np.allclose(a.landmarks[:, 1], phis[1, 29:58] - 1, atol=1e-4)
    x, y, w, h = boxes[1]
    assert a.scale == pytest.approx(min(w, h) / 200 * 1.05)
    assert a.center == pytest.approx((x - 1 + w / 2, y - 1 + h / 2))
    assert a.five_points.shape == (5, 2)


def test_cofw_errors(tmp_path):
    _cofw_raw(tmp_path / "COFW")
    with h5py.File(tmp_path / "COFW" / "COFW_test_color.mat", "a") as f:
        del f["phisT"]
        f.create_dataset("phisT", data=np.zeros((80, 2)))
    with pytest.raises(RawFormatError, match=r"COFW_test_color\.mat: field 'phisT': expected shape \(2, 87\)"):
        convert_cofw(tmp_path / "COFW", tmp_path / "out")
    with h5py.File(tmp_path / "COFW" / "COFW_test_color.mat", "a") as f:
        del f["bboxesT"]
    with pytest.raises(RawFormatError, match="field 'bboxesT': variable missing"):
        convert_cofw(tmp_path / "COFW", tmp_path / "out")


def test_box_to_crop():
    scale, centre = box_to_crop(10, 20, 110, 220)
    assert scale == pytest.approx(100 / 200 * 1.05) and centre == (60.0, 120.0)


def test_convert_cli(tmp_path, capsys):
    _300w_raw(tmp_path / "300W")
    assert main(["data", "convert", "300w", str(tmp_path / "300W"), "--out", str(tmp_path / "a")]) == 0
    assert "test.tsv: 4 faces" in capsys.readouterr().out
    assert main(["data", "convert", "wflw", str(tmp_path / "nowhere"), "--out", str(tmp_path / "b")]) == 2
    assert "no such folder" in capsys.readouterr().err
