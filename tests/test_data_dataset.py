"""The dataset: geometry on real pixels, flips, reproducibility, targets and errors."""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from staralign.data.annotations import Annotation, AnnotationError, write_annotations
from staralign.data.dataset import (
    DataWarning,
    LandmarkDataset,
    collate_samples,
    find_annotation_file,
    worker_init_fn,
)
from staralign.data.images import ImageReadError, read_image
from staralign.data.targets.edges import edge_maps
from staralign.data.targets.points import point_maps, point_maps_torch
from staralign.data.transforms import (
    GeometryAugment,
    TextureAugment,
    crop_matrix,
    crop_to_image,
    normalize_image,
    normalize_points,
)
from staralign.definitions import LandmarkDefinition, get_definition

NO_TEXTURE = TextureAugment(0.0, 0.0, 0.0, 0.0, 0.0)

# Six points in mirrored pairs plus an edge, small enough to reason about.
TOY = LandmarkDefinition.from_dict({
    "name": "toy", "num_points": 6,
    "edges": [{"closed": False, "indices": [0, 4, 5, 1]}, {"closed": True, "indices": [2, 4, 3, 5]}],
    "flip_pairs": [[0, 1], [2, 3]], "flip_x_offset": -1,
    "nme_default": {"left": 0, "right": 1},
})


def _toy_landmarks(w: int) -> np.ndarray:
    c = (w - 1) / 2.0
    return np.array([[c - 90, 150], [c + 90, 150], [c - 50, 230], [c + 50, 230], [c, 120], [c, 300]],
                    np.float32)


def _write(tmp: Path, images: list[np.ndarray], landmarks: list[np.ndarray], tags=None,
           name: str = "train.tsv") -> Path:
    anns = []
    for i, (img, lm) in enumerate(zip(images, landmarks, strict=True)):
        cv2.imwrite(str(tmp / f"{i}.png"), img)
        (x0, y0), (x1, y1) = lm.min(0), lm.max(0)
        anns.append(Annotation(f"{i}.png", lm, float(max(x1 - x0, y1 - y0) / 200 * 1.3),
                               (float(x0 + x1) / 2, float(y0 + y1) / 2),
                               tags=tuple(tags[i]) if tags else ()))
    write_annotations(tmp / name, anns)
    return tmp / name


def _dot_image(w: int, h: int, pts: np.ndarray) -> np.ndarray:
    img = np.full((h, w, 3), 20, np.uint8)
    for x, y in np.round(pts).astype(int):
        img[y - 4:y + 5, x - 4:x + 5] = 255
    return img


# --------------------------------------------------------------------------- geometry


def test_train_landmarks_land_on_the_warped_dots(tmp_path):
    rng = np.random.default_rng(0)
    images, lms = [], []
    for _ in range(3):
        lm = _toy_landmarks(420) + rng.uniform(-20, 20, (1, 2)).astype(np.float32)
        lm = np.round(lm)
        images.append(_dot_image(420, 380, lm))
        lms.append(lm)
    tsv = _write(tmp_path, images, lms)
    ds = LandmarkDataset(tsv, tmp_path, TOY, train=True, targets="device", texture=NO_TEXTURE)
    flips = set()
    for epoch in range(6):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            s = ds[i]
            flips.add(s["flipped"])
            img = s["image"].numpy()  # (3, S, S) in [-1, 1]
            for x, y in s["points"].numpy():
                xi, yi = int(round(x)), int(round(y))
                if 2 <= xi < 254 and 2 <= yi < 254:
                    assert img[:, yi, xi].min() > 0.5, (epoch, i, x, y)
            # And the crop is dark away from the dots.
            assert (img[0] < -0.5).mean() > 0.5
    assert flips == {True, False}


