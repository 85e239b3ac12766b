"""Methods run on MVTec AD 2, MVTec LOCO AD and Real-IAD like on any dataset, with their own metrics.

MVTec AD 2's private test sets are predicted and written in the evaluation server's layout,
exported by ``harness export-maps``, and never scored.
"""

from __future__ import annotations

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
from harness_benchmarks import mvtec_ad2, mvtec_loco, realiad  # noqa: E402

from harness.engine.registry import load_registry  # noqa: E402


def _run(tmp_path, run_options, name, module, builder, seed=0, protocol="multiclass"):
    from toy_plugins import ToyPlugin

    from harness.engine.jobs import expand_jobs
    from harness.engine.runner import Runner

    root = tmp_path / name
    builder(root, random.Random(seed))
    registry = load_registry(entry_points=[], extra_plugins=[("toy", ToyPlugin()), (name, module)])
    run_options.data_roots = {name: root}
    jobs = expand_jobs(["meanimage"], [name], protocol, None, [0], {name: "tiny"})
    summary = Runner(registry, run_options).run(jobs)
    assert [o.status for o in summary.outcomes] == ["ok"], summary.describe()
    return root, summary.outcomes[0]


def test_mvtec_ad2_scores_the_public_set_and_exports_the_private_ones(tmp_path, run_options):
    import tifffile
    from PIL import Image

    from harness.results.report.export import export_maps

    root, outcome = _run(tmp_path, run_options, "mvtec_ad2", mvtec_ad2, R.build_mvtec_ad2)
    record = outcome.record
    index = mvtec_ad2.load_mvtec_ad2(root)
    for category, values in record.metrics.items():
        assert 0 <= values["pixel_segf1"] <= 1 and 0 <= values["pixel_aupro_fpr0.05"] <= 1
    # Only test_public is scored: the number of test images equals its size.
    assert record.efficiency["n_test_images"] == sum(len(c.test) for c in index.categories.values())
    unscored = record.artifacts["unscored_maps"]
    assert unscored["counts"] == {c: len(cat.unscored) for c, cat in index.categories.items()}
    assert all(t is not None for t in unscored["thresholds"].values())
    out = tmp_path / "export"
    exported = export_maps(run_options.results_dir, "meanimage", out)
    assert exported[0].unscored == unscored["counts"] and not exported[0].counts
    for cat in index.categories.values():
        for sample in cat.unscored:
            stem = sample.key.rsplit("/", 1)[1]
            amap = tifffile.imread(out / "anomaly_images" / sample.category / sample.split / f"{stem}.tiff")
            assert amap.dtype == np.float16 and amap.shape == (R.SIZE, R.SIZE)
            binary = np.asarray(Image.open(out / "anomaly_images_thresholded" / sample.category / sample.split /
                                           f"{stem}.png"))
            assert set(np.unique(binary)) <= {0, 255}
    assert not (out / "can" / "test_private").exists()


def test_mvtec_ad2_oneclass_writes_the_private_maps_of_every_category(tmp_path, run_options):
    root, outcome = _run(tmp_path, run_options, "mvtec_ad2", mvtec_ad2, R.build_mvtec_ad2, protocol="oneclass")
    index = mvtec_ad2.load_mvtec_ad2(root)
    unscored = outcome.record.artifacts["unscored_maps"]
    assert unscored["counts"] == {c: len(cat.unscored) for c, cat in index.categories.items()}
    assert set(unscored["thresholds"]) == set(index.categories)


def test_segf1_threshold_comes_from_validation_normals_only():
    from harness.metrics.segf1 import RunningMoments, segf1

    rng = np.random.default_rng(0)
    maps = [rng.random((5, 7)) for _ in range(4)]
    moments = RunningMoments()
    for m in maps:
        moments.update(m)
    pixels = np.concatenate([m.ravel() for m in maps])
    assert moments.threshold() == pytest.approx(pixels.mean() + 3 * pixels.std(), abs=1e-12)
    masks = [m > 0.8 for m in maps]
    predicted = np.concatenate([(m >= 0.5).ravel() for m in maps])
    truth = np.concatenate([k.ravel() for k in masks])
    tp = np.sum(predicted & truth)
    assert segf1(maps, masks, 0.5) == pytest.approx(2 * tp / (predicted.sum() + truth.sum()))


