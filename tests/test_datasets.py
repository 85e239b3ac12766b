"""The benchmark dataset plugins on miniature copies of the real trees, and ``harness data summary``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
try:
    import harness_benchmarks  # noqa: F401 - installed once pyproject lists datasets/benchmarks
except ImportError:  # pragma: no cover - a checkout installed before the package was added
    sys.path.insert(0, str(REPO / "datasets" / "benchmarks"))

import dataset_fixtures as F  # noqa: E402
from harness_benchmarks import dagm, folder, medical, mpdd, mvtec, mvtec3d, visa  # noqa: E402

from harness import read_image, read_mask  # noqa: E402
from harness.engine.support.dataset_summary import summarize  # noqa: E402
from harness.errors import DatasetError  # noqa: E402
from harness.engine.registry import load_registry  # noqa: E402

MODULES = [("mvtec", mvtec), ("visa", visa), ("mpdd", mpdd), ("dagm", dagm), ("mvtec3d", mvtec3d),
           ("medical", medical), ("folder", folder)]


def counts(index):
    """{category: (train, test normal, test anomalous, masks)}."""
    return {name: (len(c.train), sum(s.label == 0 for s in c.test), sum(s.label == 1 for s in c.test),
                   sum(s.mask is not None for s in c.test)) for name, c in index.categories.items()}


def plan_counts(plan):
    """Expected counts from an MVTec-like fixture plan."""
    return {c: (a, b, sum(d.values()), sum(d.values())) for c, (a, b, d) in plan.items()}


def assert_pairing(index):
    """Every anomalous sample's mask is the one written for its own relative path."""
    checked = 0
    for cat in index.categories.values():
        for s in cat.test:
            if s.label == 1 and s.mask is not None:
                assert np.array_equal(read_mask(s.mask), F.expected_mask(s.key)), s.key
                checked += 1
    assert checked > 0


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    """Every fixture tree, built once for the module."""
    base = tmp_path_factory.mktemp("trees")
    builders = {"mvtec": F.build_mvtec, "mpdd": F.build_mpdd, "visa_raw": F.build_visa_raw,
                "visa_prepared": F.build_visa_prepared, "dagm_raw": F.build_dagm_raw, "dagm_mvtec": F.build_dagm_mvtec,
                "mvtec3d": F.build_mvtec3d, "bmad": F.build_bmad, "folder": F.build_folder}
    return {name: build(base / name) for name, build in builders.items()}


# -- registration ----------------------------------------------------------------------------
def test_every_plugin_registers_without_problems():
    registry = load_registry(entry_points=[], extra_plugins=MODULES)
    assert registry.problems == []
    assert {"mvtec", "visa", "mpdd", "dagm", "mvtec3d", "brainmri", "liverct", "resc", "medical",
            "folder"} <= set(registry.datasets)
    assert len(registry.dataset("mvtec").categories) == 15 and len(registry.dataset("visa").categories) == 12
    assert registry.dataset("dagm").categories[-1] == "Class10"
    assert registry.dataset("folder").categories == ()  # discovered in the root
    official = registry.dataset("mvtec").official_counts
    assert sum(v["train"] for v in official.values()) == 3629
    assert sum(v["test_normal"] for v in official.values()) == 467
    assert sum(v["test_anomalous"] for v in official.values()) == 1258


# -- per dataset -----------------------------------------------------------------------------
def test_mvtec_counts_pairing_and_greyscale(trees):
    index = mvtec.load_mvtec(trees["mvtec"])
    assert counts(index) == plan_counts(F.MVTEC_PLAN)
    assert_pairing(index)
    grid = index.categories["grid"]
    assert read_image(grid.train[0].image).shape == (F.SIZE, F.SIZE, 3)  # greyscale file, RGB array
    keys = [s.key for c in index.categories.values() for s in [*c.train, *c.test]]
    assert len(keys) == len(set(keys)) and "bottle/test/contamination/002" in keys
    # license.txt / readme.txt at the root are expected; only the absent categories are reported.
    assert all("missing category folder" in p for p in index.problems)


def test_mpdd_counts(trees):
    index = mpdd.load_mpdd(trees["mpdd"])
    assert counts(index) == plan_counts(F.MPDD_PLAN)
    assert_pairing(index)


def test_visa_raw_uses_the_crlf_split_and_binarises_class_masks(trees):
    index = visa.load_visa(trees["visa_raw"])
    assert counts(index) == {c: (a, b, d, d) for c, (a, b, d) in F.VISA_PLAN.items()}
    assert_pairing(index)  # class indices 1 and 2 both count as defect
    sample = index.categories["candle"].test[-1]
    assert sample.key.startswith("candle/test/bad/") and str(sample.image).endswith(".JPG")
    assert not any("split_csv" in p or "LICENSE" in p for p in index.problems)


