"""Crop geometry, flips, normalisation and texture augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from staralign.data.transforms import (
    GeometryAugment,
    TextureAugment,
    apply_texture,
    crop_matrix,
    crop_to_image,
    denormalize_points,
    flip_matrix,
    image_to_tensor,
    invert_affine,
    mirror_matrix,
    normalize_points,
    random_geometry_matrix,
    transform_points,
    warp_image,
)
from staralign.definitions import get_definition

from .conftest import load_reference


def test_crop_matrix_matches_reference():
    for case in load_reference("crop_matrix.pt"):
        m = crop_matrix(case["scale"], case["center_w"], case["center_h"], 256)
        assert m.shape == (3, 3) and m.dtype == np.float32
        assert np.abs(m - case["matrix"].numpy()).max() <= 1e-4


def test_crop_puts_the_face_centre_in_the_middle():
    m = crop_matrix(1.5, 321.0, 123.0, 256)
    centre = transform_points(np.array([[321.0, 123.0]]), m)
    assert np.allclose(centre, 127.5, atol=1e-4)
    # 300 px of face (scale 1.5) span the 256 px crop.
    a, b = transform_points(np.array([[171.0, 123.0], [471.0, 123.0]]), m)
    assert b[0] - a[0] == pytest.approx(256.0, abs=1e-3)


def flip_pixel_landmarks_np(points: np.ndarray, width: int, definition) -> np.ndarray:
    """The original's landmark flip, written out (the oracle for flip_matrix and the pairs):
    (N, 2) image-pixel landmarks of a ``width``-wide image, pairs swapped, x -> w + offset - x."""
    out = np.asarray(points)[definition.flip_permutation()].copy()
    out[:, 0] = width + definition.flip_x_offset - out[:, 0]
    return out


@pytest.mark.parametrize("name", ["WFLW", "300W", "COFW"])
def test_flip_twice_is_identity_and_pairs_swap(name):
    d = get_definition(name)
    rng = np.random.default_rng(0)
    pts = rng.uniform(0, 300, (d.num_points, 2)).astype(np.float32)
    once = flip_pixel_landmarks_np(pts, 300, d)
    assert np.allclose(flip_pixel_landmarks_np(once, 300, d), pts)
    for a, b in d.flip_pairs:
        assert once[a, 1] == pts[b, 1] and once[b, 1] == pts[a, 1]
        assert once[a, 0] == pytest.approx(300 + d.flip_x_offset - pts[b, 0])
    # The same flip as a matrix (after the permutation).
    perm = d.flip_permutation()
    assert np.allclose(transform_points(pts[perm], flip_matrix(300, d.flip_x_offset)), once)


def test_mirror_matrix_is_the_pixel_mirror():
    img = np.random.default_rng(1).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    out = warp_image(img, mirror_matrix(30), 30)  # a 30x30 crop: rows 20.. are outside
    assert np.array_equal(out[:20], img[:, ::-1]) and not out[20:].any()


def test_random_geometry_is_reproducible_and_has_the_right_spread():
    a = random_geometry_matrix(np.random.default_rng(5))
    b = random_geometry_matrix(np.random.default_rng(5))
    assert np.array_equal(a, b)
    rng = np.random.default_rng(7)
    mats = np.stack([random_geometry_matrix(rng, 256) for _ in range(4000)]).astype(np.float64)
    scale = np.hypot(mats[:, 0, 0], mats[:, 1, 0])
    angle = np.arctan2(mats[:, 1, 0], mats[:, 0, 0])
    centre = transform_points(np.array([[127.5, 127.5]]), mats)[:, 0] - 127.5
    cfg = GeometryAugment()
    assert scale.mean() == pytest.approx(1.0, abs=0.01) and scale.std() == pytest.approx(cfg.scale_sigma, rel=0.1)
    assert angle.std() == pytest.approx(cfg.rotation_sigma, rel=0.1)
    # Rotation and scale happen about the crop centre, so the centre moves by the shift only.
    assert centre.std(0) == pytest.approx([cfg.shift_sigma * 255] * 2, rel=0.1)


def test_normalize_and_inverse():
    pts = np.array([[-0.5, 0.0], [127.5, 255.5], [300.0, -10.0]], np.float32)
    n = normalize_points(pts, 256)
    assert np.allclose(n[0], [-1.0, (1.0 / 256) - 1])
    assert np.allclose(n[1], [0.0, 1.0])
    assert np.array_equal(n[2], [1.0, -1.0])  # clamped
    inside = np.array([[10.25, 200.0]])
    assert np.allclose(denormalize_points(normalize_points(inside)), inside)
    t = torch.tensor([[10.25, 200.0]])
    assert torch.allclose(denormalize_points(normalize_points(t)), t)


def test_crop_to_image_inverts_the_crop_numpy_and_torch():
    m = (random_geometry_matrix(np.random.default_rng(2)) @ crop_matrix(2.0, 300.0, 250.0)).astype(np.float32)
    pts = np.random.default_rng(3).uniform(100, 400, (5, 2))
    crop = transform_points(pts, m)
    assert np.allclose(crop_to_image(crop, m), pts, atol=1e-3)
    batch_m = torch.from_numpy(np.stack([m, crop_matrix(1.0, 10.0, 20.0)]))
    batch_p = torch.from_numpy(np.stack([crop, crop])).float()
    back = crop_to_image(batch_p, batch_m)
    assert torch.allclose(back[0], torch.from_numpy(pts).float(), atol=1e-3)
    assert np.allclose(invert_affine(m) @ m, np.eye(3), atol=1e-5)


def test_image_to_tensor():
    img = np.zeros((4, 5, 3), np.uint8)
    img[..., 0], img[..., 2] = 255, 0
    t = image_to_tensor(img)
    assert t.shape == (3, 4, 5) and t.dtype == torch.float32
    assert torch.all(t[0] == 1.0) and torch.all(t[2] == -1.0)


def test_texture_is_reproducible_and_varies():
    img = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    a = apply_texture(img, np.random.default_rng(11))
    b = apply_texture(img, np.random.default_rng(11))
    assert np.array_equal(a, b) and a.dtype == np.uint8 and a.shape == img.shape
    outs = [apply_texture(img, np.random.default_rng(s)) for s in range(40)]
    assert sum(not np.array_equal(o, img) for o in outs) > 20
    assert any(np.array_equal(o, img) for o in outs)  # sometimes nothing applies
    assert np.array_equal(img, np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))


def test_each_texture_step():
    img = np.full((64, 64, 3), 128, np.uint8)
    img[:, :, 0] = 200
    only = {k: 0.0 for k in ("occlusion", "blur", "gamma", "noise", "grey")}
    heights = []
    for seed in range(100):
        occ = apply_texture(img, np.random.default_rng(seed), TextureAugment(**{**only, "occlusion": 1.0}))
        black = (occ == 0).all(axis=2)
        assert black.any() and (occ == img).all(axis=2).any()
        rows = np.nonzero(black.any(axis=1))[0]
        if rows[0] > 0 and rows[-1] < 63:  # not cut by the border
            heights.append(len(rows))
    # Box height: a fraction 0.2 .. 0.8 of half the crop (32 px here).
    assert min(heights) >= 5 and max(heights) <= 27 and max(heights) - min(heights) >= 12
    grey = apply_texture(img, np.random.default_rng(0), TextureAugment(**{**only, "grey": 1.0}))
    assert np.all(grey[..., 0] == grey[..., 1]) and np.all(grey[..., 1] == grey[..., 2])
    gam = apply_texture(img, np.random.default_rng(0), TextureAugment(**{**only, "gamma": 1.0}))
    assert not np.array_equal(gam, img) and np.all(gam[..., 1] == gam[0, 0, 1])
    noisy = apply_texture(img, np.random.default_rng(0), TextureAugment(**{**only, "noise": 1.0}))
    assert noisy.std() > 0 and np.abs(noisy.astype(int) - img).max() <= 128


def test_texture_copies_only_to_occlude():
    img = np.full((32, 32, 3), 90, np.uint8)
    none = TextureAugment(0.0, 0.0, 0.0, 0.0, 0.0)
    assert apply_texture(img, np.random.default_rng(0), none) is img  # nothing applied: no copy
    occ = apply_texture(img, np.random.default_rng(0), TextureAugment(1.0, 0.0, 0.0, 0.0, 0.0))
    assert (occ == 0).any() and np.all(img == 90)  # the occlusion works on a copy
