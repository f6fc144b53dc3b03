"""Temporal filters for one face's landmarks across video frames (``--smooth``).

Every filter is an object with ``update(points, covariance, t, unit)`` returning the
filtered ``(points, covariance)`` for the frame at time ``t`` (seconds), and it keeps
its own state between calls (one filter per track).  ``points`` are (N, 2) image
pixels, ``covariance`` the (N, 2, 2) heatmap covariances in pixels squared (or
None), ``unit`` the face size in pixels (the crop's ``scale * 200``), so that the
parameters mean the same for a small and a large face.

* :class:`NoFilter` (``none``) -- the network's landmarks as they are.
* :class:`OneEuroFilter` (``oneeuro``) -- the standard baseline (Casiez, Roussel and
  Vogel, CHI 2012): a first-order low-pass whose cutoff rises with speed, per
  coordinate; it ignores the covariance (passed through unchanged).
* :class:`AmbiguityKalmanFilter` (``ambiguity``) -- a constant-velocity Kalman filter
  per landmark whose measurement noise is that landmark's heatmap covariance, so
  a jaw point is smoothed strongly along the jaw line (where STAR's heatmap is
  long) and little across it (where it is sharp).  Its one parameter, ``motion``,
  is the process noise: the spectral density of the (white-noise) acceleration, in
  face sizes squared per second cubed.  Larger follows motion faster and smooths
  less.  The covariance it returns is the filtered (posterior) position covariance.

:func:`make_filter` builds one by name; :data:`SMOOTHERS` lists the names.
"""

from __future__ import annotations

import math
from typing import Protocol

import numpy as np

__all__ = [
    "DEFAULT_MOTION",
    "SMOOTHERS",
    "AmbiguityKalmanFilter",
    "LandmarkFilter",
    "NoFilter",
    "OneEuroFilter",
    "make_filter",
]

SMOOTHERS = ("none", "oneeuro", "ambiguity")

# Chosen with ``staralign experiment stability`` on the demo model (docs/experiments.md).
DEFAULT_MOTION = 30.0
DEFAULT_MIN_CUTOFF = 4.0  # Hz
DEFAULT_BETA = 2.0  # per (face size / s)


class LandmarkFilter(Protocol):
    """One track's temporal filter; see the module docstring."""

    def update(self, points: np.ndarray, covariance: np.ndarray | None, t: float,
               unit: float) -> tuple[np.ndarray, np.ndarray | None]: ...


class NoFilter:
    """The measurements unchanged (``--smooth none``)."""

    def update(self, points: np.ndarray, covariance: np.ndarray | None, t: float,
               unit: float) -> tuple[np.ndarray, np.ndarray | None]:
        return np.asarray(points, np.float64), covariance


def _alpha(cutoff: np.ndarray | float, dt: float) -> np.ndarray | float:
    """Smoothing factor of a first-order low-pass with ``cutoff`` Hz sampled every ``dt`` s."""
    tau = 1.0 / (2.0 * math.pi * np.asarray(cutoff, np.float64))
    return 1.0 / (1.0 + tau / dt)


class OneEuroFilter:
    """The One Euro filter on every coordinate (``--smooth oneeuro``).

    ``min_cutoff`` (Hz) sets the smoothing at rest, ``beta`` how fast the cutoff
    rises with speed (per face size per second, so it does not depend on the face's
    size in pixels), ``d_cutoff`` (Hz) the low-pass on the speed estimate.
    """

    def __init__(self, min_cutoff: float = DEFAULT_MIN_CUTOFF, beta: float = DEFAULT_BETA,
                 d_cutoff: float = 1.0) -> None:
        self.min_cutoff, self.beta, self.d_cutoff = float(min_cutoff), float(beta), float(d_cutoff)
        self.x: np.ndarray | None = None
        self.dx: np.ndarray | None = None
        self.t = 0.0

    def update(self, points: np.ndarray, covariance: np.ndarray | None, t: float,
               unit: float) -> tuple[np.ndarray, np.ndarray | None]:
        z = np.asarray(points, np.float64)
        if self.x is None or self.dx is None or self.x.shape != z.shape:  # first frame, or a new layout
            self.x, self.dx, self.t = z.copy(), np.zeros_like(z), float(t)
        if not t > self.t:  # the first frame, or a repeated time: nothing to filter
            return self.x.copy(), covariance
        dt = float(t) - self.t
        dx = (z - self.x) / dt
        self.dx = self.dx + _alpha(self.d_cutoff, dt) * (dx - self.dx)
        cutoff = self.min_cutoff + self.beta * np.abs(self.dx) / max(float(unit), 1e-9)
        self.x = self.x + _alpha(cutoff, dt) * (z - self.x)
        self.t = float(t)
        return self.x.copy(), covariance


