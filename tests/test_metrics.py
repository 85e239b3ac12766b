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


# -- the fast engine against the references ------------------------------------------------------
from harness.metrics import MetricAccumulator  # noqa: E402


def _mvtec_algorithm_aupro(maps, masks, limit=0.3):
    """AUPRO as the MVTec AD evaluation code computes it: per-pixel FP and PRO changes, one sort,
    cumulative sums, the last pixel of every tie group, trapezoid to the limit with interpolation."""
    fp_change = np.zeros(maps.shape)
    pro_change = np.zeros(maps.shape)
    n_ok = n_regions = 0
    for i, mask in enumerate(masks):
        labelled, count = ndimage.label(mask, structure=np.ones((3, 3)))
        n_regions += count
        n_ok += int((labelled == 0).sum())
        fp_change[i][labelled == 0] = 1
        for r in range(1, count + 1):
            pro_change[i][labelled == r] = 1.0 / (labelled == r).sum()
    scores = np.asarray(maps, dtype=np.float64).ravel()
    order = np.argsort(scores, kind="stable")[::-1]
    scores = scores[order]
    fpr = np.cumsum(fp_change.ravel()[order]) / n_ok
    pro = np.cumsum(pro_change.ravel()[order]) / n_regions
    keep = np.append(np.diff(scores) != 0, True)
    fpr = np.r_[0.0, np.minimum(fpr[keep], 1), 1.0]
    pro = np.r_[0.0, np.minimum(pro[keep], 1), 1.0]
    return area_to_limit(fpr, pro, limit) / limit