def test_mvtec_loco_run_reports_spro_by_anomaly_type(tmp_path, run_options):
    _, outcome = _run(tmp_path, run_options, "mvtec_loco", mvtec_loco, R.build_mvtec_loco)
    for values in outcome.record.metrics.values():
        for name in ("pixel_spro", "pixel_spro_logical", "pixel_spro_structural"):
            assert 0 <= values[name] <= 1
        assert values["pixel_spro"] == pytest.approx((values["pixel_spro_logical"]
                                                     + values["pixel_spro_structural"]) / 2)
        assert 0 <= values["image_auroc_logical"] <= 1 and 0 <= values["image_auroc_structural"] <= 1


def test_leaderboard_shows_loco_by_anomaly_type(tmp_path, run_options):
    from harness.results.leaderboard import build_leaderboard

    _run(tmp_path, run_options, "mvtec_loco", mvtec_loco, R.build_mvtec_loco)
    registry = load_registry(entry_points=[], extra_plugins=[("mvtec_loco", mvtec_loco)])
    text = build_leaderboard(run_options.results_dir, metrics=registry.metric_specs())
    for label in ("I-AUROC-log", "I-AUROC-str", "P-sPRO-log", "P-sPRO-str", "P-sPRO"):
        assert label in text, text


def test_realiad_sample_level_auroc(tmp_path, run_options):
    _, outcome = _run(tmp_path, run_options, "realiad", realiad, R.build_realiad)
    for values in outcome.record.metrics.values():
        assert 0 <= values["image_sample_auroc"] <= 1


def test_sample_level_auroc_takes_the_max_over_views():
    from harness.metrics import CategoryScores

    image_sample_auroc = realiad.harness_metrics()[0].compute

    keys = [f"toy/test/{d}/toy_000{o}_{'NG_AK' if d == 'AK' else 'OK'}_C{v}_2023" for o, d in ((1, "good"), (2, "AK"))
            for v in range(1, 6)]
    labels = [0] * 5 + [0, 1, 0, 0, 0]
    scores = [0.1, 0.2, 0.9, 0.1, 0.1] + [0.3, 0.5, 0.2, 0.2, 0.2]
    value = image_sample_auroc(CategoryScores(np.array(scores), np.array(labels), name="toy", keys=keys,
                                              standard={}))
    assert value == 0.0  # object 1 (normal) peaks at 0.9, object 2 (anomalous) at 0.5


def test_run_passes_data_options_to_the_loader(tmp_path, run_options, monkeypatch, capsys):
    from toy_plugins import ToyPlugin

    import harness.cli
    import harness.engine.registry
    from harness.engine.jobs import expand_jobs
    from harness.engine.planning import plan_jobs

    root = tmp_path / "realiad"
    R.build_realiad(root, random.Random(30))
    registry = load_registry(entry_points=[], extra_plugins=[("toy", ToyPlugin()), ("realiad", realiad)])
    run_options.data_roots = {"realiad": root}
    run_options.data_options = {"resolution": "256", "split": "sv"}
    plan = plan_jobs(registry, expand_jobs(["meanimage"], ["realiad"], "multiclass", None, [0], {"realiad": "tiny"}),
                     run_options)
    samples = [s for c in plan.indexes["realiad"].categories.values() for s in c.test]
    assert samples and all("realiad_256" in str(s.image) for s in samples)
    monkeypatch.setattr(harness.engine.registry, "load_registry", lambda *a, **k: registry)
    assert harness.cli.main(["run", "--methods", "meanimage", "--datasets", "realiad", "--data-root", str(root),
                             "--data-option", "colour=red", "--dry-run"]) == 2
    assert "--data-option colour: no dataset of this run takes it" in capsys.readouterr().err


def test_a_forced_rerun_leaves_no_stale_private_map(tmp_path, run_options):
    from harness.engine.inference.unscored import unscored_folder

    root, outcome = _run(tmp_path, run_options, "mvtec_ad2", mvtec_ad2, R.build_mvtec_ad2)
    stale = unscored_folder(outcome.record_path) / "anomaly_images" / "can" / "test_private" / "gone.tiff"
    stale.write_bytes(b"old")
    run_options.force = True
    _, again = _run(tmp_path / "again", run_options, "mvtec_ad2", mvtec_ad2, R.build_mvtec_ad2)
    assert again.record_path == outcome.record_path and not stale.exists()