def test_flip_of_a_symmetric_face_is_consistent(tmp_path):
    w = 401
    lm = _toy_landmarks(w)
    img = _dot_image(w, 380, lm)
    img[:, :, 1] = np.arange(w)[None, :].clip(0, 255) // 3 + (np.arange(w)[::-1][None, :].clip(0, 255) // 3)
    assert np.array_equal(img, img[:, ::-1])  # mirror symmetric about (w - 1) / 2
    tsv = _write(tmp_path, [img], [lm])
    still = GeometryAugment(0.0, 0.0, 0.0)
    ds = LandmarkDataset(tsv, tmp_path, TOY, train=True, targets="device", texture=NO_TEXTURE, geometry=still)
    seen = {}
    for epoch in range(20):
        ds.set_epoch(epoch)
        s = ds[0]
        seen.setdefault(s["flipped"], s)
        if len(seen) == 2:
            break
    plain, flipped = seen[False], seen[True]
    # Mirroring a symmetric face and swapping the pairs changes nothing.
    assert torch.allclose(flipped["points"], plain["points"], atol=1e-3)
    assert (flipped["image"] - plain["image"]).abs().max() <= 2 / 127.5
    # The flipped matrix maps the flipped (permuted) annotation onto the same crop points.
    perm = TOY.flip_permutation()
    back = crop_to_image(flipped["points"].double(), flipped["matrix"].double()).numpy()
    assert np.allclose(back, lm[perm], atol=1e-2)


def test_test_mode_is_the_plain_crop(tmp_path):
    lm = _toy_landmarks(300) + np.float32(3.3)
    tsv = _write(tmp_path, [_dot_image(300, 300, lm)], [lm])
    ds = LandmarkDataset(tsv, tmp_path, TOY, train=False)
    a = ds.items[0]
    s = ds[0]
    assert np.allclose(s["matrix"].numpy(), crop_matrix(a.scale, *a.center, 256))
    assert not s["flipped"]
    assert np.allclose(crop_to_image(s["points"].numpy(), s["matrix"].numpy()), lm, atol=1e-3)
    assert torch.allclose(s["landmarks"], torch.from_numpy(normalize_points(s["points"].numpy())))
    ds.set_epoch(5)
    assert torch.equal(ds[0]["image"], s["image"])


# --------------------------------------------------------------------------- reproducibility


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)


def test_samples_depend_on_seed_epoch_index_only(tmp_path):
    rng = np.random.default_rng(1)
    lms = [np.round(_toy_landmarks(320) + rng.uniform(-10, 10, (1, 2)).astype(np.float32)) for _ in range(4)]
    tsv = _write(tmp_path, [rng.integers(0, 256, (300, 320, 3), dtype=np.uint8) for _ in lms], lms)
    ds = LandmarkDataset(tsv, tmp_path, TOY, train=True, seed=3)
    ds.set_epoch(2)
    first = [ds[i] for i in range(4)]
    again = LandmarkDataset(tsv, tmp_path, TOY, train=True, seed=3)
    again.set_epoch(2)
    assert all(_same(first[i], again[i]) for i in (3, 1, 0, 2))  # any order
    again.set_epoch(3)
    assert not _same(first[1], again[1])
    other_seed = LandmarkDataset(tsv, tmp_path, TOY, train=True, seed=4)
    other_seed.set_epoch(2)
    assert not _same(first[1], other_seed[1])
    # Worker processes produce the very same samples, and persistent ones follow set_epoch.
    loader = DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate_samples,
                        worker_init_fn=worker_init_fn, persistent_workers=True)
    for epoch in (2, 3):
        ds.set_epoch(epoch)
        direct = collate_samples([ds[i] for i in range(4)])
        batches = list(loader)
        for key in ("image", "points", "pointmaps", "edgemaps", "matrix"):
            assert torch.equal(torch.cat([b[key] for b in batches]), direct[key]), (epoch, key)
    assert not torch.equal(direct["points"], collate_samples(first)["points"])


# --------------------------------------------------------------------------- targets


def test_worker_and_device_targets_agree(tmp_path):
    d = get_definition("COFW")
    rng = np.random.default_rng(2)
    base = rng.uniform(150, 250, (29, 2)).astype(np.float32)
    tsv = _write(tmp_path, [rng.integers(0, 256, (400, 400, 3), dtype=np.uint8)] * 2, [base, base + 5])
    worker = LandmarkDataset(tsv, tmp_path, d, train=True, targets="worker")
    device = LandmarkDataset(tsv, tmp_path, d, train=True, targets="device")
    a = collate_samples([worker[0], worker[1]])
    b = collate_samples([device[0], device[1]])
    assert "pointmaps" not in b and torch.equal(a["points"], b["points"])
    assert a["pointmaps"].shape == (2, 29, 64, 64) and a["edgemaps"].shape == (2, 7, 64, 64)
    assert torch.allclose(point_maps_torch(b["points"]), a["pointmaps"], atol=1e-6)
    assert np.allclose(a["edgemaps"][1].numpy(), edge_maps(a["points"][1].numpy(), d))
    assert np.allclose(a["pointmaps"][0].numpy(), point_maps(a["points"][0].numpy()))


