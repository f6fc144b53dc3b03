"""The synthetic face generator: determinism, landmarks on the drawn features, tags,
the STAR tsv output, and the semantic-ambiguity label model."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from staralign.data.annotations import five_points_from_landmarks, read_annotations
from staralign.data.synth import (
    CORNER_IDS,
    Occluder,
    add_arguments,
    ambiguous_landmarks,
    generate_dataset,
    make_sample,
    render_face,
    run,
    sample_params,
    tangents_from_landmarks,
)
from staralign.definitions import get_definition

WFLW = get_definition("WFLW")


def _params(i: int, seed: int = 123):
    return sample_params(np.random.default_rng([seed, 7, i]))


def _neutral_params(params):
    """The same face without lighting, blur, noise or occluders: the pure drawn colours, so
    landmarks can be checked against features of known colour."""
    return replace(params, light_strength=0.0, brightness=1.0, contrast=1.0,
                   tint=(1.0, 1.0, 1.0), shading=0.0, blur=0.0, motion_blur=False, noise=0.0,
                   occluders=())


# --------------------------------------------------------------------------- determinism


def test_same_seed_same_face_different_seed_different_face():
    img_a, lm_a, info_a = render_face(np.random.default_rng([5, 0, 3]))
    img_b, lm_b, info_b = render_face(np.random.default_rng([5, 0, 3]))
    assert img_a.dtype == np.uint8 and img_a.shape == (256, 256, 3)
    assert lm_a.dtype == np.float32 and lm_a.shape == (98, 2)
    assert img_a.tobytes() == img_b.tobytes()
    assert np.array_equal(lm_a, lm_b)
    assert info_a["tags"] == info_b["tags"]
    img_c, lm_c, _ = render_face(np.random.default_rng([6, 0, 3]))
    assert img_a.tobytes() != img_c.tobytes()
    assert not np.allclose(lm_a, lm_c)


def test_sample_depends_only_on_seed_split_and_index():
    a = make_sample(9, "train", 4, size=128, ambiguity=0.05)
    make_sample(9, "train", 0, size=128, ambiguity=0.05)  # other work in between
    b = make_sample(9, "train", 4, size=128, ambiguity=0.05)
    assert a[0].tobytes() == b[0].tobytes() and np.array_equal(a[1], b[1])
    test = make_sample(9, "test", 4, size=128, ambiguity=0.05)
    assert a[0].tobytes() != test[0].tobytes()  # the split is part of the seed
    # The label noise has its own stream: the image does not depend on the ambiguity.
    exact = make_sample(9, "train", 4, size=128, ambiguity=0.0)
    assert exact[0].tobytes() == a[0].tobytes()


def test_faces_vary():
    lms = np.stack([render_face(np.random.default_rng([1, 0, i]), 128)[1] for i in range(30)])
    centres = lms.mean(axis=1)
    sizes = lms.max(axis=1) - lms.min(axis=1)
    assert centres.std(axis=0).min() > 3.0  # the face moves around the image
    assert sizes.std(axis=0).min() > 2.0  # and changes size
    # shape varies too: landmarks normalised by their bounding box still differ
    norm = (lms - lms.min(axis=1, keepdims=True)) / sizes[:, None, :]
    assert norm.std(axis=0).mean() > 0.02


# --------------------------------------------------------------------------- landmarks on features


def _min_dist(img: np.ndarray, pt: np.ndarray, color, radius: float) -> float:
    """Smallest colour distance to ``color`` among pixels within ``radius`` of ``pt``."""
    x0, y0 = pt
    xs = np.arange(int(np.floor(x0 - radius)), int(np.ceil(x0 + radius)) + 1)
    ys = np.arange(int(np.floor(y0 - radius)), int(np.ceil(y0 + radius)) + 1)
    xx, yy = np.meshgrid(xs, ys)
    keep = ((xx - x0) ** 2 + (yy - y0) ** 2 <= radius ** 2) & (xx >= 0) & (yy >= 0) & \
        (xx < img.shape[1]) & (yy < img.shape[0])
    pix = img[yy[keep], xx[keep]].astype(np.float64)
    return float(np.min(np.linalg.norm(pix - np.asarray(color, np.float64), axis=1)))


def _feature_failures(img: np.ndarray, lm: np.ndarray, info: dict) -> list[str]:
    """Landmarks that do not sit on the feature they name (by the drawn colours).

    A point on an outline must have the feature's colour within ``R`` pixels (anti-
    aliasing mixes the pixels right on an edge, and a 1-pixel line is never drawn in
    its pure colour); "has the colour" allows half the contrast with the skin.
    """
    c = info["colors"]
    vis = info["visible"]
    skin = np.asarray(c["skin"], np.float64)

    def near(k: int, name: str, radius: float = 2.5) -> bool:
        tol = max(20.0, 0.5 * float(np.linalg.norm(np.asarray(c[name]) - skin)))
        return _min_dist(img, lm[k], c[name], radius) <= tol

    bad = []
    for k in (96, 97):  # pupils: dark at the pupil centre
        if vis[k]:
            x, y = np.round(lm[k]).astype(int)
            if img[y, x].max() > 60:
                bad.append(f"pupil {k} pixel {img[y, x]}")
    for k in range(76, 96):  # lips: lip colour (or the line between closed lips)
        if vis[k] and not (near(k, "lip") or near(k, "lip_line", 1.5)):
            bad.append(f"lip {k}")
    for k in range(60, 76):  # eye outline: the lash line (upper lid, corners, closed eyes)
        lower = k in (65, 66, 67, 73, 74, 75)  # or the lower-lid line
        if vis[k] and not (near(k, "lash") or (lower and near(k, "lower_lid"))):
            bad.append(f"eye {k}")
    for k in range(33, 51):  # eyebrows
        if vis[k] and not near(k, "brow"):
            bad.append(f"brow {k}")
    for k in range(55, 60):  # the shadow line under the nose
        if vis[k] and not near(k, "nose_line"):
            bad.append(f"nose {k}")
    for k in range(33):  # face contour: skin on one side, something else on the other
        if vis[k] and (_min_dist(img, lm[k], c["skin"], 2.0) > 4
                       or _far_from(img, lm[k], c["skin"], 2.0) < 10):
            bad.append(f"contour {k}")
    return bad


def _far_from(img: np.ndarray, pt: np.ndarray, color, radius: float) -> float:
    """Largest colour distance to ``color`` within ``radius`` of ``pt``."""
    x0, y0 = np.round(pt).astype(int)
    r = int(np.ceil(radius))
    patch = img[max(0, y0 - r): y0 + r + 1, max(0, x0 - r): x0 + r + 1].astype(np.float64)
    return float(np.max(np.linalg.norm(patch - np.asarray(color, np.float64), axis=-1)))


def test_landmarks_lie_on_the_drawn_features():
    failures = []
    checked = 0
    for i in range(40):
        img, lm, info = render_face(_neutral_params(_params(i)), 384)
        bad = _feature_failures(img, lm, info)
        failures += [f"face {i}: {b}" for b in bad]
        checked += int(info["visible"].sum())
    assert checked > 40 * 90
    assert not failures, failures[:20]


def test_feature_check_catches_misplaced_landmarks():
    # The check above must be able to fail: shifting the points by a few pixels does.
    img, lm, info = render_face(_neutral_params(_params(0)), 384)
    assert not _feature_failures(img, lm, info)
    shifted = lm + np.array([0.0, 0.15 * info["iod"]], np.float32)  # ~ an iris diameter
    bad = _feature_failures(img, shifted, info)
    assert any(b.startswith("pupil") for b in bad)
    assert any(b.startswith("lip") for b in bad)
    assert any(b.startswith("contour") for b in bad)


def test_outline_stays_the_silhouette_at_extreme_pose():
    # Inner features never leave the face outline, even at the largest yaw and pitch.
    for i in range(20):
        p = replace(_params(i, seed=8), yaw=45.0 if i % 2 else -45.0, pitch=25.0 - 2.5 * i)
        _, lm, info = render_face(p, 256)
        outline = info["curves"][0]["points"].astype(np.float32)
        inside = [cv2.pointPolygonTest(outline, (float(x), float(y)), True) for x, y in lm[33:]]
        assert min(inside) > 0, (i, min(inside))


def test_crop_scale_is_the_converters_rule_and_unchanged():
    """``scale`` uses the converters' constants on the drawn box side, bit for bit as before
    (recomputing it from the rounded ``face_box`` corners would change its last bits)."""
    from staralign.data.converters import BOX_MARGIN, FACE_SIZE, box_to_crop

    for i in range(20):
        p = _params(i)
        _, _, info = render_face(p, 128)
        assert info["scale"] == p.face_frac * 128 / 200.0 * 1.05
        scale, center = box_to_crop(*info["face_box"])
        assert info["scale"] == pytest.approx(scale, rel=1e-12)
        assert info["center"] == pytest.approx(center, rel=1e-12)
    assert (FACE_SIZE, BOX_MARGIN) == (200.0, 1.05)


def test_render_face_rejects_bad_input():
    with pytest.raises(TypeError):
        render_face(42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="size"):
        render_face(np.random.default_rng(0), 16)


def test_hidden_pupil_under_a_closed_eyelid():
    p = _neutral_params(replace(_params(1), eye_closure=(1.0, 0.0)))
    img, lm, info = render_face(p, 256)
    assert info["hidden"][96] and not info["hidden"][97]
    assert not info["visible"][96]


# --------------------------------------------------------------------------- tags


def test_tags_follow_the_documented_thresholds():
    seen = np.zeros(6)
    for i in range(150):
        p = _params(i, seed=77)
        _, _, info = render_face(p, 96)
        n_occ = int(info["occluded"].sum())
        expected = (
            abs(p.yaw) >= 30 or abs(p.pitch) >= 20 or abs(p.roll) >= 30,
            p.mouth_open >= 0.4 or abs(p.smile) >= 0.5 or p.brow_raise >= 0.5
            or max(p.eye_closure) >= 0.5,
            p.light_strength >= 0.5 or p.brightness < 0.7 or p.brightness > 1.3,
            p.makeup,
            n_occ >= 5,
            p.blur >= 0.01,
        )
        assert info["tags"] == tuple(int(v) for v in expected), (i, info["tags"], expected)
        if not p.occluders:
            assert n_occ == 0
        seen += info["tags"]
    # every attribute occurs, and none on every face
    assert np.all(seen >= 5) and np.all(seen <= 120), seen


def test_occluder_marks_the_points_it_covers():
    p = _neutral_params(_params(2))
    big = Occluder("rect", 54, (0.0, 0.0), (0.35, 0.35), 0.0, (0, 255, 0), (0, 0, 255))
    img, lm, info = render_face(replace(p, occluders=(big,)), 256)
    assert info["occluded"][54] and info["occluded"].sum() >= 5
    assert info["tags"][4] == 1
    ij = np.round(lm[info["occluded"]]).astype(int)
    # the occluder is drawn there (at least half coverage where a point is on its edge)
    colour = img[ij[:, 1], ij[:, 0]].astype(float)
    assert np.all(np.linalg.norm(colour - (0, 255, 0), axis=1) < 0.5 * 255 * np.sqrt(2))
    assert np.mean(np.all(colour == (0, 255, 0), axis=1)) > 0.7
    assert not np.any(info["occluded"][:33] & (np.linalg.norm(lm[:33] - lm[54], axis=1) > 100))


# --------------------------------------------------------------------------- ambiguity and tangents


def _components(n: int, sigma: float):
    tang, norm, corner, contour, onc = [], [], [], [], []
    for i in range(n):
        _, labels, info = make_sample(11, "train", i, size=256, ambiguity=sigma)
        d = labels.astype(np.float64) - info["landmarks"]
        t = info["tangents"].astype(np.float64)
        nrm = np.stack([-t[:, 1], t[:, 0]], axis=1)
        kinds = info["kinds"]
        c = kinds == 0
        tang.append(np.abs((d * t).sum(1))[c])
        norm.append(np.abs((d * nrm).sum(1))[c])
        contour.append(np.linalg.norm(d[c], axis=1) / info["iod"])
        corner.append(np.linalg.norm(d[kinds > 0], axis=1) / info["iod"])
        for curve in info["curves"]:  # the moved labels still lie on their curve
            pts = curve["points"]
            if curve["closed"]:
                pts = np.concatenate([pts, pts[:1]])
            onc.extend(_dist_to_polyline(labels[curve["ids"]].astype(np.float64), pts))
    return (np.concatenate(tang), np.concatenate(norm), np.concatenate(contour),
            np.concatenate(corner), np.asarray(onc))


def _dist_to_polyline(q: np.ndarray, poly: np.ndarray) -> np.ndarray:
    a, b = poly[:-1], poly[1:]
    ab = b - a
    t = np.clip(((q[:, None] - a[None]) * ab[None]).sum(-1) / np.maximum((ab * ab).sum(-1), 1e-12),
                0, 1)
    proj = a[None] + t[..., None] * ab[None]
    return np.linalg.norm(q[:, None] - proj, axis=-1).min(axis=1)


def test_ambiguity_moves_labels_along_the_contour():
    sigma = 0.05
    tang, norm, contour, corner, on_curve = _components(30, sigma)
    assert tang.mean() > 10 * norm.mean()  # tangential >> normal
    # contour points move by |N(0, sigma)| iod on average: sigma * sqrt(2 / pi)
    assert contour.mean() == pytest.approx(sigma * np.sqrt(2 / np.pi), rel=0.15)
    assert corner.mean() < 0.2 * contour.mean()  # corners much less
    # "float32 exact": the moved points are on the drawn curve (up to float32 rounding)
    assert on_curve.max() < 1e-3


def test_zero_ambiguity_and_test_labels_are_exact():
    for i in range(5):
        _, labels, info = make_sample(3, "train", i, size=128, ambiguity=0.0)
        assert np.array_equal(labels, info["landmarks"])
        _, labels, info = make_sample(3, "test", i, size=128, ambiguity=0.2)
        assert np.array_equal(labels, info["landmarks"])


def test_ambiguous_landmarks_direct():
    _, lm, info = render_face(np.random.default_rng(4), 256)
    a = ambiguous_landmarks(lm, info["curves"], 0.1, np.random.default_rng(0))
    b = ambiguous_landmarks(lm, info["curves"], 0.1, np.random.default_rng(0))
    assert np.array_equal(a, b) and not np.array_equal(a, lm)
    assert np.array_equal(ambiguous_landmarks(lm, info["curves"], 0.0,
                                              np.random.default_rng(0)), lm)


def test_tangents_are_unit_and_match_the_recomputed_ones():
    angles = []
    for i in range(10):
        _, lm, info = render_face(np.random.default_rng([2, 0, i]), 256)
        t = info["tangents"]
        n = np.linalg.norm(t, axis=1)
        assert np.allclose(n[:96], 1.0, atol=1e-5) and np.all(n[96:] == 0)
        approx = tangents_from_landmarks(lm, WFLW)
        smooth = [k for k in range(96) if k not in CORNER_IDS]
        cos = np.abs((approx[smooth] * t[smooth]).sum(1)).clip(0, 1)
        angles.append(np.degrees(np.arccos(cos)))
    angles = np.concatenate(angles)
    assert np.median(angles) < 5 and np.percentile(angles, 90) < 20


# --------------------------------------------------------------------------- dataset and CLI


def test_generate_dataset_layout_and_tsv(tmp_path: Path):
    out = tmp_path / "synth"
    summary = generate_dataset(out, train=6, test=4, ambiguity=0.05, seed=5, size=128)
    assert summary["train"] == 6 and summary["test"] == 4
    cfg = yaml.safe_load((out / "synth.yaml").read_text())
    assert (cfg["seed"], cfg["train"], cfg["test"], cfg["size"], cfg["ambiguity"]) == \
        (5, 6, 4, 128, 0.05)
    assert cfg["version"] >= 1
    for split, n in (("train", 6), ("test", 4)):
        anns = read_annotations(out / f"{split}.tsv", num_points=98)
        assert len(anns) == n
        exact = np.load(out / f"{split}_exact.npy")
        tangents = np.load(out / f"{split}_tangents.npy")
        visible = np.load(out / f"{split}_visible.npy")
        assert exact.shape == tangents.shape == (n, 98, 2) and visible.shape == (n, 98)
        for i, a in enumerate(anns):
            assert a.image_path == f"images/{split}/{i:06d}.jpg"
            img = cv2.imread(str(out / a.image_path))
            assert img is not None and img.shape == (128, 128, 3)
            assert len(a.tags) == 6
            # the STAR crop (side scale * 200 around the centre) holds every landmark
            half = a.scale * 200 / 2
            for pts in (a.landmarks, exact[i]):
                assert np.all(np.abs(pts - np.asarray(a.center)) <= half)
            # and is not much larger than the face (a WFLW-like tight crop)
            assert 2 * half <= 1.06 * (exact[i].max(0) - exact[i].min(0)).max()
            assert np.allclose(a.five_points,
                               five_points_from_landmarks(a.landmarks, WFLW.five_points),
                               atol=1e-4)
        if split == "test":
            assert np.array_equal(np.stack([a.landmarks for a in anns]), exact)
        else:
            assert not np.array_equal(np.stack([a.landmarks for a in anns]), exact)


def test_generate_dataset_is_the_same_with_workers(tmp_path: Path):
    generate_dataset(tmp_path / "a", train=5, test=3, ambiguity=0.03, seed=2, size=96,
                     image_format="png")
    generate_dataset(tmp_path / "b", train=5, test=3, ambiguity=0.03, seed=2, size=96,
                     image_format="png", workers=2)
    for rel in ["train.tsv", "test.tsv", "train_tangents.npy", "images/train/000004.png",
                "images/test/000002.png"]:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    generate_dataset(tmp_path / "c", train=5, test=3, ambiguity=0.03, seed=3, size=96,
                     image_format="png")
    assert (tmp_path / "a" / "train.tsv").read_bytes() != (tmp_path / "c" / "train.tsv").read_bytes()


def test_cli_run(tmp_path: Path, capsys):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--out", str(tmp_path / "d"), "--train", "3", "--test", "2",
                              "--ambiguity", "0.02", "--seed", "1", "--size", "64",
                              "--format", "png"])
    assert run(args) == 0
    assert "3 train + 2 test" in capsys.readouterr().out
    assert (tmp_path / "d" / "images" / "train" / "000002.png").exists()
    assert len(read_annotations(tmp_path / "d" / "test.tsv", num_points=98)) == 2


def test_cli_rejects_bad_values(tmp_path: Path):
    from staralign.cli import UserError

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with pytest.raises(UserError, match="train"):
        run(parser.parse_args(["--out", str(tmp_path), "--train", "-1"]))
    with pytest.raises(UserError, match="ambiguity"):
        run(parser.parse_args(["--out", str(tmp_path), "--ambiguity", "-0.1"]))
