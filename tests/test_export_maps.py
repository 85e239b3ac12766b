"""``harness export-maps``: saved maps in the MVTec evaluation layout score to the record's numbers."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from toy_plugins import MeanImage, ToyPlugin, load_toy, method_spec

from harness import Prediction, hookimpl
from harness.cli import main
from harness.results.evaluate_maps import evaluate_maps
from harness.engine.jobs import Job
from harness.results.records import scan_records
from harness.engine.registry import load_registry
from harness.engine.runner import Runner

EVAL_SIZE = 48  # not the toy's 32: maps and masks are resized on their way to the metrics


class NoisyMean(MeanImage):
    """The toy method with strong noise, and an image score that is not the map maximum."""

    def predict(self, images, categories):  # noqa: D102
        out = super().predict(images, categories)
        generator = torch.Generator().manual_seed(int(images.sum().item() * 1000) % (2 ** 31))
        maps = out.anomaly_maps + 0.8 * torch.rand(out.anomaly_maps.shape, generator=generator)
        return Prediction(maps, maps.flatten(1).topk(12, dim=1).values.mean(1))


class NoisyPlugin:
    """Provides the noisy method."""

    @hookimpl
    def harness_methods(self):  # noqa: D102
        return [method_spec("noisy", NoisyMean)]


STANDARD = ("image_auroc", "image_ap", "image_f1max", "pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_aupro")


@pytest.fixture(scope="module")
def exported_run(tmp_path_factory):
    """Two methods on the toy data with --save-maps all, and the noisy one exported with --ground-truth."""
    from harness.engine.runner import RunOptions

    tmp = tmp_path_factory.mktemp("export")
    registry = load_registry(entry_points=[], extra_plugins=[("toy", ToyPlugin()), ("noisy", NoisyPlugin())])
    options = RunOptions(results_dir=tmp / "results", cache_dir=tmp / "cache", device="cpu", eval_size=EVAL_SIZE,
                         progress=False, latency_repeats=1, save_maps="all")
    summary = Runner(registry, options).run([Job("noisy", "toy", "multiclass", None, 0, "tiny"),
                                             Job("meanimage", "toy", "multiclass", None, 0, "tiny")])
    assert summary.exit_code == 0, summary.describe()
    out = tmp / "exported"
    assert main(["export-maps", "--results-dir", str(tmp / "results"), "--method", "noisy", "--out", str(out),
                 "--ground-truth"]) == 0
    return {"tmp": tmp, "records": {o.job.method: o.record for o in summary.outcomes}, "out": out}


def test_the_layout_is_the_official_one(exported_run):
    out, record = exported_run["out"], exported_run["records"]["noisy"]
    index = load_toy()
    for category, data in index.categories.items():
        for sample in data.test:
            amap = tifffile.imread(out / f"{sample.key}.tiff")
            assert amap.dtype == np.float32 and amap.shape == (EVAL_SIZE, EVAL_SIZE)
            assert (out / f"{sample.key}.png").is_file()
            mask_file = out / category / "ground_truth" / sample.defect / f"{sample.key.rsplit('/', 1)[1]}_mask.png"
            assert mask_file.is_file() == (sample.label == 1)
        with open(out / category / "image_scores.csv", newline="") as handle:
            assert len(list(csv.DictReader(handle))) == len(data.test)
    assert record.artifacts["maps"]["n_all"] == sum(len(c.test) for c in index.categories.values())
    # Nothing in the saved-maps folders looks like a (damaged) record.
    assert scan_records(exported_run["tmp"] / "results").damaged == []


def test_harness_evaluate_scores_the_export_to_the_record(exported_run):
    out, record = exported_run["out"], exported_run["records"]["noisy"]
    evaluation = evaluate_maps(out, load_toy(), eval_size=EVAL_SIZE)
    assert len(evaluation.score_files) == 2
    for category, values in record.metrics.items():
        assert 0.3 < values["pixel_aupro"] < 0.999  # the noise makes every metric informative
        for metric in STANDARD:
            assert evaluation.metrics[category][metric] == pytest.approx(values[metric], abs=1e-9), (category, metric)


def _mvtec_aupro(maps, masks, limit=0.3):
    """The MVTec AD evaluation code's AU-PRO, written out: pixels sorted by score, each defect-free
    pixel adds 1/n_ok to the FPR, each defect pixel 1/(its region's size * n_regions) to the PRO,
    the last pixel of a tie group closes it, (0, 0) and (1, 1) are added, trapezoids up to the
    limit with the last segment interpolated there, normalised by the limit."""
    fpr_step = np.zeros(maps.shape)
    pro_step = np.zeros(maps.shape)
    regions = 0
    sizes = []
    for i, mask in enumerate(masks):
        labelled, count = ndimage.label(mask, structure=np.ones((3, 3)))
        sizes.append((i, labelled, count))
        regions += count
    n_ok = int((~masks).sum())
    for i, labelled, count in sizes:
        fpr_step[i][labelled == 0] = 1.0 / n_ok
        for r in range(1, count + 1):
            pro_step[i][labelled == r] = 1.0 / ((labelled == r).sum() * regions)
    order = np.argsort(-maps.ravel(), kind="stable")
    scores = maps.ravel()[order]
    fpr = np.cumsum(fpr_step.ravel()[order])
    pro = np.cumsum(pro_step.ravel()[order])
    last = np.r_[scores[1:] != scores[:-1], True]
    fpr = np.r_[0.0, np.minimum(fpr[last], 1.0), 1.0]
    pro = np.r_[0.0, np.minimum(pro[last], 1.0), 1.0]
    inside = fpr <= limit
    area = float(np.sum(0.5 * (pro[inside][1:] + pro[inside][:-1]) * np.diff(fpr[inside])))
    j = int(np.count_nonzero(inside))
    if fpr[j - 1] < limit:
        y = pro[j - 1] + (pro[j] - pro[j - 1]) * (limit - fpr[j - 1]) / (fpr[j] - fpr[j - 1])
        area += 0.5 * (pro[j - 1] + y) * (limit - fpr[j - 1])
    return area / limit


def test_the_mvtec_algorithm_on_the_exported_tree_gives_the_record(exported_run):
    """Read the exported folder as the official script does (maps, ground truth, the test listing)."""
    out, record = exported_run["out"], exported_run["records"]["noisy"]
    for category, values in record.metrics.items():
        maps, masks, labels = [], [], []
        for image in sorted((out / category / "test").rglob("*.png")):
            defect, stem = image.parent.name, image.stem
            maps.append(tifffile.imread(image.with_suffix(".tiff")))
            gt = out / category / "ground_truth" / defect / f"{stem}_mask.png"
            masks.append(np.asarray(Image.open(gt)) > 0 if defect != "good" else np.zeros(maps[-1].shape, bool))
            labels.append(defect != "good")
        maps, masks = np.stack(maps), np.stack(masks)
        assert _mvtec_aupro(maps, masks) == pytest.approx(values["pixel_aupro"], abs=1e-9)
        assert roc_auc_score(masks.ravel(), maps.ravel()) == pytest.approx(values["pixel_auroc"], abs=1e-9)
        # The official script's image score is the map maximum; the method's own differs.
        official = roc_auc_score(labels, maps.reshape(len(maps), -1).max(1))
        assert 0.0 <= official <= 1.0


def test_without_the_scores_file_evaluate_uses_the_map_maximum(exported_run, tmp_path):
    import shutil

    record = exported_run["records"]["meanimage"]  # its image score is the map maximum
    out = tmp_path / "meanimage"
    assert main(["export-maps", "--results-dir", str(exported_run["tmp"] / "results"), "--method", "meanimage",
                 "--dataset", "toy", "--out", str(out)]) == 0
    for category in record.metrics:
        (out / category / "image_scores.csv").unlink()
    evaluation = evaluate_maps(out, load_toy(), eval_size=EVAL_SIZE)
    assert evaluation.score_files == []
    for category, values in record.metrics.items():
        for metric in STANDARD:
            assert evaluation.metrics[category][metric] == pytest.approx(values[metric], abs=1e-9)
    shutil.rmtree(out)


def test_export_errors_are_usage_errors(exported_run, tmp_path, capsys):
    results = str(exported_run["tmp"] / "results")
    assert main(["export-maps", "--results-dir", results, "--method", "nosuch", "--out", str(tmp_path / "a")]) == 2
    assert "no finished record of method 'nosuch'" in capsys.readouterr().err
    # A record saved with --save-maps sample has no map of every image.
    registry = load_registry(entry_points=[], extra_plugins=[("toy", ToyPlugin())])
    from harness.engine.runner import RunOptions

    options = RunOptions(results_dir=tmp_path / "r", cache_dir=tmp_path / "c", device="cpu", eval_size=32,
                         progress=False, latency_repeats=1, save_maps="sample")
    Runner(registry, options).run([Job("meanimage", "toy", "multiclass", None, 0, "tiny")])
    assert main(["export-maps", "--results-dir", str(tmp_path / "r"), "--method", "meanimage",
                 "--out", str(tmp_path / "b")]) == 2
    assert "--save-maps all" in capsys.readouterr().err


def test_several_records_go_to_one_folder_each(tmp_path):
    from harness.engine.runner import RunOptions

    registry = load_registry(entry_points=[], extra_plugins=[("toy", ToyPlugin())])
    options = RunOptions(results_dir=tmp_path / "r", cache_dir=tmp_path / "c", device="cpu", eval_size=32,
                         progress=False, latency_repeats=1, save_maps="all")
    Runner(registry, options).run([Job("meanimage", "toy", "multiclass", None, s, "tiny") for s in (0, 1)])
    assert main(["export-maps", "--results-dir", str(tmp_path / "r"), "--method", "meanimage",
                 "--out", str(tmp_path / "out")]) == 0
    for seed in (0, 1):
        assert (tmp_path / "out" / "toy" / "multiclass" / f"tiny-seed{seed}" / "red" / "test" / "good"
                / "000.tiff").is_file()
    assert main(["export-maps", "--results-dir", str(tmp_path / "r"), "--method", "meanimage", "--seed", "1",
                 "--out", str(tmp_path / "one")]) == 0
    assert (tmp_path / "one" / "blue" / "test" / "square" / "007.tiff").is_file()


@pytest.mark.slow
def test_the_command_line_round_trip_on_the_synthetic_data(tmp_path, capsys):
    """harness export-maps, then harness evaluate (the installed synthetic dataset), give the record."""
    from harness.engine.runner import RunOptions

    registry = load_registry(extra_plugins=[("noisy", NoisyPlugin())])
    options = RunOptions(results_dir=tmp_path / "r", cache_dir=tmp_path / "c", device="cpu", eval_size=64,
                         progress=False, latency_repeats=1, save_maps="all")
    summary = Runner(registry, options).run([Job("noisy", "synthetic", "multiclass", None, 0, "tiny")])
    assert summary.exit_code == 0, summary.describe()
    record = summary.outcomes[0].record
    assert main(["export-maps", "--results-dir", str(tmp_path / "r"), "--method", "noisy", "--out",
                 str(tmp_path / "maps")]) == 0
    assert "--eval-size 64" in capsys.readouterr().out
    assert main(["evaluate", "--maps", str(tmp_path / "maps"), "--dataset", "synthetic", "--eval-size", "64",
                 "--name", "noisy-exported", "--results-dir", str(tmp_path / "e")]) == 0
    (path,) = (tmp_path / "e" / "records").rglob("*.json")
    evaluated = json.loads(path.read_text())
    assert evaluated["method_info"]["image_score"].startswith("the method's own")
    for category, values in record.metrics.items():
        for metric in STANDARD:
            assert evaluated["metrics"][category][metric] == pytest.approx(values[metric], abs=1e-9)
