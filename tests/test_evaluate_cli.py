"""``harness evaluate``: TIFF/NPY maps in the MVTec evaluation layout, scored against the ground truth."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import tifffile

from harness.cli import main
from harness.data import read_mask
from harness.results.export import write_mvtec_layout
from harness.metrics import evaluate
from harness.results.records import iter_records
from harness.engine.registry import load_registry

CATEGORIES = ["weave", "disc"]


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    write_mvtec_layout(load_registry().dataset("synthetic").loader(None, CATEGORIES), root)
    return root


def _write_maps(dataset_dir, out, suffix=".tiff", size=None):
    """One map per test image: noise plus the mask (so the metrics are far from trivial)."""
    index = load_registry().dataset("folder").loader(dataset_dir, None)
    rng = np.random.default_rng(0)
    arrays = {}
    for category in index.categories.values():
        for sample in category.test:
            mask = read_mask(sample.mask) if sample.mask is not None else np.zeros((128, 128), bool)
            amap = (rng.random(mask.shape) + 0.6 * mask).astype(np.float32)
            if size:
                amap = amap[:size, :size]
            path = out / (sample.key + suffix)
            path.parent.mkdir(parents=True, exist_ok=True)
            tifffile.imwrite(path, amap) if suffix != ".npy" else np.save(path, amap)
            arrays.setdefault(category.name, []).append((amap, mask))
    return arrays


def test_evaluate_tiff_maps_prints_table_and_writes_a_record(dataset_dir, tmp_path, capsys):
    arrays = _write_maps(dataset_dir, tmp_path / "mymethod")
    code = main(["evaluate", "--maps", str(tmp_path / "mymethod"), "--dataset", "folder", "--root", str(dataset_dir),
                 "--results-dir", str(tmp_path / "results")])
    assert code == 0
    out = capsys.readouterr().out
    assert "P-AUPRO" in out and "weave" in out and "**mean**" in out
    [(path, record)] = list(iter_records(tmp_path / "results"))
    assert record["job"]["method"] == "mymethod" and record["job"]["protocol"] == "multiclass"
    assert record["job"]["profile"] == "maps" and record["status"] == "ok"
    for category, pairs in arrays.items():
        expected = evaluate([m for m, _ in pairs], [k for _, k in pairs])
        for metric, value in expected.items():
            assert record["metrics"][category][metric] == pytest.approx(value, abs=1e-12)
    assert 0.5 < record["mean"]["pixel_aupro"] < 1.0

    from harness.results.leaderboard import build_leaderboard

    board = build_leaderboard(tmp_path / "results", reported_dir=None, fmt="markdown")
    assert "mymethod (maps)" in board


def test_npy_maps_and_the_mvtec_plugin(dataset_dir, tmp_path, capsys):
    # The MVTec plugin knows only MVTec's categories: present the synthetic "weave" as "carpet".
    mvtec_root = tmp_path / "mvtec"
    shutil.copytree(dataset_dir / "weave", mvtec_root / "carpet")
    maps = tmp_path / "maps"
    _write_maps(dataset_dir, maps, suffix=".npy")
    shutil.move(maps / "weave", maps / "carpet")
    code = main(["evaluate", "--maps", str(maps), "--dataset", "mvtec", "--root", str(mvtec_root), "--categories",
                 "carpet", "--name", "other", "--results-dir", str(tmp_path / "results")])
    assert code == 0
    [(_, record)] = list(iter_records(tmp_path / "results"))
    assert set(record["metrics"]) == {"carpet"} and record["job"]["method"] == "other"


def test_missing_map_is_an_error_naming_the_file(dataset_dir, tmp_path, capsys):
    _write_maps(dataset_dir, tmp_path / "m")
    victim = sorted((tmp_path / "m" / "disc" / "test" / "good").iterdir())[0]
    victim.unlink()
    code = main(["evaluate", "--maps", str(tmp_path / "m"), "--dataset", "folder", "--root", str(dataset_dir),
                 "--no-record"])
    assert code == 2
    err = capsys.readouterr().err
    assert "1 test image(s) have no anomaly map" in err and str(victim) in err


def test_extra_map_is_a_warning_naming_the_file(dataset_dir, tmp_path, capsys):
    _write_maps(dataset_dir, tmp_path / "m")
    extra = tmp_path / "m" / "weave" / "test" / "good" / "999.tiff"
    tifffile.imwrite(extra, np.zeros((128, 128), np.float32))
    code = main(["evaluate", "--maps", str(tmp_path / "m"), "--dataset", "folder", "--root", str(dataset_dir),
                 "--no-record"])
    assert code == 0
    assert f"warning: {extra} matches no test image" in capsys.readouterr().err


def test_map_of_another_size_is_an_error_unless_resized(dataset_dir, tmp_path, capsys):
    _write_maps(dataset_dir, tmp_path / "m", size=100)
    args = ["evaluate", "--maps", str(tmp_path / "m"), "--dataset", "folder", "--root", str(dataset_dir), "--no-record"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "100x100 (WxH) but its ground truth is 128x128" in err and ".tiff" in err
    assert main(args + ["--eval-size", "64"]) == 0


def test_nan_in_a_map_names_the_file(dataset_dir, tmp_path, capsys):
    _write_maps(dataset_dir, tmp_path / "m")
    victim = sorted((tmp_path / "m" / "weave" / "test" / "hole").iterdir())[1]
    amap = tifffile.imread(victim)
    amap[3, 3] = np.nan
    tifffile.imwrite(victim, amap)
    code = main(["evaluate", "--maps", str(tmp_path / "m"), "--dataset", "folder", "--root", str(dataset_dir),
                 "--no-record"])
    assert code == 2
    err = capsys.readouterr().err
    assert str(victim) in err and "NaN or inf" in err


def test_an_unreadable_map_is_one_line_naming_the_file(dataset_dir, tmp_path, capsys):
    _write_maps(dataset_dir, tmp_path / "m")
    victim = sorted((tmp_path / "m" / "disc" / "test" / "good").iterdir())[0]
    victim.write_bytes(b"II*\x00 not a tiff at all")
    code = main(["evaluate", "--maps", str(tmp_path / "m"), "--dataset", "folder", "--root", str(dataset_dir),
                 "--no-record"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error:") and str(victim) in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
