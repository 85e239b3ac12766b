"""``harness evaluate`` on MVTec AD 2 and Real-IAD: their own metrics from maps made elsewhere."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
try:
    import harness_benchmarks  # noqa: F401
except ImportError:  # pragma: no cover
    sys.path.insert(0, str(REPO / "datasets" / "benchmarks"))

import recent_dataset_fixtures as R  # noqa: E402
from harness_benchmarks import mvtec_ad2, realiad  # noqa: E402

from harness import read_mask  # noqa: E402
from harness.metrics import aupro  # noqa: E402
from harness.engine.registry import load_registry  # noqa: E402


def _evaluate(tmp_path, monkeypatch, name, module, root, maps_dir):
    import harness.cli
    import harness.engine.registry

    registry = load_registry(entry_points=[], extra_plugins=[(name, module)])
    monkeypatch.setattr(harness.engine.registry, "load_registry", lambda *a, **k: registry)
    results = tmp_path / "results"
    assert harness.cli.main(["evaluate", "--maps", str(maps_dir), "--dataset", name, "--root", str(root),
                             "--results-dir", str(results), "--name", "elsewhere"]) == 0
    return json.loads(next(results.rglob("*.json")).read_text())


def _write(path: Path, amap: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, amap)


def test_mvtec_ad2_segf1_and_aupro_005_from_maps_in_the_dataset_tree(tmp_path, monkeypatch):
    root = tmp_path / "ad2"
    R.build_mvtec_ad2(root, random.Random(21))
    index = mvtec_ad2.load_mvtec_ad2(root)
    rng = np.random.default_rng(21)
    maps_dir = tmp_path / "maps"
    expected = {}
    for name, cat in index.categories.items():
        validation = [rng.random((R.SIZE, R.SIZE)).astype(np.float32) for _ in cat.validation]
        for sample, amap in zip(cat.validation, validation):
            _write(maps_dir / f"{sample.key}.npy", amap)
        pixels = np.concatenate([v.ravel().astype(np.float64) for v in validation])
        threshold = pixels.mean() + 3 * pixels.std()
        maps, masks = [], []
        for sample in cat.test:
            mask = read_mask(sample.mask) if sample.mask is not None else np.zeros((R.SIZE, R.SIZE), bool)
            amap = rng.random((R.SIZE, R.SIZE)).astype(np.float32)
            amap += mask.astype(np.float32) * np.float32(2 * rng.random())
            # As the dataset tree has it: <category>/test_public/<good|bad>/<stem>
            _write(maps_dir / Path(sample.image).relative_to(root).with_suffix(".npy"), amap)
            maps.append(amap)
            masks.append(mask)
        predicted = np.stack(maps) >= threshold
        truth = np.stack(masks)
        tp = np.sum(predicted & truth)
        expected[name] = (2 * tp / (predicted.sum() + truth.sum()), aupro(np.stack(maps), truth, 0.05))
    record = _evaluate(tmp_path, monkeypatch, "mvtec_ad2", mvtec_ad2, root, maps_dir)
    for name, (segf1, aupro_005) in expected.items():
        assert record["metrics"][name]["pixel_segf1"] == pytest.approx(segf1, abs=1e-12)
        assert record["metrics"][name]["pixel_aupro_fpr0.05"] == pytest.approx(aupro_005, abs=1e-9)
    # The private sets are not test images: no map is asked for, none is scored.
    assert record["efficiency"]["n_test_images"] == sum(len(c.test) for c in index.categories.values())


def test_realiad_sample_auroc_from_maps(tmp_path, monkeypatch):
    root = tmp_path / "realiad"
    R.build_realiad(root, random.Random(22))
    index = realiad.load_realiad(root)
    rng = np.random.default_rng(22)
    maps_dir = tmp_path / "maps"
    expected = {}
    for name, cat in index.categories.items():
        objects: dict[str, list] = {}
        for sample in cat.test:
            amap = rng.random((R.SIZE, R.SIZE)).astype(np.float32)
            _write(maps_dir / f"{sample.key}.npy", amap)
            objects.setdefault(realiad.sample_id(sample.key), []).append((float(amap.max()), sample.label))
        from sklearn.metrics import roc_auc_score

        labels = [max(label for _, label in views) for views in objects.values()]
        scores = [max(score for score, _ in views) for views in objects.values()]
        expected[name] = roc_auc_score(labels, scores) if len(set(labels)) == 2 else float("nan")
    record = _evaluate(tmp_path, monkeypatch, "realiad", realiad, root, maps_dir)
    for name, value in expected.items():
        assert record["metrics"][name]["image_sample_auroc"] == pytest.approx(value, abs=1e-12)
