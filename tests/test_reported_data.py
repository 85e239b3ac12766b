"""Sanity checks for the numbers transcribed from the papers into ``results/reported/*.csv``."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest

REPORTED_DIR = Path(__file__).parents[1] / "results" / "reported"

HEADER = ["paper", "table", "method", "dataset", "protocol", "shots", "category", "metric", "value"]
KEY = ["paper", "table", "method", "dataset", "protocol", "shots", "category", "metric"]

EXPECTED_FILES = {"diad.csv": "DiAD", "diffusionad.csv": "DiffusionAD", "lafite.csv": "LafitE",
                  "anomalysd.csv": "AnomalySD"}

METRICS = {"image_auroc", "image_ap", "image_f1max", "pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_aupro",
           "mad", "fps"}
ACCURACY_METRICS = METRICS - {"mad", "fps"}
DATASETS = {"mvtec", "visa", "mpdd", "dagm", "mvtec3d", "medical"}
PROTOCOLS = {"multiclass", "oneclass", "fewshot"}

CATEGORIES = {
    "mvtec": {"bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut", "pill", "screw",
              "tile", "toothbrush", "transistor", "wood", "zipper"},
    "visa": {"candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2", "pcb1", "pcb2", "pcb3",
             "pcb4", "pipe_fryum"},
    "mpdd": {"bracket_black", "bracket_brown", "bracket_white", "connector", "metal_plate", "tubes"},
    "dagm": {f"Class{i}" for i in range(1, 11)},
    "mvtec3d": {"bagel", "cable_gland", "carrot", "cookie", "dowel", "foam", "peach", "potato", "rope", "tire"},
}

# The setting each paper's comparison tables use.
PAPER_PROTOCOL = {"DiAD": "multiclass", "LafitE": "multiclass", "AnomalySD": "fewshot", "DiffusionAD": "oneclass"}


def _csv_files():
    return sorted(REPORTED_DIR.glob("*.csv"))


def _load(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)


@pytest.fixture(scope="module")
def reported() -> pd.DataFrame:
    frames = [_load(p).assign(_file=p.name) for p in _csv_files()]
    assert frames, f"no CSV files in {REPORTED_DIR}"
    return pd.concat(frames, ignore_index=True)


def test_expected_files_present():
    names = {p.name for p in _csv_files()}
    assert set(EXPECTED_FILES) <= names


@pytest.mark.parametrize("path", _csv_files(), ids=lambda p: p.name)
def test_header(path):
    with open(path, encoding="utf-8") as fh:
        first = fh.readline().rstrip("\r\n")
    assert first.split(",") == HEADER
    assert list(_load(path).columns) == HEADER


@pytest.mark.parametrize("path", _csv_files(), ids=lambda p: p.name)
def test_one_paper_per_file(path):
    df = _load(path)
    assert len(df) > 0
    papers = set(df["paper"])
    assert len(papers) == 1
    if path.name in EXPECTED_FILES:
        assert papers == {EXPECTED_FILES[path.name]}


def test_no_empty_cells(reported):
    for col in HEADER:
        if col == "shots":
            continue
        assert (reported[col].str.strip() != "").all(), f"empty {col}"


def test_allowed_values(reported):
    assert set(reported["metric"]) <= METRICS
    assert set(reported["dataset"]) <= DATASETS
    assert set(reported["protocol"]) <= PROTOCOLS


def test_method_identifiers(reported):
    bad = [m for m in reported["method"].unique() if not re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", m)]
    assert not bad


def test_method_names_are_canonical(reported):
    """One name per method (``stfpm``, ``csflow``): the names the harness's plugins register."""
    from harness.results.reported import REPORTED_METHODS

    unknown = sorted(set(reported["method"]) - set(REPORTED_METHODS))
    assert not unknown, f"not in harness.results.reported.REPORTED_METHODS: {unknown}"


def test_categories(reported):
    for dataset, cats in CATEGORIES.items():
        used = set(reported.loc[reported["dataset"] == dataset, "category"])
        assert used <= cats | {"mean"}, (dataset, used - cats)
    medical = set(reported.loc[reported["dataset"] == "medical", "category"])
    assert all(re.fullmatch(r"[a-z0-9_]+", c) for c in medical)


