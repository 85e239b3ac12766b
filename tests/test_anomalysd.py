"""Tests of the AnomalySD plugin: masks, threshold, fusion, prompts, weight loading, tiny fit/predict."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

try:
    import harness_anomalysd  # noqa: F401
except ImportError:  # not installed: import from the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins" / "anomalysd"))

from harness import FitContext, TrainSet, WeightsNotFoundError  # noqa: E402
from harness.data import ImageCache, Sample  # noqa: E402
from harness.progress import Progress  # noqa: E402
from harness.weights import WeightsResolver  # noqa: E402
from harness_anomalysd import masks as masks_mod  # noqa: E402
from harness_anomalysd import scoring  # noqa: E402
from harness_anomalysd.model import AnomalySD  # noqa: E402
from harness_anomalysd.plugin import PROFILES, harness_methods  # noqa: E402
from harness_anomalysd.prompts import builtin_prompt_entries, load_prompt_sets  # noqa: E402
from harness_anomalysd.weights import build_components, character_tokenizer  # noqa: E402

MVTEC = ("bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut", "pill", "screw", "tile",
         "toothbrush", "transistor", "wood", "zipper")
VISA = ("candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2", "pcb1", "pcb2", "pcb3", "pcb4",
        "pipe_fryum")
SYNTHETIC = ("weave", "grain", "tiles", "disc", "pcb", "nut")

#: The tiny profile cut further for unit tests: 32 px, one epoch, two scales.
MICRO = {**PROFILES["tiny"], "image_size": 32, "unet_epochs": 1, "decoder_epochs": 1, "scales": (1, 2),
         "num_inference_steps": 4, "eval_batch_size": 4, "inpaint_batch": 8}


# ---------------------------------------------------------------- spec and sizes

def test_spec_is_fewshot_only_and_documents_every_setting():
    (spec,) = harness_methods()
    assert spec.name == "anomalysd"
    assert spec.protocols == ("fewshot",)
    for profile in spec.profiles.values():
        assert set(profile) <= set(spec.settings_help)


def test_paper_profile_has_sd15_inpainting_sizes_on_meta_device():
    with torch.device("meta"):
        method = AnomalySD(PROFILES["paper"])
    counts = method.parameter_count()
    assert counts["unet"] == 859_535_364  # SD v1.5 inpainting UNet (9 input channels)
    assert abs(counts["vae"] / 83.65e6 - 1) < 0.01
    assert abs(counts["text_encoder"] / 123.06e6 - 1) < 0.01
    assert method.unet.config.in_channels == 9
    assert tuple(PROFILES["paper"]["scales"]) == (1, 2, 4, 8)


# ---------------------------------------------------------------- masks

@pytest.mark.parametrize("size,k", [((64, 64), 1), ((64, 64), 2), ((64, 64), 4), ((64, 64), 8), ((30, 45), 4)])
def test_grid_masks_cover_the_image_exactly_once(size, k):
    grid = masks_mod.grid_masks(*size, k)
    assert grid.shape == (k * k, *size)
    assert torch.equal(grid.sum(0), torch.ones(size))
    assert set(grid.unique().tolist()) <= {0.0, 1.0}
    # Every patch is a non-empty rectangle of about (H/k) x (W/k).
    for m in grid:
        rows, cols = torch.nonzero(m.sum(1)).flatten(), torch.nonzero(m.sum(0)).flatten()
        assert m.sum() == len(rows) * len(cols)
        assert abs(len(rows) - size[0] / k) <= 1 and abs(len(cols) - size[1] / k) <= 1


def test_variance_threshold_splits_two_clusters():
    rng = np.random.default_rng(0)
    low = rng.normal(1.0, 0.1, 300)
    high = rng.normal(5.0, 0.1, 20)
    values = torch.tensor(np.concatenate([low, high]), dtype=torch.float32)
    r = float(masks_mod.variance_threshold(values))
    assert low.max() < r < high.min()


def test_variance_threshold_minimises_the_papers_criterion():
    values = torch.tensor([0.0, 0.1, 0.2, 3.0, 3.3, 7.0])
    r = float(masks_mod.variance_threshold(values))

    def cost(t):
        hi, lo = values[values >= t], values[values < t]
        return float(hi.var(unbiased=False) + lo.var(unbiased=False))

    best = min(cost(float(t)) for t in values[1:])
    assert cost(r) == pytest.approx(best)
    # Constant maps give no split: nothing exceeds the threshold.
    assert not (torch.ones(5) > masks_mod.variance_threshold(torch.ones(5))).any()


def test_prototype_mask_is_binary_at_image_size():
    error = torch.zeros(2, 4, 4)
    error[0, 1, 2] = 10.0
    mask = masks_mod.prototype_mask(error, (16, 16))
    assert mask.shape == (2, 16, 16)
    assert mask[0].sum() == 16 and mask[0, 4:8, 8:12].all()
    assert mask[1].sum() == 0


def test_training_masks_respect_the_iou_threshold():
    rng = np.random.default_rng(0)
    fg = np.zeros((64, 64), dtype=bool)
    fg[16:48, 16:48] = True
    for _ in range(30):
        mask, gamma = masks_mod.random_training_mask(fg, rng)
        assert gamma in (0.0, 0.2, 0.5)
        assert masks_mod.mask_iou(mask, fg) > gamma


def test_foreground_of_an_object_and_of_a_texture():
    image = np.full((3, 32, 32), 0.1, dtype=np.float32)
    image[:, 8:24, 8:24] = 0.9
    fg = masks_mod.foreground_mask(image)
    assert fg[8:24, 8:24].all() and not fg[:8].any()
    assert masks_mod.foreground_mask(image, whole=True).all()


# ---------------------------------------------------------------- scoring

def test_harmonic_mean_and_fusion():
    a = torch.full((1, 2, 2), 1.0)
    b = torch.full((1, 2, 2), 3.0)
    hm = scoring.harmonic_mean([a, b])
    assert torch.allclose(hm, torch.full_like(a, 1.5))  # 2 / (1 + 1/3)
    # A zero at one scale pulls the harmonic mean to (nearly) zero, unlike an arithmetic mean.
    assert scoring.harmonic_mean([torch.zeros(1, 1, 1), torch.ones(1, 1, 1)]).item() < 1e-6
    fused = scoring.fuse(hm, torch.full_like(a, 10.0), 0.1)
    assert torch.allclose(fused, 0.9 * 1.5 + 0.1 * 10.0 * torch.ones_like(a))
    assert scoring.fuse(hm, None, 0.1) is hm


def test_scale_map_takes_each_pixel_from_its_own_patch():
    masks = masks_mod.grid_masks(4, 4, 2)
    distances = torch.stack([torch.full((4, 4), float(i + 1)) for i in range(4)])[None]  # (1, 4, 4, 4)
    s = scoring.scale_map(masks, distances)[0]
    assert s[0, 0] == 1 and s[0, 3] == 2 and s[3, 0] == 3 and s[3, 3] == 4


def test_lpips_distance_matches_the_package_and_never_downloads(monkeypatch):
    import torchvision

    def no_download(*args, **kwargs):
        raise AssertionError("LPIPS construction tried to fetch weights")

    monkeypatch.setattr(torchvision.models._api.WeightsEnum, "get_state_dict", no_download)
    model = scoring.build_lpips()
    x, y = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    assert torch.allclose(scoring.distance_map(model, x, y), model(x, y, normalize=True)[:, 0], atol=1e-6)
    assert torch.count_nonzero(scoring.distance_map(model, x, x)) == 0


def test_alexnet_trunk_loads_from_a_torchvision_checkpoint(tmp_path):
    from torchvision.models import alexnet

    reference = alexnet(weights=None)
    path = tmp_path / "alexnet-owt-7be5be79.pth"
    torch.save(reference.state_dict(), path)
    model = scoring.build_lpips()
    scoring.load_alexnet_trunk(model, path)
    assert torch.equal(model.net.slice2._modules["3"].weight, reference.features[3].weight)
    torch.save({"features.0.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="AlexNet"):
        scoring.load_alexnet_trunk(model, tmp_path / "bad.pth")


# ---------------------------------------------------------------- prompts

def test_prompt_files_cover_every_benchmark_category():
    entries = builtin_prompt_entries()
    for c in MVTEC + VISA + SYNTHETIC:
        assert c in entries and len(entries[c]["detailed"]) >= 2, c
    sets, fallback = load_prompt_sets(["toothbrush", "my_part"])
    assert sets["toothbrush"][0] == "A perfect toothbrush."
    assert len(sets["toothbrush"]) >= 3
    assert sets["my_part"] == ["A perfect my part."] and fallback == ["my_part"]


def test_user_prompt_file_replaces_entries(tmp_path):
    path = tmp_path / "p.json"
    path.write_text('{"disc": {"name": "washer", "detailed": ["A round washer."]}}')
    sets, _ = load_prompt_sets(["disc"], str(path))
    assert sets["disc"] == ["A perfect washer.", "A round washer."]
    with pytest.raises(FileNotFoundError, match="prompts_file"):
        load_prompt_sets(["disc"], str(tmp_path / "missing.json"))


def test_character_tokenizer_spells_words():
    tok = character_tokenizer()
    ids = tok(["A nut."], padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert ids.shape == (1, 77) and ids[0, 0] == 512 and int(ids.max()) < 514


# ---------------------------------------------------------------- weights

def _save_tiny_pipeline(folder: Path) -> None:
    """A tiny SD-inpainting pipeline folder in diffusers' layout, written by save_pretrained."""
    torch.manual_seed(123)
    sd = build_components("tiny")
    sd.unet.save_pretrained(folder / "unet")
    sd.vae.save_pretrained(folder / "vae")
    sd.text_encoder.save_pretrained(folder / "text_encoder")
    character_tokenizer().save_pretrained(folder / "tokenizer")