def _random_category(seed, n=7, size=20):
    """Maps of a random value range and coarseness (ties), with random blob masks."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), dtype=bool)
    for i in range(n):
        for _ in range(rng.integers(0, 3)):
            y, x = rng.integers(0, size - 2, 2)
            masks[i, y:y + rng.integers(1, 7), x:x + rng.integers(1, 7)] = True
    masks[0] = False  # at least one normal image
    masks[1, 3:6, 3:6] = True  # at least one defect
    maps = rng.normal(size=masks.shape) + masks * rng.uniform(0, 2)
    style = seed % 5
    if style == 0:
        maps = np.round(maps, 1)  # heavy ties, across classes too
    elif style == 1:
        maps = maps * 1e-4 + 1e6  # a large offset: distinct only in float64
    elif style == 2:
        maps = (maps * 1e3).astype(np.float32)
    elif style == 3:
        maps = np.floor(maps * 2).astype(np.float32) - 0.0 * maps.astype(np.float32)  # ties, and -0.0 next to 0.0
    else:
        maps = -np.exp(-maps)  # negative scores only
    return maps, masks


@pytest.mark.parametrize("seed", range(25))
def test_engine_equals_sklearn_and_mvtec_algorithm(seed):
    maps, masks = _random_category(seed)
    scores, labels = np.asarray(maps).ravel(), masks.ravel()
    out = evaluate(maps, masks)
    assert out["pixel_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-9)
    assert out["pixel_ap"] == pytest.approx(average_precision_score(labels, scores), abs=1e-9)
    assert out["pixel_f1max"] == pytest.approx(_sklearn_f1max(labels, scores), abs=1e-9)
    assert out["pixel_aupro"] == pytest.approx(_mvtec_algorithm_aupro(maps, masks), abs=1e-9)
    assert out["pixel_aupro"] == pytest.approx(_pro_by_threshold_sweep(np.asarray(maps), masks), abs=1e-9)
    image_scores = np.asarray(maps).reshape(len(maps), -1).max(axis=1)
    image_labels = masks.reshape(len(masks), -1).any(axis=1)
    assert out["image_auroc"] == pytest.approx(roc_auc_score(image_labels, image_scores), abs=1e-12)
    assert out["image_ap"] == pytest.approx(average_precision_score(image_labels, image_scores), abs=1e-12)
    assert out["image_f1max"] == pytest.approx(_sklearn_f1max(image_labels, image_scores), abs=1e-12)


def test_float64_maps_are_not_merged_into_float32_ties():
    # 1e6 + k * 1e-4 are distinct doubles but equal float32 values: merging them would make
    # every pixel a tie and the AUROC 0.5.
    masks = np.zeros((2, 4, 4), dtype=bool)
    masks[1, :2] = True
    maps = 1e6 + np.where(masks, 2e-4, 1e-4) + np.random.default_rng(0).random(masks.shape) * 1e-5
    assert evaluate(maps, masks)["pixel_auroc"] == pytest.approx(1.0)


def test_integer_and_half_maps():
    rng = np.random.default_rng(3)
    masks = rng.random((4, 12, 12)) < 0.2
    for maps in (rng.integers(0, 6, masks.shape).astype(np.uint8), rng.random(masks.shape).astype(np.float16)):
        out = evaluate(maps, masks)
        assert out["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel().astype(float)), abs=1e-12)
        assert out["pixel_aupro"] == pytest.approx(_mvtec_algorithm_aupro(maps, masks), abs=1e-9)


@pytest.mark.parametrize("seed", range(6))
def test_accumulator_equals_one_shot(seed):
    maps, masks = _random_category(seed, n=11)
    rng = np.random.default_rng(seed)
    whole = evaluate(maps, masks)
    acc = MetricAccumulator()
    cuts = np.sort(rng.choice(np.arange(1, 11), size=3, replace=False))
    for part_maps, part_masks in zip(np.split(maps, cuts), np.split(masks, cuts)):
        if seed % 2:  # sequences of 2-D arrays, masks as 0/255
            acc.update(list(part_maps), [m.astype(np.uint8) * 255 for m in part_masks])
        else:
            acc.update(part_maps, part_masks)
    streamed = acc.compute()
    assert streamed.keys() == whole.keys()
    for name in whole:
        assert streamed[name] == pytest.approx(whole[name], abs=1e-12), name
    assert acc.compute() == streamed  # compute twice: same numbers


def test_accumulator_widens_to_float64_when_a_later_batch_needs_it():
    maps, masks = _random_category(1, n=6)  # float64 needing its precision
    acc = MetricAccumulator()
    acc.update(np.round(maps[:3] - 1e6, 2).astype(np.float32) + np.float32(0), masks[:3])
    first = np.round(maps[:3] - 1e6, 2).astype(np.float32).astype(np.float64)
    acc.update(maps[3:] - 1e6, masks[3:])
    both = np.concatenate([first, maps[3:] - 1e6])
    assert acc.compute()["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), both.ravel()), abs=1e-12)


def test_accumulator_takes_maps_of_different_sizes():
    rng = np.random.default_rng(0)
    small, big = rng.random((2, 8, 8)), rng.random((1, 16, 12))
    small_masks, big_masks = small > 0.8, big > 0.7
    acc = MetricAccumulator()
    acc.update(small, small_masks)
    acc.update(big, big_masks)
    scores = np.r_[small.ravel(), big.ravel()]
    labels = np.r_[small_masks.ravel(), big_masks.ravel()]
    assert acc.compute()["pixel_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_given_image_scores_and_labels_are_used():
    rng = np.random.default_rng(1)
    maps, masks = rng.random((6, 8, 8)), np.zeros((6, 8, 8), dtype=bool)
    masks[3:, :2, :2] = True
    image_scores, labels = np.array([0.1, 0.5, 0.2, 0.9, 0.4, 0.8]), np.array([0, 1, 0, 1, 0, 1])
    out = evaluate(maps, masks, image_scores=image_scores, labels=labels)
    assert out["image_auroc"] == pytest.approx(roc_auc_score(labels, image_scores))


def test_undefined_pixel_and_image_cases():
    rng = np.random.default_rng(0)
    maps = rng.random((3, 6, 6))
    with pytest.warns(UndefinedMetricWarning, match="image AUROC"):
        only_anomalous = evaluate(maps, np.ones(maps.shape, dtype=bool))
    assert math.isnan(only_anomalous["image_auroc"]) and math.isnan(only_anomalous["pixel_auroc"])
    assert math.isnan(only_anomalous["pixel_aupro"])  # no defect-free pixel
    assert only_anomalous["pixel_ap"] == pytest.approx(1.0) and only_anomalous["pixel_f1max"] == pytest.approx(1.0)
    with pytest.warns(UndefinedMetricWarning):
        empty = MetricAccumulator().compute()
    assert all(math.isnan(v) for v in empty.values())


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_map_names_the_image_across_batches(bad):
    acc = MetricAccumulator(name="cat")
    acc.update(np.zeros((2, 4, 4)), np.zeros((2, 4, 4)))
    maps = np.zeros((3, 4, 4))
    maps[1, 2, 2] = bad
    with pytest.raises(ValueError, match="anomaly map 3 in category 'cat'"):
        acc.update(maps, np.zeros((3, 4, 4)))
    with pytest.raises(ValueError, match="b.tiff"):
        acc.update(maps, np.zeros((3, 4, 4)), names=["a.tiff", "b.tiff", "c.tiff"])
    assert acc.n_images == 2  # a rejected batch leaves nothing behind


def test_map_and_mask_shapes_must_match():
    with pytest.raises(ValueError, match="anomaly map 0.*shape"):
        evaluate([np.zeros((4, 4))], [np.zeros((4, 5))])


def test_peak_memory_stays_within_twice_the_float32_maps():
    import tracemalloc

    # MVTec-like: defects on 60% of the images, a few percent of their pixels.
    rng = np.random.default_rng(0)
    maps = rng.random((50, 256, 256), dtype=np.float32)
    masks = np.zeros(maps.shape, dtype=bool)
    yy, xx = np.mgrid[0:256, 0:256]
    for i in range(30):
        cy, cx, r = rng.integers(40, 216), rng.integers(40, 216), rng.integers(8, 40)
        masks[i] = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
    maps += masks * np.float32(0.5)
    evaluate(maps[:2], masks[:2])  # imports and caches outside the measurement
    tracemalloc.start()
    evaluate(maps, masks)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak <= 2 * maps.nbytes, f"peak {peak / maps.nbytes:.2f}x the maps"


def test_category_scores_can_carry_streamed_metrics_without_maps():
    from harness.metrics.builtin import STANDARD_METRICS

    standard = {spec.name: 0.5 for spec in STANDARD_METRICS}
    scores = CategoryScores(np.zeros(2), np.array([0, 1]), standard=standard)
    assert [spec.compute(scores) for spec in STANDARD_METRICS] == [0.5] * 7
    with pytest.raises(ValueError, match="maps and masks"):
        CategoryScores(np.zeros(2), np.array([0, 1]))
