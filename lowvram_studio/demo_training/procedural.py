"""Seeded procedural video clips that teach the demo model to move.

Image-to-video models infer motion from the picture alone (plus the motion-bucket amount), so every
moving clip carries a visual cue that tells its motion class apart:

- ``left`` / ``right`` / ``up`` / ``down``: a solid arrow travels the way it points; the rest is still.
- ``rotate``: a pinwheel spins clockwise in place.
- ``zoom_in``: the camera zooms in on the frame centre; the scene holds a bullseye.
- ``zoom_out``: the camera zooms out from the frame centre; the scene holds a framed diamond.
- ``pan_left`` / ``pan_right``: the whole picture slides the way a double chevron ">>" points
  (classes name the direction the picture moves, not the camera).
- ``still``: plain circles, boxes and ellipses; nothing moves.

Every scene has a textured background and plain distractor shapes. A clip's ``magnitude`` is the
typical displacement of its moving content in pixels per frame at 128 px, so it does not depend on the
rendered size; ``motion_bucket_id`` follows from it as SVD derives its bucket from optical-flow speed.
Rendering is plain OpenCV polygon filling plus one affine warp per frame (well under a millisecond per
frame on one core), fast enough to generate training data on the fly in DataLoader workers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

import cv2
import numpy as np

REFERENCE_SIZE = 128  # magnitudes are quoted in pixels per frame at this frame size
BUCKET_PER_PIXEL = 36.0  # motion_bucket_id per pixel/frame: 3.5 px/frame -> bucket 126
SUBPIXEL_BITS = 4  # OpenCV fixed-point drawing: coordinates carry 4 fractional bits
_SUBPIXEL = 1 << SUBPIXEL_BITS


class MotionClass(str, Enum):
    """What moves in a clip and which way; values name the direction the picture content moves."""

    STILL = "still"
    LEFT = "left"
    RIGHT = "right"
    UP = "up"
    DOWN = "down"
    ROTATE = "rotate"
    ZOOM_IN = "zoom_in"
    ZOOM_OUT = "zoom_out"
    PAN_LEFT = "pan_left"
    PAN_RIGHT = "pan_right"


MOTION_CLASSES: tuple[MotionClass, ...] = tuple(MotionClass)

# Unit direction (dx, dy) in image coordinates (y points down) for the translating classes.
TRANSLATION_DIRECTIONS: dict[MotionClass, tuple[float, float]] = {
    MotionClass.LEFT: (-1.0, 0.0),
    MotionClass.RIGHT: (1.0, 0.0),
    MotionClass.UP: (0.0, -1.0),
    MotionClass.DOWN: (0.0, 1.0),
    MotionClass.PAN_LEFT: (-1.0, 0.0),
    MotionClass.PAN_RIGHT: (1.0, 0.0),
}

# Mean distance of a square's points from its centre, as a fraction of its side: turns a zoom rate
# into the mean flow speed of the frame.
_MEAN_RADIUS_OF_SQUARE = 0.3826


@dataclass(frozen=True)
class ClipSpec:
    """Shape of the clips a generator makes."""

    num_frames: int = 14
    size: int = 128


@dataclass
class Clip:
    """One rendered clip: frames (F, H, W, 3) uint8 RGB plus the motion it shows."""

    frames: np.ndarray
    motion: MotionClass
    magnitude: float
    seed: int

    @property
    def motion_bucket_id(self) -> int:
        return motion_bucket_for(self.magnitude)


def motion_bucket_for(magnitude: float) -> int:
    """SVD's motion_bucket_id (0..255) for a speed in pixels per frame at 128 px."""
    return int(round(min(255.0, max(0.0, magnitude * BUCKET_PER_PIXEL))))


@dataclass
class _Sprite:
    """A filled polygon (or several) with an outline, in canvas pixels."""

    polygons: list[np.ndarray]  # each (N, 2) float, relative to the sprite centre
    color: tuple[int, int, int]
    outline: tuple[int, int, int]
    thickness: int
    nested: bool = False  # polygons sit inside each other (bullseye): alternate the two colours


