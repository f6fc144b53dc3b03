"""Training targets: parity with the authors' numbers, with a slow re-statement of their
recipe, and between the numpy (worker) and torch (device) paths."""

from __future__ import annotations

import warnings

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import interpolate

from staralign.data.targets.edges import _covered, _segment_geometry, edge_maps, edge_maps_torch
from staralign.data.targets.points import point_maps, point_maps_torch
from staralign.data.targets.splines import CurvePlan, fit_edge_curve
from staralign.definitions import LandmarkDefinition, get_definition

from .conftest import load_reference

# --------------------------------------------------------------------------- slow references
# The README's description of the original recipe, executed literally: a 256x256 canvas
# per point, a 1024x1024 float canvas per edge, scipy's splprep, OpenCV resizes.


def _splprep_curve(points: np.ndarray, closed: bool) -> np.ndarray:
    x, y = points[:, 0].astype(np.float64), points[:, 1].astype(np.float64)
    if closed:
        x, y = np.append(x, x[0]), np.append(y, y[0])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tck, u = interpolate.splprep([x, y], s=0, per=closed, k=3)
    except (ValueError, TypeError):
        return points.astype(np.float64)
    params = np.concatenate([np.linspace(u[i], u[i + 1], 5, endpoint=False) for i in range(len(u) - 1)])
    if not closed:
        params = np.append(params, u[-1])
    return np.stack(interpolate.splev(params, tck), -1)


def _slow_edge_maps(points: np.ndarray, definition: LandmarkDefinition, size: int = 256,
                    heat: int = 64) -> np.ndarray:
    maps = []
    for e in definition.edges:
        curve = np.clip(_splprep_curve(points[list(e.indices)], e.closed), 0, size - 1)
        canvas = np.zeros((4 * size, 4 * size), np.float32)
        cv2.polylines(canvas, [(curve * 4 + 0.5).astype(np.int32)], e.closed, 255, 4, cv2.LINE_AA)
        maps.append(cv2.resize(canvas, (size, size), interpolation=cv2.INTER_AREA))
    stack = torch.from_numpy(np.stack(maps) / 255.0).float()[None]
    return F.interpolate(stack, size=(heat, heat), mode="bilinear", align_corners=False)[0].numpy()


def _slow_point_maps(points: np.ndarray, size: int = 256, heat: int = 64) -> np.ndarray:
    maps = np.zeros((len(points), size, size), np.float32)
    g = np.exp(-((np.arange(10)[None] - 5) ** 2 + (np.arange(10)[:, None] - 5) ** 2) / 4.5)
    for k, (x, y) in enumerate(np.clip(points, 0, size - 1)):
        ux, uy, bx, by = int(x - 4.5), int(y - 4.5), int(x + 5.5), int(y + 5.5)
        maps[k, max(0, uy):min(by, size), max(0, ux):min(bx, size)] = g[
            max(0, -uy):min(by, size) - uy, max(0, -ux):min(bx, size) - ux]
    return F.interpolate(torch.from_numpy(maps)[None], size=(heat, heat), mode="bilinear",
                         align_corners=False)[0].numpy()


def _augmented(points: np.ndarray, rng: np.random.Generator, kind: str) -> np.ndarray:
    ang, zoom, shift = rng.normal(0, 0.4), np.exp(rng.normal(0, 0.4)), rng.normal(0, 25, 2)
    rot = np.array([[np.cos(ang), -np.sin(ang)], [np.sin(ang), np.cos(ang)]]) * zoom
    q = (points.astype(np.float64) - 127.5) @ rot.T + 127.5 + shift
    if kind == "tiny":
        q = q * 0.1 + 100
    elif kind == "duplicates":  # equal consecutive points make splprep fail: raw points drawn
        i = int(rng.integers(0, len(q) - 1))
        q[i + 1] = q[i]
    elif kind == "integer":
        q = np.round(q)
    elif kind == "outside":
        q = q * 2.5 - 200
    return q.astype(np.float32)


def _fit_edge_curve_torch(points: torch.Tensor, closed: bool) -> torch.Tensor:
    """The batched spline fit of one edge, (B, n, 2) -> (B, m, 2): the device path
    (``CurvePlan.curves_torch``) for a definition with that single edge."""
    return CurvePlan(((tuple(range(points.shape[1])), closed),)).curves_torch(points)


