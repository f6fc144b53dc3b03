"""Temporal filters: step and ramp responses, and the Kalman filter against a textbook one."""

from __future__ import annotations

import numpy as np
import pytest

from staralign.inference.smoothing import (
    AmbiguityKalmanFilter,
    NoFilter,
    OneEuroFilter,
    make_filter,
)

FPS, UNIT = 30.0, 100.0  # frames per second; face size in pixels


def _run(filt, positions, cov=None):
    """Feed (T, N, 2) positions; the filtered (T, N, 2)."""
    return np.stack([filt.update(p, cov, t / FPS, UNIT)[0] for t, p in enumerate(positions)])


def _step(frames=60, at=10, height=10.0):
    x = np.zeros((frames, 1, 2))
    x[at:] = height
    return x


def _ramp(frames=90, speed=2.0):
    x = np.zeros((frames, 1, 2))
    x[:, 0, 0] = speed * np.arange(frames)
    x[:, 0, 1] = -0.5 * speed * np.arange(frames)
    return x


def test_no_filter_is_the_identity():
    x = np.random.default_rng(0).normal(size=(20, 5, 2))
    cov = np.eye(2)[None].repeat(5, 0)
    out, c = NoFilter().update(x[0], cov, 0.0, UNIT)
    assert np.array_equal(out, x[0]) and c is cov
    assert np.array_equal(_run(NoFilter(), x), x)


@pytest.mark.parametrize("name", ["oneeuro", "ambiguity"])
def test_step_response_settles_without_jumping_at_once(name):
    cov = np.eye(2)[None] * 4.0  # a 2-pixel measurement std
    out = _run(make_filter(name), _step(), cov)
    assert np.allclose(out[:10], 0)
    assert 0 < out[10, 0, 0] < 10  # smoothed: it does not jump all the way in one frame
    assert np.all(np.diff(out[10:30, 0, 0]) > -0.5)  # rises (the Kalman filter may overshoot a little)
    assert abs(out[-1, 0, 0] - 10) < 0.1  # and settles on the new value


def test_kalman_follows_a_ramp_without_lag_one_euro_lags_a_little():
    cov = np.eye(2)[None] * 4.0
    ramp = _ramp()
    kf = _run(AmbiguityKalmanFilter(), ramp, cov)
    oe = _run(OneEuroFilter(), ramp, cov)
    late = slice(60, None)
    # constant velocity is the Kalman filter's model: no steady-state lag
    assert np.abs(kf[late] - ramp[late]).max() < 0.05
    # the One Euro filter is a first-order low-pass: it trails a ramp by a constant amount
    lag = ramp[late, 0, 0] - oe[late, 0, 0]
    assert np.all(lag > 0.05) and np.ptp(lag) < 0.05 * lag.mean()


def test_one_euro_cutoff_rises_with_speed():
    slow, fast = _ramp(speed=0.5), _ramp(speed=8.0)
    lag_slow = (slow - _run(OneEuroFilter(), slow))[-1, 0, 0] / 0.5  # lag in frames
    lag_fast = (fast - _run(OneEuroFilter(), fast))[-1, 0, 0] / 8.0
    assert lag_fast < lag_slow


def test_kalman_smooths_more_along_the_ambiguous_direction():
    """Noise along a landmark's long heatmap axis is removed more than noise across it."""
    rng = np.random.default_rng(0)
    tangent = np.array([np.cos(0.4), np.sin(0.4)])
    normal = np.array([-tangent[1], tangent[0]])
    cov = (9.0 * np.outer(tangent, tangent) + 0.25 * np.outer(normal, normal))[None]
    noise = rng.normal(size=(400, 1, 1)) * tangent * 3.0 + rng.normal(size=(400, 1, 1)) * normal * 0.5
    out = _run(AmbiguityKalmanFilter(motion=2.0), noise, cov)[50:]
    along, across = np.std(out @ tangent) / 3.0, np.std(out @ normal) / 0.5
    assert along < 0.8 * across


