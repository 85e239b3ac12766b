"""Loader throughput: the harness's ImageCache against plain PIL decoding.

Writes a temporary tree of 256 images of 512x512 px (half JPEG, half PNG, noise plus smooth
structure so that the codecs do real work), then measures images per second to decode, convert
to RGB and resize to 256x256 (bicubic):

- ``PIL``: ``Image.open(...).convert("RGB").resize(...)`` every time, as a plain loader does;
- ``ImageCache, epoch 1``: the first pass through :class:`harness.data.ImageCache` (decodes);
- ``ImageCache, epoch 2``: the second pass (every image comes from memory).

Then the memory bound: a cache limited to ``--bound-mb`` (default: a quarter of the decoded set)
is filled with every image three times over, in a loop, and its largest size is compared with
the bound (it must never exceed it, and the process's resident memory must grow by about the
bound, not by the whole set), and its hit rate is reported.

Run: ``python benchmarks/bench_loader.py [--n 256] [--size 512] [--out 256] [--repeats 3] [--bound-mb MB]``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from harness.data import ImageCache, Sample


def make_tree(folder: Path, n: int, size: int) -> list[Path]:
    """Write ``n`` images of ``size`` px, alternating JPEG and PNG; return their paths."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    paths = []
    for i in range(n):
        base = 127 + 100 * np.sin(2 * np.pi * (xx * (1 + i % 5) + yy * (1 + i % 3)))
        noise = rng.normal(0, 12, (size, size, 3))
        array = np.clip(base[..., None] + noise, 0, 255).astype(np.uint8)
        path = folder / (f"{i:03d}.jpg" if i % 2 == 0 else f"{i:03d}.png")
        Image.fromarray(array).save(path, quality=95) if path.suffix == ".jpg" else Image.fromarray(array).save(path)
        paths.append(path)
    return paths


def plain_pil(paths: list[Path], out: int) -> float:
    """Seconds for one pass of open + convert + bicubic resize."""
    start = time.perf_counter()
    for path in paths:
        with Image.open(path) as img:
            np.asarray(img.convert("RGB").resize((out, out), Image.BICUBIC))
    return time.perf_counter() - start


def cached_epochs(paths: list[Path], out: int) -> tuple[float, float]:
    """Seconds for the first and second pass through a fresh ImageCache."""
    cache = ImageCache()
    samples = [Sample(f"bench/train/good/{p.stem}", "bench", "train", 0, "good", p) for p in paths]
    times = []
    for _ in range(2):
        start = time.perf_counter()
        for sample in samples:
            cache.image("bench", sample, (out, out))
        times.append(time.perf_counter() - start)
    return times[0], times[1]


def bounded_cache(paths: list[Path], out: int, bound: int) -> dict[str, float]:
    """Cycle through every image three times with a cache of ``bound`` bytes; what it held at most."""
    import resource

    cache = ImageCache(max_bytes=bound)
    samples = [Sample(f"bench/train/good/{p.stem}", "bench", "train", 0, "good", p) for p in paths]
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = 0
    for _ in range(3):
        for sample in samples:
            cache.image("bench", sample, (out, out))
            peak = max(peak, cache.nbytes)
    rss_growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) * 1024
    return {"bound": bound, "peak": peak, "hits": cache.hits, "misses": cache.misses, "rss_growth": rss_growth}


def main() -> None:
    """Build the tree, time each loader (best of ``--repeats``), print a table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--out", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bound-mb", type=float, default=None,
                        help="memory bound of the bounded-cache run (default: a quarter of the decoded set)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_tree(Path(tmp), args.n, args.size)
        bound = int(args.bound_mb * 2**20) if args.bound_mb else args.n * args.out * args.out * 3 // 4
        bounded = bounded_cache(paths, args.out, bound)
        pil = min(plain_pil(paths, args.out) for _ in range(args.repeats))
        runs = [cached_epochs(paths, args.out) for _ in range(args.repeats)]
        first, second = min(r[0] for r in runs), min(r[1] for r in runs)
    print(f"{args.n} images ({args.n // 2} JPEG + {args.n - args.n // 2} PNG) at {args.size}px -> {args.out}px, "
          f"best of {args.repeats}")
    print(f"{'loader':<24}{'images/s':>12}{'ms/image':>12}")
    for name, seconds in [("PIL open+convert+resize", pil), ("ImageCache, epoch 1", first),
                          ("ImageCache, epoch 2", second)]:
        print(f"{name:<24}{args.n / seconds:>12.0f}{1000 * seconds / args.n:>12.3f}")
    total = args.n * args.out * args.out * 3
    print(f"\nbounded cache: bound {bounded['bound'] / 2**20:.1f} MiB (decoded set {total / 2**20:.1f} MiB); "
          f"largest size held {bounded['peak'] / 2**20:.1f} MiB; peak RSS grew by {bounded['rss_growth'] / 2**20:.1f} MiB; "
          f"{bounded['hits']} hits, {bounded['misses']} misses over 3 passes")
    print("bound held" if bounded["peak"] <= bounded["bound"] else "BOUND EXCEEDED")


if __name__ == "__main__":
    main()