def _rotation(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, -s], [s, c]])


def _ngon(n: int, radius: float, phase: float = 0.0) -> np.ndarray:
    angles = phase + np.arange(n) * 2 * math.pi / n
    return radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _arrow(radius: float, angle: float) -> list[np.ndarray]:
    pts = np.array(
        [(-1, -0.28), (0.15, -0.28), (0.15, -0.72), (1, 0), (0.15, 0.72), (0.15, 0.28), (-1, 0.28)]
    )
    return [radius * pts @ _rotation(angle).T]


def _double_chevron(radius: float, angle: float) -> list[np.ndarray]:
    chevron = np.array([(-0.35, -0.8), (0.05, -0.8), (0.45, 0), (0.05, 0.8), (-0.35, 0.8), (0.05, 0)])
    rot = _rotation(angle).T
    return [radius * (chevron + (dx, 0)) @ rot for dx in (-0.45, 0.45)]


def _pinwheel(radius: float, angle: float) -> list[np.ndarray]:
    blades = []
    for k in range(4):
        a = angle + k * math.pi / 2
        blade = np.array([(0.0, 0.0), (1.0, 0.0), (0.55, 0.75)])
        blades.append(radius * blade @ _rotation(a).T)
    return blades


def _bullseye(radius: float) -> list[np.ndarray]:
    return [_ngon(48, radius * f) for f in (1.0, 0.62, 0.28)]


def _framed_diamond(radius: float) -> list[np.ndarray]:
    return [_ngon(4, radius), _ngon(4, radius * 0.6)]


def _random_color(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(0, 256, size=3))


def _contrasting_color(rng: np.random.Generator, against: np.ndarray) -> tuple[int, int, int]:
    """A colour whose luminance differs from ``against`` by at least a quarter of the range."""
    target = float(np.dot(against, (0.299, 0.587, 0.114)))
    for _ in range(32):
        color = rng.integers(0, 256, size=3)
        if abs(float(np.dot(color, (0.299, 0.587, 0.114))) - target) > 64:
            return tuple(int(v) for v in color)
    return (255, 255, 255) if target < 128 else (0, 0, 0)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Two colours mixed by a smooth noise field, optionally with soft stripes or checks."""
    cells = int(rng.integers(3, 7))
    field = cv2.resize(rng.random((cells, cells)).astype(np.float32), (size, size), interpolation=cv2.INTER_CUBIC)
    kind = int(rng.integers(0, 3))
    if kind > 0:
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
        period = float(rng.uniform(0.08, 0.25))
        angle = float(rng.uniform(0, math.pi))
        u = xx * math.cos(angle) + yy * math.sin(angle)
        if kind == 1:
            pattern = 0.5 + 0.5 * np.sin(2 * math.pi * u / period)
        else:
            v = -xx * math.sin(angle) + yy * math.cos(angle)
            pattern = 0.5 + 0.5 * np.sin(2 * math.pi * u / period) * np.sin(2 * math.pi * v / period)
        field = 0.6 * field + 0.4 * pattern
    field = np.clip(field, 0.0, 1.0)[..., None]
    c1 = np.array(_random_color(rng), dtype=np.float32)
    c2 = np.array(_random_color(rng), dtype=np.float32)
    return (c1 * (1 - field) + c2 * field).astype(np.uint8)


def _draw(canvas: np.ndarray, sprite: _Sprite, center: np.ndarray, angle: float = 0.0, scale: float = 1.0) -> None:
    """Fill the sprite's polygons at ``center`` with sub-pixel precision and anti-aliasing."""
    rot = _rotation(angle).T * scale
    shapes = [np.round((poly @ rot + center) * _SUBPIXEL).astype(np.int32) for poly in sprite.polygons]
    colors = (sprite.color, sprite.outline)
    for i, pts in enumerate(shapes):
        fill = colors[i % 2] if sprite.nested else sprite.color
        cv2.fillPoly(canvas, [pts], fill, lineType=cv2.LINE_AA, shift=SUBPIXEL_BITS)
        cv2.polylines(canvas, [pts], True, sprite.outline, sprite.thickness, cv2.LINE_AA, SUBPIXEL_BITS)


