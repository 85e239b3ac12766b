"""The command line as a user runs it, with installed plugins only (no test registry)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from cli_helpers import harness
from cli_helpers import install_package as _install

from harness.results.records import iter_records

REPO = Path(__file__).resolve().parents[1]


def test_list_shows_everything_with_its_distribution(tmp_path):
    items = json.loads(harness("list", "--format", "json", cwd=tmp_path).stdout)["items"]
    found = {(i["kind"], i["name"]): i["from"] for i in items}
    assert found[("method", "patchcore")].startswith("harness-ad")
    assert found[("dataset", "synthetic")].startswith("harness-ad")
    for metric in ("image_auroc", "image_ap", "image_f1max", "pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_aupro"):
        assert ("metric", metric) in found
    assert {("protocol", p) for p in ("multiclass", "fewshot", "oneclass")} <= set(found)


def test_describe_counts_parameters_without_weights(tmp_path):
    info = json.loads(harness("describe", "patchcore", "--format", "json", cwd=tmp_path).stdout)
    assert info["profile"] == "paper"
    assert info["networks"] and all(isinstance(v, int) and v > 0 for v in info["networks"].values())
    assert info["total_parameters"] == sum(info["networks"].values())
    text = harness("describe", "patchcore", "--profile", "tiny", cwd=tmp_path).stdout
    assert "networks (parameters)" in text


def test_unknown_method_is_a_clear_usage_error(tmp_path):
    done = harness("run", "--methods", "nosuchmethod", cwd=tmp_path, check=False)
    assert done.returncode == 2
    assert "nosuchmethod" in done.stderr and "patchcore" in done.stderr


def test_data_synth_writes_the_mvtec_layout(tmp_path):
    harness("data", "synth", "--out", str(tmp_path / "synth"), "--categories", "weave", cwd=tmp_path)
    root = tmp_path / "synth" / "weave"
    assert sorted(p.name for p in (root / "train" / "good").iterdir())[0] == "000.png"
    defects = [p.name for p in (root / "test").iterdir() if p.name != "good"]
    assert defects
    for defect in defects:
        stems = sorted(p.stem for p in (root / "test" / defect).iterdir())
        masks = sorted(p.stem for p in (root / "ground_truth" / defect).iterdir())
        assert masks == [f"{s}_mask" for s in stems]


@pytest.fixture(scope="module")
def third_party(tmp_path_factory) -> Path:
    """The example package plus a generated one whose ``predict`` raises, installed with pip."""
    root = tmp_path_factory.mktemp("third_party")
    broken = root / "harness-explodes"
    (broken / "harness_explodes").mkdir(parents=True)
    (broken / "pyproject.toml").write_text(textwrap.dedent("""\
        [build-system]
        requires = ["setuptools>=61"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "harness-explodes"
        version = "0.0.1"
        [project.entry-points.harness]
        explodes = "harness_explodes"
        [tool.setuptools]
        packages = ["harness_explodes"]
        """))
    (broken / "harness_explodes" / "__init__.py").write_text(textwrap.dedent("""\
        from harness import MethodSpec, PaperRef, hookimpl
        from harness_pixelstats import PixelStats

        class Explodes(PixelStats):
            def predict(self, images, categories):
                raise RuntimeError("exploded in predict")

        @hookimpl
        def harness_methods():
            profile = {"image_size": 32, "eval_batch_size": 8, "min_std": 0.02}
            return [MethodSpec(name="explodes", paper=PaperRef(title="A broken method"), protocols=("multiclass",),
                               profiles={"paper": profile, "tiny": profile}, factory=Explodes)]
        """))
    site = root / "site"
    _install(REPO / "examples" / "harness-pixelstats", site)
    _install(broken, site)
    return site


@pytest.mark.slow
def test_third_party_package_lists_runs_fails_alone_and_resumes(tmp_path, third_party):
    items = json.loads(harness("list", "--format", "json", cwd=tmp_path, pythonpath=third_party).stdout)["items"]
    found = {i["name"]: i["from"] for i in items if i["kind"] == "method"}
    assert found["pixelstats"].startswith("harness-pixelstats")
    assert found["explodes"].startswith("harness-explodes")

    args = ("run", "--methods", "pixelstats,explodes", "--eval-size", "64", "--no-progress", "--results-dir", "res",
            "--cache-dir", "cache")
    done = harness(*args, cwd=tmp_path, pythonpath=third_party, check=False)
    assert done.returncode == 1, done.stderr
    assert "exploded in predict" in done.stderr
    records = {r["job"]["method"]: r for _, r in iter_records(tmp_path / "res")}
    assert records["pixelstats"]["status"] == "ok"
    assert records["pixelstats"]["efficiency"]["fps"] > 0
    assert records["explodes"]["status"] == "failed"
    assert records["explodes"]["error"]["phase"] == "predict"
    assert "I-AUROC" in done.stdout and "FPS" in done.stdout

    # A rerun recomputes nothing that finished: the good record is untouched.
    before = records["pixelstats"]["finished"]
    harness(*args, cwd=tmp_path, pythonpath=third_party, check=False)
    again = {r["job"]["method"]: r for _, r in iter_records(tmp_path / "res")}
    assert again["pixelstats"]["finished"] == before


@pytest.mark.slow
def test_fewshot_over_seeds_reports_mean_and_std(tmp_path, third_party):
    done = harness("run", "--methods", "pixelstats", "--protocol", "fewshot", "--shots", "1,2", "--seeds", "0,1",
                   "--eval-size", "64", "--no-progress", "--results-dir", "res", cwd=tmp_path, pythonpath=third_party)
    assert "±" in done.stdout
    jobs = {(r["job"]["shots"], r["job"]["seed"]) for _, r in iter_records(tmp_path / "res")}
    assert jobs == {(1, 0), (1, 1), (2, 0), (2, 1)}


def test_a_warning_repeated_in_a_loop_is_kept_once_and_printed_with_its_count(monkeypatch, capsys):
    import argparse
    import warnings

    from harness import cli
    from harness.errors import HarnessWarning

    def noisy(args):
        for _ in range(50_000):
            warnings.warn("a library warns in a loop", UserWarning)
        for _ in range(3):
            warnings.warn("harness: something to know", HarnessWarning)
        warnings.warn("harness: something to know", HarnessWarning)  # the same text from another line
        return 0

    parser = argparse.ArgumentParser()
    parser.set_defaults(func=noisy, debug=False, command="noisy")
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    seen = []
    original = cli._WarningCollector.__call__
    monkeypatch.setattr(cli._WarningCollector, "__call__",
                        lambda self, *a, **k: (original(self, *a, **k), seen.append(len(self.seen)))[0])
    assert cli.main([]) == 0
    assert max(seen) == 3  # one per distinct (text, place), however often each came
    err = capsys.readouterr().err
    assert "a library warns in a loop (x50000)" in err
    assert err.count("warning: harness: something to know") == 1
