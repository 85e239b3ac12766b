"""Saved maps (--save-maps none|sample|all): the fixed sample, the worst cases, the folder's life cycle."""

from __future__ import annotations

import numpy as np
import pytest

from toy_plugins import ToyPlugin, load_toy

from harness.engine.jobs import Job
from harness.engine.registry import load_registry
from harness.results.report.maps import (SAMPLE, SAMPLE_ANOMALOUS, SAMPLE_NORMAL, WORST_FN, WORST_FP, artifacts_folder,
                                 iter_all_maps, read_sample, sample_keys)
from harness.engine.runner import Runner


def _keys(category="red"):
    return [(s.key, s.label) for s in load_toy().categories[category].test]


def test_the_sample_depends_on_the_test_set_only():
    keys = _keys()
    chosen = sample_keys("toy", "red", keys)
    assert chosen == sample_keys("toy", "red", list(reversed(keys)))  # not on the order images come in
    labels = dict(keys)
    assert [labels[k] for k in chosen] == [0] * SAMPLE_NORMAL + [1] * SAMPLE_ANOMALOUS
    assert len(set(chosen)) == len(chosen)
    # Another dataset or category draws independently; a small test set gives what it has.
    draws = {tuple(sample_keys(d, c, keys)) for d in ("toy", "mvtec", "visa") for c in ("red", "blue", "x", "y")}
    assert len(draws) > 1
    assert sample_keys("toy", "red", keys[:1] + keys[-1:]) == [keys[0][0], keys[-1][0]]


def _run(tmp_path, save_maps, jobs, force=False):
    from harness.engine.runner import RunOptions

    registry = load_registry(entry_points=[], extra_plugins=[("toy", ToyPlugin())])
    options = RunOptions(results_dir=tmp_path / "results", cache_dir=tmp_path / "cache", device="cpu", eval_size=32,
                         progress=False, latency_repeats=1, save_maps=save_maps, force=force)
    return Runner(registry, options).run(jobs)


def test_none_saves_nothing(tmp_path):
    summary = _run(tmp_path, "none", [Job("meanimage", "toy", "multiclass", None, 0, "tiny")])
    outcome = summary.outcomes[0]
    assert outcome.record.artifacts == {}
    assert not artifacts_folder(outcome.record_path).exists()


def test_the_same_images_for_every_method_seed_and_protocol_plus_each_ones_worst(tmp_path):
    jobs = [Job("meanimage", "toy", "multiclass", None, 0, "tiny"), Job("meanimage", "toy", "multiclass", None, 3, "tiny"),
            Job("meanimage", "toy", "fewshot", 1, 0, "tiny")]
    summary = _run(tmp_path, "all", jobs)
    assert summary.exit_code == 0
    samples = []
    for outcome in summary.outcomes:
        saved = read_sample(outcome.record_path, outcome.record)
        samples.append(sorted(m.key for m in saved if SAMPLE in m.roles))
        everything = list(iter_all_maps(outcome.record_path, outcome.record))
        for category in ("red", "blue"):
            mine = [m for m in everything if m.category == category]
            normal = max((m for m in mine if m.label == 0), key=lambda m: m.score)
            anomalous = min((m for m in mine if m.label == 1), key=lambda m: m.score)
            assert [m.key for m in saved if m.category == category and WORST_FP in m.roles] == [normal.key]
            assert [m.key for m in saved if m.category == category and WORST_FN in m.roles] == [anomalous.key]
            for m in saved:
                if m.category == category:
                    full = next(x for x in mine if x.key == m.key)
                    assert np.array_equal(m.amap, full.amap) and m.score == full.score
                    assert np.array_equal(m.mask, full.mask) and m.image.shape == (32, 32, 3)
    assert samples[0] == samples[1] == samples[2]
    expected = sorted(sample_keys("toy", "red", _keys("red")) + sample_keys("toy", "blue", _keys("blue")))
    assert samples[0] == expected


def test_a_rerun_replaces_the_folder_and_a_dead_jobs_leftovers_go(tmp_path):
    job = Job("meanimage", "toy", "multiclass", None, 0, "tiny")
    first = _run(tmp_path, "all", [job]).outcomes[0]
    folder = artifacts_folder(first.record_path)
    assert (folder / "all").is_dir()
    leftover = folder.with_name(folder.name + ".tmp-999-deadbeef")
    (leftover / "all").mkdir(parents=True)
    (leftover / "all" / "000-00000.safetensors").write_bytes(b"half a file")
    second = _run(tmp_path, "sample", [job], force=True).outcomes[0]
    assert not leftover.exists()
    assert not (folder / "all").exists()  # the folder is the second run's, whole
    assert "all" not in second.record.artifacts["maps"]
    assert sorted(p.name for p in folder.iterdir()) == ["curves.safetensors", "sample.safetensors"]
    assert not list(folder.parent.glob("*.json.*")) and not list(folder.rglob("*.json"))


def test_a_failed_job_leaves_no_saved_maps(tmp_path):
    summary = _run(tmp_path, "all", [Job("raising", "toy", "multiclass", None, 0, "tiny")])
    outcome = summary.outcomes[0]
    assert outcome.status == "failed" and outcome.record.artifacts == {}
    assert not artifacts_folder(outcome.record_path).exists()
    with pytest.raises(Exception, match="--save-maps all"):
        list(iter_all_maps(outcome.record_path, outcome.record))


def test_the_report_warns_about_damaged_saved_maps_and_still_renders(tmp_path):
    from harness.results.report.html import build_report

    outcome = _run(tmp_path, "sample", [Job("meanimage", "toy", "multiclass", None, 0, "tiny")]).outcomes[0]
    damaged = artifacts_folder(outcome.record_path) / "sample.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:200])
    lines = []
    result = build_report(tmp_path / "results", tmp_path / "report", warn=lines.append)
    assert result.index.is_file() and result.shown == 1
    assert any(str(damaged) in line for line in lines)
    assert str(damaged) in result.index.read_text()
