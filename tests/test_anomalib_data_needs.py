"""Data a method needs besides its dataset (``harness.DataNeed``) is checked by the preflight,
before any job runs: DiffusionAD's and DRAEM's DTD (``dtd_root``), EfficientAD's ImageNette."""

from __future__ import annotations

import pytest

from harness import DataNeed
from harness.cli import main


def _run(tmp_path, *args):
    return main(["run", *args, "--results-dir", str(tmp_path / "r"), "--cache-dir", str(tmp_path / "c"),
                 "--no-progress", "--skip-data-check"])


def test_a_data_need_names_the_setting_what_it_is_and_how_to_get_it(tmp_path):
    need = DataNeed(setting="dtd_root", what="DTD", how="download it", random_weights_fallback="procedural")
    assert "setting dtd_root is empty" in need.problem("m", "", random_weights=False)
    assert "--set m.dtd_root=PATH" in need.problem("m", "", random_weights=False)
    assert "is not an existing folder" in need.problem("m", str(tmp_path / "nope"), random_weights=False)
    assert need.problem("m", str(tmp_path), random_weights=False) is None
    assert need.problem("m", "", random_weights=True) is None  # waived: procedural textures stand in


def test_diffusionad_paper_without_dtd_stops_in_the_preflight(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = _run(tmp_path, "--methods", "diffusionad", "--profile", "paper")
    err = capsys.readouterr().err
    assert code == 2, err
    assert "diffusionad needs the Describable Textures Dataset" in err and "dtd_root" in err
    assert not (tmp_path / "r").exists()  # nothing ran, nothing was written


def test_diffusionad_with_dtd_or_its_opt_out_passes_the_data_check(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    dtd = tmp_path / "dtd"
    dtd.mkdir()
    for args in (["--set", f"diffusionad.dtd_root={dtd}"], ["--set", "diffusionad.texture_source=procedural"]):
        code = _run(tmp_path, "--methods", "diffusionad", "--profile", "paper", "--dry-run", *args)
        out = capsys.readouterr()
        assert code == 0 and "dtd_root" not in out.err, out.err
    # The tiny profile opts out (procedural textures): the main job needs no download.
    assert _run(tmp_path, "--methods", "diffusionad", "--dry-run") == 0


def test_draem_and_efficientad_paper_need_dtd_and_imagenette(tmp_path, capsys, monkeypatch):
    pytest.importorskip("anomalib")
    monkeypatch.chdir(tmp_path)
    # --weights random waives the data needs (procedural textures stand in), so a fast dev run of
    # the paper profile needs no download.
    code = _run(tmp_path, "--methods", "draem,efficientad", "--profile", "paper", "--weights", "random", "--dry-run")
    assert code == 0
    code = _run(tmp_path, "--methods", "draem,efficientad", "--profile", "paper", "--dry-run",
                "--set", "efficientad.backbone_pretrained=false")
    out = capsys.readouterr().out
    assert "draem needs the Describable Textures Dataset" in out and "--set draem.dtd_root=PATH" in out
    assert "efficientad needs ImageNette" in out and "imagenet_dir" in out


def test_without_anomalib_its_methods_are_simply_absent(monkeypatch):
    import importlib.util

    import harness_anomalib.plugin as plugin

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "anomalib" else real(name, *a))
    assert plugin.harness_methods() == []
    from harness.engine.registry import load_registry

    registry = load_registry()
    assert "padim" not in registry.methods and "patchcore" in registry.methods
    assert not [p for p in registry.problems if p.plugin == "anomalib"]
