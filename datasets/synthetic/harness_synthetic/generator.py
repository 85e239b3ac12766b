"""Procedural, deterministic images for the embedded synthetic dataset.

Every image is rendered from a seed derived from (category index, split, index) only, so two
processes, or two calls, always produce identical arrays. Rendering happens in three stages:

1. a *scene* is drawn in float RGB in [0, 1] from randomly drawn parameters (phase, position,
   lighting gradient, ...), which is how normal images vary;
2. for anomalous test images a defect is applied to the scene, which also yields its mask;
3. sensor noise is added and the image is quantised to ``uint8``.

Defects act on the clean scene (before the sensor noise), so the mask covers exactly the region
the defect changed and nothing else differs from what a normal rendering would have produced.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Callable

import numpy as np
from scipy import ndimage

#: Side of every generated image, in pixels.
IMAGE_SIZE = 128
#: All categories, textures first.
CATEGORIES = ("weave", "grain", "tiles", "disc", "pcb", "nut")
TEXTURES = ("weave", "grain", "tiles")
OBJECTS = ("disc", "pcb", "nut")
#: Defect kinds; each becomes a test folder name.
DEFECTS = ("scratch", "hole", "stain", "missing_part", "misplaced_part")
N_TRAIN = 40
N_TEST_GOOD = 12
N_TEST_ANOMALOUS = 18
SPLIT_IDS = {"train": 0, "test": 1}

_YY, _XX = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float64)
_YY.setflags(write=False)
_XX.setflags(write=False)


# ---------------------------------------------------------------------------------------------
# Test plan and entry point
# ---------------------------------------------------------------------------------------------

def test_plan() -> list[tuple[str, int]]:
    """The test images of one category, in order, as (defect folder, index within folder).

    Returns
    -------
    list of (str, int)
        ``N_TEST_GOOD`` ``"good"`` entries, then ``N_TEST_ANOMALOUS`` defective ones spread as
        evenly as possible over :data:`DEFECTS` (4, 4, 4, 3, 3).
    """
    plan = [("good", i) for i in range(N_TEST_GOOD)]
    per_kind = [N_TEST_ANOMALOUS // len(DEFECTS) + (k < N_TEST_ANOMALOUS % len(DEFECTS))
                for k in range(len(DEFECTS))]
    for kind, count in zip(DEFECTS, per_kind):
        plan.extend((kind, i) for i in range(count))
    return plan


@lru_cache(maxsize=256)
def _render_cached(category: str, split: str, index: int) -> tuple[np.ndarray, np.ndarray | None]:
    # Image and mask of a defective sample come from one rendering; caching it means asking for
    # both does not render twice. Arrays are frozen so callers cannot corrupt the cache.
    image, mask = _render(category, split, index)
    image.setflags(write=False)
    if mask is not None:
        mask.setflags(write=False)
    return image, mask


def render_sample(category: str, split: str, index: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Render one image of the dataset.

    Parameters
    ----------
    category : str
        One of :data:`CATEGORIES`.
    split : str
        ``"train"`` or ``"test"``.
    index : int
        Position in the split: 0..N_TRAIN-1 for train, 0..len(test_plan())-1 for test.

    Returns
    -------
    image : numpy.ndarray
        RGB ``uint8`` array of shape (IMAGE_SIZE, IMAGE_SIZE, 3).
    mask : numpy.ndarray of bool or None
        The defect region for anomalous test images, ``None`` for normal ones.
    """
    image, mask = _render_cached(category, split, int(index))
    return image.copy(), (None if mask is None else mask.copy())


def _render(category: str, split: str, index: int) -> tuple[np.ndarray, np.ndarray | None]:
    cat_idx = CATEGORIES.index(category)
    # A tuple seed keeps streams of different categories/splits independent; Python's hash() is
    # salted per process and would break determinism.
    rng = np.random.default_rng((cat_idx, SPLIT_IDS[split], index))
    defect = "good" if split == "train" else test_plan()[index][0]
    renderer = _RENDERERS[category]
    params = renderer.sample(rng)
    scene, fg = renderer.draw(params)
    mask = None
    if defect != "good":
        scene, mask = _apply_defect(defect, category, params, scene, fg, rng)
    return _finish(scene, rng), mask