def _reference_cv_kalman(z, r, q, dt, p0_pos, p0_vel):
    """A textbook constant-velocity Kalman filter, state (x, y, vx, vy), written out in full."""
    f = np.array([[1, 0, dt, 0], [0, 1, 0, dt], [0, 0, 1, 0], [0, 0, 0, 1]], float)
    g = np.array([[dt ** 3 / 3, 0, dt ** 2 / 2, 0], [0, dt ** 3 / 3, 0, dt ** 2 / 2],
                  [dt ** 2 / 2, 0, dt, 0], [0, dt ** 2 / 2, 0, dt]], float)
    qm = q * g
    h = np.array([[1, 0, 0, 0], [0, 1, 0, 0]], float)
    rm = r * np.eye(2)
    x = np.array([z[0, 0], z[0, 1], 0.0, 0.0])
    p = np.diag([p0_pos, p0_pos, p0_vel, p0_vel])
    out = [x[:2].copy()]
    covs = [p[:2, :2].copy()]
    for zk in z[1:]:
        x = f @ x
        p = f @ p @ f.T + qm
        s = h @ p @ h.T + rm
        k = p @ h.T @ np.linalg.inv(s)
        x = x + k @ (zk - h @ x)
        p = (np.eye(4) - k @ h) @ p
        out.append(x[:2].copy())
        covs.append(p[:2, :2].copy())
    return np.array(out), np.array(covs)


def test_kalman_with_isotropic_covariance_is_the_standard_constant_velocity_filter():
    rng = np.random.default_rng(1)
    t = np.arange(80) / FPS
    truth = np.stack([40 * np.sin(2 * t), 25 * np.cos(3 * t)], 1)
    z = truth + rng.normal(scale=1.5, size=truth.shape)
    r, motion = 2.25, 3.0
    floor = 1e-4
    kf = AmbiguityKalmanFilter(motion=motion, initial_speed=0.5, floor=floor)
    got, got_cov = [], []
    for k, zk in enumerate(z):
        p, c = kf.update(zk[None], np.eye(2)[None] * r, k / FPS, UNIT)
        got.append(p[0])
        got_cov.append(c[0])
    want, want_cov = _reference_cv_kalman(z, r + floor, motion * UNIT ** 2, 1 / FPS, r + floor, (0.5 * UNIT) ** 2)
    assert np.allclose(got, want, atol=1e-9)
    assert np.allclose(got_cov, want_cov, atol=1e-9)
    assert np.sqrt(np.mean((np.array(got) - truth) ** 2)) < np.sqrt(np.mean((z - truth) ** 2))


def test_filters_keep_shapes_and_restart_on_a_new_point_count():
    for name in ("none", "oneeuro", "ambiguity"):
        f = make_filter(name)
        a, _ = f.update(np.zeros((98, 2)), None, 0.0, UNIT)
        b, _ = f.update(np.ones((68, 2)), None, 0.1, UNIT)
        assert a.shape == (98, 2) and b.shape == (68, 2)
    with pytest.raises(ValueError, match="unknown smoothing"):
        make_filter("median")
    with pytest.raises(ValueError, match="motion"):
        AmbiguityKalmanFilter(motion=0)


def test_the_stability_experiment_runs_end_to_end_and_resumes_from_its_records(tiny_wflw_weights, tmp_path):
    """`staralign experiment stability` on a tiny model and two short videos: every filter and
    landmark group gets finite NME and jitter; a second run reads the recorded sequences."""
    import json

    from staralign.cli import main
    from staralign.experiments.stability import FILTERS, GROUPS

    out = tmp_path / "stability"
    args = ["experiment", "stability", "--weights", str(tiny_wflw_weights), "--out", str(out), "--seeds", "2",
            "--frames", "8", "--size", "96", "--detect-every", "4"]
    assert main(args) == 0
    result = json.loads((out / "stability.json").read_text())
    assert result["seeds"] == [0, 1] and set(result["summary"]) == set(FILTERS)
    for name in FILTERS:
        assert set(result["summary"][name]) == set(GROUPS)
        for metric in ("nme", "jitter"):
            assert np.isfinite(result["summary"][name]["all"][metric]["mean"]), (name, metric)
    records = sorted(p.name for p in out.glob("seed_*.npz"))
    assert len(records) == 2
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("seed_*.npz")}
    assert main(args) == 0  # the recorded sequences are read again, not re-recorded
    assert {p: p.stat().st_mtime_ns for p in out.glob("seed_*.npz")} == stamps
    assert "| ambiguity | all |" in (out / "stability.md").read_text()
    other = tmp_path / "other.safetensors"  # another model into the same folder records its own
    other.write_bytes(tiny_wflw_weights.read_bytes())
    assert main([*args[:3], str(other), *args[4:]]) == 0
    assert len(list(out.glob("seed_*.npz"))) == 4 and not list(out.glob("*.tmp*"))
