"""The anomalib adapter (plugins/anomalib): names, typed settings, raw maps, protocols, weights,
checkpoints. Skipped when anomalib is not installed (``pip install -e '.[anomalib]'``)."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("anomalib")

from harness.method import FitContext  # noqa: E402
from harness.engine.support.progress import Progress  # noqa: E402
from harness.engine.registry import load_registry  # noqa: E402
from harness.engine.weights import WeightsResolver  # noqa: E402

#: The names ``results/reported/`` uses for the methods anomalib implements.
NAMES = ("draem", "rd4ad", "padim", "fastflow", "cfa", "cflow", "stfpm", "csflow", "winclip", "dinomaly", "inpformer",
         "uninet", "anomalydino", "supersimplenet", "glass", "efficientad", "dsr", "anomalib_patchcore")


@pytest.fixture(scope="module")
def registry():
    return load_registry()


def _method(registry, name, profile="tiny", **overrides):
    spec = registry.method(name)
    settings = spec.resolve(profile, overrides)
    return spec, settings, spec.factory(settings)


def _context(tmp_path, settings, **kwargs):
    from harness.engine.support.checkpoint import TrainingCheckpoint

    return FitContext(device=torch.device("cpu"), seed=0, profile="tiny", settings=settings, cache_dir=tmp_path,
                      weights=WeightsResolver(tmp_path / "weights"), progress=Progress(False),
                      checkpoint=TrainingCheckpoint(tmp_path / "checkpoints", interval=1e9), **kwargs)


def _train(n=6, size=64):
    from harness.data import ImageCache, TrainSet
    from harness_synthetic.plugin import load_synthetic

    index = load_synthetic(None, ["weave", "nut"])
    samples = [s for c in index.categories.values() for s in c.train[:n]]
    return TrainSet("synthetic", samples, (size, size), ImageCache())


def test_every_anomalib_model_is_registered_under_its_reported_name(registry):
    from harness_anomalib.plugin import installed

    assert installed()
    for name in NAMES:
        assert name in registry.methods, name
        assert registry.methods[name].plugin.name == "anomalib"
    # The harness's own PatchCore stays beside anomalib's.
    assert "patchcore" in registry.methods


def test_the_entry_point_module_imports_nothing_heavy():
    import subprocess
    import sys

    code = ("import sys, harness_anomalib.plugin as p; p.harness_methods(); "
            "print(sorted(m for m in ('anomalib', 'lightning', 'timm', 'open_clip') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_settings_are_typed_from_the_constructor_signatures(registry):
    from harness_anomalib.signatures import TABLE, regenerate

    # The stored table is what the installed anomalib's signatures give.
    assert json.loads(TABLE.read_text()) == json.loads(json.dumps(regenerate()))
    schema = registry.method("padim").schema
    assert schema.setting("n_features").type is int and schema.setting("n_features").default == 0
    assert schema.setting("layers").type == tuple[str, ...]
    assert schema.setting("layers").default == ("layer1", "layer2", "layer3")
    rd = registry.method("rd4ad").schema.setting("anomaly_map_mode")
    assert rd.type is str and set(rd.choices) == {"add", "multiply"}
    # anomalib's dtype 'precision' does not shadow the harness's autocast setting.
    assert "model_precision" in registry.method("dinomaly").schema
    # --set values are parsed by the declared type.
    assert registry.method("padim").schema.setting("layers").parse("layer1,layer3") == ("layer1", "layer3")


def test_describe_lists_the_settings_typed(registry):
    from harness.cli import describe_method

    info = describe_method(registry.method("cflow"), "paper")
    rows = {row["name"]: row for row in info["settings_table"]}
    assert rows["coupling_blocks"]["type"] == "int" and rows["coupling_blocks"]["value"] == 8
    assert info["typed_settings"] is True


class _StubModel(torch.nn.Module):
    """Returns a fixed raw map (ties, values far outside [0, 1]) and raw scores."""

    def __init__(self, side):
        super().__init__()
        self.side = side
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, images):
        from anomalib.data import InferenceBatch

        b = images.shape[0]
        base = torch.arange(self.side * self.side, dtype=torch.float32).reshape(self.side, self.side) // 7
        maps = (base * 37.5 + 1000.0).expand(b, 1, self.side, self.side).clone()
        scores = torch.arange(b, dtype=torch.float32) * 1e4 - 3.0
        return InferenceBatch(pred_score=scores, anomaly_map=maps)


def test_a_raw_map_reaches_the_metric_engine_unchanged(registry):
    spec, settings, method = _method(registry, "padim")
    # Never anomalib's pipeline: no post-processor (min-max with a clamp), evaluator or visualizer.
    assert method.module.post_processor is None
    assert method.module.evaluator is None and method.module.visualizer is None
    stub = _StubModel(64)
    method.module.model = stub
    images = torch.rand(4, 3, 64, 64)
    prediction = method.predict(images, ["weave"] * 4)
    expected = stub(method.transform(images))
    assert torch.equal(prediction.anomaly_maps, expected.anomaly_map[:, 0])
    assert torch.equal(prediction.image_scores, expected.pred_score)
    # anomalib would have min-max normalised and clamped these; the engine ranks the raw values.
    assert prediction.anomaly_maps.max() > 1.0 and prediction.image_scores.min() < 0.0


def test_a_centre_cropping_model_puts_its_map_back_on_the_full_image(registry):
    from harness.toolkit.crops import center_crop_box

    spec, settings, method = _method(registry, "dinomaly")
    assert settings.image_size == 64 and settings.center_crop == 56
    method.module.model = _StubModel(56)
    images = torch.rand(2, 3, 64, 64)
    prediction = method.predict(images, ["nut", "nut"])
    box = center_crop_box((64, 64), 56)
    inner = prediction.anomaly_maps[:, box.top:box.top + 56, box.left:box.left + 56]
    raw = _StubModel(56)(images).anomaly_map[:, 0]
    assert prediction.anomaly_maps.shape == (2, 64, 64)
    assert torch.equal(inner, raw)
    # The ring outside the crop holds each image's lowest score.
    assert torch.all(prediction.anomaly_maps[:, 0, :] == raw.amin(dim=(1, 2))[:, None])


def test_protocols(registry, tmp_path, capsys, monkeypatch):
    from harness.cli import main

    for name in ("winclip", "anomalydino"):
        assert registry.method(name).protocols == ("fewshot",)
    assert registry.method("dinomaly").paper_protocol == "multiclass"
    assert registry.method("padim").protocols == ("multiclass", "fewshot", "oneclass")
    monkeypatch.chdir(tmp_path)
    code = main(["run", "--methods", "winclip", "--protocol", "multiclass", "--results-dir", str(tmp_path / "r"),
                 "--cache-dir", str(tmp_path / "c"), "--no-progress"])
    assert code == 2 and "does not support" in capsys.readouterr().err


def test_methods_all_under_multiclass_skips_the_fewshot_models_with_a_reason(tmp_path, capsys, monkeypatch):
    from harness.cli import main

    monkeypatch.chdir(tmp_path)
    code = main(["run", "--methods", "all", "--protocol", "multiclass", "--dry-run", "--results-dir",
                 str(tmp_path / "r"), "--cache-dir", str(tmp_path / "c"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 0
    for name in ("winclip", "anomalydino"):
        assert f"note: {name} does not support the multiclass protocol; skipped" in err


def test_fewshot_references_are_exactly_the_shots_of_each_category(registry, tmp_path):
    from harness_anomalib import hooks

    spec, settings, method = _method(registry, "padim")
    seen = {}

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("visual_embeddings", torch.zeros(0))
            self.k_shot = 0

        def setup(self, category, references):
            seen[category] = references.clone()
            self.visual_embeddings = references.mean(dim=(2, 3))

        def forward(self, images):
            from anomalib.data import InferenceBatch

            score = (images.mean(dim=(1, 2, 3)) - self.visual_embeddings.mean()).abs()
            return InferenceBatch(pred_score=score, anomaly_map=score[:, None, None, None].expand(-1, 1, 4, 4))

    method.module.model = Recorder()
    train = _train(n=2)
    hooks.fit_fewshot(method, train, _context(tmp_path, settings))
    assert sorted(seen) == ["nut", "weave"]
    for category, refs in seen.items():
        expected = torch.stack([train[i][0] for i in range(len(train)) if train[i][1] == category])
        assert torch.equal(refs, method.transform(expected))
    prediction = hooks.predict_fewshot(method, torch.stack([train[0][0], train[3][0]]), [train[0][1], train[3][1]])
    assert prediction.anomaly_maps.shape == (2, 4, 4)


def test_weights_are_declared_pinned_and_read_from_disk_only(registry, tmp_path):
    from harness_anomalib.offline import UndeclaredWeightsError, weights_from_disk
    from harness_anomalib.plugin import weight_files

    def files(name, profile="paper", **overrides):
        spec = registry.method(name)
        return {f.key: f for f in spec.weight_files(spec.resolve(profile, overrides))}

    # anomalib's wide_resnet50_2 is timm's racm_in1k file, not torchvision's V1 of PatchCore's paper.
    assert files("anomalib_patchcore")["wide_resnet50_2"].repo_id == "timm/wide_resnet50_2.racm_in1k"
    assert files("padim")["resnet18"].repo_id == "timm/resnet18.a1_in1k"
    assert files("dinomaly")["vit_base_patch14_reg4_dinov2"].repo_id == "timm/vit_base_patch14_reg4_dinov2.lvd142m"
    assert "wide_resnet50_2-9ba9bcbe.pth" in files("uninet")
    assert files("efficientad")["teacher"].filenames == ("pretrained_teacher_small.pth",)
    assert "clip" in files("winclip")
    for name in registry.methods:
        if registry.methods[name].plugin.name == "anomalib":
            assert files(name, "tiny") == {}, name
    del weight_files

    # A paper build reads the declared file; an undeclared request is an error, never a download.
    import timm

    reference = timm.create_model("resnet18", pretrained=False, features_only=True)
    torch.nn.init.constant_(reference.conv1.weight, 0.125)
    full = timm.create_model("resnet18", pretrained=False)
    full.load_state_dict({**full.state_dict(), **{k: v for k, v in reference.state_dict().items()
                                                  if k in full.state_dict()}})
    from safetensors.torch import save_file

    path = tmp_path / "resnet18.safetensors"
    save_file(full.state_dict(), str(path))
    spec = registry.method("padim")
    settings = spec.resolve("paper", {"image_size": 64})
    method = spec.factory(settings)
    module = method._build({"resnet18": path}, None)
    assert torch.all(module.model.feature_extractor.feature_extractor.conv1.weight == 0.125)
    with pytest.raises(UndeclaredWeightsError, match="resnet18"):
        with weights_from_disk({"wide_resnet50_2": path}):
            timm.create_model("resnet18", pretrained=True)


def test_a_fit_is_checkpointed_at_epoch_ends_and_resumes(registry, tmp_path):
    from harness.engine.support.state_io import load_state

    spec, settings, method = _method(registry, "stfpm", epochs=2, train_batch_size=6)
    train = _train()
    context = _context(tmp_path, settings)
    method.fit(train, context)
    saved = sorted((tmp_path / "checkpoints").glob("checkpoint-*.safetensors"))
    assert saved, "no checkpoint written"
    state, info = load_state(saved[-1])
    assert info["stage"] == "anomalib" and info["epoch"] == 2
    assert any(k.startswith("model.") for k in state["objects"]["module"])  # the module's weights
    assert state["objects"]["optimisers"]["optimisers"]  # and the optimiser's state
    # A rerun with the same checkpoints finds the stage done and restores the same weights.
    again = spec.factory(settings)
    again.fit(train, _context(tmp_path, settings))
    for key, value in method.module.state_dict().items():
        assert torch.equal(value, again.module.state_dict()[key]), key


@pytest.mark.parametrize("name", ["padim", "draem"])
def test_conformance(registry, name, tmp_path):
    """The harness's contract checks: meta build, fit/predict, exact state round trip, seeded refit."""
    from harness.testing import check_method

    check_method(registry.method(name), profile="tiny", workdir=tmp_path, image_size=64)