def test_visa_prepared_layout(trees):
    index = visa.load_visa(trees["visa_prepared"], ["candle", "pcb1"])
    assert counts(index) == {c: (a, b, d, d) for c, (a, b, d) in F.VISA_PLAN.items()}
    assert_pairing(index)
    assert index.problems == []


def test_visa_raw_without_split_csv_says_so(tmp_path):
    F.build_visa_raw(tmp_path)
    (tmp_path / "split_csv" / "1cls.csv").unlink()
    with pytest.raises(DatasetError, match="1cls.csv"):
        visa.load_visa(tmp_path)


@pytest.mark.parametrize("layout", ["dagm_raw", "dagm_mvtec"])
def test_dagm_unsupervised_split(trees, layout):
    index = dagm.load_dagm(trees[layout], ["Class1", "Class7"])
    expected = {c: (s["Train"][0], s["Test"][0], s["Test"][1], s["Test"][1]) for c, s in F.DAGM_PLAN.items()}
    assert counts(index) == expected  # defective training images are left out
    assert all(s.label == 0 for c in index.categories.values() for s in c.train)
    assert_pairing(index)
    assert index.problems == []
    assert read_image(index.categories["Class1"].train[0].image).shape[2] == 3


def test_mvtec3d_rgb_with_defect_ids(trees):
    index = mvtec3d.load_mvtec3d(trees["mvtec3d"])
    expected = {c: (a, g, sum(d.values()), sum(d.values())) for c, (a, _, g, d) in F.MVTEC3D_PLAN.items()}
    assert counts(index) == expected  # validation ignored, xyz ignored
    assert_pairing(index)  # 253 and 254 are defects
    assert all(s.mask is None for c in index.categories.values() for s in c.test if s.label == 0)
    assert all(str(s.image).endswith(".png") and "/rgb/" in str(s.image)
               for c in index.categories.values() for s in [*c.train, *c.test])
    assert all("missing category folder" in p for p in index.problems)


def test_bmad_sets_both_nestings_and_rgba_masks(trees):
    index = medical.load_medical(trees["bmad"])
    assert list(index.categories) == ["brainmri", "liverct", "resc"]
    assert counts(index) == {"brainmri": (3, 2, 2, 2), "liverct": (2, 2, 3, 3), "resc": (2, 1, 2, 2)}
    assert_pairing(index)  # alpha (255 everywhere) is ignored
    assert index.problems == []
    for name, sub in [("brainmri", "Brain"), ("liverct", "Liver"), ("resc", "RESC")]:
        loader = getattr(medical, f"load_{name}")
        assert counts(loader(trees["bmad"] / sub)) == {name: counts(index)[name]}
        assert counts(loader(trees["bmad"])) == {name: counts(index)[name]}  # the folder holding it


def test_folder_discovers_categories_with_and_without_masks(trees):
    index = folder.load_folder(trees["folder"])
    assert counts(index) == {"gadgets": (2, 2, 2, 0), "widgets": (3, 2, 2, 2)}
    assert index.problems == []  # no ground_truth folder means no masks, not missing masks
    assert_pairing(index)


# -- broken trees ----------------------------------------------------------------------------
@pytest.mark.parametrize("module, loader", [(mvtec, "load_mvtec"), (visa, "load_visa"), (dagm, "load_dagm"),
                                            (mvtec3d, "load_mvtec3d"), (medical, "load_medical"),
                                            (medical, "load_brainmri"), (folder, "load_folder"), (mpdd, "load_mpdd")])
def test_wrong_root_shows_the_expected_layout(tmp_path, module, loader):
    (tmp_path / "holiday_photos").mkdir()
    (tmp_path / "holiday_photos" / "beach.jpg").write_bytes(b"x")
    for root in (tmp_path, tmp_path / "does_not_exist"):
        with pytest.raises(DatasetError) as err:
            getattr(module, loader)(root, None)
        message = str(err.value)
        assert "expected layout" in message and str(root) in message and "├──" in message


def test_root_one_level_too_high_gets_a_hint(tmp_path):
    F.build_mvtec(tmp_path / "mvtec_anomaly_detection")
    with pytest.raises(DatasetError, match="did you mean .*mvtec_anomaly_detection"):
        mvtec.load_mvtec(tmp_path)


