"""Tests of the PatchCore plugin on the toy data (fast) and of its paper profile (no weights)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from toy_plugins import load_toy

from harness import TrainSet, WeightsNotFoundError
from harness.data import ImageCache, read_image, resize_image, to_tensor
from harness.testing import check_method, fit_context
from harness_patchcore.model import PatchCore
from harness_patchcore.plugin import harness_methods

SIZE = 64
(SPEC,) = harness_methods()


def _settings(profile="tiny", **overrides):
    # ResNet-18 layer2 + layer3 at 64 px keep the toy bank small and the test fast; the coreset
    # ratio is the paper's 10%.
    base = dict(backbone="resnet18", image_size=SIZE, backbone_layers=(2, 3), pretrain_embed_dim=64,
                target_embed_dim=64, coreset_ratio=0.1) if profile == "tiny" else {}
    return SPEC.resolve(profile, {**base, **overrides})


def _context(tmp_path, settings, profile="tiny"):
    return fit_context(settings, tmp_path, profile=profile, weights_dir=tmp_path / "weights")


def _toy():
    index = load_toy()
    train = [s for cat in index.categories.values() for s in cat.train]
    test = [s for cat in index.categories.values() for s in cat.test]
    images = to_tensor([resize_image(read_image(s.image), (SIZE, SIZE)) for s in test])
    return TrainSet("toy", train, (SIZE, SIZE), ImageCache()), images, [s.category for s in test], \
        np.array([s.label for s in test])


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    torch.manual_seed(123)
    train, images, categories, labels = _toy()
    settings = _settings()
    method = PatchCore(settings).to("cpu")
    context = _context(tmp_path_factory.mktemp("pc"), settings)
    method.fit(train, context)
    method.eval()
    return method, context, images, categories, labels


def test_spec_is_complete():
    assert SPEC.name == "patchcore" and set(SPEC.profiles) >= {"paper", "tiny"}
    for profile in SPEC.profiles.values():
        assert set(profile) <= set(SPEC.schema.names)


def test_patchcore_passes_the_conformance_checks(tmp_path):
    check_method(SPEC, overrides=dict(backbone="resnet18", image_size=32, backbone_layers=(1, 2),
                                      pretrain_embed_dim=32, target_embed_dim=32), workdir=tmp_path)


def test_fit_predict_shapes_and_separation(fitted):
    method, context, images, categories, labels = fitted
    out = method.predict(images, categories)
    maps, scores = out.anomaly_maps, out.image_scores
    assert maps.shape == (len(images), SIZE, SIZE) and scores.shape == (len(images),)
    assert torch.isfinite(maps).all() and torch.isfinite(scores).all()
    assert scores[labels == 1].mean() > scores[labels == 0].mean()
    assert context.info["backbone_init"] == "random"
    bank = context.info["memory_bank"]
    assert bank["coreset"] == round(0.1 * bank["patches"]) == method.bank.shape[0]


def test_state_dict_round_trip(fitted, tmp_path):
    method, _, images, categories, _ = fitted
    path = tmp_path / "fit.pt"
    torch.save(method.state_dict(), path)
    # A fresh object built from another random state must reproduce the fit exactly.
    torch.manual_seed(999)
    restored = PatchCore(_settings()).to("cpu")
    restored.load_state_dict(torch.load(path, weights_only=True))
    restored.eval()
    a, b = method.predict(images[:4], categories[:4]), restored.predict(images[:4], categories[:4])
    assert torch.equal(a.anomaly_maps, b.anomaly_maps) and torch.equal(a.image_scores, b.image_scores)


def test_fit_is_reproducible_from_the_seed(fitted, tmp_path):
    method, _, images, categories, _ = fitted
    train, *_ = _toy()
    torch.manual_seed(7)  # a different global state must not matter: fit re-seeds the backbone
    other = PatchCore(_settings()).to("cpu")
    other.fit(train, _context(tmp_path, _settings()))
    other.eval()
    assert torch.allclose(other.predict(images[:4], categories[:4]).image_scores,
                          method.predict(images[:4], categories[:4]).image_scores)


def test_paper_profile_builds_on_meta_device():
    with torch.device("meta"):
        method = PatchCore(SPEC.resolve("paper"))
    count = method.parameter_count()["backbone"]
    # The full wide_resnet50_2 has 68.88 M parameters, of which layer4 and fc (not built with
    # out_indices=(2, 3)) hold 44.02 M: stem + layer1..layer3 = 24.86 M.
    assert 24.5e6 < count < 25.2e6, count
    assert method.input_size == (256, 256)


def test_paper_profile_without_weights_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HARNESS_WEIGHTS", raising=False)
    settings = SPEC.resolve("paper", {"image_size": 32})
    train, *_ = _toy()
    with torch.device("meta"):
        method = PatchCore(settings)
    with pytest.raises(WeightsNotFoundError) as err:
        method.fit(train, _context(tmp_path, settings, profile="paper"))
    message = str(err.value)
    assert "wide_resnet50_2-95faca4d.pth" in message and str(tmp_path / "weights") in message
    assert "harness weights pull" in message and "--weights random" in message


def test_paper_weights_are_loaded_from_disk(tmp_path, monkeypatch):
    """A checkpoint in the torchvision layout is found in the weights folder and loaded."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    # resnet18 stands in for wide_resnet50_2 to keep the test fast; the loading code is the same.
    settings = _settings(backbone="resnet18", backbone_pretrained=True)
    import timm

    full = timm.create_model("resnet18", pretrained=False)
    (tmp_path / "weights").mkdir()
    torch.save(full.state_dict(), tmp_path / "weights" / "resnet18.pth")
    train, images, categories, _ = _toy()
    method = PatchCore(settings).to("cpu")
    context = _context(tmp_path, settings, profile="paper")
    method.fit(train, context)
    assert context.info["backbone_init"] == "imagenet"
    assert torch.equal(method.backbone.state_dict()["conv1.weight"], full.state_dict()["conv1.weight"])
