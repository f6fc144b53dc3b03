"""WFLW 98 -> 300W 68 landmark conversion."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from staralign.data.landmark_formats import (
    CONVERSIONS,
    conversion_matrix,
    convert_landmarks,
    register_conversion,
)
from staralign.definitions import get_definition


def _one_to_one_points(src: str = "WFLW", dst: str = "300W") -> dict[int, int]:
    """Destination -> source index for the points a registered conversion copies unchanged."""
    _, table = CONVERSIONS[(src.upper(), dst.upper())]
    return {i: row[0][0] for i, row in enumerate(table) if len(row) == 1 and row[0][1] == 1.0}


def test_shapes_numpy_and_torch():
    pts = np.random.default_rng(0).uniform(0, 256, (4, 3, 98, 2))
    out = convert_landmarks(pts)
    assert out.shape == (4, 3, 68, 2) and out.dtype == pts.dtype
    t = torch.from_numpy(pts).float().requires_grad_(True)
    out_t = convert_landmarks(t, "wflw", "300w")
    assert out_t.shape == (4, 3, 68, 2) and out_t.dtype == torch.float32
    assert torch.allclose(out_t, torch.from_numpy(out).float(), atol=1e-4)
    out_t.sum().backward()
    assert t.grad is not None
    with pytest.raises(ValueError, match=r"\(\.\.\., 98, 2\)"):
        convert_landmarks(np.zeros((68, 2)))
    with pytest.raises(KeyError, match="no landmark conversion"):
        convert_landmarks(pts, "300W", "WFLW")


def test_one_to_one_groups_and_jaw():
    pts = np.random.default_rng(1).uniform(0, 256, (98, 2))
    out = convert_landmarks(pts)
    same = _one_to_one_points()
    # Jaw endpoints and chin, nose, lips are copied exactly.
    for dst, src in [(0, 0), (8, 16), (16, 32), (27, 51), (30, 54), (33, 57), (48, 76), (54, 82),
                     (60, 88), (67, 95), (36, 60), (39, 64), (42, 68), (45, 72), (17, 33), (26, 46)]:
        assert same[dst] == src
        assert np.array_equal(out[dst], pts[src])
    assert sorted(same) == sorted(set(range(68)) - {37, 38, 40, 41, 43, 44, 46, 47})
    # Eye lids lie between the WFLW lid points that bracket them.
    assert np.allclose(out[37], pts[61] * 2 / 3 + pts[62] / 3)
    assert np.allclose(out[47], pts[74] / 3 + pts[75] * 2 / 3)
    # Pupils (96, 97) and lower brow contours are not used.
    m = conversion_matrix()
    assert not m[:, [38, 39, 40, 41, 47, 48, 49, 50, 96, 97]].any()
    assert np.allclose(m.sum(1), 1.0)


def test_conversion_respects_the_flip_structure():
    """Converting a mirrored WFLW face gives the mirrored 300W face."""
    wflw, w300 = get_definition("WFLW"), get_definition("300W")
    pts = np.random.default_rng(2).uniform(0, 256, (98, 2))
    mirrored = pts[wflw.flip_permutation()].copy()
    mirrored[:, 0] = 255 - mirrored[:, 0]
    a = convert_landmarks(mirrored)
    b = convert_landmarks(pts)[w300.flip_permutation()].copy()
    b[:, 0] = 255 - b[:, 0]
    assert np.allclose(a, b)


def test_register_conversion_validates():
    with pytest.raises(ValueError, match="sum to"):
        register_conversion("A", "B", 3, [[(0, 0.5)]])
    with pytest.raises(ValueError, match="outside"):
        register_conversion("A", "B", 3, [[(5, 1.0)]])
    register_conversion("A", "B", 3, [[(0, 0.5), (2, 0.5)], [(1, 1.0)]])
    try:
        out = convert_landmarks(np.array([[0.0, 0.0], [1.0, 1.0], [2.0, 4.0]]), "A", "B")
        assert np.allclose(out, [[1.0, 2.0], [1.0, 1.0]])
    finally:
        CONVERSIONS.pop(("A", "B"))