def test_broken_tree_lists_every_problem_with_its_file(tmp_path):
    root = F.build_mvtec(tmp_path / "mvtec")
    bottle = root / "bottle"
    missing = bottle / "ground_truth" / "broken_large" / "001_mask.png"
    missing.unlink()
    truncated = bottle / "test" / "good" / "001.png"
    truncated.write_bytes(truncated.read_bytes()[:-40])
    jpeg = bottle / "train" / "good" / "002.png"
    from PIL import Image

    Image.open(jpeg).convert("RGB").save(bottle / "train" / "good" / "009.jpg", quality=90)
    cut_jpeg = bottle / "train" / "good" / "009.jpg"
    cut_jpeg.write_bytes(cut_jpeg.read_bytes()[:-200])
    resized = bottle / "ground_truth" / "contamination" / "000_mask.png"
    Image.open(resized).resize((16, 16)).save(resized)
    (bottle / "test" / "good" / ".DS_Store").write_bytes(b"\0")
    orphan = bottle / "ground_truth" / "contamination" / "007_mask.png"
    Image.new("L", (32, 32)).save(orphan)

    index = mvtec.load_mvtec(root, ["bottle", "grid"])
    sample = next(s for s in index.categories["bottle"].test if s.key == "bottle/test/broken_large/001")
    assert sample.mask is None
    summary = summarize(index, mvtec.OFFICIAL)
    text = "\n".join(summary["problems"])
    for path, what in [(missing, "missing mask"), (truncated, "image"), (cut_jpeg, "truncated"),
                       (resized, "16x16"), (bottle / "test" / "good" / ".DS_Store", "unexpected file"),
                       (orphan, "mask without image")]:
        line = next((p for p in summary["problems"] if str(path) in p), None)
        assert line is not None and what in line, (path, text)
    assert any("partial download" in w for w in summary["warnings"])


# -- the summary command ---------------------------------------------------------------------
def test_data_summary_json(trees, monkeypatch, capsys):
    import harness.cli
    import harness.engine.registry

    registry = load_registry(entry_points=[], extra_plugins=MODULES)
    monkeypatch.setattr(harness.engine.registry, "load_registry", lambda *a, **k: registry)
    assert harness.cli.main(["data", "summary", "--dataset", "visa", "--root", str(trees["visa_raw"]),
                             "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"dataset", "root", "categories", "problems", "warnings", "notes"}
    rows = {r["category"]: r for r in out["categories"]}
    assert set(rows["candle"]) == {"category", "train", "test_normal", "test_anomalous", "masks", "image_sizes",
                                   "official"}
    assert (rows["pcb1"]["train"], rows["pcb1"]["test_normal"], rows["pcb1"]["test_anomalous"]) == (2, 1, 3)
    assert rows["pcb1"]["image_sizes"] == ["32x32"] and rows["pcb1"]["official"]["train"] == 904
    assert any("pcb1" in w and "partial download" in w for w in out["warnings"])
    assert harness.cli.main(["data", "summary", "--dataset", "folder", "--root", str(trees["folder"])]) == 0
    assert "widgets" in capsys.readouterr().out


# -- end to end ------------------------------------------------------------------------------
def test_runner_on_the_mvtec_fixture(trees, run_options):
    from toy_plugins import ToyPlugin

    from harness.engine.jobs import expand_jobs
    from harness.engine.runner import Runner

    registry = load_registry(entry_points=[], extra_plugins=[("toy", ToyPlugin()), ("mvtec", mvtec)])
    run_options.data_roots = {"mvtec": trees["mvtec"]}
    jobs = expand_jobs(["meanimage"], ["mvtec"], "multiclass", None, [0], {"mvtec": "tiny"})
    summary = Runner(registry, run_options).run(jobs)
    assert [o.status for o in summary.outcomes] == ["ok"], summary.describe()
    record = summary.outcomes[0].record
    assert set(record.metrics) == {"bottle", "grid"}
    assert record.method_info["n_train"] == 7
    assert 0 <= record.metrics["grid"]["pixel_auroc"] <= 1


@pytest.mark.parametrize("name, tree", [("mvtec", "mvtec"), ("mpdd", "mpdd"), ("visa", "visa_raw"),
                                        ("visa", "visa_prepared"), ("dagm", "dagm_raw"), ("dagm", "dagm_mvtec"),
                                        ("mvtec3d", "mvtec3d"), ("medical", "bmad"), ("folder", "folder"),
                                        ("synthetic", None)])
def test_every_dataset_plugin_passes_the_conformance_check(trees, name, tree):
    from harness.testing import check_dataset

    spec = load_registry().dataset(name)
    index = check_dataset(spec, trees[tree] if tree else None)
    assert index.categories
