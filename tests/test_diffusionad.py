"""Tests of the DiffusionAD plugin: sizes, anomaly synthesis, scoring rule, a tiny fit and predict."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

try:
    import harness_diffusionad  # noqa: F401
except ImportError:  # not installed: import from the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins" / "diffusionad"))

from harness import FitContext, TrainSet  # noqa: E402
from harness.data import ImageCache, Sample  # noqa: E402
from harness.progress import Progress  # noqa: E402
from harness_diffusionad import synthesis  # noqa: E402
from harness_diffusionad.model import DiffusionAD, top_k_mean  # noqa: E402
from harness_diffusionad.plugin import PROFILES, harness_methods  # noqa: E402

#: Smallest settings that still run every code path, for fast tests.
MICRO = {**PROFILES["tiny"], "image_size": 32, "base_channels": 8, "channel_mults": (1, 2), "norm_groups": 4,
         "attention_resolutions": (16,), "seg_base_channels": 8, "seg_depth": 3, "epochs": 1, "batch_size": 4,
         "top_k": 10}


def test_paper_parameter_counts_match_authors():
    with torch.device("meta"):
        method = DiffusionAD(PROFILES["paper"])
    counts = method.parameter_count()
    assert abs(counts["denoiser"] / 131.7e6 - 1) < 0.05
    assert abs(counts["segmenter"] / 28.4e6 - 1) < 0.05


def test_spec_declares_protocols_and_profiles():
    (spec,) = harness_methods()
    assert spec.name == "diffusionad"
    assert set(spec.protocols) == {"multiclass", "oneclass", "fewshot"}
    for profile in spec.profiles.values():
        assert set(profile) <= set(spec.settings_help)


def _object_image(size: int = 64) -> np.ndarray:
    """A bright disc on a dark background, (3, H, W) in [0, 1]."""
    yy, xx = np.mgrid[0:size, 0:size]
    disc = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 4) ** 2
    image = np.full((3, size, size), 0.1, dtype=np.float32)
    image[:, disc] = 0.8
    return image, disc


def test_synthetic_masks_lie_inside_the_foreground():
    image, disc = _object_image()
    rng = np.random.default_rng(0)
    textures = synthesis.TextureSource(None, (64, 64))
    fg = synthesis.foreground_mask(image, "disc", "auto", ())
    assert np.array_equal(fg, disc)
    hits = 0
    for _ in range(20):
        out, mask = synthesis.synthesize_one(image, "disc", rng, textures)
        assert not (mask & ~disc).any()
        # Outside the mask the image is untouched.
        assert np.allclose(out[:, ~mask], image[:, ~mask])
        hits += mask.any()
    assert hits >= 18


def test_textures_use_the_whole_image():
    rng = np.random.default_rng(1)
    texture = synthesis.procedural_texture((32, 32), rng).astype(np.float32)
    assert synthesis.foreground_mask(texture, "carpet", "auto", ("carpet",)).all()
    assert synthesis.foreground_mask(texture, "x", "whole").all()


def test_half_of_each_batch_is_synthetic():
    image, _ = _object_image(32)
    batch = torch.from_numpy(np.stack([image] * 7))
    out, masks, labels = synthesis.synthesize_batch(batch, ["disc"] * 7, np.random.default_rng(2),
                                                    synthesis.TextureSource(None, (32, 32)))
    assert int(labels.sum()) == 3
    assert masks[labels == 0].sum() == 0
    assert torch.equal(out[labels == 0], batch[labels == 0])
    assert out.shape == batch.shape and masks.shape == (7, 1, 32, 32)


def test_dtd_folder_is_used_when_given(tmp_path):
    from PIL import Image
    Image.fromarray(np.full((40, 50, 3), 200, np.uint8)).save(tmp_path / "a.jpg")
    source = synthesis.TextureSource(tmp_path, (16, 16))
    assert source.kind == "dtd"
    assert source.sample(np.random.default_rng(0)).shape == (3, 16, 16)
    assert synthesis.TextureSource("", (16, 16)).kind == "procedural"


def test_image_score_is_mean_of_top_50():
    maps = torch.zeros(2, 20, 20)
    maps[0].view(-1)[:50] = torch.arange(50, dtype=torch.float32) + 100  # 50 large values
    maps[0].view(-1)[50:] = 1.0
    maps[1].view(-1)[:] = torch.arange(400, dtype=torch.float32)
    scores = top_k_mean(maps, 50)
    assert scores[0] == pytest.approx(124.5)
    assert scores[1] == pytest.approx(float(np.arange(350, 400).mean()))
    assert top_k_mean(torch.ones(1, 5, 5), 50)[0] == 1.0  # fewer pixels than k: all of them


def _train_set(size: int) -> TrainSet:
    rng = np.random.default_rng(0)
    samples = []
    for c in ("disc", "weave"):
        for i in range(4):
            img = (rng.random((size, size, 3)) * 255).astype(np.uint8)
            samples.append(Sample(f"{c}/train/good/{i}", c, "train", 0, "good", image=lambda a=img: a))
    return TrainSet("t", samples, (size, size), ImageCache())


def _context(tmp_path, settings) -> FitContext:
    return FitContext(device=torch.device("cpu"), seed=0, profile="tiny", settings=settings, cache_dir=tmp_path,
                      weights=None, progress=Progress(False), pseudo_validation=lambda **_: None)


def test_tiny_fit_and_predict(tmp_path):
    torch.manual_seed(0)
    method = DiffusionAD(MICRO)
    context = _context(tmp_path, MICRO)
    method.fit(_train_set(32), context)
    assert context.info["synthesis_source"] == "procedural"
    assert context.info["levels"] == [200, 400] and context.info["steps"] == 2
    pred = method.predict(torch.rand(3, 3, 32, 32), ["disc"] * 3)
    assert pred.anomaly_maps.shape == (3, 32, 32) and pred.image_scores.shape == (3,)
    assert torch.isfinite(pred.anomaly_maps).all() and torch.isfinite(pred.image_scores).all()
    # Restoring the state gives the same predictions (inference noise is seeded).
    clone = DiffusionAD(MICRO)
    clone.load_state_dict(method.state_dict())
    clone.eval()
    images = torch.rand(2, 3, 32, 32)
    assert torch.allclose(method.predict(images, ["a", "b"]).anomaly_maps, clone.predict(images, ["a", "b"]).anomaly_maps)


def test_levels_and_combination_change_the_output():
    torch.manual_seed(0)
    images = torch.rand(2, 3, 32, 32)
    base = DiffusionAD(MICRO).eval()
    state = base.state_dict()
    outputs = {}
    for name, extra in {"code": {}, "levels": {"levels": (100, 200)}, "average": {"combination": "average"}}.items():
        method = DiffusionAD({**MICRO, **extra})
        method.load_state_dict(state)
        method.eval()
        outputs[name] = method.predict(images, ["a", "b"]).anomaly_maps
    assert not torch.allclose(outputs["code"], outputs["levels"])
    assert not torch.allclose(outputs["code"], outputs["average"])
    with pytest.raises(ValueError):
        DiffusionAD({**MICRO, "combination": "max"})
