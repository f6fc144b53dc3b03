"""What a synthetic face is made of, how each quantity is drawn at random, and the tags.

A face is fully described by a :class:`FaceParams` (shape, expression, pose,
colours, lighting, degradations, occluders, plus one integer seed for unimportant
detail such as background clutter and pixel noise), so ``render_face(params)`` is a
pure function and a test can take a random face and switch one thing off.

Canonical units: the face is built in a frame where the face half-width at the
temples is about 0.5, x points to the image right, y down, the eye line is near
y = 0 and the chin near y = 0.85.  Angles are in degrees.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "FaceParams",
    "OCCLUDER_KINDS",
    "Occluder",
    "TAG_THRESHOLDS",
    "face_tags",
    "sample_params",
]

Color = tuple[int, int, int]  # BGR

OPEN_MAX = 0.13  # canonical mouth opening at mouth_open == 1
OCCLUDER_KINDS = ("ellipse", "rect", "blob", "bar", "stripes", "sunglasses", "facemask")

# Thresholds that turn generator parameters into the six WFLW attribute tags
# (documented in docs/synthetic.md; tests check the tags against them).
TAG_THRESHOLDS = {
    "pose_yaw": 30.0,  # |yaw| >= this (degrees) ...
    "pose_pitch": 20.0,  # ... or |pitch| >= this ...
    "pose_roll": 30.0,  # ... or |roll| >= this -> pose
    "mouth_open": 0.4,  # mouth_open >= this ...
    "smile": 0.5,  # ... or |smile| >= this ...
    "brow_raise": 0.5,  # ... or brow_raise >= this ...
    "eye_closure": 0.5,  # ... or either eye's closure >= this -> expression
    "light_strength": 0.5,  # light_strength >= this ...
    "brightness_low": 0.7,  # ... or brightness < this ...
    "brightness_high": 1.3,  # ... or brightness > this -> illumination
    "occluded_points": 5,  # at least this many landmarks under an occluder -> occlusion
    "blur": 0.01,  # blur sigma >= this x face-box side -> blur
}

# Base colours (BGR), jittered per face.
_SKIN = np.array([[190, 210, 240], [150, 180, 225], [110, 150, 200], [80, 120, 175],
                  [60, 90, 140], [45, 62, 100]], np.float64)
_HAIR = np.array([[18, 18, 22], [30, 42, 62], [45, 70, 110], [95, 160, 205], [40, 65, 150],
                  [150, 150, 155], [60, 60, 60]], np.float64)
_IRIS = np.array([[30, 50, 90], [20, 25, 35], [150, 115, 70], [80, 125, 85], [55, 95, 125],
                  [120, 120, 110]], np.float64)
_LIPSTICK = np.array([[45, 35, 190], [45, 25, 120], [150, 95, 225], [110, 45, 115],
                      [50, 40, 70], [70, 90, 210]], np.float64)
_SHADOW = np.array([[150, 80, 40], [130, 60, 110], [60, 80, 110], [40, 40, 40], [80, 130, 60]],
                   np.float64)


@dataclass(frozen=True)
class Occluder:
    """An object in front of the face, placed relative to one landmark.

    ``offset`` and ``size`` are in units of the face-box side, ``anchor`` is the
    landmark index it is centred near (ignored by sunglasses/facemask, which sit on
    the eyes/mouth), ``angle`` its in-plane rotation in degrees.
    """

    kind: str
    anchor: int
    offset: tuple[float, float]
    size: tuple[float, float]
    angle: float
    color: Color
    color2: Color


@dataclass(frozen=True)
class FaceParams:
    """Everything that determines one rendered face (see the module docstring for units)."""

    # --- shape (identity)
    half_width: float = 0.5  # face half-width at the temples
    asym: float = 0.0  # right half is (1 + asym), left (1 - asym) times half_width
    temple_y: float = -0.1  # height of the jaw ends (landmarks 0 and 32)
    jaw_length: float = 0.95  # temple-to-chin height
    jaw_square: float = 2.5  # superellipse exponent: 2 oval, 3+ square jaw
    cranium: float = 0.78  # height of the skull above the temples
    face_depth: float = 0.14  # how far the face centre stands out of the outline plane
    eye_y: float = 0.0
    eye_x: float = 0.22  # eye centre distance from the midline
    eye_w: float = 0.2  # eye width (corner to corner)
    eye_open: float = 0.3  # upper-lid height / eye width
    eye_low: float = 0.15  # lower-lid depth / eye width
    eye_tilt: float = 0.0  # outer corners this much higher than inner ones
    iris_r: float = 0.21  # iris radius / eye width
    pupil_r: float = 0.45  # pupil radius / iris radius
    brow_gap: float = 0.13  # brow inner end height above the eye line
    brow_inner_x: float = 0.08
    brow_ext: float = 0.05  # brow outer end beyond the outer eye corner
    brow_tilt: float = 0.02  # outer end this much lower than the inner end
    brow_arch: float = 0.03
    brow_thick: float = 0.045
    nose_top_y: float = -0.03  # landmark 51
    nose_tip_y: float = 0.3  # landmark 54
    nose_alar_y: float = 0.34  # landmarks 55 and 59
    nose_sub: float = 0.02  # landmark 57 this much below 55/59
    nose_w: float = 0.1  # alar half-width
    nose_depth: float = 0.12
    mouth_y: float = 0.52
    mouth_hw: float = 0.18
    lip_up: float = 0.045
    lip_low: float = 0.055
    lip_bow: float = 0.3  # depth of the cupid's-bow dip, relative
    # --- expression
    mouth_open: float = 0.0  # 0 closed .. 1 wide open
    smile: float = 0.0  # -0.3 .. 1: mouth corners up, mouth wider
    brow_raise: float = 0.0  # 0 .. 1
    eye_closure: tuple[float, float] = (0.0, 0.0)  # image-left eye, image-right eye; 1 closed
    gaze: tuple[float, float] = (0.0, 0.0)  # -1 .. 1
    # --- pose and placement
    yaw: float = 0.0  # > 0 turns the face towards the image right
    pitch: float = 0.0  # > 0 tilts the face up
    roll: float = 0.0  # in-plane rotation
    face_frac: float = 0.6  # face-box side / image size
    center: tuple[float, float] = (0.5, 0.5)  # face-box centre / image size
    # --- appearance
    skin: Color = (150, 180, 225)
    hair_color: Color = (30, 42, 62)
    hair_style: int = 1  # 0 bald, 1 short, 2 long
    hairline_y: float = -0.45
    hair_volume: float = 0.08
    hair_length: float = 1.0  # bottom of long hair
    brow_color: Color = (30, 40, 55)
    iris_color: Color = (30, 50, 90)
    lip_color: Color = (110, 120, 200)
    makeup: bool = False
    shadow_color: Color = (150, 80, 40)
    ears: bool = True
    clothes_color: Color = (90, 60, 40)
    background: tuple[Color, Color] = ((120, 130, 110), (90, 100, 80))
    clutter: int = 6
    # --- illumination
    light_angle: float = 0.0  # direction the light comes from, degrees in the image plane
    light_strength: float = 0.0  # gain varies by +- this across the face
    brightness: float = 1.0
    contrast: float = 1.0
    tint: tuple[float, float, float] = (1.0, 1.0, 1.0)
    shading: float = 0.0  # darkening towards the face outline
    # --- degradations
    blur: float = 0.0  # Gaussian sigma / face-box side
    motion_blur: bool = False  # a linear motion kernel of length 4 * sigma instead
    motion_angle: float = 0.0
    noise: float = 0.0  # luminance noise std in grey levels (triangular, near Gaussian)
    occluders: tuple[Occluder, ...] = field(default_factory=tuple)
    # --- unimportant detail (background clutter, hair strands, pixel noise)
    detail_seed: int = 0


# --------------------------------------------------------------------------- sampling


def _color(rng: np.random.Generator, palette: np.ndarray, jitter: float) -> Color:
    i = rng.integers(len(palette))
    c = palette[i] + rng.normal(0.0, jitter, 3)
    return tuple(int(v) for v in np.clip(c, 0, 255))  # type: ignore[return-value]


def _skin(rng: np.random.Generator) -> Color:
    t = rng.uniform(0, len(_SKIN) - 1)
    i = min(int(t), len(_SKIN) - 2)
    c = _SKIN[i] * (1 - (t - i)) + _SKIN[i + 1] * (t - i) + rng.normal(0, 6, 3)
    return tuple(int(v) for v in np.clip(c, 0, 255))  # type: ignore[return-value]


def _dist(a: Color, b: Color) -> float:
    return float(np.linalg.norm(np.subtract(a, b, dtype=np.float64)))


def _far_color(rng: np.random.Generator, avoid: Color, min_dist: float) -> Color:
    """A random colour at least ``min_dist`` from ``avoid`` (so the face outline stays visible)."""
    for _ in range(20):
        c = tuple(int(v) for v in rng.integers(0, 256, 3))
        if _dist(c, avoid) >= min_dist:
            return c  # type: ignore[return-value]
    # Fall back to the complement-ish colour, which is always far enough for skin tones.
    return tuple(int(255 - v) for v in avoid)  # type: ignore[return-value]


def _mixture(rng: np.random.Generator, p_wide: float, wide: tuple[float, float],
             narrow_std: float, limit: float) -> float:
    """Mostly near zero, sometimes anywhere in ``wide``: real datasets have a long tail."""
    if rng.random() < p_wide:
        return float(rng.uniform(*wide))
    return float(np.clip(rng.normal(0.0, narrow_std), -limit, limit))


def _occluder(rng: np.random.Generator, skin: Color) -> Occluder:
    kind = OCCLUDER_KINDS[int(rng.choice(len(OCCLUDER_KINDS),
                                         p=[0.2, 0.17, 0.2, 0.13, 0.12, 0.09, 0.09]))]
    anchor = int(rng.integers(0, 98))
    offset = (float(rng.normal(0, 0.08)), float(rng.normal(0, 0.08)))
    if kind == "bar":
        size = (float(rng.uniform(0.5, 1.0)), float(rng.uniform(0.05, 0.12)))
    elif kind in ("sunglasses", "facemask"):
        size = (1.0, 1.0)
    else:
        size = (float(rng.uniform(0.15, 0.4)), float(rng.uniform(0.15, 0.4)))
    if kind == "blob" and rng.random() < 0.5:  # a hand: skin-like but darker
        color = tuple(int(v * rng.uniform(0.7, 0.9)) for v in skin)
    else:
        color = tuple(int(v) for v in rng.integers(0, 256, 3))
    color2 = tuple(int(v) for v in rng.integers(0, 256, 3))
    return Occluder(kind, anchor, offset, size, float(rng.uniform(-180, 180)),
                    color, color2)  # type: ignore[arg-type]


def sample_params(rng: np.random.Generator) -> FaceParams:
    """Draw one random face.  Uses only ``rng`` (no global state), so a face is a
    function of the generator's seed."""
    u = rng.uniform
    half_width = u(0.46, 0.54)
    temple_y = u(-0.14, -0.06)
    eye_y = u(-0.02, 0.02)
    eye_w = u(0.17, 0.22)
    eye_x = u(max(0.19, eye_w / 2 + 0.085), 0.245)
    nose_tip_y = u(0.26, 0.34)
    nose_alar_y = nose_tip_y + u(0.02, 0.05)
    mouth_y = nose_alar_y + u(0.14, 0.19)
    lip_low = u(0.04, 0.065)
    jaw_min = mouth_y + lip_low + 0.2 - temple_y
    jaw_length = max(u(0.85, 1.05), jaw_min)

    # Expression: mostly neutral, with a tail of strong expressions.
    mouth_open = u(0.3, 1.0) if rng.random() < 0.2 else u(0.0, 0.08)
    smile = u(0.3, 1.0) if rng.random() < 0.2 else float(np.clip(rng.normal(0, 0.1), -0.3, 0.3))
    brow_raise = u(0.3, 1.0) if rng.random() < 0.12 else u(0.0, 0.2)
    r = rng.random()
    if r < 0.08:  # blink
        c = u(0.5, 1.0)
        eye_closure = (c, float(np.clip(c + rng.normal(0, 0.05), 0, 1)))
    elif r < 0.12:  # wink
        c = u(0.6, 1.0)
        eye_closure = (c, u(0, 0.2)) if rng.random() < 0.5 else (u(0, 0.2), c)
    else:
        eye_closure = (u(0, 0.25), u(0, 0.25))
    gaze = (float(np.clip(rng.normal(0, 0.4), -1, 1)), float(np.clip(rng.normal(0, 0.3), -1, 1)))

    face_frac = u(0.45, 0.7)
    m = face_frac / 2 + 0.02
    center = (u(m, 1 - m), u(m, 1 - m))

    skin = _skin(rng)
    hair_color = _color(rng, _HAIR, 8)
    while _dist(hair_color, skin) < 45:
        hair_color = tuple(int(v * 0.6) for v in hair_color)  # darker until distinct
    hair_style = int(rng.choice(3, p=[0.08, 0.47, 0.45]))
    makeup = bool(rng.random() < 0.2)
    base_lip = np.array(skin, np.float64) * np.array([0.72, 0.62, 0.95]) + [0, 0, 15]
    lip_color = _color(rng, _LIPSTICK, 10) if makeup else tuple(
        int(v) for v in np.clip(base_lip + rng.normal(0, 6, 3), 0, 255))
    brow_color = tuple(int(v) for v in np.clip(
        np.array(hair_color, np.float64) * u(0.6, 0.9) + rng.normal(0, 5, 3), 0, 255))
    if _dist(brow_color, skin) < 60:
        brow_color = tuple(int(v * 0.45) for v in skin)
    bg1 = _far_color(rng, skin, 70)
    bg2 = tuple(int(v) for v in np.clip(np.add(bg1, rng.normal(0, 30, 3)), 0, 255))

    light_strength = u(0.5, 0.9) if rng.random() < 0.2 else u(0.0, 0.35)
    r = rng.random()
    brightness = u(0.45, 0.65) if r < 0.05 else u(1.35, 1.6) if r < 0.1 else u(0.8, 1.2)

    blur = 0.0
    motion = False
    if rng.random() < 0.25:
        blur = u(0.003, 0.022)
        motion = bool(rng.random() < 0.3)
    noise = u(1.0, 8.0) if rng.random() < 0.5 else 0.0

    occluders: tuple[Occluder, ...] = ()
    if rng.random() < 0.25:
        occluders = tuple(_occluder(rng, skin) for _ in range(1 if rng.random() < 0.8 else 2))

    return FaceParams(
        half_width=half_width,
        asym=float(np.clip(rng.normal(0, 0.015), -0.04, 0.04)),
        temple_y=temple_y,
        jaw_length=jaw_length,
        jaw_square=u(2.0, 3.2),
        cranium=u(0.7, 0.85),
        face_depth=u(0.12, 0.16),
        eye_y=eye_y,
        eye_x=eye_x,
        eye_w=eye_w,
        eye_open=u(0.22, 0.34),
        eye_low=u(0.1, 0.18),
        eye_tilt=u(-0.02, 0.03),
        iris_r=u(0.19, 0.23),
        pupil_r=u(0.35, 0.55),
        brow_gap=u(0.1, 0.15),
        brow_inner_x=u(0.06, 0.1),
        brow_ext=u(0.02, 0.07),
        brow_tilt=u(-0.01, 0.04),
        brow_arch=u(0.015, 0.045),
        brow_thick=u(0.03, 0.055),
        nose_top_y=u(-0.06, -0.01),
        nose_tip_y=nose_tip_y,
        nose_alar_y=nose_alar_y,
        nose_sub=u(0.01, 0.03),
        nose_w=u(0.08, 0.12),
        nose_depth=u(0.09, 0.14),
        mouth_y=mouth_y,
        mouth_hw=u(0.15, 0.21),
        lip_up=u(0.035, 0.055),
        lip_low=lip_low,
        lip_bow=u(0.1, 0.3),
        mouth_open=mouth_open,
        smile=smile,
        brow_raise=brow_raise,
        eye_closure=eye_closure,
        gaze=gaze,
        yaw=_mixture(rng, 0.25, (-45.0, 45.0), 10.0, 45.0),
        pitch=_mixture(rng, 0.2, (-25.0, 25.0), 7.0, 25.0),
        roll=_mixture(rng, 0.2, (-40.0, 40.0), 8.0, 40.0),
        face_frac=face_frac,
        center=center,
        skin=skin,
        hair_color=hair_color,  # type: ignore[arg-type]
        hair_style=hair_style,
        hairline_y=u(-0.58, -0.42),
        hair_volume=u(0.03, 0.14),
        hair_length=u(0.6, 1.5),
        brow_color=brow_color,  # type: ignore[arg-type]
        iris_color=_color(rng, _IRIS, 10),
        lip_color=lip_color,  # type: ignore[arg-type]
        makeup=makeup,
        shadow_color=_color(rng, _SHADOW, 15),
        ears=bool(rng.random() < 0.6),
        clothes_color=tuple(int(v) for v in rng.integers(0, 256, 3)),  # type: ignore[arg-type]
        background=(bg1, bg2),  # type: ignore[arg-type]
        clutter=int(rng.integers(2, 13)),
        light_angle=u(-180.0, 180.0),
        light_strength=light_strength,
        brightness=brightness,
        contrast=u(0.75, 1.2),
        tint=tuple(float(v) for v in np.clip(1.0 + rng.normal(0, 0.05, 3), 0.85, 1.15)),  # type: ignore[arg-type]
        shading=u(0.1, 0.3),
        blur=blur,
        motion_blur=motion,
        motion_angle=u(0.0, 180.0),
        noise=noise,
        occluders=occluders,
        detail_seed=int(rng.integers(0, 2**31 - 1)),
    )


# --------------------------------------------------------------------------- tags


def face_tags(params: FaceParams, n_occluded: int) -> tuple[int, ...]:
    """The six WFLW attribute flags (pose, expression, illumination, make-up, occlusion,
    blur) from the generator's parameters, by the thresholds in ``TAG_THRESHOLDS``.

    ``n_occluded`` is the number of landmarks an occluder covers (known only after
    rendering, which is why it is an argument).
    """
    t = TAG_THRESHOLDS
    pose = (abs(params.yaw) >= t["pose_yaw"] or abs(params.pitch) >= t["pose_pitch"]
            or abs(params.roll) >= t["pose_roll"])
    expression = (params.mouth_open >= t["mouth_open"] or abs(params.smile) >= t["smile"]
                  or params.brow_raise >= t["brow_raise"]
                  or max(params.eye_closure) >= t["eye_closure"])
    illumination = (params.light_strength >= t["light_strength"]
                    or params.brightness < t["brightness_low"]
                    or params.brightness > t["brightness_high"])
    occlusion = n_occluded >= t["occluded_points"]
    blur = params.blur >= t["blur"]
    return tuple(int(bool(v)) for v in (pose, expression, illumination, params.makeup,
                                         occlusion, blur))