# --------------------------------------------------------------------------- reference values


def test_point_maps_match_reference():
    for case in load_reference("targets.pt"):
        pts = case["points"].numpy()
        want = case["pointmaps"].numpy()
        got = point_maps(pts)
        got_t = point_maps_torch(case["points"][None])[0].numpy()
        assert got.shape == want.shape and got.dtype == np.float32
        assert np.abs(got - want).max() <= 1e-5
        assert np.abs(got_t - want).max() <= 1e-5


def test_edge_maps_match_reference():
    for case in load_reference("targets.pt"):
        d = get_definition(case["definition"])
        want = case["edgemaps"].numpy()
        for got in (edge_maps(case["points"].numpy(), d),
                    edge_maps_torch(case["points"][None], d, method="torch")[0].numpy()):
            assert got.shape == want.shape == (d.num_edges, 64, 64)
            diff = np.abs(got - want)
            assert diff.mean() <= 0.01 and diff.max() <= 0.15
            # We reproduce the rasterisation itself, so in fact the maps are equal.
            assert diff.max() <= 1e-6


def test_slow_restatement_matches_reference():
    """The slow helpers below are trustworthy oracles for the randomised tests."""
    case = load_reference("targets.pt")[0]
    d = get_definition(case["definition"])
    pts = case["points"].numpy()
    assert np.abs(_slow_edge_maps(pts, d) - case["edgemaps"].numpy()).max() <= 1e-6
    assert np.abs(_slow_point_maps(pts) - case["pointmaps"].numpy()).max() <= 1e-5


# --------------------------------------------------------------------------- randomised parity


@pytest.mark.parametrize("kind", ["plain", "tiny", "duplicates", "integer", "outside"])
def test_edge_and_point_maps_match_slow_recipe(kind):
    rng = np.random.default_rng(["plain", "tiny", "duplicates", "integer", "outside"].index(kind))
    cases = load_reference("targets.pt")
    for case in cases[::2]:  # one per definition
        d = get_definition(case["definition"])
        pts = _augmented(case["points"].numpy(), rng, kind)
        want = _slow_edge_maps(pts, d)
        got = edge_maps(pts, d)
        got_t = edge_maps_torch(torch.from_numpy(pts)[None], d, method="torch")[0].numpy()
        assert np.abs(got - want).max() <= 1e-6, kind
        assert np.abs(got_t - want).max() <= 1e-6, kind
        assert np.abs(point_maps(pts) - _slow_point_maps(pts)).max() <= 1e-5
        assert np.abs(point_maps_torch(torch.from_numpy(pts)[None])[0].numpy() - point_maps(pts)).max() <= 1e-6


def test_torch_path_is_batched_and_equals_numpy():
    d = get_definition("WFLW")
    ref = load_reference("targets.pt")[0]["points"].numpy()
    rng = np.random.default_rng(3)
    batch = np.stack([_augmented(ref, rng, "plain") for _ in range(4)])
    batch[2] = _augmented(ref, rng, "duplicates")  # one sample falls back to raw points
    em = edge_maps_torch(torch.from_numpy(batch), d, method="torch")
    assert torch.equal(em, edge_maps_torch(torch.from_numpy(batch), d))  # auto: numpy on a CPU
    pm = point_maps_torch(torch.from_numpy(batch))
    assert em.shape == (4, d.num_edges, 64, 64) and pm.shape == (4, 98, 64, 64)
    assert em.dtype == pm.dtype == torch.float32
    for i in range(4):
        assert np.abs(em[i].numpy() - edge_maps(batch[i], d)).max() <= 1e-6
        assert np.abs(pm[i].numpy() - point_maps(batch[i])).max() <= 1e-6


@pytest.mark.parametrize("image_size,heat", [(256, 128), (192, 64), (256, 32)])
def test_other_integer_factors(image_size, heat):
    """Even (2, 8) and odd (3) resize factors follow the same recipe."""
    d = get_definition("300W")
    pts = load_reference("targets.pt")[2]["points"].numpy() * (image_size / 256)
    want = _slow_edge_maps(pts, d, image_size, heat)
    assert np.abs(edge_maps(pts, d, image_size, heat) - want).max() <= 1e-6
    got_t = edge_maps_torch(torch.from_numpy(pts)[None], d, image_size, heat, method="torch")[0].numpy()
    assert np.abs(got_t - want).max() <= 1e-6
    assert np.abs(point_maps(pts, image_size, heat) - _slow_point_maps(pts, image_size, heat)).max() <= 1e-5


