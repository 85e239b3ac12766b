"""Procedural anomaly-source textures: what stands in for DTD in ``tiny`` profiles.

DRAEM and GLASS paste Perlin-shaped patches of a texture image into normal images; their papers
take the textures from DTD, which cannot be downloaded offline. The ``tiny`` profiles set
``anomaly_source=procedural``: the adapter writes a few seeded textures (oriented stripes, checks
and smoothed noise in random colours, the kinds of pattern DTD is made of) as PNG files into the
job's cache and hands anomalib that folder, so its own reading code runs unchanged.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

#: Textures written per job (DRAEM draws one at random per synthetic anomaly).
COUNT = 24


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Bilinearly upsampled uniform noise on a ``cells`` x ``cells`` lattice, in [0, 1]."""
    lattice = rng.random((cells + 1, cells + 1))
    axis = np.linspace(0, cells, size, endpoint=False)
    i = axis.astype(int)
    f = axis - i
    rows = lattice[i] * (1 - f)[:, None] + lattice[i + 1] * f[:, None]
    return rows[:, i] * (1 - f)[None, :] + rows[:, i + 1] * f[None, :]


def texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """One (size, size, 3) uint8 texture: a pattern mixed between two random colours."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    kind = rng.integers(3)
    if kind == 0:
        angle, period = rng.uniform(0, np.pi), rng.uniform(0.05, 0.3)
        pattern = 0.5 + 0.5 * np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period)
    elif kind == 1:
        period = rng.uniform(0.08, 0.35)
        pattern = ((np.floor(xx / period) + np.floor(yy / period)) % 2).astype(float)
    else:
        pattern = _smooth_noise(rng, size, int(rng.integers(3, 12)))
    pattern = np.clip(0.8 * pattern + 0.2 * _smooth_noise(rng, size, 16), 0, 1)
    low, high = rng.random(3), rng.random(3)
    image = low[None, None] * (1 - pattern[..., None]) + high[None, None] * pattern[..., None]
    return (image * 255).round().astype(np.uint8)


def write_textures(root: Path, size: int, seed: int, count: int = COUNT) -> Path:
    """Write ``count`` seeded textures as ``root/procedural/texture_NNN.png``; return ``root``.

    One class folder inside ``root``, so the folder reads both as DTD (searched recursively) and as
    an ImageFolder (EfficientAD's ImageNette).
    """
    from PIL import Image

    root = Path(root)
    folder = root / "procedural"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index in range(count):
        Image.fromarray(texture(rng, size)).save(folder / f"texture_{index:03d}.png")
    return root