def test_shots(reported):
    fewshot = reported["protocol"] == "fewshot"
    assert (reported.loc[~fewshot, "shots"] == "").all()
    shots = reported.loc[fewshot, "shots"]
    assert shots.str.fullmatch(r"\d+").all()
    assert (shots.astype(int) >= 0).all()


def test_protocol_per_paper(reported):
    for paper, protocol in PAPER_PROTOCOL.items():
        used = set(reported.loc[reported["paper"] == paper, "protocol"])
        assert used <= {protocol}, (paper, used)


def test_values_numeric_and_in_range(reported):
    values = pd.to_numeric(reported["value"], errors="coerce")
    assert values.notna().all(), reported.loc[values.isna(), "value"].tolist()
    accuracy = reported["metric"].isin(ACCURACY_METRICS)
    assert values[accuracy].between(0.0, 100.0).all()
    assert (values[reported["metric"] == "fps"] > 0).all()


def test_no_duplicate_keys(reported):
    dup = reported[reported.duplicated(KEY, keep=False)]
    assert dup.empty, dup[KEY].to_string()


SPOT_CHECKS = [
    # DiAD (AAAI): MVTec-AD mean, multi-class; Tables 1 and 3
    ("DiAD", "Table 1", "diad", "mvtec", "multiclass", "", "mean", "image_auroc", 97.2),
    ("DiAD", "Table 1", "diad", "mvtec", "multiclass", "", "mean", "image_ap", 99.0),
    ("DiAD", "Table 1", "diad", "mvtec", "multiclass", "", "mean", "image_f1max", 96.5),
    ("DiAD", "Table 3", "diad", "mvtec", "multiclass", "", "mean", "pixel_auroc", 96.8),
    ("DiAD", "Table 3", "diad", "mvtec", "multiclass", "", "mean", "pixel_ap", 52.6),
    ("DiAD", "Table 3", "diad", "mvtec", "multiclass", "", "mean", "pixel_f1max", 55.5),
    ("DiAD", "Table 4", "diad", "mvtec", "multiclass", "", "mean", "pixel_aupro", 90.7),
    ("DiAD", "Table 2", "uniad", "visa", "multiclass", "", "mean", "pixel_aupro", 75.6),
    # DiffusionAD: VisA image AUROC and PRO, DAGM image AUROC
    ("DiffusionAD", "Table 1", "diffusionad", "visa", "oneclass", "", "mean", "image_auroc", 97.8),
    ("DiffusionAD", "Table 2", "diffusionad", "visa", "oneclass", "", "mean", "pixel_aupro", 93.2),
    ("DiffusionAD", "Table 5", "diffusionad", "dagm", "oneclass", "", "mean", "image_auroc", 99.6),
    # LafitE: MVTec-AD and MPDD, multi-class
    ("LafitE", "Table 1", "lafite", "mvtec", "multiclass", "", "mean", "image_auroc", 98.5),
    ("LafitE", "Table 2", "lafite", "mpdd", "multiclass", "", "mean", "pixel_auroc", 99.0),
    # AnomalySD: 1-shot multi-class on MVTec-AD and VisA
    ("AnomalySD", "Table 1", "anomalysd", "mvtec", "fewshot", "1", "mean", "image_auroc", 93.6),
    ("AnomalySD", "Table 1", "anomalysd", "visa", "fewshot", "1", "mean", "pixel_auroc", 96.5),
]


@pytest.mark.parametrize("row", SPOT_CHECKS, ids=lambda r: "-".join(map(str, r[:3] + r[6:8])))
def test_spot_checks(reported, row):
    *key, expected = row
    mask = pd.Series(True, index=reported.index)
    for col, val in zip(KEY, key):
        mask &= reported[col] == val
    hit = reported[mask]
    assert len(hit) == 1, key
    assert float(hit["value"].iloc[0]) == pytest.approx(expected)
