"""Drawings: ambiguity ellipses clipped to the face with the scale stated, ring/dot marks, the legend."""

from __future__ import annotations

import numpy as np

from staralign.viz import (
    AMBIGUITY_CLIP,
    GROUND_TRUTH_COLOR,
    PREDICTION_COLOR,
    add_legend,
    draw_landmarks,
)

BOX = (40.0, 40.0, 140.0, 140.0)  # a 100 px face: ellipses clipped at 10 px


def _extent(drawn: np.ndarray, blank: np.ndarray, row: int) -> int:
    cols = np.flatnonzero((drawn[row] != blank[row]).any(-1))
    return int(cols.max() - cols.min())


def test_ambiguity_ellipses_are_clipped_to_the_face_and_the_scale_is_stated():
    canvas = np.zeros((200, 200, 3), np.uint8)
    pts = np.array([[90.0, 90.0], [60.0, 60.0]])
    huge = np.tile(np.diag([60.0 ** 2, 30.0 ** 2]), (2, 1, 1))  # 60 px sd: a weak model's spread
    plain = draw_landmarks(canvas, pts, box=BOX, radius=1)
    drawn = draw_landmarks(canvas, pts, box=BOX, radius=1, ambiguity=huge)
    assert _extent(drawn, plain, 90) <= 2 * AMBIGUITY_CLIP * 100 + 3  # not 120 px across the face
    below = (drawn[141:] != plain[141:]).any(-1)  # the caption under the box
    assert below.any()
    small = np.tile(np.diag([16.0, 4.0]), (2, 1, 1))  # 4 px: drawn as it is, caption without "clipped"
    ok = draw_landmarks(canvas, pts, box=BOX, radius=1, ambiguity=small)
    assert 6 <= _extent(ok, plain, 90) <= 10
    assert (ok[141:] != plain[141:]).any(-1).sum() < below.sum()  # a shorter note


def test_rings_and_dots_with_a_rim():
    canvas = np.full((40, 40, 3), 128, np.uint8)
    ring = draw_landmarks(canvas, [[20.0, 20.0]], radius=5, hollow=True, color=GROUND_TRUTH_COLOR, outline=(0, 0, 0))
    dot = draw_landmarks(canvas, [[20.0, 20.0]], radius=5, color=PREDICTION_COLOR, outline=(0, 0, 0))
    assert tuple(dot[20, 20]) == PREDICTION_COLOR and tuple(ring[20, 20]) == (128, 128, 128)  # hollow centre
    assert (ring < 60).all(-1).any() and (dot < 60).all(-1).any()  # the dark rim


def test_legend_band_names_each_mark():
    image = np.zeros((50, 300, 3), np.uint8)
    out = add_legend(image, [("ground truth", GROUND_TRUTH_COLOR, True), ("prediction", PREDICTION_COLOR, False)])
    assert out.shape[1] == 300 and out.shape[0] > 50
    np.testing.assert_array_equal(out[-50:], image)
    band = out[:-50].astype(int)
    for color in (GROUND_TRUTH_COLOR, PREDICTION_COLOR):
        assert (np.abs(band - color).max(-1) < 30).any()
