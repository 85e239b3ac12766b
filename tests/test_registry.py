"""Plugin loading: entry points, broken plugins, duplicate names, invalid specs, reporters."""

from __future__ import annotations

import importlib.metadata as metadata
import sys
import textwrap

import pytest
from toy_plugins import PAPER, PROFILES, MeanImage, ToyPlugin

from harness import MethodSpec, hookimpl
from harness.errors import UsageError
from harness.engine.jobs import expand_jobs
from harness.engine.registry import load_registry
from harness.engine.runner import Runner


class _Duplicate:
    @hookimpl
    def harness_methods(self):
        return [MethodSpec(name="meanimage", paper=PAPER, protocols=("multiclass",), profiles=PROFILES, factory=MeanImage)]


class _Incomplete:
    @hookimpl
    def harness_methods(self):
        return [MethodSpec(name="incomplete", paper=PAPER, protocols=(), profiles=PROFILES, factory=MeanImage),
                MethodSpec(name="oddprotocol", paper=PAPER, protocols=("zeroshot-magic",), profiles=PROFILES, factory=MeanImage)]


class _RaisingHook:
    @hookimpl
    def harness_datasets(self):
        raise RuntimeError("cannot list datasets")


def test_builtin_metrics_are_loaded():
    registry = load_registry(entry_points=[])
    assert list(registry.metrics)[:7] == ["image_auroc", "image_ap", "image_f1max", "pixel_auroc", "pixel_ap",
                                          "pixel_f1max", "pixel_aupro"]
    assert registry.metrics["pixel_aupro"].plugin.distribution == "harness (built-in)"


def test_duplicate_names_keep_the_first_and_name_both_plugins():
    registry = load_registry(entry_points=[], extra_plugins=[("toy", ToyPlugin()), ("dupe", _Duplicate())])
    assert registry.methods["meanimage"].plugin.name == "toy"
    problem = next(p for p in registry.problems if p.kind == "duplicate")
    assert "duplicate method name 'meanimage'" in str(problem) and "'toy'" in str(problem)
    assert problem.plugin == "dupe"


def test_invalid_specs_and_raising_hooks_are_reported_not_fatal():
    registry = load_registry(entry_points=[], extra_plugins=[("bad", _Incomplete()), ("raiser", _RaisingHook()),
                                                               ("toy", ToyPlugin())])
    assert "incomplete" not in registry.methods and "oddprotocol" not in registry.methods
    assert "meanimage" in registry.methods and "toy" in registry.datasets
    text = "\n".join(map(str, registry.problems))
    assert {p.kind for p in registry.problems} >= {"spec", "hook"}
    assert "lacks protocols" in text and "zeroshot-magic" in text and "cannot list datasets" in text


def test_entry_point_that_fails_to_import_is_reported_with_its_distribution(tmp_path, monkeypatch):
    # A distribution on sys.path, exactly as pip lays one out: a dist-info with entry_points.txt.
    site = tmp_path / "site"
    (site / "broken_plugin").mkdir(parents=True)
    (site / "broken_plugin" / "__init__.py").write_text("import not_a_real_module_xyz\n")
    (site / "good_plugin.py").write_text(textwrap.dedent("""
        from harness import hookimpl, MethodSpec, PaperRef
        import toy_plugins
        @hookimpl
        def harness_methods():
            return [toy_plugins.method_spec("outside")]
    """))
    info = site / "harness_outside-1.2.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: harness-outside\nVersion: 1.2.3\n")
    (info / "entry_points.txt").write_text("[harness]\nbroken = broken_plugin\noutside = good_plugin\n")
    monkeypatch.syspath_prepend(str(site))
    eps = [ep for ep in metadata.entry_points(group="harness") if ep.dist.metadata["Name"] == "harness-outside"]
    assert len(eps) == 2
    registry = load_registry(entry_points=eps)
    assert "outside" in registry.methods
    assert registry.methods["outside"].plugin.distribution == "harness-outside 1.2.3"
    problem = next(p for p in registry.problems if p.plugin == "broken")
    assert problem.kind == "import" and problem.distribution == "harness-outside 1.2.3"
    assert "not_a_real_module_xyz" in problem.message
    sys.modules.pop("good_plugin", None)


def test_unknown_method_lists_the_installed_ones(toy_registry):
    with pytest.raises(UsageError, match="meanimage"):
        toy_registry.method("nope")


class _Reporter:
    def __init__(self):
        self.events = []

    @hookimpl
    def harness_run_started(self, jobs, options):
        self.events.append(("run_started", len(jobs)))

    @hookimpl
    def harness_job_started(self, job):
        self.events.append(("job_started", job.method))

    @hookimpl
    def harness_job_finished(self, job, record):
        self.events.append(("job_finished", record.status))

    @hookimpl
    def harness_run_finished(self, records, interrupted):
        self.events.append(("run_finished", len(records), interrupted))


class _BrokenReporter:
    @hookimpl
    def harness_job_finished(self, job, record):
        raise ValueError("tracker offline")


def test_reporters_see_the_run_and_a_broken_reporter_is_not_fatal(run_options):
    reporter = _Reporter()
    registry = load_registry(entry_points=[], extra_plugins=[("toy", ToyPlugin()), ("rep", reporter),
                                                               ("broken", _BrokenReporter())])
    jobs = expand_jobs(["meanimage", "raising"], ["toy"], "multiclass", None, [0], {"toy": "tiny"})
    summary = Runner(registry, run_options).run(jobs)
    assert [o.status for o in summary.outcomes] == ["ok", "failed"]
    assert reporter.events == [("run_started", 2), ("job_started", "meanimage"), ("job_finished", "ok"),
                               ("job_started", "raising"), ("job_finished", "failed"), ("run_finished", 2, False)]
    assert any("tracker offline" in p.message and p.kind == "reporter" for p in registry.problems)


class _Misspelled:
    @hookimpl
    def harness_method(self):  # noqa: D102 - the misspelling is the point
        return []


class _Undecorated:
    def harness_datasets(self):  # noqa: D102 - forgot @hookimpl
        return []


def test_a_misspelled_or_undecorated_hook_is_a_problem_naming_the_plugin():
    registry = load_registry(entry_points=[], extra_plugins=[("typo", _Misspelled()), ("nodeco", _Undecorated())])
    problems = {p.plugin: p for p in registry.problems}
    assert problems["typo"].kind == "unknown-hook" and "harness_methods" in problems["typo"].message
    assert problems["nodeco"].kind == "unknown-hook" and "@harness.hookimpl" in problems["nodeco"].message


def test_a_profile_naming_an_unknown_setting_is_a_plugin_problem():
    from harness import Setting

    class BadProfile:
        @hookimpl
        def harness_methods(self):
            return [MethodSpec(name="typed", paper=PAPER, protocols=("multiclass",), factory=MeanImage,
                               settings=(Setting("image_size", int, 32, "side"),),
                               profiles={"tiny": {"image_size": 16, "imagesize": 16}})]

    registry = load_registry(entry_points=[], extra_plugins=[("bad", BadProfile())])
    assert "typed" not in registry.methods
    (problem,) = [p for p in registry.problems if p.plugin == "bad"]
    assert problem.kind == "spec" and "imagesize" in problem.message and "tiny" in problem.message
