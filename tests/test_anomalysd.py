"""Tests of the AnomalySD plugin: spec and weights, masks, sampler, scoring, prompts, loading, fit/predict,
λ selection, resume, fast dev run, precision and the conformance kit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

try:
    import harness_anomalysd  # noqa: F401
except ImportError:  # not installed: import from the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins" / "anomalysd"))

from harness import TrainSet, WeightsNotFoundError  # noqa: E402
from harness.data import ImageCache, Sample  # noqa: E402
from harness.method import FAST_DEV_STEPS  # noqa: E402
from harness.testing import check_method, fit_context  # noqa: E402
from harness_anomalysd import masks as masks_mod  # noqa: E402
from harness_anomalysd import sampling, scoring, selection  # noqa: E402
from harness_anomalysd.networks import build_components, character_tokenizer  # noqa: E402
from harness_anomalysd.plugin import harness_methods  # noqa: E402
from harness_anomalysd.prompts import builtin_prompt_entries, load_prompt_sets  # noqa: E402
from harness_anomalysd.weightfiles import ALEXNET, EFFICIENTNET_B6, SD_INPAINTING, SD_REVISION  # noqa: E402

MVTEC = ("bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut", "pill", "screw", "tile",
         "toothbrush", "transistor", "wood", "zipper")
VISA = ("candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2", "pcb1", "pcb2", "pcb3", "pcb4",
        "pipe_fryum")
SYNTHETIC = ("weave", "grain", "tiles", "disc", "pcb", "nut")

(SPEC,) = harness_methods()

#: The tiny profile cut further for unit tests: 32 px, one epoch, two scales, two λ candidates.
MICRO = {"image_size": 32, "unet_epochs": 1, "decoder_epochs": 1, "scales": (1, 2), "denoising_steps": 4,
         "eval_batch_size": 4, "inpaint_batch": 8, "lambda_candidates": (0.3, 0.5), "lambda_val_per_category": 4}


def micro(**changes):
    """The tiny profile's settings with :data:`MICRO` and ``changes`` applied."""
    return SPEC.resolve("tiny", {**MICRO, **changes})


def build(settings):
    torch.manual_seed(0)
    return SPEC.factory(settings)


def _train_set(size: int, cats=("disc", "weave"), n: int = 2) -> TrainSet:
    rng = np.random.default_rng(0)
    samples = []
    for c in cats:
        for i in range(n):
            img = (rng.random((size, size, 3)) * 255).astype(np.uint8)
            samples.append(Sample(f"{c}/train/good/{i}", c, "train", 0, "good", image=lambda a=img: a))
    return TrainSet("t", samples, (size, size), ImageCache())


def _context(tmp_path, settings, **kwargs):
    return fit_context(settings, tmp_path, textures=("weave",), **kwargs)


# ---------------------------------------------------------------- spec, settings and weights