def _context(tmp_path, settings, weights_dir=None) -> FitContext:
    return FitContext(device=torch.device("cpu"), seed=0, profile="tiny", settings=settings, cache_dir=tmp_path,
                      weights=WeightsResolver(weights_dir), progress=Progress(False), pseudo_validation=None)


def _train_set(size: int, cats=("disc", "weave"), n: int = 2) -> TrainSet:
    rng = np.random.default_rng(0)
    samples = []
    for c in cats:
        for i in range(n):
            img = (rng.random((size, size, 3)) * 255).astype(np.uint8)
            samples.append(Sample(f"{c}/train/good/{i}", c, "train", 0, "good", image=lambda a=img: a))
    return TrainSet("t", samples, (size, size), ImageCache())


def _pretrained_settings(tmp_path) -> dict:
    from torchvision.models import alexnet

    from harness.backbones import create_features

    weights = tmp_path / "weights"
    weights.mkdir()
    torch.save(alexnet(weights=None).state_dict(), weights / "alexnet-owt-7be5be79.pth")
    torch.save(create_features("efficientnet_b0", (2, 3)).state_dict(), weights / "efficientnet_b0.pth")
    _save_tiny_pipeline(weights / "stable-diffusion-inpainting")
    # No fine-tuning, so that the loaded weights can be compared with the saved ones.
    return {**MICRO, "pretrained": True, "latent_scale": "config", "unet_epochs": 0, "decoder_epochs": 0}, weights