def _finish(scene: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    # Sensor noise, drawn after any defect so normal and defective images share its statistics.
    noisy = scene + rng.normal(0.0, 0.012, scene.shape)
    return np.clip(np.round(noisy * 255.0), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------

def _smooth_noise(rng: np.random.Generator, sigma, shape=(IMAGE_SIZE, IMAGE_SIZE)) -> np.ndarray:
    """Gaussian-filtered white noise rescaled to unit standard deviation."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    return field / (field.std() + 1e-12)


def _lighting(rng: np.random.Generator, strength: float = 0.12) -> np.ndarray:
    """A multiplicative illumination field: a random linear gradient plus a soft vignette."""
    gx, gy = rng.uniform(-strength, strength, 2)
    vignette = rng.uniform(0.0, 0.08)
    u, v = (_XX - 63.5) / 64.0, (_YY - 63.5) / 64.0
    return 1.0 + gx * u + gy * v - vignette * (u ** 2 + v ** 2)


def _rotate(x: np.ndarray, y: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    c, s = np.cos(angle), np.sin(angle)
    return c * x + s * y, -s * x + c * y


def _blend(img: np.ndarray, colour, alpha: np.ndarray) -> np.ndarray:
    """Paint ``colour`` (RGB or an HxWx3 array) over ``img`` with per-pixel opacity ``alpha``."""
    return img * (1.0 - alpha[..., None]) + np.asarray(colour, dtype=np.float64) * alpha[..., None]


def _disc(cx: float, cy: float, r: float) -> np.ndarray:
    """Anti-aliased coverage of a disc (1 inside, 0 outside, a one-pixel ramp on the edge)."""
    d = np.hypot(_XX - cx, _YY - cy)
    return np.clip(r + 0.5 - d, 0.0, 1.0)


def _rect(cx: float, cy: float, w: float, h: float, angle: float = 0.0) -> np.ndarray:
    """Anti-aliased coverage of a rotated rectangle of size w×h centred on (cx, cy)."""
    u, v = _rotate(_XX - cx, _YY - cy, angle)
    cov_u = np.clip(w / 2 + 0.5 - np.abs(u), 0.0, 1.0)
    cov_v = np.clip(h / 2 + 0.5 - np.abs(v), 0.0, 1.0)
    return cov_u * cov_v


def _window(cx: float, cy: float, half: float) -> tuple[slice, slice]:
    """The pixel window around (cx, cy) that a shape of radius ``half`` can touch."""
    x0, x1 = max(int(cx - half) - 1, 0), min(int(cx + half) + 2, IMAGE_SIZE)
    y0, y1 = max(int(cy - half) - 1, 0), min(int(cy + half) + 2, IMAGE_SIZE)
    return slice(y0, max(y1, y0)), slice(x0, max(x1, x0))


def _paint_rect(img: np.ndarray, colour, cx: float, cy: float, w: float, h: float, angle: float = 0.0) -> None:
    """Paint a rotated rectangle in place, touching only its bounding window (small parts are cheap)."""
    sl = _window(cx, cy, 0.5 * np.hypot(w, h) + 1)
    u, v = _rotate(_XX[sl] - cx, _YY[sl] - cy, angle)
    cov = np.clip(w / 2 + 0.5 - np.abs(u), 0.0, 1.0) * np.clip(h / 2 + 0.5 - np.abs(v), 0.0, 1.0)
    img[sl] = _blend(img[sl], colour, cov)


def _paint_disc(img: np.ndarray, colour, cx: float, cy: float, r: float) -> None:
    """Paint a disc in place, touching only its bounding window."""
    sl = _window(cx, cy, r + 1)
    img[sl] = _blend(img[sl], colour, np.clip(r + 0.5 - np.hypot(_XX[sl] - cx, _YY[sl] - cy), 0.0, 1.0))


def _irregular_blob(rng: np.random.Generator, cx: float, cy: float, radius: float,
                    roughness: float = 0.25) -> np.ndarray:
    """A star-shaped blob whose radius wobbles with a few random angular harmonics (signed distance)."""
    phi = np.arctan2(_YY - cy, _XX - cx)
    wobble = np.zeros_like(phi)
    for k in (2, 3, 5):
        wobble += rng.uniform(-roughness, roughness) / k * 2 * np.cos(k * phi + rng.uniform(0, 2 * np.pi))
    r_edge = radius * (1.0 + wobble)
    return r_edge - np.hypot(_XX - cx, _YY - cy)


# ---------------------------------------------------------------------------------------------
# Category renderers: sample(rng) -> params, draw(params) -> (scene float HxWx3, foreground bool)
# ---------------------------------------------------------------------------------------------

class _Renderer:
    """A category: how to draw random parameters and how to render a scene from them."""

    def __init__(self, sample: Callable, draw: Callable):
        self.sample = sample
        self.draw = draw


def _weave_sample(rng):
    return {"period": rng.uniform(7.6, 8.4), "phase": rng.uniform(0, 16, 2), "angle": np.deg2rad(rng.uniform(-3, 3)),
            "warp": np.array([0.78, 0.70, 0.55]) * rng.uniform(0.96, 1.04),
            "weft": np.array([0.52, 0.42, 0.33]) * rng.uniform(0.96, 1.04),
            "jitter": _smooth_noise(rng, 6) * 0.7, "fibre": _smooth_noise(rng, (0.6, 0.6)),
            "light": _lighting(rng)}


def _weave_draw(p):
    u, v = _rotate(_XX, _YY, p["angle"])
    # The displacement field makes the threads wander slightly, as real yarns do.
    u = u + p["phase"][0] + p["jitter"]
    v = v + p["phase"][1] - p["jitter"] * 0.5
    fu, fv = u / p["period"], v / p["period"]
    warp_on_top = (np.floor(fu) + np.floor(fv)) % 2 == 0
    shade_warp = np.sqrt(np.abs(np.sin(np.pi * fu)))
    shade_weft = np.sqrt(np.abs(np.sin(np.pi * fv)))
    warp = p["warp"] * (0.55 + 0.45 * shade_warp)[..., None]
    weft = p["weft"] * (0.55 + 0.45 * shade_weft)[..., None]
    img = np.where(warp_on_top[..., None], warp, weft)
    img = img * (1.0 + 0.04 * p["fibre"])[..., None] * p["light"][..., None]
    return img, np.ones((IMAGE_SIZE, IMAGE_SIZE), bool)


def _grain_sample(rng):
    return {"angle": np.deg2rad(rng.uniform(-8, 8)), "centre": (rng.uniform(-80, 80), rng.uniform(-90, 90)),
            "period": rng.uniform(8.5, 12.0), "warp": _smooth_noise(rng, 12) * rng.uniform(4, 7),
            "streak": _smooth_noise(rng, (0.7, 9.0)), "tint": rng.uniform(0.95, 1.05),
            "light": _lighting(rng)}


def _grain_draw(p):
    u, v = _rotate(_XX - 64, _YY - 64, p["angle"])
    # Rings of a log cut lengthwise: strongly elongated along the grain direction u.
    r = np.hypot(v - p["centre"][1], 0.08 * (u - p["centre"][0]))
    val = 0.5 + 0.5 * np.sin(2 * np.pi * (r + p["warp"]) / p["period"])
    val = val ** 2.5  # thin dark latewood lines on wider light earlywood
    light, dark = np.array([0.80, 0.62, 0.42]) * p["tint"], np.array([0.50, 0.32, 0.18])
    img = light + (dark - light) * val[..., None]
    img = img * (1.0 + 0.05 * p["streak"])[..., None] * p["light"][..., None]
    return img, np.ones((IMAGE_SIZE, IMAGE_SIZE), bool)


def _tiles_sample(rng):
    return {"size": 32.0, "offset": 16 + rng.uniform(-3, 3, 2), "grout": rng.uniform(2.5, 3.5),
            "colours": np.array([0.80, 0.76, 0.69]) * (1 + rng.normal(0, 0.025, (6, 6, 3))),
            "surface": _smooth_noise(rng, 2.0), "light": _lighting(rng)}


def _tiles_draw(p):
    x, y = _XX + p["offset"][0], _YY + p["offset"][1]
    ix, iy = np.floor(x / p["size"]).astype(int), np.floor(y / p["size"]).astype(int)
    fx, fy = x - ix * p["size"], y - iy * p["size"]
    # Distance to the nearest tile edge drives both the grout lines and the bevel shading.
    edge = np.minimum(np.minimum(fx, p["size"] - fx), np.minimum(fy, p["size"] - fy))
    half = p["grout"] / 2
    tile = p["colours"][iy % 6, ix % 6] * (1.0 + 0.02 * p["surface"])[..., None]
    tile = tile * (1.0 - 0.12 * np.clip(1.0 - (edge - half) / 3.0, 0, 1))[..., None]
    grout = np.array([0.45, 0.43, 0.40]) * (1.0 + 0.05 * p["surface"])[..., None]
    img = _blend(tile, grout, np.clip(half + 0.5 - edge, 0, 1))
    return img * p["light"][..., None], np.ones((IMAGE_SIZE, IMAGE_SIZE), bool)


_BACKGROUND = np.array([0.30, 0.32, 0.35])


def _disc_sample(rng):
    theta = np.deg2rad(rng.uniform(-8, 8))
    return {"cx": 64 + rng.normal(0, 1.5), "cy": 64 + rng.normal(0, 1.5), "theta": theta,
            "R": 44.0, "r": 16.0,
            "rivets": [(theta + np.pi / 4 + k * np.pi / 2, 30.0) for k in range(4)],
            "bites": [], "bg": _BACKGROUND * rng.uniform(0.95, 1.05), "texture": _smooth_noise(rng, 1.2),
            "light": _lighting(rng)}


def _disc_draw(p):
    dx, dy = _XX - p["cx"], _YY - p["cy"]
    d, phi = np.hypot(dx, dy), np.arctan2(dy, dx)
    ring = _disc(p["cx"], p["cy"], p["R"]) * (1.0 - _disc(p["cx"], p["cy"], p["r"]))
    for bx, by, br in p["bites"]:
        ring = ring * (1.0 - _disc(bx, by, br))
    # Brushed-metal look: an anisotropic sheen following the rotation, bevels on both edges.
    sheen = 0.66 + 0.10 * np.cos(2 * (phi - p["theta"])) + 0.015 * p["texture"]
    bevel = np.clip(np.minimum(p["R"] - d, d - p["r"]) / 3.0, 0, 1)
    metal = np.array([0.80, 0.80, 0.82]) * (sheen * (0.8 + 0.2 * bevel))[..., None]
    img = _blend(np.broadcast_to(p["bg"], metal.shape).copy(), metal, ring)
    for angle, radius in p["rivets"]:
        rx, ry = p["cx"] + radius * np.cos(angle), p["cy"] + radius * np.sin(angle)
        cov = _disc(rx, ry, 4.5)
        dome = np.sqrt(np.clip(1 - (np.hypot(_XX - rx, _YY - ry) / 4.5) ** 2, 0, 1))
        head = np.array([0.55, 0.50, 0.42]) * (0.7 + 0.5 * dome)[..., None]
        img = _blend(img, head, cov * ring)
    return img * p["light"][..., None], ring > 0.5


def _nut_sample(rng):
    return {"cx": 64 + rng.normal(0, 1.5), "cy": 64 + rng.normal(0, 1.5), "theta": np.deg2rad(rng.uniform(-10, 10)),
            "R": 42.0, "hole": (0.0, 0.0, 15.0), "bites": [], "bg": _BACKGROUND * rng.uniform(0.95, 1.05),
            "texture": _smooth_noise(rng, 1.0), "light": _lighting(rng)}


def _nut_draw(p):
    dx, dy = _XX - p["cx"], _YY - p["cy"]
    apothem = p["R"] * np.cos(np.pi / 6)
    normals = p["theta"] + np.pi / 6 + np.arange(6) * np.pi / 3
    proj = np.stack([dx * np.cos(a) + dy * np.sin(a) for a in normals])
    hexagon = np.clip(apothem + 0.5 - proj.max(axis=0), 0, 1)
    hx, hy, hr = p["cx"] + p["hole"][0], p["cy"] + p["hole"][1], p["hole"][2]
    body = hexagon * (1.0 - _disc(hx, hy, hr))
    for bx, by, br in p["bites"]:
        body = body * (1.0 - _disc(bx, by, br))
    # The chamfer outside the inscribed circle is lit differently on each of the six facets.
    facet = proj.argmax(axis=0)
    facet_shade = np.array([0.78, 0.70, 0.60, 0.56, 0.63, 0.74])[facet]
    face = np.clip(apothem - 2.0 - np.hypot(dx, dy), 0, 1)
    shade = face * 0.72 + (1 - face) * facet_shade + 0.015 * p["texture"]
    steel = np.array([0.74, 0.74, 0.70]) * shade[..., None]
    # Thread crests visible in a narrow ring around the hole edge.
    dh = np.hypot(_XX - hx, _YY - hy)
    thread = 0.08 * np.cos(2 * np.pi * dh / 2.5) * np.clip(1.0 - (dh - hr) / 4, 0, 1)
    steel = steel * (1.0 + thread)[..., None]
    img = _blend(np.broadcast_to(p["bg"], steel.shape).copy(), steel, body)
    return img * p["light"][..., None], body > 0.5


# PCB layout in board coordinates: (kind, x, y, w, h, angle in degrees).
_PCB_PARTS = (
    ("ic", 40, 36, 30, 18, 0), ("resistor", 84, 26, 12, 5, 0), ("resistor", 84, 40, 12, 5, 0),
    ("resistor", 28, 84, 12, 5, 90), ("capacitor", 86, 84, 8, 8, 0), ("led", 58, 92, 7, 7, 0),
    ("chip", 94, 60, 8, 5, 90),
)
_PCB_TRACES = ((20, 60, 106, 60), (40, 45, 40, 60), (84, 28, 100, 28), (84, 40, 100, 40), (100, 28, 100, 84),
               (28, 60, 28, 80), (58, 60, 58, 88), (86, 60, 86, 80), (60, 36, 76, 36), (76, 26, 76, 40))


def _pcb_sample(rng):
    parts = [[kind, x + rng.normal(0, 0.6), y + rng.normal(0, 0.6), w, h, a + rng.normal(0, 1.5)]
             for kind, x, y, w, h, a in _PCB_PARTS]
    return {"ox": 10 + rng.normal(0, 1.2), "oy": 10 + rng.normal(0, 1.2), "parts": parts,
            "board": np.array([0.10, 0.42, 0.22]) * rng.uniform(0.95, 1.05), "texture": _smooth_noise(rng, 1.5),
            "light": _lighting(rng)}


def _pcb_part(img, kind, cx, cy, w, h, angle):
    """Paint one component in place."""
    a = np.deg2rad(angle)
    if kind == "ic":
        # Pins first so the package body covers their inner ends.
        for k in range(6):
            off = (k - 2.5) * w / 6
            for side in (-1, 1):
                px, py = _rotate(np.array(off), np.array(side * (h / 2 + 1.5)), -a)
                _paint_rect(img, [0.78, 0.78, 0.76], cx + px, cy + py, 2.0, 4.0, a)
        _paint_rect(img, [0.09, 0.09, 0.10], cx, cy, w, h, a)
        mx, my = _rotate(np.array(-w / 2 + 3.5), np.array(-h / 2 + 3.5), -a)
        _paint_disc(img, [0.30, 0.30, 0.30], cx + mx, cy + my, 1.5)
    elif kind == "capacitor":
        _paint_disc(img, [0.12, 0.16, 0.40], cx, cy, w / 2)
        sx, sy = _rotate(np.array(w / 4), np.array(0.0), -a)
        _paint_rect(img, [0.70, 0.72, 0.80], cx + sx, cy + sy, 1.6, h * 0.7, a)
    elif kind == "led":
        _paint_rect(img, [0.85, 0.15, 0.12], cx, cy, w, h, a)
    else:
        for side in (-1, 1):
            ex, ey = _rotate(np.array(side * w / 2), np.array(0.0), -a)
            _paint_rect(img, [0.80, 0.80, 0.78], cx + ex, cy + ey, 3.0, h, a)
        _paint_rect(img, [0.75, 0.65, 0.45] if kind == "resistor" else [0.35, 0.28, 0.22], cx, cy, w - 4, h, a)
        if kind == "resistor":
            # A coloured band makes the orientation (and so a rotated part) visible.
            bx, by = _rotate(np.array(-w / 4), np.array(0.0), -a)
            _paint_rect(img, [0.60, 0.15, 0.10], cx + bx, cy + by, 1.5, h, a)


def _pcb_draw(p):
    ox, oy = p["ox"], p["oy"]
    board = _rect(ox + 54, oy + 54, 108, 108)
    img = _blend(np.broadcast_to(_BACKGROUND * 0.5, (IMAGE_SIZE, IMAGE_SIZE, 3)).copy(),
                 p["board"] * (1.0 + 0.04 * p["texture"])[..., None], board)
    for x0, y0, x1, y1 in _PCB_TRACES:
        _paint_rect(img, [0.72, 0.58, 0.30], ox + (x0 + x1) / 2, oy + (y0 + y1) / 2, abs(x1 - x0) + 2, abs(y1 - y0) + 2)
    for hx, hy in ((6, 6), (102, 6), (6, 102), (102, 102)):
        _paint_disc(img, [0.80, 0.72, 0.40], ox + hx, oy + hy, 3.5)
        _paint_disc(img, _BACKGROUND * 0.5, ox + hx, oy + hy, 2.0)
    for kind, x, y, w, h, a in p["parts"]:
        _pcb_part(img, kind, ox + x, oy + y, w, h, a)
    return img * p["light"][..., None], board > 0.5


_RENDERERS = {
    "weave": _Renderer(_weave_sample, _weave_draw), "grain": _Renderer(_grain_sample, _grain_draw),
    "tiles": _Renderer(_tiles_sample, _tiles_draw), "disc": _Renderer(_disc_sample, _disc_draw),
    "pcb": _Renderer(_pcb_sample, _pcb_draw), "nut": _Renderer(_nut_sample, _nut_draw),
}


# ---------------------------------------------------------------------------------------------
# Defects: each returns (new scene, bool mask)
# ---------------------------------------------------------------------------------------------

def _point_on(fg: np.ndarray, rng: np.random.Generator, margin: int = 10) -> tuple[float, float]:
    """A random pixel of the foreground, away from the image border."""
    inner = ndimage.binary_erosion(fg, iterations=3)
    inner[:margin] = inner[-margin:] = False
    inner[:, :margin] = inner[:, -margin:] = False
    ys, xs = np.nonzero(inner if inner.any() else fg)
    k = rng.integers(len(xs))
    return float(xs[k]), float(ys[k])


def _contrast_target(img: np.ndarray, rng: np.random.Generator, low: float, high: float) -> np.ndarray:
    """The image darkened or brightened by a random contrast in [low, high]."""
    c = rng.uniform(low, high)
    return img * (1 - c) if rng.random() < 0.6 else img + c * (1 - img)


def _scratch(img, fg, rng):
    x0, y0 = _point_on(fg, rng)
    length, angle = rng.uniform(14, 50), rng.uniform(0, 2 * np.pi)
    bend = rng.uniform(-0.5, 0.5) * length
    t = np.linspace(0, 1, 300)[:, None]
    p0 = np.array([x0, y0])
    p2 = p0 + length * np.array([np.cos(angle), np.sin(angle)])
    p1 = (p0 + p2) / 2 + bend * np.array([-np.sin(angle), np.cos(angle)])
    curve = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t ** 2 * p2  # quadratic Bezier
    seed = np.ones(fg.shape, bool)
    cx = np.clip(np.round(curve[:, 0]).astype(int), 0, IMAGE_SIZE - 1)
    cy = np.clip(np.round(curve[:, 1]).astype(int), 0, IMAGE_SIZE - 1)
    seed[cy, cx] = False
    dist = ndimage.distance_transform_edt(seed)
    width = rng.uniform(0.6, 1.8)
    alpha = np.clip(width + 0.5 - dist, 0, 1) * fg
    return _blend(img, _contrast_target(img, rng, 0.12, 0.45), alpha), alpha > 0.05


def _hole(img, fg, rng):
    x0, y0 = _point_on(fg, rng)
    radius = rng.uniform(2.8, 8.5)
    sd = _irregular_blob(rng, x0, y0, radius)
    inside = np.clip(sd + 0.5, 0, 1) * fg
    rim = np.clip(sd + 2.5, 0, 1) * fg - inside
    depth = rng.uniform(0.45, 0.85)
    out = _blend(img, img * (1.0 + rng.uniform(0.10, 0.25)), rim)
    # Darker towards the middle, like a pit lit from above.
    core = np.clip(sd / max(radius, 1e-6), 0, 1)
    out = out * (1.0 - inside[..., None] * depth * (0.6 + 0.4 * core)[..., None])
    return out, (inside + rim) > 0.05


def _stain(img, fg, rng):
    x0, y0 = _point_on(fg, rng)
    radius = rng.uniform(4, 14)
    sd = _irregular_blob(rng, x0, y0, radius, roughness=0.35)
    alpha = ndimage.gaussian_filter(np.clip(sd / 2 + 0.5, 0, 1), rng.uniform(1.0, 2.5)) * fg
    colour = np.array(rng.choice([[0.45, 0.30, 0.10], [0.25, 0.25, 0.30], [0.70, 0.62, 0.20], [0.55, 0.20, 0.15]]))
    # Some stains are faint on purpose: these are what separates good methods from naive ones.
    strength = rng.uniform(0.22, 0.55) if rng.random() < 0.6 else rng.uniform(0.55, 0.85)
    a = alpha * strength
    return _blend(img, img * 0.5 + colour * 0.5, a), alpha > 0.12


def _patch_region(fg, rng):
    x0, y0 = _point_on(fg, rng, margin=16)
    return x0, y0, _irregular_blob(rng, x0, y0, rng.uniform(5, 13), roughness=0.2) > 0


def _missing_pattern(img, fg, rng):
    x0, y0, region = _patch_region(fg, rng)
    # Worn through: the pattern is gone, only its averaged colour (somewhat darker) remains.
    flat = ndimage.uniform_filter(img, size=(17, 17, 1), mode="reflect") * rng.uniform(0.75, 1.0)
    region &= fg
    return np.where(region[..., None], flat, img), region


def _misplaced_pattern(img, fg, rng):
    x0, y0, region = _patch_region(fg, rng)
    angle = np.deg2rad(rng.uniform(20, 90) * rng.choice([-1, 1]))
    shift = rng.uniform(2, 6, 2) * rng.choice([-1, 1], 2)
    # Each output pixel samples the scene at a rotated, shifted position about the patch centre.
    u, v = _rotate(_XX - x0, _YY - y0, angle)
    coords = np.stack([v + y0 + shift[1], u + x0 + shift[0]])
    moved = np.stack([ndimage.map_coordinates(img[..., c], coords, order=1, mode="reflect") for c in range(3)], -1)
    region &= fg
    return np.where(region[..., None], moved, img), region


def _diff_mask(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """Region where two renders differ, closed so a changed part is one solid region."""
    changed = np.abs(before - after).max(axis=2) > 0.02
    return ndimage.binary_fill_holes(ndimage.binary_closing(changed, iterations=2)) | changed


def _object_part_defect(kind, category, params, img, rng):
    """Re-render the object with one part removed or moved; the mask is where the renders differ."""
    draw = _RENDERERS[category].draw
    for _ in range(8):
        p = dict(params)
        if category == "pcb":
            parts = [list(q) for q in p["parts"]]
            k = int(rng.integers(len(parts)))
            if kind == "missing_part":
                del parts[k]
            elif rng.random() < 0.5:
                parts[k][1] += rng.uniform(3, 7) * rng.choice([-1, 1])
                parts[k][2] += rng.uniform(0, 4) * rng.choice([-1, 1])
            else:
                parts[k][5] += rng.uniform(15, 60) * rng.choice([-1, 1])
            p["parts"] = parts
        elif category == "disc":
            if kind == "missing_part" and rng.random() < 0.5:
                gone = int(rng.integers(4))
                p["rivets"] = [r for j, r in enumerate(p["rivets"]) if j != gone]
            elif kind == "missing_part":
                phi = rng.uniform(0, 2 * np.pi)
                p["bites"] = [(p["cx"] + p["R"] * np.cos(phi), p["cy"] + p["R"] * np.sin(phi), rng.uniform(5, 11))]
            else:
                rivets = list(p["rivets"])
                k = int(rng.integers(4))
                angle, radius = rivets[k]
                rivets[k] = (angle + np.deg2rad(rng.uniform(10, 30) * rng.choice([-1, 1])),
                             radius + rng.uniform(-4, 4))
                p["rivets"] = rivets
        else:  # nut
            if kind == "missing_part":
                corner = p["theta"] + int(rng.integers(6)) * np.pi / 3
                rr = p["R"] + rng.uniform(-2, 3)
                p["bites"] = [(p["cx"] + rr * np.cos(corner), p["cy"] + rr * np.sin(corner), rng.uniform(6, 13))]
            else:
                phi = rng.uniform(0, 2 * np.pi)
                off = rng.uniform(2.5, 6)
                p["hole"] = (off * np.cos(phi), off * np.sin(phi), p["hole"][2] * rng.uniform(0.9, 1.05))
        after, _ = draw(p)
        mask = _diff_mask(img, after)
        if mask.sum() >= 30:
            return after, mask
    raise RuntimeError(f"could not make a visible {kind} defect for {category}")  # pragma: no cover


_SURFACE_DEFECTS = {"scratch": _scratch, "hole": _hole, "stain": _stain}
_PATTERN_DEFECTS = {"missing_part": _missing_pattern, "misplaced_part": _misplaced_pattern}


#: Least mean change (max over RGB, scene in [0, 1]) inside a surface or pattern defect's mask:
#: about 13 grey levels, four times the sensor noise. Faint stains and rotated patches of a
#: plain tile can otherwise change the scene by less than the noise, labelling invisible defects.
MIN_VISIBLE_CHANGE = 0.05


def visible_change(before: np.ndarray, after: np.ndarray, mask: np.ndarray) -> float:
    """Mean over ``mask`` of the largest per-channel change between two scenes."""
    return float(np.abs(after - before).max(axis=2)[mask].mean()) if mask.any() else 0.0


def _apply_defect(kind: str, category: str, params: dict, img: np.ndarray, fg: np.ndarray,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Apply defect ``kind`` to a clean scene and return the new scene and the defect mask.

    Surface and texture-pattern defects are redrawn (from the same random stream, so the result
    stays deterministic) until they change the scene by :data:`MIN_VISIBLE_CHANGE` on average
    inside their mask; object-part defects are re-rendered objects with their own check.
    """
    if kind not in _SURFACE_DEFECTS and category not in TEXTURES:
        return _object_part_defect(kind, category, params, img, rng)
    make = _SURFACE_DEFECTS.get(kind) or _PATTERN_DEFECTS[kind]
    for _ in range(32):
        after, mask = make(img, fg, rng)
        if visible_change(img, after, mask) >= MIN_VISIBLE_CHANGE:
            return after, mask
    raise RuntimeError(f"could not make a visible {kind} defect for {category}")  # pragma: no cover
