"""sPRO against an independent, brute-force implementation of the official MVTec LOCO AD definition.

The reference below thresholds every map at every distinct score (plus one threshold above the
maximum and one below the minimum, as the official script's first and last thresholds), counts
each channel's true positives and the false positives outside the union of an image's channels
on binary maps, and integrates with the MVTec AD ``trapz`` rule (interpolation at the limit by
``bisect``). It shares no code with :mod:`harness.metrics.spro`. The last test compares
``harness evaluate`` with numbers made by MVTec's own LOCO evaluation modules on seeded fixtures
(``golden/spro/reference.json``; how they were made: ``golden/spro/make_reference.py``).
"""

from __future__ import annotations

import bisect
import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
try:
    import harness_benchmarks  # noqa: F401
except ImportError:  # pragma: no cover
    sys.path.insert(0, str(REPO / "datasets" / "benchmarks"))

import recent_dataset_fixtures as R  # noqa: E402
from harness_benchmarks import mvtec_loco  # noqa: E402

from harness.metrics.spro import SPRO_FPR_LIMITS, SproAccumulator, saturation_area  # noqa: E402


# -- the independent reference ---------------------------------------------------------------
def ref_trapz(x, y, x_max):
    """MVTec AD's trapezoid with an upper bound (bisect, linear interpolation at x_max)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    correction = 0.0
    if x_max not in x:
        ins = bisect.bisect(list(x), x_max)
        y_at = y[ins - 1] + (y[ins] - y[ins - 1]) * (x_max - x[ins - 1]) / (x[ins] - x[ins - 1])
        correction = 0.5 * (y_at + y[ins - 1]) * (x_max - x[ins - 1])
    keep = x <= x_max
    x, y = x[keep], y[keep]
    return float(np.sum(0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1])) + correction)


def ref_auc_spro(maps, gts, limits):
    """maps: list of (H, W); gts: per image a list of (bool channel, saturation area), [] for good."""
    scores = np.unique(np.concatenate([m.ravel() for m in maps]))
    thresholds = np.r_[scores.max() + 1.0, scores[::-1], scores.min() - 1.0]
    fprs, spros = [], []
    n_free = sum(int((~np.logical_or.reduce([c for c, _ in g] + [np.zeros(m.shape, bool)])).sum())
                 for m, g in zip(maps, gts))
    for t in thresholds:
        fp, values = 0, []
        for m, g in zip(maps, gts):
            positive = m >= t
            union = np.zeros(m.shape, bool)
            for channel, area in g:
                union |= channel
                values.append(min(np.logical_and(positive, channel).sum() / area, 1.0))
            fp += int(np.logical_and(positive, ~union).sum())
        fprs.append(fp / n_free)
        spros.append(float(np.mean(values)))
    return {limit: ref_trapz(fprs, spros, limit) / limit for limit in limits}


def random_case(rng, n_good=3, n_bad=4, size=12, levels=None):
    maps, gts = [], []
    for i in range(n_good + n_bad):
        m = rng.random((size, size))
        if levels:
            m = np.round(m * levels) / levels  # many ties, within and across images
        gt = []
        if i >= n_good:
            for _ in range(rng.integers(1, 4)):
                channel = np.zeros((size, size), bool)
                y, x = rng.integers(0, size - 3, 2)
                h, w = rng.integers(1, 6, 2)
                channel[y:y + h, x:x + w] = True
                m[channel] += rng.random() * 0.5  # defects score higher, partly
                relative = bool(rng.integers(0, 2))
                threshold = float(rng.choice([0.3, 0.5, 1.0])) if relative else float(rng.integers(1, 30))
                area = saturation_area(channel, threshold, relative)
                # int(0.3 * 1) = 0: the official code would divide by zero; the accumulator refuses it.
                gt.append((channel, area if area > 0 else saturation_area(channel, 1.0, False)))
        maps.append(m)
        gts.append(gt)
    return maps, gts


@pytest.mark.parametrize("seed, levels", [(0, None), (1, None), (2, 20), (3, 7), (4, 1000)])
def test_accumulator_equals_the_brute_force_definition(seed, levels):
    rng = np.random.default_rng(seed)
    maps, gts = random_case(rng, levels=levels)
    acc = SproAccumulator()
    for m, g in zip(maps, gts):
        acc.update(m, g, part="bad" if g else "good")
    ours = acc.compute()
    ref = ref_auc_spro(maps, gts, SPRO_FPR_LIMITS)
    for limit in SPRO_FPR_LIMITS:
        assert ours[limit] == pytest.approx(ref[limit], abs=1e-12), (limit, ours, ref)


def test_saturation_area_follows_the_config_rule():
    channel = np.zeros((10, 10), bool)
    channel[:3, :7] = True  # 21 pixels
    assert saturation_area(channel, 0.5, True) == 10.0  # int(0.5 * 21)
    assert saturation_area(channel, 40, False) == 21.0  # min(40, 21)
    assert saturation_area(channel, 8, False) == 8.0


def test_a_defect_found_beyond_its_saturation_counts_fully():
    amap = np.zeros((6, 6))
    channel = np.zeros((6, 6), bool)
    channel[:, :3] = True  # 18 pixels, saturated at 6
    amap[0, :3] = amap[1, :3] = 1.0  # 6 of them found at the top score
    acc = SproAccumulator()
    acc.update(amap, [(channel, 6.0)], part="bad")
    fpr, y = acc.curve()
    assert y[fpr == 0].max() == 1.0


# -- end to end: harness evaluate on a LOCO tree with random maps ----------------------------
def _reference_from_files(root: Path, maps_dir: Path, category: str):
    """The official aggregation computed from the files alone (reference reading, no loader)."""
    config = {d["pixel_value"]: d for d in json.loads((root / category / "defects_config.json").read_text())}
    parts = {"good": [], "logical_anomalies": [], "structural_anomalies": []}
    for kind in parts:
        for image in sorted((root / category / "test" / kind).glob("*.png")):
            amap = np.load(maps_dir / category / "test" / kind / f"{image.stem}.npy")
            gt = []
            if kind != "good":
                for mask_file in sorted((root / category / "ground_truth" / kind / image.stem).glob("*.png")):
                    array = np.asarray(Image.open(mask_file))
                    entry = config[int(array.max())]
                    channel = array > 0
                    gt.append((channel, saturation_area(channel, entry["saturation_threshold"],
                                                        entry["relative_saturation"])))
            parts[kind].append((amap, gt))
    per_kind = {}
    for kind in ("logical_anomalies", "structural_anomalies"):
        pairs = parts["good"] + parts[kind]
        per_kind[kind] = ref_auc_spro([m for m, _ in pairs], [g for _, g in pairs], SPRO_FPR_LIMITS)
    return {limit: (per_kind["logical_anomalies"][limit] + per_kind["structural_anomalies"][limit]) / 2
            for limit in SPRO_FPR_LIMITS}, per_kind


@pytest.mark.parametrize("seed", [0, 1])
def test_harness_evaluate_gives_the_reference_spro(tmp_path, monkeypatch, capsys, seed):
    import harness.cli
    import harness.engine.registry
    from harness.engine.registry import load_registry

    root = tmp_path / "loco"
    R.build_mvtec_loco(root, random.Random(seed))
    index = mvtec_loco.load_mvtec_loco(root)
    rng = np.random.default_rng(seed)
    maps_dir = tmp_path / "maps"
    for cat in index.categories.values():
        for sample in cat.test:
            amap = np.round(rng.random((R.SIZE, R.SIZE)), 2).astype(np.float32)
            for channel in sample.channels:
                amap[np.asarray(Image.open(channel.source)) > 0] += np.float32(rng.random())
            path = maps_dir / f"{sample.key}.npy"
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, amap)
    registry = load_registry(entry_points=[], extra_plugins=[("mvtec_loco", mvtec_loco)])
    monkeypatch.setattr(harness.engine.registry, "load_registry", lambda *a, **k: registry)
    results = tmp_path / "results"
    assert harness.cli.main(["evaluate", "--maps", str(maps_dir), "--dataset", "mvtec_loco", "--root", str(root),
                             "--results-dir", str(results), "--name", "random"]) == 0
    assert "pixel_spro" in capsys.readouterr().out
    record = json.loads(next(results.rglob("*.json")).read_text())
    for category in index.categories:
        expected, per_kind = _reference_from_files(root, maps_dir, category)
        got = record["metrics"][category]
        assert got["pixel_spro"] == pytest.approx(expected[0.05], abs=1e-12)
        for limit in SPRO_FPR_LIMITS:
            assert got[f"pixel_spro_fpr{limit:g}"] == pytest.approx(expected[limit], abs=1e-12)
        assert got["pixel_spro_logical"] == pytest.approx(per_kind["logical_anomalies"][0.05], abs=1e-12)
        assert got["pixel_spro_structural"] == pytest.approx(per_kind["structural_anomalies"][0.05], abs=1e-12)
        assert 0 <= got["image_auroc_logical"] <= 1 and 0 <= got["image_auroc_structural"] <= 1


# -- against numbers made by MVTec's evaluation code -----------------------------------------
REFERENCE = Path(__file__).resolve().parent / "golden" / "spro" / "reference.json"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_harness_evaluate_equals_the_official_code(tmp_path, monkeypatch, capsys, seed):
    """``reference.json`` was made by MVTec's LOCO evaluation modules (tests/golden/spro/make_reference.py)."""
    import harness.cli
    import harness.engine.registry
    from harness.engine.registry import load_registry

    reference = json.loads(REFERENCE.read_text())["seeds"][str(seed)]
    root = tmp_path / "loco"
    R.build_mvtec_loco(root, random.Random(seed))
    index = mvtec_loco.load_mvtec_loco(root)
    maps_dir = tmp_path / "maps"
    for cat in index.categories.values():
        for key, amap in R.loco_maps(cat.test, seed).items():
            path = maps_dir / f"{key}.npy"
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, amap)
    registry = load_registry(entry_points=[], extra_plugins=[("mvtec_loco", mvtec_loco)])
    monkeypatch.setattr(harness.engine.registry, "load_registry", lambda *a, **k: registry)
    results = tmp_path / "results"
    assert harness.cli.main(["evaluate", "--maps", str(maps_dir), "--dataset", "mvtec_loco", "--root", str(root),
                             "--results-dir", str(results)]) == 0
    record = json.loads(next(results.rglob("*.json")).read_text())
    for category, official in reference.items():
        ours = record["metrics"][category]
        for limit in SPRO_FPR_LIMITS:
            expected = official["mean"][str(limit)]
            assert ours[f"pixel_spro_fpr{limit:g}"] == pytest.approx(expected, abs=1e-6), (category, limit)
        assert ours["pixel_spro_logical"] == pytest.approx(official["logical_anomalies"]["0.05"], abs=1e-6)
        assert ours["pixel_spro_structural"] == pytest.approx(official["structural_anomalies"]["0.05"], abs=1e-6)