def test_mixed_targets_and_8bit_images_are_exact(tmp_path):
    # The trainer's "mixed" mode: edge maps from the workers, 8-bit crops normalised later;
    # the sample must be the float path's to the last bit.
    d = get_definition("COFW")
    rng = np.random.default_rng(3)
    base = rng.uniform(150, 250, (29, 2)).astype(np.float32)
    tsv = _write(tmp_path, [rng.integers(0, 256, (400, 400, 3), dtype=np.uint8)], [base])
    full = LandmarkDataset(tsv, tmp_path, d, train=True, targets="worker")
    mixed = LandmarkDataset(tsv, tmp_path, d, train=True, targets="mixed", image_dtype="uint8")
    a, b = collate_samples([full[0]]), collate_samples([mixed[0]])
    assert b["image"].dtype == torch.uint8 and "pointmaps" not in b
    assert torch.equal(normalize_image(b["image"]), a["image"])
    assert torch.equal(b["edgemaps"], a["edgemaps"]) and torch.equal(b["points"], a["points"])
    assert torch.allclose(point_maps_torch(b["points"]), a["pointmaps"], atol=1e-6)
    assert normalize_image(a["image"]) is a["image"]  # float input passes through
    with pytest.raises(ValueError, match="image_dtype"):
        LandmarkDataset(tsv, tmp_path, d, train=True, image_dtype="float16")


# --------------------------------------------------------------------------- errors


def _tsv_lines(tmp: Path, rows: list[str]) -> Path:
    p = tmp / "rows.tsv"
    p.write_text("image_path\tlandmarks_5pts\tlandmarks_target\tscale\tcenter_w\tcenter_h\n"
                 + "\n".join(rows) + "\n", encoding="utf-8")
    return p


def _row(name: str, n: int = 6, scale: str = "1.0") -> str:
    return "\t".join([name, "", ",".join(["10"] * (2 * n)), scale, "50", "50"])


def test_bad_rows_name_file_line_and_field(tmp_path):
    p = _tsv_lines(tmp_path, [_row("a.png"), _row("b.png", n=5), _row("c.png", scale="x")])
    with pytest.raises(AnnotationError) as err:
        LandmarkDataset(p, tmp_path, TOY, train=False)
    assert str(p) in str(err.value) and ":3:" in str(err.value) and "landmarks_target" in str(err.value)
    with pytest.warns(DataWarning, match="skipped 2 bad row"):
        ds = LandmarkDataset(p, tmp_path, TOY, train=False, skip_bad_rows=True)
    assert len(ds) == 1 and [e.line for e in ds.skipped] == [3, 4]
    assert ds.skipped[1].field == "scale"