def test_spec_is_fewshot_typed_and_its_entry_point_imports_no_heavy_library():
    assert SPEC.name == "anomalysd" and SPEC.protocols == ("fewshot",) and SPEC.paper_protocol == "fewshot"
    assert not SPEC.schema.inferred and all(s.help for s in SPEC.schema)
    paper = SPEC.resolve("paper")
    assert paper.image_size == 512 and paper.eval_size == 512 and paper.denoising_steps == 50
    assert paper.backbone == "tf_efficientnet_b6" and paper.lambda_selection == "holdout"
    code = ("import sys, harness_anomalysd.plugin; "
            "print(sorted(m for m in ('diffusers', 'transformers', 'lpips', 'timm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_paper_profile_has_sd15_inpainting_sizes_on_meta_device():
    with torch.device("meta"):
        method = SPEC.factory(SPEC.resolve("paper"))
    counts = method.parameter_count()
    assert counts["unet"] == 859_535_364  # SD v1.5 inpainting UNet (9 input channels)
    assert abs(counts["vae"] / 83.65e6 - 1) < 0.01
    assert abs(counts["text_encoder"] / 123.06e6 - 1) < 0.01
    assert method.unet.config.in_channels == 9 and method.unet.is_gradient_checkpointing


def test_weight_files_are_pinned_and_follow_the_settings():
    paper = SPEC.resolve("paper")
    files = {f.key: f for f in SPEC.weight_files(paper)}
    assert files["sd"] is SD_INPAINTING and SD_INPAINTING.revision == SD_REVISION and SD_INPAINTING.folder
    assert files["lpips_trunk"] is ALEXNET and ALEXNET.url.endswith("alexnet-owt-7be5be79.pth")
    assert files["backbone"] is EFFICIENTNET_B6
    assert EFFICIENTNET_B6.repo_id == "timm/tf_efficientnet_b6.aa_in1k" and len(EFFICIENTNET_B6.revision) == 40
    # S_ms alone needs no backbone; the tiny profile reads no file at all.
    ms_only = {f.key for f in SPEC.weight_files(paper.replace(anomaly_map="multi_scale"))}
    assert ms_only == {"sd", "lpips_trunk"}
    assert SPEC.weight_files(SPEC.resolve("tiny")) == []


def test_open_choices_are_documented():
    choices = {s.name for s in SPEC.schema if s.choice}
    assert {"step_schedule", "lambda_selection", "precision", "backbone", "interpolation"} <= choices


# ---------------------------------------------------------------- masks

@pytest.mark.parametrize("size,k", [((64, 64), 1), ((64, 64), 2), ((64, 64), 4), ((64, 64), 8), ((30, 45), 4)])
def test_grid_masks_cover_the_image_exactly_once(size, k):
    grid = masks_mod.grid_masks(*size, k)
    assert grid.shape == (k * k, *size)
    assert torch.equal(grid.sum(0), torch.ones(size))
    for m in grid:
        rows, cols = torch.nonzero(m.sum(1)).flatten(), torch.nonzero(m.sum(0)).flatten()
        assert m.sum() == len(rows) * len(cols)
        assert abs(len(rows) - size[0] / k) <= 1 and abs(len(cols) - size[1] / k) <= 1


def test_variance_threshold_minimises_the_papers_criterion():
    values = torch.tensor([0.0, 0.1, 0.2, 3.0, 3.3, 7.0])
    r = float(masks_mod.variance_threshold(values))

    def cost(t):
        hi, lo = values[values >= t], values[values < t]
        return float(hi.var(unbiased=False) + lo.var(unbiased=False))

    assert cost(r) == pytest.approx(min(cost(float(t)) for t in values[1:]))
    assert not (torch.ones(5) > masks_mod.variance_threshold(torch.ones(5))).any()
    rng = np.random.default_rng(0)
    low, high = rng.normal(1.0, 0.1, 300), rng.normal(5.0, 0.1, 20)
    r = float(masks_mod.variance_threshold(torch.tensor(np.concatenate([low, high]))))
    assert low.max() < r < high.min()


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
        assert gamma in (0.0, 0.2, 0.5) and masks_mod.mask_iou(mask, fg) > gamma


def test_foreground_uses_the_toolkit_and_textures_are_whole():
    from harness.toolkit.foreground import object_foreground

    image = np.full((3, 32, 32), 0.1, dtype=np.float32)
    image[:, 8:24, 8:24] = 0.9
    fg = masks_mod.foreground_mask(image)
    assert np.array_equal(fg, object_foreground(image))
    assert fg[8:24, 8:24].all() and not fg[:8].any()
    assert masks_mod.foreground_mask(image, whole=True).all()
    assert not hasattr(masks_mod, "otsu_threshold")  # one Otsu: the toolkit's


# ---------------------------------------------------------------- sampler

def test_denoising_starts_at_exactly_lambda_T():
    abar = sampling.alphas_cumprod()
    for lam in (0.2, 0.35, 0.4, 1.0):
        for reading in ("pipeline", "span"):
            steps = sampling.inference_timesteps(lam, 50, reading)
            assert steps[0] == round(lam * 1000) - 1  # paper step λT = diffusers index λT - 1
            assert all(a > b for a, b in zip(steps, steps[1:])) and steps[-1] >= 0
    assert len(sampling.inference_timesteps(0.4, 50, "pipeline")) == 20
    assert len(sampling.inference_timesteps(0.4, 50, "span")) == 50
    assert sampling.inference_timesteps(0.0, 50) == []
    # ᾱ of the paper's step t is diffusers' alphas_cumprod[t - 1].
    from diffusers import DDPMScheduler

    from harness.toolkit.sd15 import SCHEDULE

    ref = DDPMScheduler(**SCHEDULE).alphas_cumprod.double().numpy()
    assert np.allclose(abar, ref, rtol=1e-6)


def test_pipeline_reading_matches_diffusers_inpainting_strength_and_ddim_update():
    from diffusers import DDIMScheduler

    from harness.toolkit.sd15 import SCHEDULE

    scheduler = DDIMScheduler(**SCHEDULE, clip_sample=False, set_alpha_to_one=False, timestep_spacing="trailing")
    scheduler.set_timesteps(50)
    # diffusers' img2img / inpaint pipelines: keep the last int(N * strength) timesteps.
    expected = scheduler.timesteps[50 - int(50 * 0.4):].tolist()
    steps = sampling.inference_timesteps(0.4, 50, "pipeline")
    assert steps == expected
    torch.manual_seed(0)
    z, eps = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    abar = sampling.alphas_cumprod()
    for i, t in enumerate(steps[-2:]):
        ours = sampling.ddim_step(z, eps, t, steps[-1] if i == 0 else None, abar)
        theirs = scheduler.step(eps, t, z, eta=0.0).prev_sample
        assert torch.allclose(ours, theirs, atol=1e-5)


# ---------------------------------------------------------------- scoring

def test_harmonic_mean_and_fusion():
    a, b = torch.full((1, 2, 2), 1.0), torch.full((1, 2, 2), 3.0)
    hm = scoring.harmonic_mean([a, b])
    assert torch.allclose(hm, torch.full_like(a, 1.5))  # 2 / (1 + 1/3)
    assert scoring.harmonic_mean([torch.zeros(1, 1, 1), torch.ones(1, 1, 1)]).item() < 1e-6
    assert torch.allclose(scoring.fuse(hm, torch.full_like(a, 10.0), 0.1), 0.9 * 1.5 + 0.1 * 10.0 * torch.ones_like(a))
    assert scoring.fuse(hm, None, 0.1) is hm


def test_scale_map_takes_each_pixel_from_its_own_patch():
    masks = masks_mod.grid_masks(4, 4, 2)
    distances = torch.stack([torch.full((4, 4), float(i + 1)) for i in range(4)])[None]
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
    path = tmp_path / "alexnet.pth"
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
    assert sets["toothbrush"][0] == "A perfect toothbrush." and len(sets["toothbrush"]) >= 3
    assert sets["my_part"] == ["A perfect my part."] and fallback == ["my_part"]


def test_user_prompt_file_replaces_entries(tmp_path):
    path = tmp_path / "p.json"
    path.write_text('{"disc": {"name": "washer", "detailed": ["A round washer."]}}')
    sets, _ = load_prompt_sets(["disc"], str(path))
    assert sets["disc"] == ["A perfect washer.", "A round washer."]
    with pytest.raises(FileNotFoundError, match="prompts_file"):
        load_prompt_sets(["disc"], str(tmp_path / "missing.json"))


def test_character_tokenizer_spells_words():
    ids = character_tokenizer()(["A nut."], padding="max_length", max_length=77, return_tensors="pt").input_ids
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


def test_pretrained_files_load_through_the_declared_weights(tmp_path, monkeypatch):
    from torchvision.models import alexnet

    from harness.toolkit.backbones import create_features

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    weights = tmp_path / "weights"
    weights.mkdir()
    _save_tiny_pipeline(weights / "stable-diffusion-inpainting")  # found as <weights dir>/<repo name>
    reference_alex = alexnet(weights=None)
    torch.save(reference_alex.state_dict(), tmp_path / "my-alexnet.pth")
    torch.save(create_features("efficientnet_b0", (2, 3)).state_dict(), weights / "efficientnet_b0.pth")
    # No fine-tuning, so that the loaded weights can be compared with the saved ones.
    settings = micro(sd_pretrained=True, lpips_pretrained=True, backbone_pretrained=True, latent_scale="config",
                     unet_epochs=0, decoder_epochs=0, lambda_selection="fixed",
                     lpips_weights_file=str(tmp_path / "my-alexnet.pth"))
    method = build(settings)
    ctx = _context(tmp_path / "ctx", settings, weights_dir=weights)
    method.fit(_train_set(32, n=1), ctx)
    torch.manual_seed(123)
    reference = build_components("tiny")
    assert torch.equal(method.unet.conv_in.weight, reference.unet.conv_in.weight)
    assert torch.equal(method.vae.decoder.conv_out.weight, reference.vae.decoder.conv_out.weight)
    assert torch.equal(method.lpips.net.slice1._modules["0"].weight, reference_alex.features[0].weight)
    assert ctx.info["sd_init"] == "pretrained" and ctx.info["backbone_init"] == "imagenet"
    assert method.tokenizer()("A nut.").input_ids[0] == 512
    used = {u["key"] for u in ctx.weights.used}
    assert {"sd", "lpips_trunk", "backbone", "lpips_linear"} <= used
    # A file under torchvision's name must carry torchvision's hash prefix.
    torch.save(reference_alex.state_dict(), weights / "alexnet-owt-7be5be79.pth")
    from harness.engine.weights import WeightsVerifyError

    with pytest.raises(WeightsVerifyError, match="7be5be79"):
        build(settings.replace(lpips_weights_file="")).fit(_train_set(32, n=1),
                                                           _context(tmp_path / "c2", settings, weights_dir=weights))


def test_missing_weights_name_the_pull_command(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    settings = micro(sd_pretrained=True)
    with pytest.raises(WeightsNotFoundError, match="harness weights pull") as err:
        build(settings).fit(_train_set(32, n=1), _context(tmp_path, settings, weights_dir=tmp_path / "empty"))
    assert "stable-diffusion-inpainting" in str(err.value)
    broken = tmp_path / "broken"
    (broken / "unet").mkdir(parents=True)
    with pytest.raises(WeightsNotFoundError, match="text_encoder"):
        build(settings.replace(sd_path=str(broken))).fit(_train_set(32, n=1), _context(tmp_path, settings))
    # --weights random reads nothing.
    build(settings).fit(_train_set(32, n=1), _context(tmp_path / "r", settings, random_weights=True))


# ---------------------------------------------------------------- fit and predict

def test_tiny_fit_predict_state_roundtrip_branches_and_zero_shot(tmp_path):
    settings = micro(lambda_selection="fixed")
    method = build(settings)
    ctx = _context(tmp_path, settings)
    method.fit(_train_set(32), ctx)
    assert set(method.banks) == {"disc", "weave"} and ctx.info["sd_init"] == "random"
    assert ctx.info["denoising"]["per_category"]["disc"]["start_timestep"] == 399
    method.eval()
    images = torch.rand(3, 3, 32, 32)
    pred = method.predict(images, ["disc", "weave", "disc"])
    assert pred.anomaly_maps.shape == (3, 32, 32) and pred.anomaly_maps.dtype == torch.float32
    assert torch.isfinite(pred.anomaly_maps).all()
    assert torch.allclose(pred.image_scores, pred.anomaly_maps.flatten(1).amax(1))
    parts = method.score_maps(images[:1], ["disc"], 0.4)
    assert len(parts["scales"]) == 2 and parts["prototype"] is not None
    assert torch.allclose(parts["map"], 0.9 * parts["multi_scale"] + 0.1 * parts["prototype"])
    clone = build(settings)
    clone.load_state_dict(method.state_dict())
    clone.eval()
    assert torch.equal(clone.predict(images, ["disc", "weave", "disc"]).anomaly_maps, pred.anomaly_maps)
    # Each branch alone (the paper's Table 5 ablation).
    for branch, key in (("multi_scale", "multi_scale"), ("prototype", "prototype")):
        alone = build(settings.replace(anomaly_map=branch))
        alone.load_state_dict({k: v for k, v in method.state_dict().items()
                               if k != "backbone" or branch != "multi_scale"})
        alone.eval()
        out = alone.score_maps(images[:1], ["disc"], 0.4)
        assert torch.equal(out["map"], out[key])
        assert (out["prototype"] is None) == (branch == "multi_scale") and (out["scales"] == []) == (branch ==
                                                                                                     "prototype")
        assert torch.allclose(out[key], parts[key])
    zero = build(settings)
    zctx = _context(tmp_path / "zero", settings)
    zero.fit(_train_set(32, n=0), zctx)
    assert zctx.info["zero_shot"] and not zero.banks
    out = zero.score_maps(images[:2], ["nut", "pcb"], 0.4)
    assert out["prototype"] is None and torch.equal(out["map"], out["multi_scale"])


def test_lambda_is_chosen_per_category_on_held_out_shots(tmp_path):
    settings = micro(lambda_refit=True, noise_strength_per_category={"grain": 0.2})
    method = build(settings)
    ctx = _context(tmp_path, settings)
    train = _train_set(32, cats=("disc", "weave", "grain"), n=2)
    method.fit(train, ctx)
    ns = ctx.info["noise_strength"]
    assert ns["selection"] == "holdout" and ns["refit_on_all_shots"]
    assert set(ns["per_category"]) == {"disc", "weave"}  # grain is given explicitly
    for c in ("disc", "weave"):
        assert ns["per_category"][c]["lambda"] in (0.3, 0.5)
        assert ns["per_category"][c]["source"].startswith("held out")
        assert len(ns["held_out"][c]) == 1
        assert method.noise_strength(c) == ns["per_category"][c]["lambda"]
    assert method.noise_strength("grain") == 0.2
    # The refit model's banks hold every shot; the selection model's held one per category.
    bank_one = build(settings.replace(lambda_selection="fixed"))
    bank_one.fit(train.subset([0, 2, 4]), _context(tmp_path / "one", settings))
    assert ctx.info["prototype_banks"]["disc"] == 2 * bank_one.banks["disc"].shape[0]
    # One shot: nothing to hold out, augmented copies of the (seen) shot instead, recorded.
    one = _context(tmp_path / "one-shot", settings)
    build(settings).fit(_train_set(32, cats=("disc",), n=1), one)
    assert one.info["noise_strength"]["per_category"]["disc"]["source"].startswith("augmented copies")
    assert not one.info["noise_strength"]["refit_on_all_shots"]


def test_pseudo_validation_from_one_image_has_anomalies():
    images = torch.rand(1, 3, 32, 32)
    val = selection.pseudo_validation(images, ["disc"], 6, 0, lambda x, g: x.roll(int(torch.randint(1, 9, (1,),
                                                                                               generator=g)), -1))
    assert len(val) == 6 and int(val.labels.sum()) == 3 and val.masks[val.labels == 1].any()


def test_check_method_passes():
    check_method(SPEC, profile="tiny", overrides={**MICRO, "lambda_val_per_category": 2})


def _interrupt_after(monkeypatch, steps: int):
    """Make the fit die right after its ``steps``-th optimiser step has been checkpointed."""
    from harness.engine.support import checkpoint

    original = checkpoint.Position.step
    count = {"n": 0}

    def step(self, *, epoch, batch):
        original(self, epoch=epoch, batch=batch)
        count["n"] += 1
        if count["n"] == steps:
            raise RuntimeError("killed")

    monkeypatch.setattr(checkpoint.Position, "step", step)
    return lambda: monkeypatch.setattr(checkpoint.Position, "step", original)


@pytest.mark.parametrize("kill_after", [3, 17])
def test_an_interrupted_fit_resumes_to_identical_predictions(tmp_path, monkeypatch, kill_after):
    # Selection fit on 4 images (batch 2, 2 epochs: 4 steps per stage), then the refit on 6 (6 steps per
    # stage): step 3 dies in the first decoder stage, step 17 in the refit UNet stage.
    settings = micro(decoder_epochs=2, unet_epochs=2, train_batch_size=2, lambda_refit=True)
    train = _train_set(32, cats=("disc", "weave"), n=3)
    images = torch.rand(2, 3, 32, 32)

    def run(folder, interrupt=None):
        method = build(settings)
        ctx = _context(folder, settings, checkpoint_interval=0.0)
        method.fit(train, ctx)
        method.eval()
        return method.predict(images, ["disc", "weave"]).anomaly_maps, ctx

    reference, _ = run(tmp_path / "straight")
    restore = _interrupt_after(monkeypatch, kill_after)
    with pytest.raises(RuntimeError, match="killed"):
        run(tmp_path / "killed")
    restore()
    resumed, ctx = run(tmp_path / "killed")
    assert ctx.checkpoint.resumed_from is not None and ctx.checkpoint.resumed_from["step"] >= 1
    assert torch.equal(resumed, reference)


def test_fast_dev_run_cuts_fit_and_predict_steps(tmp_path):
    settings = micro(scales=(1, 2, 4), decoder_epochs=3, unet_epochs=3, train_batch_size=1, denoising_steps=10,
                     lambda_selection="fixed")
    method = build(settings)
    ctx = _context(tmp_path, settings, fast_dev_run=True)
    calls = []
    handle = method.unet.register_forward_hook(lambda *args: calls.append(1))
    method.fit(_train_set(32, n=3), ctx)  # 6 images at batch 1 for 3 epochs: 18 steps without the dev run
    assert len(calls) == FAST_DEV_STEPS
    calls.clear()
    method.eval()
    method.predict(torch.rand(1, 3, 32, 32), ["disc"])
    handle.remove()
    # The first scale only (one UNet batch) and the prototype mask: FAST_DEV_STEPS steps each.
    assert len(calls) == 2 * FAST_DEV_STEPS
    assert ctx.info["denoising"]["dev_run_limits"]


def test_bf16_autocast_and_gradient_checkpointing_run_and_predict_float32(tmp_path):
    settings = micro(precision="bf16", gradient_checkpointing=True, lambda_selection="fixed")
    method = build(settings)
    assert method.unet.is_gradient_checkpointing
    method.fit(_train_set(32, n=1), _context(tmp_path, settings))
    method.eval()
    pred = method.predict(torch.rand(2, 3, 32, 32), ["disc", "weave"])
    assert pred.anomaly_maps.dtype == torch.float32 and torch.isfinite(pred.anomaly_maps).all()


@pytest.mark.slow
def test_harness_run_fewshot_end_to_end(tmp_path):
    from harness.cli import main

    code = main(["run", "--methods", "anomalysd", "--protocol", "fewshot", "--shots", "1", "--seeds", "0",
                 "--results-dir", str(tmp_path / "r"), "--cache-dir", str(tmp_path / "c"), "--no-progress",
                 "--set", "image_size=32", "--set", "scales=[1,2]", "--set", "unet_epochs=2",
                 "--set", "decoder_epochs=2", "--eval-size", "32"])
    assert code == 0
