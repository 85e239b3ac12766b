"""Metric engine benchmark: ours against ADEval, anomalib's AUPRO, scikit-learn and MVTec's algorithm.

Every peer scores the *same* MVTec-AD-sized maps: by default 1725 float32 maps of 256x256 in the
15 categories with MVTec AD's test-set sizes, blob-shaped defects on ~60% of the images (seeded).
For each category the script times

- ``ours``:      :func:`harness.metrics.evaluate`, all seven metrics (exact);
- ``adeval``:    ADEval's ``EvalAccumulator`` with 1000 bins (its default; ADer runs it with 50),
                 pixel AUROC / AP / AUPRO (plus its image metrics), bounds = the maps' min/max;
- ``anomalib``:  anomalib's ``AUPRO`` metric (torchmetrics, one global torch argsort);
- ``sklearn``:   scikit-learn's pixel ``roc_auc_score``, ``average_precision_score`` and F1max
                 from ``precision_recall_curve``;
- ``mvtec``:     AUPRO by the MVTec AD evaluation code's algorithm (per-pixel FP/PRO changes,
                 one argsort, cumulative sums, trapezoid to FPR 0.3 with interpolation), written
                 here from the published description, as the slow exact AUPRO reference;

then prints per category and for the whole set the time of each peer, the peak memory of each
(``tracemalloc`` sees NumPy allocations; the process peak RSS, reset per call through
``/proc/self/clear_refs``, also sees torch's), and how far each peer's values are from ours.

Usage::

    pip install -e .[bench]
    nice -n 10 python benchmarks/bench_metrics.py                 # the full MVTec-sized set
    python benchmarks/bench_metrics.py --images 200 --peers ours,adeval  # a quick look

Peers that are not installed are skipped with a note.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import tracemalloc
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
from scipy import ndimage

# MVTec AD's test-set size per category (1725 images in all).
MVTEC_TEST_SIZES = {
    "bottle": 83, "cable": 150, "capsule": 132, "carpet": 117, "grid": 78, "hazelnut": 110, "leather": 124,
    "metal_nut": 115, "pill": 167, "screw": 160, "tile": 117, "toothbrush": 42, "transistor": 100, "wood": 79,
    "zipper": 151,
}
PEERS = ("ours", "adeval", "anomalib", "sklearn", "mvtec")
FAST_PEERS = ("ours", "adeval")  # timed best-of --repeat; the slow ones once


# -- data -----------------------------------------------------------------------------------
def _smooth_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """Zero-mean, unit-variance smooth noise, drawn coarse and upsampled (fast)."""
    step = max(1, int(sigma))
    coarse = rng.standard_normal((size // step + 2, size // step + 2)).astype(np.float32)
    fine = ndimage.zoom(coarse, step, order=1)[:size, :size]
    fine -= fine.mean()
    return fine / (fine.std() + 1e-6)


def _blob_mask(rng: np.random.Generator, size: int) -> np.ndarray:
    """One to three irregular blobs (ellipses roughened by smooth noise)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    mask = np.zeros((size, size), dtype=bool)
    for _ in range(rng.integers(1, 4)):
        cy, cx = rng.uniform(0.15, 0.85, 2) * size
        ay, ax = rng.uniform(0.02, 0.12, 2) * size
        r = ((yy - cy) / ay) ** 2 + ((xx - cx) / ax) ** 2
        mask |= r + 0.4 * _smooth_noise(rng, size, 8) < 1.0
    return mask


def make_category(name: str, n_images: int, size: int, seed: int, anomalous_fraction: float = 0.6):
    """Seeded float32 maps (N, size, size), bool masks and image labels of one category."""
    rng = np.random.default_rng([seed, sum(map(ord, name))])
    maps = np.empty((n_images, size, size), dtype=np.float32)
    masks = np.zeros((n_images, size, size), dtype=bool)
    for i in range(n_images):
        amap = _smooth_noise(rng, size, 4) * 0.5 + rng.normal(0, 0.05, (size, size)).astype(np.float32)
        if rng.random() < anomalous_fraction:
            masks[i] = _blob_mask(rng, size)
            # A method's response spreads past the defect and misses parts of it.
            response = ndimage.gaussian_filter(masks[i].astype(np.float32), 3)
            amap += rng.uniform(0.5, 2.0) * response
        maps[i] = amap
    return maps, masks, masks.reshape(n_images, -1).any(axis=1)


# -- peers ----------------------------------------------------------------------------------
def peer_ours(maps, masks):
    from harness.metrics import evaluate

    return evaluate(maps, masks)


