"""The leaderboard: aggregation over seeds, bold best, reported rows, formats, the CSV check."""

from __future__ import annotations

import json
import re
import statistics

import pandas as pd
import pytest

from harness.results.leaderboard import build_leaderboard, collect, compare_accuracy, tidy_table, write_leaderboard
from harness.results.records import write_record
from record_helpers import sample_record as _record
from record_helpers import write_sample_record as _write

CATEGORIES = ("bottle", "cable")


@pytest.fixture
def results(tmp_path):
    """2 methods x 2 seeds on synthetic/multiclass, one failure, a few-shot group with 1 and 2 shots."""
    root = tmp_path / "results"
    _write(root, _record("alpha", 0, 0.90, fps=100.0))
    _write(root, _record("alpha", 1, 0.94, fps=120.0))
    # beta has no pixel maps (NaN pixel metrics) and a better image AUROC.
    _write(root, _record("beta", 0, 0.96, pixel=False, fps=50.0))
    _write(root, _record("beta", 1, 0.98, pixel=False, fps=60.0))
    _write(root, _record("gamma", 0, 0.5, status="failed"))
    for shots in (1, 2):
        _write(root, _record("alpha", 0, 0.70 + shots / 100, protocol="fewshot", shots=shots))
    return root


@pytest.fixture
def reported(tmp_path):
    """A reported-numbers folder with one paper row for synthetic/multiclass and one for another dataset."""
    folder = tmp_path / "reported"
    folder.mkdir()
    lines = ["paper,table,method,dataset,protocol,shots,category,metric,value",
             "PaperX,Table 1,diad,synthetic,multiclass,,mean,image_auroc,99.5",
             "PaperX,Table 1,diad,synthetic,multiclass,,bottle,image_auroc,99.9",
             "PaperX,Table 2,diad,synthetic,multiclass,,mean,pixel_auroc,99.7",
             "PaperX,Table 1,other,mvtec,multiclass,,mean,image_auroc,88.8"]
    (folder / "paperx.csv").write_text("\n".join(lines) + "\n")
    return folder


def _row(text: str, label: str) -> list[str]:
    """The cells of the markdown table row whose first cell is ``label``."""
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0] == label:
            return cells
    raise AssertionError(f"no row {label!r} in\n{text}")


def _section(text: str, heading: str) -> str:
    """The markdown text from ``heading`` up to the next level-2 heading."""
    start = text.index(heading)
    end = text.find("\n## ", start + 1)
    return text[start:] if end < 0 else text[start:end]


def test_collect_has_one_row_per_record(results):
    frame = collect(results)
    assert len(frame) == 7
    assert set(frame["status"]) == {"ok", "failed"}
    failed = frame[frame["status"] == "failed"].iloc[0]
    assert failed["error_phase"] == "fit" and failed["method"] == "gamma"
    assert frame.loc[frame["method"] == "beta", "metrics/bottle/pixel_auroc"].isna().all()
    assert str(frame["shots"].dtype) == "Int64"


def test_summary_mean_std_and_bold(results):
    text = _section(build_leaderboard(results, per_category=False), "## synthetic — multiclass")
    alpha, beta = _row(text, "alpha (tiny)"), _row(text, "beta (tiny)")
    # alpha I-AUROC: seed means 89 and 93 (percent): mean 91.0, sample std 2.83.
    expected_std = statistics.stdev([89.0, 93.0])
    assert alpha[1] == f"91.0 ± {expected_std:.1f}"
    assert beta[1] == "**96.0 ± 1.4**"  # beta is better on image metrics
    assert alpha[4] == "88.0 ± 2.8"  # only alpha has pixel metrics: a lone value is not bold
    assert beta[4] == "–" and beta[8] == "–"  # NaN pixel metrics and undefined mAD
    assert alpha[9] == "**110.0**" and beta[9] == "55.0"  # FPS, higher is better, mean only
    assert alpha[10] == "2.5" and alpha[11] == "2"  # Params (M) never bold, n seeds


def test_reported_rows_match_group_and_are_never_bold(results, reported):
    text = build_leaderboard(results, reported_dir=reported)
    multiclass = _section(text, "## synthetic — multiclass")
    row = _row(multiclass, "diad (reported, PaperX Table 1, Table 2)")
    assert row[1] == "99.5" and row[4] == "99.7" and row[2] == "–"
    assert "**" not in "|".join(row)
    # 99.5 beats ours but ours keep the bold: reported rows are not competitors.
    assert _row(multiclass, "beta (tiny)")[1].startswith("**")
    assert "other (reported" not in text  # mvtec only
    assert "(reported," not in _section(text, "## synthetic — fewshot, 1-shot")
    # Per category, the reported value is an extra, never bold, column.
    image = multiclass[multiclass.index("Per category, image"):]
    bottle = _row(image, "bottle")
    assert bottle[-1] == "99.9/–/–"