def test_bad_images_name_image_and_row(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not an image at all")
    p = _tsv_lines(tmp_path, [_row("missing.png"), _row("broken.png")])
    ds = LandmarkDataset(p, tmp_path, TOY, train=True)
    with pytest.raises(ImageReadError) as err:
        ds[0]
    msg = str(err.value)
    assert "missing.png" in msg and f"{p}:2" in msg and "no such file" in msg
    with pytest.raises(ImageReadError, match=r"broken\.png.*rows\.tsv:3.*not a readable image"):
        ds[1]


def test_grey_alpha_and_16_bit_images_become_bgr8(tmp_path):
    grey = np.arange(60, dtype=np.uint8).reshape(6, 10)
    cv2.imwrite(str(tmp_path / "g.png"), grey)
    rgba = np.zeros((6, 10, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 50
    cv2.imwrite(str(tmp_path / "a.png"), rgba)
    deep = (np.arange(60, dtype=np.uint16).reshape(6, 10) * 1000)
    cv2.imwrite(str(tmp_path / "d.png"), deep)
    g, a, d = (read_image(tmp_path / f"{n}.png") for n in "gad")
    for img in (g, a, d):
        assert img.shape == (6, 10, 3) and img.dtype == np.uint8
    assert np.array_equal(g[..., 0], grey) and np.array_equal(g[..., 2], grey)
    assert np.all(a[..., 0] == 200) and np.all(a[..., 1] == 0)
    assert np.array_equal(d[..., 1], (deep >> 8).astype(np.uint8))


def test_find_annotation_file(tmp_path):
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "train.tsv").write_text("x")
    (tmp_path / "nested" / "WFLW").mkdir(parents=True)
    (tmp_path / "nested" / "WFLW" / "test.tsv").write_text("x")
    assert find_annotation_file(tmp_path / "flat", "WFLW", "train.tsv") == tmp_path / "flat" / "train.tsv"
    assert find_annotation_file(tmp_path / "nested", "wflw", "test.tsv") == tmp_path / "nested" / "WFLW" / "test.tsv"
    with pytest.raises(FileNotFoundError, match="train.tsv"):
        find_annotation_file(tmp_path / "nested", "WFLW", "train.tsv")


def test_collate_pads_ragged_tags(tmp_path):
    lm = _toy_landmarks(300)
    tsv = _write(tmp_path, [_dot_image(300, 300, lm)] * 2, [lm, lm], tags=[(1, 0, 1), (0, 1, 0)])
    ds = LandmarkDataset(tsv, tmp_path, TOY, train=False)
    b = collate_samples([ds[0], ds[1]])
    assert b["tags"].tolist() == [[1, 0, 1], [0, 1, 0]]
    assert b["index"].tolist() == [0, 1] and b["image"].shape == (2, 3, 256, 256)
    s = ds[0]
    s["tags"] = torch.tensor([1])
    assert collate_samples([s, ds[1]])["tags"].tolist() == [[1, -1, -1], [0, 1, 0]]


def test_wrong_definition_is_refused(tmp_path):
    lm = _toy_landmarks(300)
    tsv = _write(tmp_path, [_dot_image(300, 300, lm)], [lm])
    with pytest.raises(AnnotationError, match="expected 196 numbers"):
        LandmarkDataset(tsv, tmp_path, "WFLW", train=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(LandmarkDataset(tsv, tmp_path, TOY, train=False)) == 1


# --------------------------------------------------------------------------- stored samples


# Computed from the samples below before __getitem__ was streamlined: any change to how a
# sample is drawn (random streams, order of draws, dtypes) changes it.  Pixels are compared
# exactly; coordinates rounded, so that BLAS rounding on another CPU cannot change it.
STORED_SAMPLES_SHA256 = "c995c6cf9f34abe4e3bd40f1131dbffc95d2ef01d8a1b4314b0e1db885b41350"


def _samples_fingerprint(tmp: Path) -> str:
    rng = np.random.default_rng(7)
    anns = []
    for i in range(3):
        cv2.imwrite(str(tmp / f"{i}.png"), rng.integers(0, 256, (180, 200, 3), dtype=np.uint8))
        anns.append(Annotation(f"{i}.png", rng.uniform(50, 130, (29, 2)).astype(np.float32), 0.6,
                               (90.0 + i, 95.0)))
    write_annotations(tmp / "stored.tsv", anns)
    ds = LandmarkDataset(tmp / "stored.tsv", tmp, "COFW", train=True, seed=5, input_size=64,
                         targets="device", image_dtype="uint8")
    h = hashlib.sha256()
    for epoch in range(4):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            s = ds[i]
            h.update(s["image"].numpy().tobytes())
            h.update(np.round(s["points"].numpy().astype(np.float64), 3).tobytes())
            h.update(np.round(s["matrix"].numpy().astype(np.float64), 4).tobytes())
            h.update(bytes([s["flipped"], s["index"]]))
    return h.hexdigest()


def test_samples_equal_the_stored_ones(tmp_path):
    assert _samples_fingerprint(tmp_path) == STORED_SAMPLES_SHA256