def test_edge_maps_reject_non_integer_factor():
    with pytest.raises(ValueError, match="multiple"):
        edge_maps(np.zeros((98, 2)), get_definition("WFLW"), 256, 60)


def test_point_maps_at_the_borders():
    pts = np.array([[0, 0], [255, 255], [-30, 400], [3.9, 4.6], [128.49, 127.51], [251.2, 2.2]], np.float32)
    assert np.abs(point_maps(pts) - _slow_point_maps(pts)).max() <= 1e-5
    # The peak sits on the integer grid: both points have int(x - 4.5) = 96 and share a map.
    a, b = point_maps(np.array([[100.51, 50.0], [101.49, 50.0]], np.float32))
    assert np.array_equal(a, b)


# --------------------------------------------------------------------------- curve fitting


@pytest.mark.parametrize("closed", [False, True])
def test_spline_equals_splprep(closed):
    rng = np.random.default_rng(int(closed))
    for n in (3, 4, 5, 8, 12, 33):
        for _ in range(4):
            pts = rng.uniform(0, 255, (n, 2))
            want = _splprep_curve(pts, closed)
            got = fit_edge_curve(pts, closed)
            assert got.shape == want.shape, (n, closed)
            assert np.abs(got - want).max() < 1e-8, (n, closed)
            got_t = _fit_edge_curve_torch(torch.from_numpy(pts)[None], closed)[0].numpy()
            assert np.abs(got_t[:len(want)] - want).max() < 1e-8


def test_spline_failures_give_raw_points():
    pts = np.array([[0, 0], [10, 5], [10, 5], [30, 0], [40, 8]], np.float64)
    assert np.array_equal(fit_edge_curve(pts, False), pts)  # equal consecutive points
    assert np.array_equal(fit_edge_curve(pts[:3], False), pts[:3])  # too few for a cubic
    closed = np.array([[0, 0], [10, 0], [5, 8], [0, 0]], np.float64)  # last equals first
    assert np.array_equal(fit_edge_curve(closed, True), closed)
    batch = torch.from_numpy(np.stack([pts, pts + 1]))
    batch[1, 2] += 3  # the second sample fits
    out = _fit_edge_curve_torch(batch, False)
    assert torch.equal(out[0, :5], batch[0]) and torch.equal(out[0, 5:], batch[0, -1:].expand(out.shape[1] - 5, 2))
    assert torch.allclose(out[1], torch.from_numpy(_splprep_curve(batch[1].numpy(), False)))


def test_curve_plan_equals_edge_by_edge():
    d = get_definition("WFLW")
    plan = CurvePlan(tuple((tuple(e.indices), e.closed) for e in d.edges))
    pts = _augmented(load_reference("targets.pt")[0]["points"].numpy(), np.random.default_rng(9), "plain")
    curves = plan.curves(pts)
    for k, e in enumerate(d.edges):
        want = fit_edge_curve(pts[list(e.indices)], e.closed)
        assert np.abs(curves[plan.offsets[k]:plan.offsets[k + 1]] - want).max() < 1e-9


# --------------------------------------------------------------------------- rasterisation


def test_segment_rasterisation_matches_opencv():
    """The device path's rule for which canvas pixels a thick segment sets, against OpenCV,
    including segments that leave the canvas (clipped outlines)."""
    rng = np.random.default_rng(0)
    size = 48
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    for _ in range(300):
        p0 = rng.integers(0, size, 2)
        p1 = np.clip(np.round(p0 + rng.uniform(-30, 30, 2)), 0, size - 1).astype(np.int64)
        if rng.random() < 0.1:
            p1 = p0.copy()
        canvas = np.zeros((size, size), np.uint8)
        cv2.polylines(canvas, [np.stack([p0, p1]).astype(np.int32)], False, 1, 4, cv2.LINE_8)
        g = _segment_geometry(torch.from_numpy(p0)[None], torch.from_numpy(p1)[None], size)
        got = _covered(g, xs.reshape(1, -1), ys.reshape(1, -1)).reshape(size, size).numpy()
        assert np.array_equal(got, canvas.astype(bool)), (p0, p1)
