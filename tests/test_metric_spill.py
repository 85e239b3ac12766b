"""The exact engine spills its sorted scores to disk above $HARNESS_METRIC_MEMORY_MB, same numbers."""

from __future__ import annotations

import gc

import numpy as np
import pytest

import harness.metrics.engine as engine
from harness.metrics.engine import MetricAccumulator


def _fill(accumulator, maps, masks):
    for start in range(0, len(maps), 4):
        accumulator.update(maps[start:start + 4], masks[start:start + 4])
    return accumulator


def test_spilled_runs_give_the_same_metrics_and_are_removed(monkeypatch, tmp_path):
    rng = np.random.default_rng(0)
    maps = np.round(rng.random((24, 64, 64)), 3).astype(np.float32)  # ties across runs
    masks = np.zeros(maps.shape, bool)
    masks[::3, 10:30, 20:35] = True
    maps[masks] += 0.2
    monkeypatch.setattr(engine, "_RUN_SIZE", 1 << 14)
    monkeypatch.setenv("HARNESS_METRIC_SPILL_DIR", str(tmp_path))
    monkeypatch.setenv("HARNESS_METRIC_MEMORY_MB", "0.1")
    spilled = _fill(MetricAccumulator(), maps, masks)
    assert any(isinstance(run, engine.SpilledRun) for run in spilled._neg_runs)
    folder = spilled._spill_dir
    assert folder.parent == tmp_path and any(folder.iterdir())
    monkeypatch.setenv("HARNESS_METRIC_MEMORY_MB", "0")
    kept = _fill(MetricAccumulator(), maps, masks)
    assert not any(isinstance(run, engine.SpilledRun) for run in kept._neg_runs)
    assert spilled.compute() == kept.compute()
    del spilled
    gc.collect()
    assert not folder.exists()


def test_a_bad_budget_names_the_variable(monkeypatch):
    monkeypatch.setenv("HARNESS_METRIC_MEMORY_MB", "lots")
    with pytest.raises(ValueError, match="HARNESS_METRIC_MEMORY_MB"):
        accumulator = MetricAccumulator()
        accumulator.update(np.zeros((1, 4, 4), np.float32), np.zeros((1, 4, 4), bool))
        accumulator.compute()


def test_widening_to_float64_reads_spilled_runs_back(monkeypatch, tmp_path):
    rng = np.random.default_rng(1)
    first = rng.random((8, 32, 32)).astype(np.float32)
    second = rng.random((8, 32, 32))  # float64 values no float32 holds: the store widens
    masks = np.zeros(first.shape, bool)
    masks[::2, 4:9, 4:12] = True  # half the images anomalous: every metric defined
    monkeypatch.setattr(engine, "_RUN_SIZE", 1 << 10)
    monkeypatch.setenv("HARNESS_METRIC_SPILL_DIR", str(tmp_path))
    results = []
    for budget in ("0.001", "0"):
        monkeypatch.setenv("HARNESS_METRIC_MEMORY_MB", budget)
        accumulator = MetricAccumulator()
        accumulator.update(first, masks)
        accumulator.update(second, masks)
        results.append(accumulator.compute())
    assert results[0] == results[1]
