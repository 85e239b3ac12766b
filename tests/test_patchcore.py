"""Tests of the PatchCore plugin on the toy data (fast) and of its paper profile (no weights)."""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from toy_plugins import load_toy

from harness import Sample, TrainSet, WeightsNotFoundError
from harness.data import ImageCache, read_image, resize_image, to_tensor
from harness.testing import check_method, fit_context
from harness.engine.weights import WeightsResolver, verify
from harness_patchcore.model import PatchCore, aggregate_patches
from harness_patchcore.plugin import harness_methods
from harness_patchcore.weightfiles import WRN50_V1

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


def test_patchcore_with_the_centre_crop_passes_the_conformance_checks(tmp_path):
    check_method(SPEC, overrides=dict(backbone="resnet18", image_size=32, center_crop=24, backbone_layers=(1, 2),
                                      pretrain_embed_dim=32, target_embed_dim=32, num_neighbours=2,
                                      distance="euclidean"), workdir=tmp_path)


def test_paper_profile_follows_the_authors_code():
    paper = SPEC.resolve("paper")
    assert paper.image_size == 256 and paper.center_crop == 224 and paper.interpolation == "bilinear"
    assert paper.backbone == "wide_resnet50_2" and paper.backbone_layers == (2, 3) and paper.patchsize == 3
    assert paper.pretrain_embed_dim == paper.target_embed_dim == 1024 and paper.coreset_ratio == 0.1
    assert paper.distance == "squared" and paper.num_neighbours == 1 and paper.coreset_starting_points == 10
    choices = {s.name for s in SPEC.settings if s.choice}
    assert {"center_crop", "distance", "interpolation", "coreset_starting_points"} <= choices


# ---------------------------------------------------------------------------------------------- local aggregation

def test_aggregation_weights_the_centre_as_the_authors_code_does():
    """layer2-like (C -> 2C values, windows of 4.5) and layer3-like (C*9 -> C, windows of 9) pooling."""
    gen = torch.Generator().manual_seed(0)
    first = torch.randn(1, 4, 5, 5, generator=gen)      # 4 channels * 9 = 36 values -> 8 (windows of 4.5)
    second = torch.randn(1, 8, 5, 5, generator=gen)     # 8 channels * 9 = 72 values -> 8 (windows of 9)
    out = aggregate_patches([first, second], patchsize=3, pretrain_dim=8, target_dim=8)
    assert out.shape == (1, 5, 5, 8)
    padded1, padded2 = F.pad(first, (1, 1, 1, 1)), F.pad(second, (1, 1, 1, 1))
    for (y, x) in [(2, 2), (0, 0), (4, 3)]:
        n1 = padded1[0, :, y:y + 3, x:x + 3].reshape(4, 9)  # zero-padded neighbourhood, row-major
        n2 = padded2[0, :, y:y + 3, x:x + 3].reshape(8, 9)
        # MeanMapper of the first layer: per channel, the first five and the last five entries.
        halves = torch.stack([n1[:, :5].mean(1), n1[:, 4:].mean(1)], 1).reshape(8)
        means = n2.mean(1)                                 # plain 3x3 means of the second layer
        # Aggregator: [halves, means] (16 values) pooled to 8 = means of consecutive pairs.
        expected = torch.cat([halves, means]).reshape(8, 2).mean(1)
        assert torch.allclose(out[0, y, x], expected, atol=1e-6), (y, x)
        # So the first layer's channel c weighs its centre 0.2 and each neighbour 0.1.
        weights = torch.full((9,), 0.1)
        weights[4] = 0.2
        assert torch.allclose(out[0, y, x, :4], (n1 * weights).sum(1), atol=1e-6)


def test_aggregation_resizes_unfolded_patches_of_later_layers():
    gen = torch.Generator().manual_seed(1)
    fine, coarse = torch.randn(2, 3, 8, 8, generator=gen), torch.randn(2, 6, 4, 4, generator=gen)
    out = aggregate_patches([fine, coarse], patchsize=3, pretrain_dim=6, target_dim=6)
    assert out.shape == (2, 8, 8, 6)
    # The coarse layer's 3x3 means (zero padded), resized bilinearly, pooled in adjacent channel pairs.
    means = F.interpolate(F.avg_pool2d(coarse, 3, 1, 1), size=(8, 8), mode="bilinear", align_corners=False)
    assert torch.allclose(out[..., 3:], means.permute(0, 2, 3, 1).reshape(2, 8, 8, 3, 2).mean(-1), atol=1e-5)


# ---------------------------------------------------------------------------------------------- crop and distance

def test_centre_crop_scores_the_border_as_the_lowest_score(tmp_path):
    train, images, categories, _ = _toy()
    settings = _settings(center_crop=48, train_batch_size=8)
    method = PatchCore(settings).to("cpu")
    method.fit(train, _context(tmp_path, settings))
    method.eval()
    assert method.crop(images).shape[-2:] == (48, 48)
    out = method.predict(images[:3], categories[:3])
    maps = out.anomaly_maps
    assert maps.shape == (3, SIZE, SIZE)
    inner = maps[:, 8:56, 8:56]
    border = maps.clone()
    border[:, 8:56, 8:56] = float("nan")
    lowest = inner.flatten(1).amin(1)
    ring = border.flatten(1)
    ring = ring[~torch.isnan(ring)].reshape(3, -1)
    assert torch.equal(ring, lowest[:, None].expand_as(ring))
    assert (inner.flatten(1).amax(1) > lowest).all()