def peer_adeval(maps, masks):
    warnings.filterwarnings("ignore", category=RuntimeWarning, module="adeval")  # 0/0 at its empty end bins
    if not hasattr(np, "trapz"):  # ADEval 1.1 calls np.trapz, which NumPy 2.4 removed (same function)
        np.trapz = np.trapezoid
    from adeval import EvalAccumulator

    lo, hi = float(maps.min()), float(maps.max())
    acc = EvalAccumulator(lo, hi, lo, hi, nstrips=1000)
    acc.add_anomap_batch(maps, masks.astype(np.uint8))
    acc.add_image(maps.reshape(len(maps), -1).max(axis=1), masks.reshape(len(masks), -1).any(axis=1))
    out = acc.summary()
    return {"pixel_auroc": out["p_auroc"], "pixel_ap": out["p_aupr"], "pixel_aupro": out["p_aupro"],
            "image_auroc": out["i_auroc"], "image_ap": out["i_aupr"]}


def peer_anomalib(maps, masks):
    import torch
    from anomalib.metrics.aupro import _AUPRO  # the torchmetrics metric; AUPRO wraps it for Batch objects

    metric = _AUPRO(fpr_limit=0.3)
    metric.update(torch.from_numpy(maps), torch.from_numpy(masks.astype(np.float32)))
    return {"pixel_aupro": float(metric.compute())}


def peer_sklearn(maps, masks):
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

    scores, labels = maps.ravel(), masks.ravel()
    precision, recall, _ = precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = 2 * precision * recall / (precision + recall)
    return {"pixel_auroc": roc_auc_score(labels, scores), "pixel_ap": average_precision_score(labels, scores),
            "pixel_f1max": float(np.nanmax(f1))}


def mvtec_reference_aupro(maps, masks, limit: float = 0.3) -> float:
    """AUPRO by the MVTec AD evaluation code's algorithm (one pixel argsort; slow, exact)."""
    fp_change = np.zeros(maps.shape, dtype=np.uint32)
    pro_change = np.zeros(maps.shape, dtype=np.float64)
    n_ok = n_regions = 0
    for i, mask in enumerate(masks):
        labelled, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=int))
        n_regions += count
        ok = labelled == 0
        n_ok += int(ok.sum())
        fp_change[i][ok] = 1
        for region in range(1, count + 1):
            inside = labelled == region
            pro_change[i][inside] = 1.0 / inside.sum()
    scores = maps.ravel()
    order = np.argsort(scores)[::-1]
    scores = scores[order]
    fpr = np.cumsum(fp_change.ravel()[order]).astype(np.float32) / n_ok
    pro = np.cumsum(pro_change.ravel()[order]) / n_regions
    keep = np.append(np.diff(scores) != 0, True)  # the last pixel of every tie group
    fpr = np.r_[0.0, np.clip(fpr[keep], None, 1.0), 1.0]
    pro = np.r_[0.0, np.clip(pro[keep], None, 1.0), 1.0]
    if limit in fpr:
        inside = fpr <= limit
        return float(np.trapezoid(pro[inside], fpr[inside]) / limit)
    ins = int(np.searchsorted(fpr, limit, side="right"))
    y_at = pro[ins - 1] + (pro[ins] - pro[ins - 1]) * (limit - fpr[ins - 1]) / (fpr[ins] - fpr[ins - 1])
    inside = fpr <= limit
    area = np.trapezoid(pro[inside], fpr[inside]) + 0.5 * (y_at + pro[ins - 1]) * (limit - fpr[ins - 1])
    return float(area / limit)


def peer_mvtec(maps, masks):
    return {"pixel_aupro": mvtec_reference_aupro(maps, masks)}


PEER_FUNCS: dict[str, Callable] = {"ours": peer_ours, "adeval": peer_adeval, "anomalib": peer_anomalib,
                                   "sklearn": peer_sklearn, "mvtec": peer_mvtec}
PEER_ABOUT = {
    "ours": "harness.metrics.evaluate: all 7 metrics, exact",
    "adeval": "ADEval EvalAccumulator, 1000 bins: pixel AUROC/AP/AUPRO (+ image AUROC/AP)",
    "anomalib": "anomalib AUPRO (exact, torch argsort)",
    "sklearn": "scikit-learn: pixel AUROC, AP, F1max (exact)",
    "mvtec": "MVTec AD algorithm: pixel AUPRO (exact, numpy argsort)",
}


def available(peer: str) -> str | None:
    """None when ``peer`` can run, else why not."""
    module = {"adeval": "adeval", "anomalib": "anomalib.metrics.aupro", "sklearn": "sklearn"}.get(peer)
    if module is None:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            __import__(module)
    except Exception as exc:  # noqa: BLE001 - any import failure means "skip this peer"
        return f"{type(exc).__name__}: {exc}"
    return None