def _distractor(rng: np.random.Generator, radius: float, bg_color: np.ndarray) -> _Sprite:
    kind = int(rng.integers(0, 3))
    if kind == 0:
        polygons = [_ngon(40, radius)]
    elif kind == 1:
        w, h = rng.uniform(0.5, 1.0, size=2)
        polygons = [radius * np.array([(-w, -h), (w, -h), (w, h), (-w, h)]) @ _rotation(float(rng.uniform(0, 0.4))).T]
    else:
        polygons = [_ngon(40, radius) * (1.0, float(rng.uniform(0.45, 0.8)))]
    color = _contrasting_color(rng, bg_color)
    return _Sprite(polygons, color, _contrasting_color(rng, np.array(color)), 1)


def _scene_base(rng: np.random.Generator, canvas_size: int, view: float, count: int, avoid: np.ndarray | None):
    """Background plus ``count`` static distractors scattered over the visible region."""
    canvas = _background(rng, canvas_size)
    centre = canvas_size / 2
    for _ in range(count):
        for _attempt in range(8):
            pos = centre + rng.uniform(-0.42, 0.42, size=2) * view
            if avoid is None or np.linalg.norm(pos - avoid) > 0.3 * view:
                break
        radius = float(rng.uniform(0.06, 0.12)) * view
        sprite = _distractor(rng, radius, canvas[int(pos[1]) % canvas_size, int(pos[0]) % canvas_size].astype(np.float32))
        _draw(canvas, sprite, pos)
    return canvas


def _cue_sprite(motion: MotionClass, radius: float, rng: np.random.Generator, bg: np.ndarray) -> _Sprite:
    if motion in (MotionClass.LEFT, MotionClass.RIGHT, MotionClass.UP, MotionClass.DOWN):
        dx, dy = TRANSLATION_DIRECTIONS[motion]
        polygons = _arrow(radius, math.atan2(dy, dx))
    elif motion in (MotionClass.PAN_LEFT, MotionClass.PAN_RIGHT):
        polygons = _double_chevron(radius, 0.0 if motion is MotionClass.PAN_RIGHT else math.pi)
    elif motion is MotionClass.ROTATE:
        polygons = _pinwheel(radius, float(rng.uniform(0, math.pi / 2)))
    elif motion is MotionClass.ZOOM_IN:
        polygons = _bullseye(radius)
    else:
        polygons = _framed_diamond(radius)
    color = _contrasting_color(rng, bg)
    nested = motion in (MotionClass.ZOOM_IN, MotionClass.ZOOM_OUT)
    return _Sprite(polygons, color, _contrasting_color(rng, np.array(color)), 2, nested)