def test_squared_distance_squares_the_euclidean_scores(fitted):
    method, _, images, categories, _ = fitted
    squared = method.predict(images[:4], categories[:4])
    euclid = PatchCore(_settings(distance="euclidean"))
    euclid.load_state_dict(method.state_dict())
    euclid.to("cpu").eval()
    plain = euclid.predict(images[:4], categories[:4])
    assert torch.allclose(squared.image_scores, plain.image_scores ** 2, rtol=1e-5)
    # The maps are smoothed after squaring, so they are not the squares of the plain maps.
    assert not torch.allclose(squared.anomaly_maps, plain.anomaly_maps ** 2, rtol=1e-3)


def test_fit_predict_shapes_and_separation(fitted):
    method, context, images, categories, labels = fitted
    out = method.predict(images, categories)
    maps, scores = out.anomaly_maps, out.image_scores
    assert maps.shape == (len(images), SIZE, SIZE) and scores.shape == (len(images),)
    assert torch.isfinite(maps).all() and torch.isfinite(scores).all()
    assert scores[labels == 1].mean() > scores[labels == 0].mean()
    assert context.info["backbone_init"] == "random"
    bank = context.info["memory_bank"]
    # The authors' sampler keeps int(N * ratio) patches.
    assert bank["coreset"] == int(0.1 * bank["patches"]) == method.bank.shape[0]


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


def test_v2_weights_are_refused_by_name_and_by_sha256(tmp_path):
    """The paper used torchvision's V1 file; V2 (another recipe) is refused, also when renamed."""
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "wide_resnet50_2-9ba9bcbe.pth").write_bytes(b"v2 stand-in")
    resolver = WeightsResolver(weights)
    with pytest.raises(WeightsNotFoundError, match="another version"):
        resolver.resolve(WRN50_V1, {})
    assert "9ba9bcbe" in WRN50_V1.refuse_sha256
    # Renamed: a file under the accepted name whose sha256 is a refused one. A real V2 file's digest
    # starts with 9ba9bcbe; the stand-in's digest is put in the refused list to exercise the check.
    renamed = weights / "wide_resnet50_2-95faca4d.pth"
    renamed.write_bytes(b"renamed stand-in")
    digest = hashlib.sha256(renamed.read_bytes()).hexdigest()
    file = dataclasses.replace(WRN50_V1, refuse_sha256=(digest[:8],))
    with pytest.raises(WeightsNotFoundError, match="sha256"):
        WeightsResolver(weights).resolve(file, {})
    assert verify(WeightsResolver(weights).locate(file, {}))[0] == "mismatch"
    # An accepted file is recorded with its sha256.
    ok = WeightsResolver(weights)
    assert ok.resolve(WRN50_V1, {}) == renamed
    assert ok.used[0]["sha256"] == digest


def test_non_square_images_keep_their_aspect_and_the_map_covers_the_whole_image(tmp_path):
    """The authors' Resize(256) + CenterCrop(224) on a 2:3 image: 256 x 384, crop in the middle, map pasted back."""
    settings = _settings(center_crop=48, train_batch_size=4, resize_mode="shorter_side")
    rng = np.random.default_rng(0)
    samples = [Sample(f"c/train/good/{i}", "c", "train", 0, "good",
                      image=lambda a=(rng.random((40, 60, 3)) * 255).astype(np.uint8): a) for i in range(4)]
    method = PatchCore(settings)
    train = TrainSet("wide", samples, method.input_size, ImageCache(), **method.resize_rule())
    assert tuple(train[0][0].shape) == (3, SIZE, 96)  # shorter side 64, aspect 2:3 kept
    context = fit_context(settings, tmp_path)
    method.fit(train, context)
    method.eval()
    assert context.info["center_crop"]["image"] == [SIZE, 96] and context.info["resize"]["mode"] == "shorter_side"
    images = torch.stack([train[i][0] for i in range(2)])
    maps = method.predict(images, ["c", "c"]).anomaly_maps
    assert maps.shape == (2, SIZE, 96)
    # The crop is centred (torchvision's rounding): rows 8..56, columns 24..72; outside, the lowest score.
    inside = maps[:, 8:56, 24:72]
    outside = maps.clone()
    outside[:, 8:56, 24:72] = float("nan")
    ring = outside.flatten(1)
    ring = ring[~torch.isnan(ring)].reshape(2, -1)
    assert torch.equal(ring, inside.flatten(1).amin(1)[:, None].expand_as(ring))


def test_paper_profile_resizes_the_shorter_side():
    paper = SPEC.resolve("paper")
    assert paper.resize_mode == "shorter_side" and paper.antialias is True and paper.center_crop == 224
    assert SPEC.resolve("tiny").resize_mode == "square"
