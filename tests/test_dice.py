"""DICE (harness.metrics.dice): its definition, BMAD's pipeline, and a run on a BMAD-layout fixture."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import precision_recall_curve

import harness_benchmarks.medical as medical_plugin
from dataset_fixtures import build_bmad
from toy_plugins import ToyPlugin

from harness.engine.inference.evaluation import Evaluator
from harness.engine.jobs import Job
from harness.metrics import CategoryScores, MetricAccumulator
from harness.metrics.builtin import DICE
from harness.metrics.dice import MEDICAL_DATASETS, dice, dice_at_threshold
from harness.engine.registry import load_registry
from harness.results.report.maps import iter_all_maps
from harness.engine.runner import Runner


def _maps(seed, n=6, size=20, decimals=2):
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), dtype=bool)
    for i in range(n // 2, n):
        y, x = rng.integers(0, size - 6, 2)
        masks[i, y:y + rng.integers(2, 6), x:x + rng.integers(2, 6)] = True
    maps = np.round(rng.random(masks.shape) * 0.8 + masks * rng.uniform(0.1, 0.6), decimals).astype(np.float32)
    return maps, masks


def _by_sweep(maps, masks):
    """The definition: the best micro Dice over every distinct threshold."""
    return max(dice_at_threshold(maps, masks, t) for t in np.unique(maps))


def _bmad_pipeline(maps, masks):
    """BMAD's anomalib pipeline, step by step: F1-optimal threshold on the (same) pixels, min-max
    normalisation that puts it at 0.5, then torchmetrics-style micro Dice at 0.5."""
    precision, recall, thresholds = precision_recall_curve(masks.ravel(), maps.ravel())
    f1 = 2 * precision * recall / (precision + recall + 1e-10)
    threshold = thresholds[np.argmax(f1[:-1])]
    normalised = np.clip((maps.astype(np.float64) - threshold) / (maps.max() - maps.min()) + 0.5, 0, 1)
    predicted = normalised >= 0.5
    tp = np.count_nonzero(predicted & masks)
    return 2 * tp / (2 * tp + np.count_nonzero(predicted & ~masks) + np.count_nonzero(~predicted & masks))


def _scores(maps, masks):
    acc = MetricAccumulator()
    acc.update(maps, masks)
    return CategoryScores(image_scores=maps.reshape(len(maps), -1).max(1), labels=masks.reshape(len(maps), -1).any(1),
                          standard=acc.compute())


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("decimals", [1, 2, 4])
def test_dice_is_the_best_micro_dice_over_thresholds(seed, decimals):
    maps, masks = _maps(seed, decimals=decimals)
    value = dice(_scores(maps, masks))
    assert value == pytest.approx(_by_sweep(maps, masks), abs=1e-12)
    assert value == pytest.approx(_bmad_pipeline(maps, masks), abs=1e-9)


def test_dice_at_threshold_counts_ties_as_predicted():
    maps = np.array([[[0.5, 0.5], [0.2, 0.9]]])
    masks = np.array([[[True, False], [False, True]]])
    # >= 0.5: three predicted, two true positives -> 2*2 / (3 + 2)
    assert dice_at_threshold(maps, masks, 0.5) == pytest.approx(0.8)
    assert np.isnan(dice_at_threshold(maps, np.zeros_like(masks), 1.0))


def test_dice_is_only_for_the_medical_sets_and_needs_no_maps(toy_registry, run_options):
    assert DICE.datasets == MEDICAL_DATASETS and not DICE.in_mad
    assert [m.name for m in toy_registry.metric_specs("toy")].count("dice") == 0
    specs = toy_registry.metric_specs("medical")
    assert "dice" in [m.name for m in specs]
    evaluator = Evaluator("medical", specs, 32, run_options.torch_device(), None, None)
    assert not evaluator.keep_maps  # DICE reads the engine's counts: a medical run keeps no maps in memory


def test_a_run_on_the_bmad_fixture_records_dice_by_its_definition(tmp_path, run_options):
    root = build_bmad(tmp_path / "bmad")
    registry = load_registry(entry_points=[], extra_plugins=[("toy", ToyPlugin()), ("medical", medical_plugin)])
    run_options.data_roots = {"medical": root}
    run_options.save_maps = "all"
    summary = Runner(registry, run_options).run([Job("meanimage", "medical", "multiclass", None, 0, "tiny"),
                                                 Job("meanimage", "toy", "multiclass", None, 0, "tiny")])
    assert summary.exit_code == 0, summary.describe()
    medical, toy = (o.record for o in summary.outcomes)
    assert set(medical.metrics) == {"brainmri", "liverct", "resc"}
    saved: dict[str, list] = {}
    for m in iter_all_maps(summary.outcomes[0].record_path, medical):
        saved.setdefault(m.category, []).append(m)
    for category, values in medical.metrics.items():
        maps = np.stack([m.amap for m in saved[category]])
        masks = np.stack([m.mask for m in saved[category]])
        assert masks.any()
        assert values["dice"] == pytest.approx(_by_sweep(maps, masks), abs=1e-9)
    assert "dice" in medical.mean and "mad" in medical.mean
    assert all("dice" not in values for values in toy.metrics.values())
