"""The metrics against scikit-learn and a direct threshold sweep of the AUPRO definition."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from harness.metrics import (CategoryScores, UndefinedMetricWarning, aupro, auroc, average_precision, evaluate, f1max,
                             mean_over_categories)
from harness.metrics.exact import area_to_limit


def _sklearn_f1max(labels, scores):
    precision, recall, _ = precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = 2 * precision * recall / (precision + recall)
    return float(np.nanmax(f1))


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("rounding", [None, 1, 0])  # 0 decimals: heavy ties
def test_image_metrics_equal_sklearn(seed, rounding):
    rng = np.random.default_rng(seed)
    labels = rng.random(150) < 0.4
    scores = rng.normal(size=150) * 3 + labels * 2 + 100
    if rounding is not None:
        scores = np.round(scores, rounding)
    assert auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert average_precision(scores, labels) == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    assert f1max(scores, labels) == pytest.approx(_sklearn_f1max(labels, scores), abs=1e-12)


def test_auroc_counts_ties_half_and_is_never_flipped():
    assert auroc(np.array([1.0, 1.0]), np.array([0, 1])) == 0.5
    assert auroc(np.array([2.0, 1.0]), np.array([0, 1])) == 0.0


def _pro_by_threshold_sweep(maps, masks, limit=0.3):
    """The AUPRO definition computed directly: one binarisation per distinct threshold."""
    regions = []
    for amap, mask in zip(maps, masks):
        labelled, count = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [(amap, labelled == r) for r in range(1, count + 1)]
    ok = ~masks
    fprs, pros = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        fprs.append(float((maps[ok] >= t).sum() / ok.sum()))
        pros.append(float(np.mean([(amap[region] >= t).mean() for amap, region in regions])))
    fprs.append(1.0)
    pros.append(1.0)
    return area_to_limit(np.array(fprs), np.array(pros), limit) / limit


@pytest.mark.parametrize("seed", range(4))
def test_aupro_equals_threshold_sweep(seed):
    rng = np.random.default_rng(seed)
    masks = np.zeros((4, 16, 16), dtype=bool)
    masks[1, 2:6, 2:6] = True
    masks[1, 6, 6] = True  # touches diagonally: same 8-connected region
    masks[2, 10:14, 3:5] = True
    masks[3, 0:3, 12:16] = True
    masks[3, 8:9, 8:9] = True
    maps = np.round(rng.random(masks.shape) + masks * rng.random(), 2)
    assert aupro(maps, masks) == pytest.approx(_pro_by_threshold_sweep(maps, masks), abs=1e-9)


def test_aupro_uses_eight_connectivity():
    masks = np.zeros((1, 8, 8), dtype=bool)
    masks[0, 1, 1:3] = True
    masks[0, 2, 3] = True  # touches (1, 2) diagonally: one region of 3 pixels, not two regions
    maps = np.zeros((1, 8, 8))
    maps[0, 2, 3] = 1.0
    # 8-connected: overlap 1/3 at FPR 0 (4-connected would give mean(0, 1) = 1/2), then a
    # straight line to (1, 1).
    y_at_limit = 1 / 3 + (1 - 1 / 3) * 0.3
    assert aupro(maps, masks) == pytest.approx(0.5 * (1 / 3 + y_at_limit), abs=1e-9)


def test_area_to_limit_interpolates():
    assert area_to_limit(np.array([0.0, 1.0]), np.array([0.0, 1.0]), 0.3) == pytest.approx(0.045)
    assert area_to_limit(np.array([0.0, 0.3, 1.0]), np.array([1.0, 1.0, 1.0]), 0.3) == pytest.approx(0.3)


def test_evaluate_defaults_and_mask_encoding():
    rng = np.random.default_rng(0)
    masks = np.zeros((6, 20, 20), dtype=np.uint8)
    masks[3:, 5:9, 5:9] = 255
    maps = rng.random(masks.shape).astype(np.float32) + (masks > 0) * 0.7
    out = evaluate(list(maps), list(masks))
    assert set(out) == {"image_auroc", "image_ap", "image_f1max", "pixel_auroc", "pixel_ap", "pixel_f1max",
                        "pixel_aupro"}
    assert out["image_auroc"] == pytest.approx(roc_auc_score([0, 0, 0, 1, 1, 1], maps.reshape(6, -1).max(1)))
    assert out["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel() > 0, maps.ravel()), abs=1e-9)
    assert all(0.0 <= v <= 1.0 for v in out.values())


def test_undefined_cases_give_nan_with_warning():
    maps = np.random.default_rng(0).random((3, 8, 8))
    with pytest.warns(UndefinedMetricWarning):
        out = evaluate(maps, np.zeros(maps.shape, dtype=bool))
    assert all(math.isnan(v) for v in out.values())


def test_nan_in_map_names_the_image():
    maps = np.zeros((3, 4, 4))
    maps[1, 0, 0] = np.nan
    with pytest.raises(ValueError, match="anomaly map 1"):
        evaluate(maps, np.zeros(maps.shape, dtype=bool))
    with pytest.raises(ValueError, match="cat/test/x/001"):
        CategoryScores(np.zeros(3), np.zeros(3), maps, np.zeros(maps.shape, bool), name="cat",
                       keys=["a", "cat/test/x/001", "c"])


def test_mean_over_categories_skips_undefined_and_adds_mad():
    per = {"a": {m: 0.8 for m in ("image_auroc", "image_ap", "image_f1max", "pixel_auroc", "pixel_ap",
                                  "pixel_f1max", "pixel_aupro")},
           "b": {"image_auroc": 0.6, "image_ap": None, "image_f1max": 0.6, "pixel_auroc": 0.6, "pixel_ap": 0.6,
                 "pixel_f1max": 0.6, "pixel_aupro": float("nan")}}
    mean = mean_over_categories(per)
    assert mean["image_auroc"] == pytest.approx(0.7)
    assert mean["image_ap"] == pytest.approx(0.8)
    assert mean["pixel_aupro"] == pytest.approx(0.8)
    assert mean["mad"] == pytest.approx(np.mean([0.7, 0.8, 0.7, 0.7, 0.7, 0.7, 0.8]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert "mad" not in mean_over_categories({"a": {"image_auroc": 0.5}})