# -- measuring ------------------------------------------------------------------------------
def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _current_rss_bytes() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def measure(fn: Callable, maps, masks, repeat: int) -> dict:
    """Best-of-``repeat`` seconds, then one traced call for the peak memory."""
    gc.collect()
    best = float("inf")
    values = None
    for _ in range(repeat):
        start = time.perf_counter()
        values = fn(maps, masks)
        best = min(best, time.perf_counter() - start)
    gc.collect()
    rss_ok = _reset_peak_rss()
    base_rss = _current_rss_bytes() if rss_ok else None
    tracemalloc.start()
    fn(maps, masks)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    peak_rss = _peak_rss_bytes() if rss_ok else None
    rss = peak_rss - base_rss if (peak_rss is not None and base_rss is not None) else None
    return {"seconds": best, "values": {k: float(v) for k, v in values.items()}, "peak_traced": peak,
            "peak_rss_extra": rss}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=1725, help="maps in all (default 1725, MVTec AD's test set)")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--peers", default=",".join(PEERS), help=f"comma-separated, from {', '.join(PEERS)}")
    parser.add_argument("--repeat", type=int, default=3,
                        help="timed calls of the fast peers (ours, adeval) per category; the best is kept")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args(argv)

    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    unknown = [p for p in peers if p not in PEERS]
    if unknown:
        parser.error(f"unknown peer(s) {unknown}; choose from {PEERS}")
    for peer in list(peers):
        why = available(peer)
        if why:
            print(f"note: peer {peer!r} skipped ({why}); install the bench extra: pip install -e .[bench]",
                  file=sys.stderr)
            peers.remove(peer)

    # One small call per peer first, so that imports and first-call set-up are not timed.
    warm_maps, warm_masks, _ = make_category("warm-up", 3, 32, args.seed)
    warm_masks[0] = False
    warm_masks[1, 4:9, 4:9] = True
    for peer in peers:
        PEER_FUNCS[peer](warm_maps, warm_masks)

    scale = args.images / sum(MVTEC_TEST_SIZES.values())
    sizes = {c: max(2, round(n * scale)) for c, n in MVTEC_TEST_SIZES.items()}
    results = {}
    total = {p: 0.0 for p in peers}
    for category, n in sizes.items():
        maps, masks, _ = make_category(category, n, args.size, args.seed)
        results[category] = {p: measure(PEER_FUNCS[p], maps, masks, args.repeat if p in FAST_PEERS else 1)
                             for p in peers}
        results[category]["maps_bytes"] = maps.nbytes
        for p in peers:
            total[p] += results[category][p]["seconds"]
        print(f"{category:11s} " + "  ".join(f"{p} {results[category][p]['seconds']:.3f}s" for p in peers),
              file=sys.stderr)
        del maps, masks

    print(report(results, peers, total, args))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    return 0


def report(results: dict, peers: list[str], total: dict, args) -> str:
    """Markdown tables: time, memory and agreement."""
    cats = list(results)
    n_maps = sum(results[c]["maps_bytes"] for c in cats) // (args.size * args.size * 4)
    lines = [f"{n_maps} float32 maps of {args.size}x{args.size} in {len(cats)} categories, seed {args.seed}; "
             f"time = best of {args.repeat} call(s) for ours and adeval, one call for the others.", ""]
    lines.append("| category | maps | " + " | ".join(f"{p} (s)" for p in peers) + " |")
    lines.append("|---|---:|" + "---:|" * len(peers))
    for c in cats:
        n = results[c]["maps_bytes"] // (args.size * args.size * 4)
        lines.append(f"| {c} | {n} | " + " | ".join(f"{results[c][p]['seconds']:.3f}" for p in peers) + " |")
    lines.append(f"| **all** | {n_maps} | " + " | ".join(f"**{total[p]:.2f}**" for p in peers) + " |")
    if "ours" in peers:
        ratio = [f"{p}: ours / {p} = {total['ours'] / total[p]:.2f}x" for p in peers if p != "ours" and total[p] > 0]
        lines += ["", "Time ratio over the whole set: " + "; ".join(ratio) + "."]
    lines += ["", "Peak memory per category call, as a multiple of that category's float32 maps "
              "(max over categories; traced = NumPy allocations seen by tracemalloc, RSS = process peak "
              "resident set above the start of the call):", "",
              "| peer | measures | traced peak | RSS peak |", "|---|---|---:|---:|"]
    for p in peers:
        traced = max(results[c][p]["peak_traced"] / results[c]["maps_bytes"] for c in cats)
        rss_vals = [results[c][p]["peak_rss_extra"] for c in cats]
        rss = (f"{max(v / results[c]['maps_bytes'] for v, c in zip(rss_vals, cats)):.2f}x"
               if all(v is not None for v in rss_vals) else "n/a")
        lines.append(f"| {p} | {PEER_ABOUT[p]} | {traced:.2f}x | {rss} |")
    if "ours" in peers:
        lines += ["", "Largest difference from ours over all categories (|peer - ours|):", "",
                  "| peer | " + " | ".join(METRICS) + " |", "|---|" + "---:|" * len(METRICS)]
        for p in peers:
            if p == "ours":
                continue
            cells = []
            for m in METRICS:
                diffs = [abs(results[c][p]["values"][m] - results[c]["ours"]["values"][m]) for c in cats
                         if m in results[c][p]["values"]]
                cells.append(f"{max(diffs):.1e}" if diffs else "")
            lines.append(f"| {p} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


METRICS = ("image_auroc", "image_ap", "pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_aupro")

if __name__ == "__main__":
    sys.exit(main())