def test_tiny_pipeline_saved_with_save_pretrained_loads_through_the_real_code(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    settings, weights = _pretrained_settings(tmp_path)
    method = AnomalySD(settings)
    ctx = _context(tmp_path, settings, weights)
    method.fit(_train_set(32, n=1), ctx)
    torch.manual_seed(123)
    reference = build_components("tiny")
    assert torch.equal(method.unet.conv_in.weight, reference.unet.conv_in.weight)
    assert torch.equal(method.text_encoder.get_input_embeddings().weight,
                       reference.text_encoder.get_input_embeddings().weight)
    assert torch.equal(method.vae.decoder.conv_out.weight, reference.vae.decoder.conv_out.weight)
    assert ctx.info["sd_init"] == "pretrained" and ctx.info["sd_weights"].endswith("stable-diffusion-inpainting")
    assert method.tokenizer_source.endswith("stable-diffusion-inpainting")
    assert method.tokenizer()("A nut.").input_ids[0] == 512


def test_missing_weights_name_the_files_and_the_tiny_profile(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    settings = {**MICRO, "pretrained": True}
    method = AnomalySD(settings)
    with pytest.raises(WeightsNotFoundError, match="stable-diffusion-inpainting") as err:
        method.fit(_train_set(32, n=1), _context(tmp_path, settings, tmp_path / "empty"))
    assert "tiny" in str(err.value)
    # A folder that lacks a component is refused with the subfolder named.
    broken = tmp_path / "broken"
    (broken / "unet").mkdir(parents=True)
    with pytest.raises(WeightsNotFoundError, match="text_encoder"):
        AnomalySD({**settings, "sd_path": str(broken)}).fit(_train_set(32, n=1), _context(tmp_path, settings))


# ---------------------------------------------------------------- fit and predict

def test_tiny_fit_predict_state_roundtrip_and_zero_shot(tmp_path):
    torch.manual_seed(0)
    method = AnomalySD(MICRO)
    ctx = _context(tmp_path, MICRO)
    method.fit(_train_set(32), ctx)
    assert set(method.banks) == {"disc", "weave"}
    assert ctx.info["sd_init"] == "random" and ctx.info["backbone_init"] == "random"
    method.eval()
    images = torch.rand(3, 3, 32, 32)
    pred = method.predict(images, ["disc", "weave", "disc"])
    assert pred.anomaly_maps.shape == (3, 32, 32) and pred.image_scores.shape == (3,)
    assert torch.isfinite(pred.anomaly_maps).all()
    assert torch.allclose(pred.image_scores, pred.anomaly_maps.flatten(1).amax(1))
    parts = method.score_maps(images[:1], ["disc"], 0.4)
    assert len(parts["scales"]) == 2 and parts["prototype"] is not None
    # A restored fit predicts the same maps.
    clone = AnomalySD(MICRO)
    clone.load_state_dict(method.state_dict())
    clone.eval()
    assert torch.allclose(clone.predict(images, ["disc", "weave", "disc"]).anomaly_maps, pred.anomaly_maps, atol=1e-5)
    # Zero-shot: nothing to fine-tune, no prototype bank, multi-scale map only.
    zero = AnomalySD(MICRO)
    zctx = _context(tmp_path, MICRO)
    zero.fit(_train_set(32, n=0), zctx)
    assert zctx.info["zero_shot"] and not zero.banks
    zero.eval()
    out = zero.score_maps(images[:2], ["nut", "pcb"], 0.4)
    assert out["prototype"] is None and torch.equal(out["map"], out["multi_scale"])


def test_per_category_noise_strength():
    method = AnomalySD({**MICRO, "noise_strength_per_category": {"screw": 0.3}})
    assert method.noise_strength("screw") == 0.3 and method.noise_strength("disc") == 0.4


@pytest.mark.slow
def test_harness_run_fewshot_end_to_end(tmp_path):
    from harness.cli import main

    code = main(["run", "--methods", "anomalysd", "--protocol", "fewshot", "--shots", "1", "--seeds", "0",
                 "--results-dir", str(tmp_path / "r"), "--cache-dir", str(tmp_path / "c"), "--no-progress",
                 "--set", "image_size=32", "--set", "scales=[1,2]", "--set", "unet_epochs=2",
                 "--set", "decoder_epochs=2", "--eval-size", "32"])
    assert code == 0
