"""``harness report``: built from a small toy run, read as HTML, and rendered in headless Chromium."""

from __future__ import annotations

import os
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch

from toy_plugins import MeanImage, RaisingMethod, ToyPlugin, method_spec

from harness import Prediction, hookimpl
from harness.cli import main
from harness.engine.jobs import Job
from harness.engine.registry import load_registry
from harness.results.report.maps import SAMPLE, SAMPLE_ANOMALOUS, SAMPLE_NORMAL, read_curves, read_sample
from harness.engine.runner import RunOptions, Runner

REPO = Path(__file__).resolve().parents[1]
SCREENSHOT = REPO / "build" / "report-screenshot.png"


class NoisyMean(MeanImage):
    """The toy method with noise, so its curves and overlays differ from the clean one."""

    def predict(self, images, categories):  # noqa: D102
        out = super().predict(images, categories)
        generator = torch.Generator().manual_seed(int(images.sum().item() * 1000) % (2 ** 31))
        maps = out.anomaly_maps + 0.6 * torch.rand(out.anomaly_maps.shape, generator=generator)
        return Prediction(maps, maps.flatten(1).amax(1))


class ReportPlugin:
    """A noisy method, and methods whose records must never show (dev runs, random weights)."""

    @hookimpl
    def harness_methods(self):  # noqa: D102
        return [method_spec("noisy", NoisyMean), method_spec("devonly"), method_spec("randomonly"),
                method_spec("devraising", RaisingMethod)]


class _Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.sources: list[str] = []

    def handle_starttag(self, tag, attrs):  # noqa: D102
        if tag == "img":
            self.sources.append(dict(attrs)["src"])


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """A toy run (two methods, two seeds, few-shot, a failure, a dev run, random weights, a damaged
    record), then ``harness report``."""
    tmp = tmp_path_factory.mktemp("report")
    registry = load_registry(entry_points=[], extra_plugins=[("toy", ToyPlugin()), ("report", ReportPlugin())])
    options = RunOptions(results_dir=tmp / "results", cache_dir=tmp / "cache", device="cpu", eval_size=32,
                         progress=False, latency_repeats=1, save_maps="sample")
    jobs = [Job("meanimage", "toy", "multiclass", None, s, "tiny") for s in (0, 1)]
    jobs += [Job("noisy", "toy", "multiclass", None, 0, "tiny"), Job("raising", "toy", "multiclass", None, 0, "tiny")]
    jobs += [Job("noisy", "toy", "fewshot", k, s, "tiny") for k in (1, 2) for s in (0, 1)]
    jobs += [Job("meanimage", "toy", "fewshot", 1, 0, "tiny")]
    jobs += [Job("devonly", "toy", "multiclass", None, 0, "tiny", dev_run=True),
             Job("devraising", "toy", "multiclass", None, 0, "tiny", dev_run=True),
             Job("randomonly", "toy", "multiclass", None, 0, "tiny", weights="random")]
    summary = Runner(registry, options).run(jobs)
    assert [o.job.method for o in summary.failed] == ["raising", "devraising"]
    damaged = tmp / "results" / "records" / "toy" / "multiclass" / "truncated" / "tiny-seed0.json"
    damaged.parent.mkdir(parents=True)
    damaged.write_text('{"job": {"method": "trunc')
    out = tmp / "report"
    code = main(["report", "--out", str(out), "--results-dir", str(tmp / "results"), "--no-reported"])
    return {"code": code, "out": out, "results": tmp / "results", "summary": summary,
            "html": (out / "index.html").read_text(encoding="utf-8")}


def test_report_shows_results_only_and_warns_about_damaged_records(report, capsys):
    assert report["code"] == 0
    page = report["html"]
    assert "meanimage (tiny)" in page and "noisy (tiny)" in page
    for never in ("devonly", "devraising", "randomonly"):
        assert never not in page
    assert "2 dev-run or random-weight record(s) are not shown" in page
    assert "boom in predict" in page and "Failed jobs" in page  # the failed real job, with its error
    assert "truncated" in page and "not valid JSON" in page     # the damaged record, named


def test_every_referenced_image_exists_and_the_figures_are_there(report):
    parser = _Images()
    parser.feed(report["html"])
    out = report["out"]
    assert parser.sources, "the report references no image"
    for source in parser.sources:
        assert not source.startswith(("/", "http:", "https:", "file:")), source
        path = out / source
        assert path.is_file() and path.stat().st_size > 100, source
    names = {Path(s).name for s in parser.sources}
    assert {"fps-toy-multiclass.png", "shots-toy.png", "curves-toy-multiclass-red.png"} <= names
    assert {"fps-toy-fewshot-1.png", "fps-toy-fewshot-2.png", "curves-toy-fewshot-2-blue.png"} <= names


