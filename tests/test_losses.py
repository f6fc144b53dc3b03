"""STAR and the other losses reproduce the authors' numbers, and stay finite where theirs do not."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from staralign.heatmaps import heatmap_moments, soft_argmax
from staralign.losses import AWingLoss, L1Loss, L2Loss, SmoothL1Loss, STARLoss, WingLoss

from .conftest import load_reference


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_star_matches_reference_every_case():
    cases = load_reference("star_loss.pt")
    checked = 0
    for i, case in enumerate(cases):
        for version in (1, 2):
            if f"loss_v{version}" not in case:
                continue
            heat = case["heatmap"].clone().requires_grad_(True)
            loss = STARLoss(w=case["w"], dist=case["dist"], version=version)(heat, case["gt"])
            loss.backward()
            want = case[f"loss_v{version}"]
            assert abs(loss.item() - want.item()) <= 1e-5 * abs(want.item()), (i, version)
            assert _rel(heat.grad, case[f"grad_v{version}"]) <= 1e-3, (i, version)
            checked += 1
    assert checked >= len(cases)


def test_other_losses_match_reference():
    make = {"awing": AWingLoss, "smoothl1": SmoothL1Loss, "wing": WingLoss}
    for case in load_reference("other_losses.pt"):
        pred = case["pred"].clone().requires_grad_(True)
        loss = make[case["kind"]]()(pred, case["gt"])
        loss.backward()
        assert abs(loss.item() - case["loss"].item()) <= 1e-5 * abs(case["loss"].item()), case["kind"]
        assert (pred.grad - case["grad"]).abs().max() <= 1e-5 * case["grad"].abs().max(), case["kind"]


def test_soft_argmax_matches_reference_decoder():
    ref = load_reference("decoder.pt")
    assert (soft_argmax(ref["heatmap"]) - ref["coords"]).abs().max() <= 1e-6


def _gaussian(h: int, w: int, mean, cov) -> torch.Tensor:
    ys = torch.linspace(-1, 1, h, dtype=torch.float64)
    xs = torch.linspace(-1, 1, w, dtype=torch.float64)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    d = torch.stack([xx - mean[0], yy - mean[1]], -1)
    inv = torch.linalg.inv(torch.as_tensor(cov, dtype=torch.float64))
    return torch.exp(-0.5 * torch.einsum("hwi,ij,hwj->hw", d, inv, d))


@pytest.mark.parametrize("angle_deg", [0, 20, 45, 75, 110, 160])
def test_eigenvectors_rotate_with_the_distribution(angle_deg):
    # An elongated Gaussian rotated by `angle`: the tangent eigenvector must point along
    # the angle, the normal across it.  Indexing eigenvector rows instead of columns
    # (the original's CPU-only trick) fails this for most angles.
    a = math.radians(angle_deg)
    rot = torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]], dtype=torch.float64)
    cov = rot @ torch.diag(torch.tensor([0.04, 0.002], dtype=torch.float64)) @ rot.T
    heat = _gaussian(64, 64, (0.1, -0.05), cov)[None, None]
    m = heatmap_moments(heat)
    normal, tangent = m.eigenvectors[0, 0, :, 0], m.eigenvectors[0, 0, :, 1]
    assert abs(float(tangent @ torch.tensor([math.cos(a), math.sin(a)], dtype=torch.float64))) > 0.999
    assert abs(float(normal @ torch.tensor([-math.sin(a), math.cos(a)], dtype=torch.float64))) > 0.999
    assert m.eigenvalues[0, 0, 0] < m.eigenvalues[0, 0, 1]
    # And they agree with a general solver (as eigenvectors: columns).
    evals, evecs = torch.linalg.eigh(m.covariance[0, 0])
    assert torch.allclose(m.eigenvalues[0, 0], evals, atol=1e-12)
    for k in range(2):
        assert abs(float(evecs[:, k] @ m.eigenvectors[0, 0, :, k])) > 1 - 1e-9


def test_moments_agree_with_direct_definition():
    gen = torch.Generator().manual_seed(0)
    heat = torch.rand(3, 5, 16, 20, generator=gen, dtype=torch.float64) ** 4
    m = heatmap_moments(heat)
    p = heat / heat.sum((-2, -1), keepdim=True)
    ys = torch.linspace(-1, 1, 16, dtype=torch.float64)
    xs = torch.linspace(-1, 1, 20, dtype=torch.float64)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    mx, my = (p * xx).sum((-2, -1)), (p * yy).sum((-2, -1))
    dx, dy = xx - mx[..., None, None], yy - my[..., None, None]
    v1 = p.sum((-2, -1)) + 1e-5
    v2 = (p * p).sum((-2, -1)) + 1e-5
    den = v1 - v2 / v1
    cxy = (p * dx * dy).sum((-2, -1)) / den
    assert torch.allclose(m.mean, torch.stack([mx, my], -1))
    assert torch.allclose(m.covariance[..., 0, 1], cxy)
    assert torch.allclose(m.covariance[..., 0, 0], (p * dx * dx).sum((-2, -1)) / den)


def test_star_suppresses_error_along_the_ambiguous_direction():
    # Same error size, once along the elongated axis and once across it.
    cov = torch.tensor([[0.05, 0.0], [0.0, 0.002]], dtype=torch.float64)
    heat = _gaussian(64, 64, (0.0, 0.0), cov)[None, None].float()
    loss = STARLoss()
    along = loss(heat, torch.tensor([[[0.1, 0.0]]]))
    across = loss(heat, torch.tensor([[[0.0, 0.1]]]))
    assert along < across


@pytest.mark.parametrize("dist", ["smoothl1", "l1", "l2", "wing"])
@pytest.mark.parametrize("version", [1, 2])
def test_every_distance_and_version_runs(dist, version):
    heat = torch.rand(2, 4, 32, 32).pow(6).requires_grad_(True)
    gt = torch.rand(2, 4, 2) * 2 - 1
    loss = STARLoss(dist=dist, version=version)(heat, gt)
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert torch.isfinite(heat.grad).all()


def test_eigenvalue_floor_is_explicit():
    heat = torch.zeros(1, 1, 16, 16)
    heat[0, 0, 8, 8] = 1.0  # one-pixel spike: zero covariance
    gt = torch.tensor([[[0.5, 0.5]]])
    plain = STARLoss()(heat, gt)
    floored = STARLoss(min_eigenvalue=1e-2)(heat, gt)
    assert floored < plain
    with pytest.raises(ValueError):
        STARLoss(min_eigenvalue=-1.0)
    with pytest.raises(ValueError, match="unknown STAR distance"):
        STARLoss(dist="huber")


def test_coordinate_losses():
    pred = torch.zeros(2, 3, 2)
    gt = torch.full((2, 3, 2), 0.5)
    assert L1Loss()(pred, gt).item() == pytest.approx(0.5)
    assert L2Loss()(pred, gt).item() == pytest.approx(0.25)
    assert SmoothL1Loss()(pred, pred).item() == 0.0


def _degenerate_map(kind: str, value: float, h: int = 16, w: int = 16) -> torch.Tensor:
    heat = torch.zeros(1, 2, h, w)
    if kind == "zeros":
        pass
    elif kind == "spike":
        heat[:, :, 3, 11] = value
    elif kind == "constant":
        heat.fill_(value)
    elif kind == "line":
        heat[:, :, 5, :] = value  # rank-one covariance
    elif kind == "two":
        heat[:, :, 2, 2] = value
        heat[:, :, 9, 9] = value
    return heat


@settings(max_examples=60, deadline=None)
@given(
    kind=st.sampled_from(["zeros", "spike", "constant", "line", "two"]),
    value=st.sampled_from([1e-12, 1e-6, 1.0, 7.5, 1e6, 1e20]),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    version=st.sampled_from([1, 2]),
    dist=st.sampled_from(["smoothl1", "l1", "l2", "wing"]),
    gx=st.floats(-1, 1),
    gy=st.floats(-1, 1),
)
def test_star_is_finite_on_degenerate_maps(kind, value, dtype, version, dist, gx, gy):
    heat = _degenerate_map(kind, value)
    if dtype is not torch.float32:
        heat = heat.clamp(max=torch.finfo(dtype).max / 4096)
    heat = heat.to(dtype).requires_grad_(True)
    gt = torch.tensor([[[gx, gy], [gy, gx]]])
    loss = STARLoss(dist=dist, version=version)(heat, gt)
    loss.backward()
    assert torch.isfinite(loss), (kind, value, dtype)
    assert torch.isfinite(heat.grad.float()).all(), (kind, value, dtype)


@settings(max_examples=40, deadline=None)
@given(
    scale=st.sampled_from([0.0, 1e-8, 1.0, 1e4, 1e15]),
    seed=st.integers(0, 2**16),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
)
def test_star_is_finite_on_random_maps(scale, seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    heat = torch.rand(2, 3, 16, 16, generator=gen).pow(4) * scale
    if dtype is not torch.float32:
        heat = heat.clamp(max=torch.finfo(dtype).max / 4096)
    heat = heat.to(dtype).requires_grad_(True)
    gt = torch.rand(2, 3, 2, generator=gen) * 2 - 1
    loss = STARLoss()(heat, gt)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(heat.grad.float()).all()


def test_awing_is_finite_in_half_precision():
    pred = torch.rand(2, 3, 8, 8).half().requires_grad_(True)
    gt = torch.rand(2, 3, 8, 8).half()
    loss = AWingLoss()(pred, gt)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(pred.grad.float()).all()


def test_awing_target_terms_computed_once_give_the_same_loss_and_gradient():
    # The recipe computes AWing's target-only terms once per batch and reuses them per stack.
    gen = torch.Generator().manual_seed(0)
    gt = torch.rand(2, 3, 16, 16, generator=gen)
    loss_fn = AWingLoss()
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.rand(2, 3, 16, 16, generator=gen).to(dtype).requires_grad_(True)
        b = a.detach().clone().requires_grad_(True)
        plain = loss_fn(a, gt)
        reused = loss_fn(b, gt, loss_fn.target_terms(gt, torch.float32))
        plain.backward()
        reused.backward()
        assert torch.equal(plain, reused) and torch.equal(a.grad, b.grad)


def test_coordinate_losses_see_float32_coordinates_under_bf16():
    from staralign.heatmaps import soft_argmax

    heat = torch.rand(1, 4, 16, 16, dtype=torch.bfloat16)
    coords = soft_argmax(heat)
    assert coords.dtype == torch.float32
    torch.testing.assert_close(coords, soft_argmax(heat.float()), rtol=0, atol=1e-6)


@pytest.mark.slow  # inductor's C++ compile: ~30 s on 2 cores unless its cache already holds this graph
def test_compiled_star_matches_eager_reference():
    # torch.compile fuses STAR's many small kernels (7x faster on an H200); it must not
    # change the numbers.
    case = load_reference("star_loss.pt")[0]
    compiled = torch.compile(STARLoss(w=case["w"], dist=case["dist"]))
    heat = case["heatmap"].clone().requires_grad_(True)
    loss = compiled(heat, case["gt"])
    loss.backward()
    assert abs(loss.item() - case["loss_v2"].item()) <= 1e-5 * abs(case["loss_v2"].item())
    assert _rel(heat.grad, case["grad_v2"]) <= 1e-3
