"""``harness leaderboard --paper NAME [--table N]``: a paper's table as published, ours beside it."""

from __future__ import annotations

import io
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pandas as pd
import pytest

from harness.cli import main
from harness.results.paper_tables import build_paper_table, load_layouts, paper_section
from harness.results.reported import load_reported, method_label
from record_helpers import sample_record as _record
from record_helpers import write_sample_record as _write

REPORTED = Path(__file__).parents[1] / "results" / "reported"


def _pipe_table(text: str) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the (only) pipe table in ``text``."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    return cells[0], cells[2:]


def _cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


def test_diad_table_1_prints_the_csv_values_exactly(tmp_path):
    code, out, _ = _cli("leaderboard", "--paper", "DiAD", "--table", "1", "--results-dir", str(tmp_path / "none"),
                        "--reported-dir", str(REPORTED))
    assert code == 0
    header, rows = _pipe_table(out)
    raw = pd.read_csv(REPORTED / "diad.csv", dtype=str, keep_default_na=False)
    raw = raw[raw["table"] == "Table 1"]
    metrics = ["image_auroc", "image_ap", "image_f1max"]
    by_category = {row[0]: row for row in rows}
    assert list(by_category) == list(dict.fromkeys(raw["category"]))  # the paper's row order, mean last
    assert header[1:] == [method_label(m) for m in dict.fromkeys(raw["method"])]
    for item in raw.itertuples():
        cell = by_category[item.category][header.index(method_label(item.method))]
        assert cell.split("/")[metrics.index(item.metric)] == item.value  # the CSV's text, not re-rounded
    # PaDiM printed only its AUROC: the other two numbers stay empty, as in the paper.
    assert by_category["mean"][header.index("PaDiM")] == "84.2/-/-"


def test_our_columns_sit_beside_the_published_ones(tmp_path):
    results = tmp_path / "results"
    # DRAEM ran twice on MVTec (multi-class), alpha once; a VisA record must not reach an MVTec table.
    _write(results, _record("draem", 0, 0.90, dataset="mvtec"))
    _write(results, _record("draem", 1, 0.94, dataset="mvtec"))
    _write(results, _record("alpha", 0, 0.80, dataset="mvtec"))
    _write(results, _record("beta", 0, 0.80, dataset="visa"))
    text = paper_section("diad", "Table 1", results, REPORTED)
    header, rows = _pipe_table(text)
    at = header.index("DRAEM")
    assert header[at + 1: at + 3] == ["DRAEM ours (tiny)", "Δ DRAEM (tiny)"]
    assert "alpha ours (tiny)" in header and "Δ alpha (tiny)" not in header
    assert not any("beta" in h for h in header)
    bottle = next(r for r in rows if r[0] == "bottle")
    # records hold 0.90/0.89/0.88 and 0.94/0.93/0.92 for bottle's image metrics: means 92.0/91.0/90.0
    assert bottle[at] == "97.5/99.2/96.1"
    assert bottle[at + 1] == "92.0/91.0/90.0"
    assert bottle[at + 2] == "-5.5/-8.2/-6.1"
    # no record for cable's neighbours: categories we did not run read "-" in our columns
    carpet = next(r for r in rows if r[0] == "carpet")
    assert carpet[at + 1] == "-/-/-"
    # the CSV form holds every number, unrounded
    csv = pd.read_csv(io.StringIO(paper_section("DiAD", "1", results, REPORTED, fmt="csv")))
    mine = csv[(csv["method"] == "draem") & (csv["profile"] == "tiny") & (csv["category"] == "bottle")
               & (csv["metric"] == "image_auroc")]
    assert mine[["published", "ours", "difference"]].iloc[0].tolist() == pytest.approx([97.5, 92.0, -5.5])


def test_fewshot_tables_match_ours_by_shots(tmp_path):
    results = tmp_path / "results"
    _write(results, _record("winclip", 0, 0.90, dataset="mvtec", protocol="fewshot", shots=1))
    header, rows = _pipe_table(paper_section("AnomalySD", "1", results, REPORTED))
    ours = [r for r in rows if r[1] == "WinCLIP ours (tiny)"]
    assert [r[0] for r in ours] == ["1-shot"]  # only the shots we ran
    assert ours[0][header.index("mvtec I-AUROC")] == f"{(0.90 + 0.88) / 2 * 100:.1f}"


def test_every_reported_table_has_a_layout_that_builds():
    papers = load_layouts(REPORTED)
    reported = load_reported(REPORTED, keep_text=True)
    tables = {(p, t.table) for p, entry in papers.items() for t in entry["tables"]}
    assert set(map(tuple, reported[["paper", "table"]].drop_duplicates().to_numpy())) == tables
    for paper, entry in papers.items():
        for layout in entry["tables"]:
            built = build_paper_table(paper, layout, reported, None)
            shown = sum(cell != "-" for row in built.rows for c in row for cell in c.split("/"))
            n = len(reported[(reported["paper"] == paper) & (reported["table"] == layout.table)])
            assert len(built.tidy) == n  # every published number is placed, none twice
            assert shown >= n


def test_without_table_the_papers_tables_are_listed(tmp_path):
    code, out, _ = _cli("leaderboard", "--paper", "lafite", "--reported-dir", str(REPORTED))
    assert code == 0
    assert all(name in out for name in ("Table 1", "Table 2", "Table 3", "mpdd"))


@pytest.mark.parametrize("args, words", [
    (("--paper", "NoSuchPaper"), ["NoSuchPaper", "DiAD", "DiffusionAD", "LafitE", "AnomalySD"]),
    (("--paper", "DiAD", "--table", "9"), ["'9'", "'Table 1'", "'arXiv Table 13'"]),
    (("--table", "1"), ["--paper"]),
])
def test_unknown_names_give_a_clear_error(args, words):
    code, _, err = _cli("leaderboard", *args, "--reported-dir", str(REPORTED))
    assert code == 2
    assert all(word in err for word in words), err


def test_html_report_has_the_paper_tables(tmp_path):
    from harness.results.report.html import build_report

    results = tmp_path / "results"
    _write(results, _record("uniad", 0, 0.90, dataset="visa"))
    build_report(results, tmp_path / "report", reported_dir=REPORTED)
    page = (tmp_path / "report" / "index.html").read_text()
    assert "The papers&#x27; tables beside ours" in page or "The papers' tables beside ours" in page
    assert "DiAD arXiv Table 12" in page and "UniAD ours (tiny)" in page
    assert "DiAD Table 1" not in page  # MVTec tables: we have no MVTec records