def test_overlays_of_every_method_on_the_same_images(report):
    """The gallery rows are the fixed sample: each has the truth and one overlay per method."""
    by_method = {}
    for outcome in report["summary"].outcomes:
        if outcome.job.protocol == "multiclass" and outcome.job.seed == 0 and outcome.status == "ok":
            saved = read_sample(outcome.record_path, outcome.record)
            by_method[outcome.job.method] = sorted(m.key for m in saved if SAMPLE in m.roles)
    assert set(by_method) >= {"meanimage", "noisy"}
    keys = by_method["meanimage"]
    assert keys == by_method["noisy"] and len(keys) == 2 * (SAMPLE_NORMAL + SAMPLE_ANOMALOUS)
    for category in ("red", "blue"):
        folder = report["out"] / "gallery" / "toy-multiclass" / category
        truths = sorted(folder.glob("*-truth.png"))
        assert len(truths) == SAMPLE_NORMAL + SAMPLE_ANOMALOUS
        for truth in truths:
            row = truth.name.split("-")[0]
            assert (folder / f"{row}-m0.png").is_file() and (folder / f"{row}-m1.png").is_file()
        assert {p.name for p in folder.glob("worst-*")} == {"worst-fp-m0.png", "worst-fn-m0.png",
                                                             "worst-fp-m1.png", "worst-fn-m1.png"}


def test_saved_curves_carry_the_records_numbers(report):
    for outcome in report["summary"].outcomes:
        if outcome.status != "ok" or outcome.job.method != "noisy":
            continue
        curves = read_curves(outcome.record_path, outcome.record)
        for category, values in outcome.record.metrics.items():
            for curve in curves[category].values():
                assert curve.value == pytest.approx(values[curve.metric], abs=1e-12)
                assert curve.x.size <= curve.n_exact


def _browser():
    """A headless Chromium WebDriver, or a skip saying what is missing."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install "
                                    "'harness-ad[test]')")
    from selenium.webdriver.chrome.service import Service

    binary = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    driver = shutil.which("chromedriver")
    if binary is None or driver is None:
        pytest.skip("no Chromium: install the Debian packages chromium and chromium-driver "
                    "(apt-get install -y chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1400,1000", "--allow-file-access-from-files"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver), options=options)


def _render(index: Path, screenshot: Path) -> dict:
    """Open the page from disk; return its console errors, images and a full-page screenshot's stats."""
    browser = _browser()
    try:
        browser.get(index.resolve().as_uri())
        images = browser.execute_script(
            "return Array.from(document.images).map(i => [i.getAttribute('src'), i.complete, i.naturalWidth]);")
        errors = [e for e in browser.get_log("browser") if e.get("level") == "SEVERE"]
        height = int(browser.execute_script("return document.body.scrollHeight;"))
        browser.set_window_size(1400, min(max(height, 600), 12000))
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(screenshot))
        title = browser.title
    finally:
        browser.quit()
    from PIL import Image

    pixels = np.asarray(Image.open(screenshot).convert("L"), dtype=np.float64)
    return {"errors": errors, "images": images, "title": title, "std": float(pixels.std()),
            "ink": float((pixels < 200).mean())}


@pytest.mark.slow
def test_the_report_renders_in_headless_chromium(report):
    """As a person would open it: no console or loading error, every image decoded, not blank."""
    seen = _render(report["out"] / "index.html", SCREENSHOT)
    assert seen["errors"] == []
    parser = _Images()
    parser.feed(report["html"])
    assert len(seen["images"]) == len(parser.sources)
    broken = [src for src, complete, width in seen["images"] if not complete or width == 0]
    assert broken == []
    assert "benchmark report" in seen["title"]
    assert seen["std"] > 20 and seen["ink"] > 0.02, "the screenshot looks blank"
    assert SCREENSHOT.stat().st_size > 10_000


@pytest.mark.slow
def test_the_ci_run_report_renders_in_headless_chromium(tmp_path):
    """The report of CI's fresh run of every method (``$HARNESS_FRESH_RESULTS``), when there is one."""
    fresh = os.environ.get("HARNESS_FRESH_RESULTS")
    if not fresh or not Path(fresh, "records").is_dir():
        pytest.skip("HARNESS_FRESH_RESULTS is not set to a results folder (CI sets it)")
    _browser().quit()  # skip before building when there is no browser
    out = tmp_path / "report"
    assert main(["report", "--out", str(out), "--results-dir", fresh]) == 0
    seen = _render(out / "index.html", REPO / "build" / "report-screenshot-ci.png")
    assert seen["errors"] == []
    assert seen["images"] and all(complete and width > 0 for _, complete, width in seen["images"])
    assert seen["std"] > 20
    shutil.copytree(out, REPO / "build" / "report", dirs_exist_ok=True)