class AmbiguityKalmanFilter:
    """Constant-velocity Kalman filter per landmark, measurement noise = heatmap covariance.

    State per landmark: position (x, y) and velocity (vx, vy), pixels and pixels/s.
    Prediction over ``dt`` seconds: ``F = [[I, dt I], [0, I]]`` with the white-noise
    acceleration process noise ``Q = q [[dt^3/3 I, dt^2/2 I], [dt^2/2 I, dt I]]``,
    ``q = motion * unit^2``.  Update with the measured position and ``R`` = the
    landmark's covariance (pixels^2; ``floor`` pixels^2 is added to keep it positive
    definite).  The first measurement sets the position (covariance ``R``); the
    velocity starts at 0 with a standard deviation of ``initial_speed`` face sizes/s.
    Without a covariance (a model without ambiguity) ``R`` is isotropic,
    ``(fallback_std * unit)^2``.
    """

    def __init__(self, motion: float = DEFAULT_MOTION, initial_speed: float = 1.0,
                 floor: float = 1e-4, fallback_std: float = 0.01) -> None:
        if not motion > 0:
            raise ValueError(f"motion (the process noise) must be > 0, got {motion}")
        self.motion, self.initial_speed = float(motion), float(initial_speed)
        self.floor, self.fallback_std = float(floor), float(fallback_std)
        self.x: np.ndarray | None = None  # (N, 4)
        self.P: np.ndarray | None = None  # (N, 4, 4)
        self.t = 0.0

    def _measurement_noise(self, n: int, covariance: np.ndarray | None, unit: float) -> np.ndarray:
        if covariance is None:
            return np.broadcast_to(np.eye(2) * (self.fallback_std * unit) ** 2, (n, 2, 2)).copy()
        r = np.asarray(covariance, np.float64)
        r = 0.5 * (r + np.swapaxes(r, -1, -2)) + np.eye(2) * self.floor
        bad = ~np.isfinite(r).all(axis=(1, 2))
        if bad.any():
            r[bad] = np.eye(2) * (self.fallback_std * unit) ** 2
        return r

    def update(self, points: np.ndarray, covariance: np.ndarray | None, t: float,
               unit: float) -> tuple[np.ndarray, np.ndarray | None]:
        z = np.asarray(points, np.float64)
        n = z.shape[0]
        r = self._measurement_noise(n, covariance, float(unit))
        if self.x is None or self.P is None or self.x.shape[0] != n:  # first frame, or a new layout
            self.x = np.concatenate([z, np.zeros_like(z)], axis=1)
            self.P = np.zeros((n, 4, 4))
            self.P[:, :2, :2] = r
            self.P[:, 2:, 2:] = np.eye(2) * (self.initial_speed * unit) ** 2
            self.t = float(t)
        if not t > self.t:  # the first frame, or a repeated time: nothing to filter
            return self.x[:, :2].copy(), self.P[:, :2, :2].copy()
        dt = float(t) - self.t
        eye = np.eye(2)
        f = np.block([[eye, dt * eye], [np.zeros((2, 2)), eye]])
        q = self.motion * float(unit) ** 2
        qm = q * np.block([[dt ** 3 / 3 * eye, dt ** 2 / 2 * eye], [dt ** 2 / 2 * eye, dt * eye]])
        x = self.x @ f.T
        p = f @ self.P @ f.T + qm
        # update with H = [I 0]
        s = p[:, :2, :2] + r
        k = p[:, :, :2] @ np.linalg.inv(s)  # (N, 4, 2)
        innovation = z - x[:, :2]
        x = x + np.einsum("nij,nj->ni", k, innovation)
        p = p - k @ p[:, :2, :]
        self.x, self.P, self.t = x, 0.5 * (p + np.swapaxes(p, -1, -2)), float(t)
        return self.x[:, :2].copy(), self.P[:, :2, :2].copy()


def make_filter(name: str, motion: float = DEFAULT_MOTION, min_cutoff: float = DEFAULT_MIN_CUTOFF,
                beta: float = DEFAULT_BETA) -> LandmarkFilter:
    """A new filter by ``--smooth`` name (``none``, ``oneeuro``, ``ambiguity``)."""
    if name == "none":
        return NoFilter()
    if name == "oneeuro":
        return OneEuroFilter(min_cutoff=min_cutoff, beta=beta)
    if name == "ambiguity":
        return AmbiguityKalmanFilter(motion=motion)
    raise ValueError(f"unknown smoothing {name!r}; choose from {', '.join(SMOOTHERS)}")