@pytest.mark.slow
def test_tiny_end_to_end_run_of_a_few_models(tmp_path, monkeypatch):
    """A memory bank, a student-teacher model and a synthesis model, through the whole runner."""
    from harness.cli import main

    monkeypatch.chdir(tmp_path)
    methods = ("padim", "stfpm", "glass")
    code = main(["run", "--methods", ",".join(methods), "--protocol", "multiclass", "--results-dir",
                 str(tmp_path / "r"), "--cache-dir", str(tmp_path / "c"), "--no-progress", "--no-leaderboard",
                 "--save-maps", "none"])
    assert code == 0
    for method in methods:
        (path,) = (tmp_path / "r" / "records").rglob(f"{method}/tiny-seed0.json")
        record = json.loads(path.read_text())
        assert record["status"] == "ok", record["error"]
        info = record["method_info"]
        assert info["anomalib_version"].startswith("2.7") and info["anomalib_class"]
        assert info["backbone_weights"].startswith("random")
        assert record["efficiency"]["fps"] > 0 and record["efficiency"]["latency_ms"] > 0
        assert 0.0 <= record["mean"]["image_auroc"] <= 1.0


def test_an_interrupted_fit_resumes_after_its_last_finished_epoch(registry, tmp_path, monkeypatch):
    from harness.engine.support.checkpoint import Position

    spec, settings, method = _method(registry, "stfpm", epochs=2, train_batch_size=6)
    train = _train()
    original = Position.save

    def save_then_die(self):
        original(self)
        if self.epoch == 1:
            raise RuntimeError("killed after epoch 1")

    monkeypatch.setattr(Position, "save", save_then_die)
    with pytest.raises(RuntimeError, match="killed"):
        method.fit(train, _context(tmp_path, settings))
    monkeypatch.setattr(Position, "save", original)
    again = spec.factory(settings)
    context = _context(tmp_path, settings)
    again.fit(train, context)
    assert context.checkpoint.resumed_from["epoch"] == 1
    assert context.info["trainer"]["epochs"] == 2 and context.info["trainer"]["max_epochs"] == 1


