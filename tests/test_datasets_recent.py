"""MVTec AD 2, MVTec LOCO AD, Real-IAD, BTAD and KolektorSDD2 on miniature trees of random size."""

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
from harness_benchmarks import btad, ksdd2, mvtec_ad2, mvtec_loco, realiad  # noqa: E402

from harness import read_mask  # noqa: E402
from harness.errors import DatasetError  # noqa: E402
from harness.engine.registry import load_registry  # noqa: E402

MODULES = [("mvtec_ad2", mvtec_ad2), ("mvtec_loco", mvtec_loco), ("realiad", realiad), ("btad", btad),
           ("ksdd2", ksdd2)]
BUILDERS = {"mvtec_ad2": R.build_mvtec_ad2, "mvtec_loco": R.build_mvtec_loco, "realiad": R.build_realiad,
            "btad": R.build_btad, "ksdd2": R.build_ksdd2}


@pytest.fixture
def registry(monkeypatch):
    """A registry of the five plugins, also seen by the CLI."""
    import harness.engine.registry

    reg = load_registry(entry_points=[], extra_plugins=MODULES)
    monkeypatch.setattr(harness.engine.registry, "load_registry", lambda *a, **k: reg)
    return reg


def summary_json(capsys, *argv):
    import harness.cli

    assert harness.cli.main(["data", "summary", *argv, "--format", "json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name", list(BUILDERS))
def test_summary_counts_of_random_trees(tmp_path, registry, capsys, name, seed):
    expected = BUILDERS[name](tmp_path / name, random.Random(f"{name}{seed}"))
    out = summary_json(capsys, "--dataset", name, "--root", str(tmp_path / name))
    rows = {r["category"]: r for r in out["categories"]}
    assert set(rows) == set(expected)
    for category, counts in expected.items():
        for field, value in counts.items():
            assert rows[category][field] == value, (category, field, rows[category])
    # Nothing is wrong in a tree written as distributed, except categories the miniature omits.
    assert all("missing category" in p or "missing " in p and "partial download" in p for p in out["problems"]), \
        out["problems"]


def test_mvtec_ad2_private_sets_are_unscored_and_pairing_holds(tmp_path):
    R.build_mvtec_ad2(tmp_path, random.Random(5))
    index = mvtec_ad2.load_mvtec_ad2(tmp_path)
    for cat in index.categories.values():
        assert cat.unscored and all(s.split.startswith("test_private") and s.defect == "unknown" for s in cat.unscored)
        assert not any(s.split.startswith("test_private") for s in cat.test)
        for s in cat.test:
            if s.label:
                assert np.array_equal(read_mask(s.mask), R.expected_mask(s.key))


def test_loco_keeps_every_mask_of_an_image(tmp_path):
    R.build_mvtec_loco(tmp_path, random.Random(3))
    index = mvtec_loco.load_mvtec_loco(tmp_path)
    assert all("missing category folder" in p for p in index.problems), index.problems
    checked = 0
    for cat in index.categories.values():
        assert cat.validation and all(s.label == 0 for s in cat.validation)
        for s in cat.test:
            if not s.label:
                assert s.channels == ()
                continue
            kind, stem = s.key.split("/")[2:]
            channels = [R.loco_channel(f"{s.category}/{kind}/{stem}/{j:03d}") for j in range(len(s.channels))]
            for channel, truth in zip(s.channels, channels):
                assert np.array_equal(read_mask(channel.source), truth)
                assert set(channel.saturation) == {255, 17, 96}
            assert np.array_equal(read_mask(s.mask), np.logical_or.reduce(channels))
            checked += 1
    assert checked


def test_loco_without_defects_config_names_the_file(tmp_path):
    R.build_mvtec_loco(tmp_path, random.Random(4))
    (tmp_path / "pushpins" / "defects_config.json").unlink()
    index = mvtec_loco.load_mvtec_loco(tmp_path)
    assert any(str(tmp_path / "pushpins" / "defects_config.json") in p for p in index.problems)


def test_realiad_options_choose_resolution_and_split(tmp_path, registry, capsys):
    mv = R.build_realiad(tmp_path, random.Random(7))
    index = realiad.load_realiad(tmp_path, resolution="256", split="sv")
    assert all("realiad_256" in str(s.image) for c in index.categories.values() for s in c.test)
    for name, cat in index.categories.items():
        # Two views per object in the single-view file of the fixture; five in the multi-view one.
        assert len(cat.train) * 5 == mv[name]["train"] * 2
    out = summary_json(capsys, "--dataset", "realiad", "--root", str(tmp_path), "--data-option", "resolution=256")
    assert {r["category"]: r["train"] for r in out["categories"]} == {c: v["train"] for c, v in mv.items()}
    with pytest.raises(DatasetError, match="resolution=999"):
        realiad.load_realiad(tmp_path, resolution="999")
    with pytest.raises(DatasetError, match="realiad_512"):
        realiad.load_realiad(tmp_path, resolution="512")
    from harness.data import load_index

    with pytest.raises(DatasetError, match="takes no --data-option colour"):
        load_index(registry.dataset("realiad"), tmp_path, None, {"colour": "1"})


def test_realiad_sample_ids_group_the_five_views(tmp_path):
    R.build_realiad(tmp_path, random.Random(8))
    index = realiad.load_realiad(tmp_path)
    for cat in index.categories.values():
        groups = {}
        for s in cat.test:
            groups.setdefault(realiad.sample_id(s.key), []).append(s)
        assert all(len(v) == 5 for v in groups.values())
        assert any(s.label for s in cat.test) and all(s.mask is not None for s in cat.test if s.label)
        for s in cat.test:
            if s.label:
                assert np.array_equal(read_mask(s.mask), R.expected_mask(s.key))


def test_btad_pairs_mixed_suffixes(tmp_path):
    R.build_btad(tmp_path, random.Random(9))
    index = btad.load_btad(tmp_path)
    assert not index.problems, index.problems
    suffixes = {c: {s.mask.suffix for s in cat.test if s.label} for c, cat in index.categories.items()}
    assert suffixes == {"01": {".png"}, "02": {".png"}, "03": {".bmp"}}
    for cat in index.categories.values():
        for s in cat.test:
            if s.label:
                assert np.array_equal(read_mask(s.mask), R.expected_mask(s.key))


def test_ksdd2_labels_by_mask_content_and_trains_on_normals(tmp_path):
    counts = R.build_ksdd2(tmp_path, random.Random(10))["ksdd2"]
    cat = ksdd2.load_ksdd2(tmp_path).categories["ksdd2"]
    assert all(s.label == 0 for s in cat.train) and len(cat.train) == counts["train"]
    for s in cat.test:
        if s.label:
            assert np.array_equal(read_mask(s.mask), R.expected_mask(s.key))
        else:
            assert s.mask is None


@pytest.mark.parametrize("name", list(BUILDERS))
def test_wrong_root_shows_the_expected_layout(tmp_path, registry, name):
    (tmp_path / "something").mkdir()
    with pytest.raises(DatasetError, match="expected layout"):
        registry.dataset(name).loader(tmp_path, None)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_conformance_check(tmp_path, registry, name):
    from harness.testing import check_dataset

    BUILDERS[name](tmp_path / name, random.Random(11))
    assert check_dataset(registry.dataset(name), tmp_path / name).categories