def test_per_category_cells_and_bold(results):
    text = _section(build_leaderboard(results), "## synthetic — multiclass")
    image = text[text.index("Per category, image"):text.index("Per category, pixel")]
    pixel = text[text.index("Per category, pixel"):]
    # bottle: alpha seeds 90/94 -> 92.0, I-AP 91.0, I-F1max 90.0; beta 97/96/95 and bold.
    assert _row(image, "bottle")[1:3] == ["92.0/91.0/90.0", "**97.0/96.0/95.0**"]
    assert _row(image, "mean")[1:3] == ["91.0/90.0/89.0", "**96.0/95.0/94.0**"]
    # beta has no pixel metrics: a lone dash, and alpha is not bold (nothing to beat).
    assert _row(pixel, "cable")[1:3] == ["87.0/86.0/85.0/84.0", "–"]


def test_failures_and_shots_groups(results):
    text = build_leaderboard(results)
    failures = _section(text, "## synthetic — multiclass")
    row = _row(failures[failures.index("### Failures"):], "gamma")
    assert row[1:4] == ["tiny", "0", "fit"]
    assert "boom" in failures and "second line" not in failures
    headings = re.findall(r"^## .*$", text, flags=re.M)
    assert headings == ["## synthetic — fewshot, 1-shot", "## synthetic — fewshot, 2-shot",
                        "## synthetic — multiclass"]
    assert _row(_section(text, "## synthetic — fewshot, 2-shot"), "alpha (tiny)")[1] == "71.0"


def test_groups_filter(results):
    text = build_leaderboard(results, groups={("synthetic", "fewshot")})
    assert "multiclass" not in text and "fewshot, 2-shot" in text
    assert "No records" in build_leaderboard(results, groups={("mvtec", "multiclass")})


def test_every_format(results, reported):
    latex = build_leaderboard(results, reported_dir=reported, fmt="latex")
    assert r"\textbf{" in latex and r"\begin{tabular}" in latex and r"$\pm$" in latex
    html = build_leaderboard(results, reported_dir=reported, fmt="html")
    assert "<b>" in html and "<table" in html
    csv_text = build_leaderboard(results, fmt="csv")
    assert csv_text.startswith("dataset,protocol,shots,method,profile,overrides,category,metric,mean,std,n_seeds")
    assert "**" not in csv_text


def test_tidy_table(results):
    table = tidy_table(results)
    row = table[(table["method"] == "alpha") & (table["protocol"] == "multiclass") & (table["category"] == "mean")
                & (table["metric"] == "image_auroc")].iloc[0]
    assert row["mean"] == pytest.approx(91.0) and row["n_seeds"] == 2
    assert row["std"] == pytest.approx(statistics.stdev([89.0, 93.0]), abs=1e-4)
    fps = table[(table["method"] == "beta") & (table["metric"] == "fps")].iloc[0]
    assert fps["mean"] == pytest.approx(55.0) and fps["category"] == "mean"
    assert "gamma" not in set(table["method"])
    assert table.equals(tidy_table(results))  # stable


def test_write_leaderboard(results, tmp_path):
    out = tmp_path / "board"
    paths = write_leaderboard(results, out, formats=("markdown", "csv", "latex", "html"))
    assert [p.name for p in paths] == ["leaderboard.md", "leaderboard.csv", "leaderboard.tex", "leaderboard.html",
                                       "environments.json"]
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths)
    frame = pd.read_csv(out / "leaderboard.csv")
    assert {"fps", "params", "image_auroc", "mad"} <= set(frame["metric"])


def test_compare_accuracy(results, tmp_path):
    committed = write_leaderboard(results, tmp_path / "committed", formats=("csv",))[0]
    frame = pd.read_csv(committed, keep_default_na=False, dtype=str)

    def changed(metric: str, delta: float, category: str = "mean"):
        edited = frame.copy()
        mask = ((edited["method"] == "alpha") & (edited["protocol"] == "multiclass")
                & (edited["category"] == category) & (edited["metric"] == metric))
        edited.loc[mask, "mean"] = (edited.loc[mask, "mean"].astype(float) + delta).astype(str)
        path = tmp_path / f"fresh-{metric}-{delta}.csv"
        edited.to_csv(path, index=False)
        return compare_accuracy(path, committed)

    assert compare_accuracy(committed, committed) == []
    problems = changed("image_auroc", 0.6)
    assert len(problems) == 1 and "alpha" in problems[0] and "image_auroc" in problems[0]
    assert changed("image_auroc", 0.4) == []
    assert changed("pixel_ap", -0.6, category="bottle") != []
    assert changed("fps", 50.0) == []
    missing = tmp_path / "missing.csv"
    frame[frame["method"] != "beta"].to_csv(missing, index=False)
    assert any("missing from the fresh file" in p for p in compare_accuracy(missing, committed))