def test_toy_width_narrows_efficientads_pdns_and_keeps_their_output_grid(registry):
    """tiny's EfficientAD: teacher and student hidden layers at toy width, outputs and map grid anomalib's."""
    from anomalib.models.image.efficient_ad.torch_model import SmallPatchDescriptionNetwork

    _, settings, method = _method(registry, "efficientad")
    teacher, student = method.module.model.teacher, method.module.model.student
    assert [teacher.conv1.out_channels, teacher.conv2.out_channels, teacher.conv3.out_channels] == [16, 32, 32]
    assert teacher.conv4.out_channels == settings["teacher_out_channels"]
    assert student.conv4.out_channels == 2 * settings["teacher_out_channels"]
    x = torch.rand(1, 3, 256, 256)
    full = SmallPatchDescriptionNetwork(out_channels=settings["teacher_out_channels"])
    assert teacher(x).shape == full(x).shape


def test_toy_width_with_pretrained_files_is_refused_by_name(registry, tmp_path):
    """A toy-width network cannot take anomalib's pretrained teacher: the fit says which setting to change."""
    _, settings, method = _method(registry, "efficientad", profile="paper", toy_width=16)
    with pytest.raises(ValueError, match=r"efficientad\.toy_width=0"):
        from harness_anomalib import hooks

        hooks.before_fit(method, _train(), _context(tmp_path, settings))


def test_toy_width_narrows_both_of_dsrs_unets(registry):
    """tiny's DSR: its anomaly-detection and upsampling U-Nets at toy width too (anomalib fixes them at 64)."""
    _, settings, method = _method(registry, "dsr")
    model = method.module.model
    for unet in (model.anomaly_detection_module, model.upsampling_module):
        widths = {m.out_channels for m in unet.modules() if isinstance(m, torch.nn.Conv2d)}
        assert max(widths) <= 8 * settings["toy_width"] < 8 * 64, widths
