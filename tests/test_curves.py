"""Exact curve vertices (harness.metrics.curves): their areas are the metrics; thinning moves them by < tolerance."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from harness.metrics import MetricAccumulator
from harness.metrics.curves import CURVE_METRICS, category_curves, curve_area, thin


def _category(seed: int, n: int = 6, size: int = 24, decimals: int | None = 2):
    """Maps with blob defects; ``decimals`` rounds the scores so that many of them tie."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), dtype=bool)
    for i in range(1, n):
        for _ in range(rng.integers(1, 3)):
            y, x = rng.integers(0, size - 6, 2)
            h, w = rng.integers(2, 7, 2)
            masks[i, y:y + h, x:x + w] = True
    maps = rng.random(masks.shape) + masks * rng.uniform(0.2, 0.9)
    maps = ndimage.uniform_filter(maps, size=(1, 3, 3))
    if decimals is not None:
        maps = np.round(maps, decimals)
    scores = maps.reshape(n, -1).max(1) + rng.normal(0, 0.05, n)
    labels = masks.reshape(n, -1).any(1)
    return maps.astype(np.float32), masks, scores, labels


def _accumulated(maps, masks, scores, labels):
    acc = MetricAccumulator()
    acc.update(maps, masks, image_scores=scores, labels=labels)
    return acc, acc.compute()


def _distance_to_polyline(px, py, x, y):
    """Distance of each point (px, py) to the polyline (x, y)."""
    ax, ay, bx, by = x[:-1], y[:-1], x[1:], y[1:]
    dx, dy = bx - ax, by - ay
    length2 = dx * dx + dy * dy
    out = np.empty(px.size)
    for i, (qx, qy) in enumerate(zip(px, py)):
        t = np.where(length2 > 0, ((qx - ax) * dx + (qy - ay) * dy) / np.where(length2 > 0, length2, 1), 0.0)
        t = np.clip(t, 0.0, 1.0)
        out[i] = np.min(np.hypot(ax + t * dx - qx, ay + t * dy - qy))
    return out


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("decimals", [None, 2, 1])
def test_every_curve_area_is_the_engines_metric(seed, decimals):
    maps, masks, scores, labels = _category(seed, decimals=decimals)
    acc, metrics = _accumulated(maps, masks, scores, labels)
    curves = category_curves(acc)
    assert set(curves) == set(CURVE_METRICS)
    for name, curve in curves.items():
        assert curve.metric == CURVE_METRICS[name]
        assert curve.value == pytest.approx(metrics[curve.metric], abs=1e-12)
        assert curve.area == pytest.approx(metrics[curve.metric], abs=1e-12)
        assert np.all(np.diff(curve.x) >= 0)
        assert curve.n_exact == curve.x.size


@pytest.mark.parametrize("seed", range(3))
def test_curves_against_scikit_learn(seed):
    maps, masks, scores, labels = _category(seed, decimals=2)
    acc, _ = _accumulated(maps, masks, scores, labels)
    curves = category_curves(acc)
    assert curves["pixel_roc"].area == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12)
    assert curves["pixel_pr"].area == pytest.approx(average_precision_score(masks.ravel(), maps.ravel()), abs=1e-12)
    assert curves["image_roc"].area == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert curves["image_pr"].area == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    # Every vertex scikit-learn finds lies on our polyline: the reduced vertices are the same curve.
    fpr, tpr, _ = roc_curve(masks.ravel(), maps.ravel(), drop_intermediate=False)
    roc = curves["pixel_roc"]
    assert _distance_to_polyline(fpr, tpr, roc.x, roc.y).max() < 1e-12


def test_pro_curve_is_the_definition_by_threshold_sweep():
    maps, masks, scores, labels = _category(7, decimals=1)
    acc, metrics = _accumulated(maps, masks, scores, labels)
    pro = category_curves(acc)["pixel_pro"]
    regions = []
    for amap, mask in zip(maps, masks):
        labelled, count = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [(amap, labelled == r) for r in range(1, count + 1)]
    for t in np.unique(maps)[::-1][:25]:
        fpr = (maps[~masks] >= t).mean()
        overlap = np.mean([(amap[region] >= t).mean() for amap, region in regions])
        assert _distance_to_polyline(np.array([fpr]), np.array([overlap]), pro.x, pro.y)[0] < 1e-12
    assert pro.value == pytest.approx(metrics["pixel_aupro"], abs=1e-12)


def test_undefined_curves_are_left_out():
    maps = np.random.default_rng(0).random((3, 8, 8)).astype(np.float32)
    acc, _ = _accumulated(maps, np.zeros(maps.shape, bool), None, None)
    assert category_curves(acc) == {}


def test_thinning_bounds_the_error_and_keeps_the_exact_value():
    rng = np.random.default_rng(3)
    n = 200_000
    labels = rng.random(n) < 0.3
    scores = rng.normal(size=n) + labels * 1.2
    acc = MetricAccumulator()
    acc.update(scores.reshape(1, 400, 500).astype(np.float32), labels.reshape(1, 400, 500))
    metrics = acc.compute()
    curve = category_curves(acc)["pixel_roc"]
    tolerance = 1e-3
    thinned = curve.thinned(tolerance)
    assert thinned.x.size < curve.x.size / 100
    assert (thinned.x[0], thinned.y[0], thinned.x[-1], thinned.y[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert thinned.value == curve.value == pytest.approx(metrics["pixel_auroc"], abs=1e-12)
    assert thinned.n_exact == curve.n_exact
    assert abs(thinned.area - curve.value) <= 4 * tolerance
    picked = rng.choice(curve.x.size, 2000, replace=False)
    assert _distance_to_polyline(curve.x[picked], curve.y[picked], thinned.x, thinned.y).max() <= tolerance + 1e-12
    # The kept vertices are exact vertices.
    assert np.isin(thinned.x, curve.x).all()


def test_thin_with_zero_tolerance_drops_only_collinear_vertices():
    x = np.array([0.0, 0.25, 0.5, 0.5, 1.0])
    y = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
    assert thin(x, y, 0.0).tolist() == [0, 2, 3, 4]
    assert curve_area("pixel_roc", x[[0, 2, 3, 4]], y[[0, 2, 3, 4]]) == curve_area("pixel_roc", x, y)
    assert thin(x[:2], y[:2]).tolist() == [0, 1]