def make_clip(seed: int, spec: ClipSpec = ClipSpec(), motion: MotionClass | None = None) -> Clip:
    """Render one clip; the same seed (and spec, motion) always gives the same frames.

    ``motion`` forces a class; by default the seed picks one uniformly.
    """
    rng = np.random.default_rng(seed)
    picked = MOTION_CLASSES[int(rng.integers(0, len(MOTION_CLASSES)))]
    motion = MotionClass(motion) if motion is not None else picked
    size, frames_n = spec.size, spec.num_frames
    unit = size / REFERENCE_SIZE  # pixels at this size per pixel at 128
    canvas_size = 2 * size
    centre = np.array([canvas_size / 2, canvas_size / 2])
    speed = float(rng.uniform(0.75, 3.5))  # px/frame at 128 for translations
    span = speed * unit * (frames_n - 1)

    hero_radius = float(rng.uniform(0.11, 0.17)) * size
    hero_pos = centre.copy()
    if motion in (MotionClass.LEFT, MotionClass.RIGHT, MotionClass.UP, MotionClass.DOWN):
        direction = np.array(TRANSLATION_DIRECTIONS[motion])
        slack = max(0.0, size / 2 - hero_radius - span / 2 - 2)
        hero_pos = centre - direction * span / 2 + rng.uniform(-1, 1, size=2) * slack * (1 - np.abs(direction)) * 0.8
    elif motion in (MotionClass.ROTATE, MotionClass.PAN_LEFT, MotionClass.PAN_RIGHT):
        hero_pos = centre + rng.uniform(-0.22, 0.22, size=2) * size
    distractors = int(rng.integers(2, 5)) if motion is MotionClass.STILL else int(rng.integers(0, 3))
    avoid = None if motion is MotionClass.STILL else hero_pos
    base = _scene_base(rng, canvas_size, size, distractors, avoid)

    hero = None
    if motion is not MotionClass.STILL:
        hero = _cue_sprite(motion, hero_radius, rng, base[int(hero_pos[1]), int(hero_pos[0])].astype(np.float32))

    magnitude = 0.0
    spin = 0.0
    zoom_rate = 0.0
    if motion in TRANSLATION_DIRECTIONS:
        magnitude = speed
    elif motion is MotionClass.ROTATE:
        spin = float(rng.uniform(0.03, 0.14))  # radians per frame, clockwise on screen
        magnitude = spin * 0.6 * hero_radius / unit
    elif motion in (MotionClass.ZOOM_IN, MotionClass.ZOOM_OUT):
        zoom_rate = float(rng.uniform(0.012, 0.055))  # log scale per frame
        magnitude = zoom_rate * _MEAN_RADIUS_OF_SQUARE * REFERENCE_SIZE

    frames = np.empty((frames_n, size, size, 3), dtype=np.uint8)
    static_scene = base.copy()
    if hero is not None and motion in (MotionClass.ZOOM_IN, MotionClass.ZOOM_OUT, MotionClass.PAN_LEFT, MotionClass.PAN_RIGHT):
        _draw(static_scene, hero, hero_pos)
    for t in range(frames_n):
        canvas = static_scene
        if motion in (MotionClass.LEFT, MotionClass.RIGHT, MotionClass.UP, MotionClass.DOWN):
            canvas = base.copy()
            _draw(canvas, hero, hero_pos + np.array(TRANSLATION_DIRECTIONS[motion]) * speed * unit * t)
        elif motion is MotionClass.ROTATE:
            canvas = base.copy()
            _draw(canvas, hero, hero_pos, angle=spin * t)  # +angle turns clockwise when y points down
        frames[t] = _camera_view(canvas, motion, t, frames_n, size, speed * unit, zoom_rate)
    return Clip(frames=frames, motion=motion, magnitude=magnitude, seed=seed)


def _camera_view(canvas: np.ndarray, motion: MotionClass, t: int, frames_n: int, size: int, speed: float, zoom_rate: float) -> np.ndarray:
    """Crop the view out of the canvas: a sliding window for pans, a scaled one for zooms."""
    canvas_size = canvas.shape[0]
    offset = (canvas_size - size) / 2
    shift_x = 0.0
    scale = 1.0
    if motion in (MotionClass.PAN_LEFT, MotionClass.PAN_RIGHT):
        direction = TRANSLATION_DIRECTIONS[motion][0]
        # The picture moves `direction`, so the window moves the other way.
        shift_x = -direction * speed * (t - (frames_n - 1) / 2)
    elif motion is MotionClass.ZOOM_IN:
        scale = math.exp(zoom_rate * t)
    elif motion is MotionClass.ZOOM_OUT:
        scale = math.exp(zoom_rate * (frames_n - 1 - t))
    if shift_x == 0.0 and scale == 1.0:
        o = int(offset)
        return canvas[o : o + size, o : o + size]
    # view pixel v maps from canvas pixel c: v = scale * (c - canvas_centre - shift) + view_centre
    c = canvas_size / 2
    matrix = np.array(
        [[scale, 0.0, size / 2 - scale * (c + shift_x)], [0.0, scale, size / 2 - scale * c]], dtype=np.float64
    )
    return cv2.warpAffine(canvas, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