def test_only_failed_group_and_overrides_variant(tmp_path):
    root = tmp_path / "results"
    _write(root, _record("gamma", 0, 0.5, status="failed"))
    text = build_leaderboard(root)
    assert "No successful runs." in text and "### Failures" in text and "I-AUROC" not in text
    tweaked = _record("alpha", 0, 0.80)
    tweaked["job"]["overrides"] = {"k": 3}
    _write(root, _record("alpha", 0, 0.90))
    write_record(root / "records" / "synthetic" / "multiclass" / "alpha" / "tiny-seed0-abc.json", tweaked)
    text = build_leaderboard(root, per_category=False)
    # Different command-line settings are separate rows, never averaged together.
    assert _row(text, "alpha (tiny)")[1] == "**89.0**"
    assert _row(text, "alpha (tiny; k=3)")[1] == "79.0"
    latex = build_leaderboard(root, fmt="latex", per_category=False)
    assert r"synthetic --- multiclass" in latex and "k=3" in latex


def test_a_third_party_metric_is_a_column_like_the_built_in_ones(tmp_path):
    from harness import MetricSpec
    from harness.metrics.builtin import STANDARD_METRICS

    record = _record("alpha", 0, 0.9)
    for values in record["metrics"].values():
        values["image_gap"] = 0.25
    record["mean"]["image_gap"] = 0.25
    _write(tmp_path / "results", record)
    gap = MetricSpec("image_gap", "image", False, lambda scores: 0.0, label="I-Gap", scale=1.0)
    text = build_leaderboard(tmp_path / "results", metrics=list(STANDARD_METRICS) + [gap])
    header = next(line for line in text.splitlines() if line.startswith("| Method"))
    assert "I-Gap" in header and header.index("I-F1max") < header.index("I-Gap") < header.index("P-AUROC")
    row = next(line for line in text.splitlines() if line.startswith("| alpha"))
    cells = dict(zip([c.strip() for c in header.split("|")], [c.strip() for c in row.split("|")]))
    assert cells["I-Gap"] == "0.2"  # shown as stored (scale 1), not in percent
    table = tidy_table(tmp_path / "results", metrics=list(STANDARD_METRICS) + [gap])
    assert table[(table.metric == "image_gap") & (table.category == "mean")]["mean"].iloc[0] == 0.25


def test_dev_runs_and_random_weights_are_never_shown(tmp_path):
    for seed, run in ((0, {"dev_run": True}), (1, {"weights": "random"})):
        record = _record("alpha", seed, 0.9)
        record["run"] = run
        _write(tmp_path / "results", record)
    text = build_leaderboard(tmp_path / "results")
    assert "alpha" not in text and "2 dev-run or random-weight record(s)" in text


def test_numerics_environments_name_where_the_tabled_numbers_were_computed(results, tmp_path):
    from harness.results.leaderboard import numerics_environments, same_numerics

    envs = numerics_environments(results)
    # The fixture's records carry no environment: one unknown environment, the failed record left out.
    assert envs == [{"torch": None, "device": None, "device_name": None, "cpu_model": None, "cpu_signature": None, "cpu_capability": None,
                     "torch_threads": None, "precision": None, "tf32": None, "compile": None, "records": 6}]
    other = tmp_path / "other"
    for seed, capability in ((0, "AVX2"), (1, "AVX512")):
        record = _record("alpha", seed, 0.9)
        record["environment"] = {"torch": "2.14.1", "device": "cpu", "cpu_model": "EPYC", "torch_threads": 2,
                                 "cpu_capability": capability, "hostname": f"host{seed}"}
        _write(other, record)
    mixed = numerics_environments(other)
    assert [e["cpu_capability"] for e in mixed] == ["AVX2", "AVX512"] and all(e["records"] == 1 for e in mixed)
    assert same_numerics(mixed[:1], [{**mixed[0], "records": 7}])  # the count and the host do not matter
    assert not same_numerics(mixed[:1], mixed[1:])
    assert not same_numerics(mixed, mixed)  # tables from two environments are not one machine's
    written = json.loads((write_leaderboard(other, tmp_path / "board", formats=("csv",))[-1]).read_text())
    assert written == mixed


def test_compare_accuracy_can_compare_the_means_only(results, tmp_path):
    committed = write_leaderboard(results, tmp_path / "committed", formats=("csv",))[0]
    frame = pd.read_csv(committed, keep_default_na=False, dtype=str)
    bottle = (frame["category"] == "bottle") & (frame["metric"] == "image_auroc") & (frame["method"] == "alpha")
    frame.loc[bottle, "mean"] = (frame.loc[bottle, "mean"].astype(float) + 5).astype(str)
    fresh = tmp_path / "fresh.csv"
    frame.to_csv(fresh, index=False)
    assert compare_accuracy(fresh, committed) != []
    assert compare_accuracy(fresh, committed, categories=("mean",)) == []


def test_share_of_the_device_limit_is_a_column_only_when_a_record_has_it(tmp_path):
    plain, gpu = tmp_path / "plain", tmp_path / "gpu"
    _write(plain, _record("alpha", 0, 0.9))
    record = _record("alpha", 0, 0.9)
    record["efficiency"]["limit_share"] = 0.27
    _write(gpu, record)
    assert "% of limit" not in build_leaderboard(plain, per_category=False)
    text = build_leaderboard(gpu, per_category=False)
    assert "% of limit" in text and "27" in text
