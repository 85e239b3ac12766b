"""DiAD's DDPM and LDM baselines: specs, sizes, training, reconstruction, scoring, resume, dry-run plans."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

try:
    import harness_diad  # noqa: F401
except ImportError:  # not installed: import from the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins" / "diad"))

from harness import TrainSet  # noqa: E402
from harness.engine.support.checkpoint import Position  # noqa: E402
from harness.data import ImageCache, Sample  # noqa: E402
from harness.testing import check_method, check_spec, fit_context  # noqa: E402
from harness.toolkit.scoring import pooled_max  # noqa: E402
from harness_diad import ddpm_plugin, ldm_plugin  # noqa: E402
from harness_diad.baselines import DDPMBaseline, LDMBaseline  # noqa: E402
from harness_diad.plugin import harness_methods as diad_methods  # noqa: E402

(DDPM,) = ddpm_plugin.harness_methods()
(LDM,) = ldm_plugin.harness_methods()
(DIAD,) = diad_methods()
MICRO_LDM = {"ae_epochs": 1, "epochs": 1, "train_batch_size": 4, "ae_train_batch_size": 4, "ddim_steps": 4,
             "eval_batch_size": 4}
MICRO_DDPM = {"epochs": 1, "train_batch_size": 4, "ddim_steps": 4, "eval_batch_size": 4}


def _train_set(n: int = 8, size: int = 32) -> TrainSet:
    rng = np.random.default_rng(0)
    samples = []
    for i in range(n):
        img = (rng.random((size, size, 3)) * 50 + 100).astype(np.uint8)
        samples.append(Sample(f"a/train/good/{i}", "a", "train", 0, "good", image=lambda a=img: a))
    return TrainSet("t", samples, (size, size), ImageCache(), "bilinear")


def _fit(cls, settings, tmp_path, train=None, **context):
    torch.manual_seed(0)
    method = cls(settings)
    ctx = fit_context(settings, tmp_path, **context)
    method.fit(train or _train_set(), ctx)
    return method, ctx


# ---------------------------------------------------------------------------------------------- specs and sizes

def test_specs_are_registered_typed_and_cheap_to_import():
    for spec in (DDPM, LDM):
        check_spec(spec)
    assert (DDPM.name, LDM.name) == ("ddpm", "ldm")
    code = ("import sys, harness_diad.ddpm_plugin as a, harness_diad.ldm_plugin as b; a.harness_methods(); "
            "b.harness_methods(); print([m for m in ('diffusers', 'timm', 'lpips', 'transformers') if m in sys.modules])")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "plugins" / "diad")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == "[]"


def test_ldm_is_diad_without_the_sg_network_on_meta_device():
    with torch.device("meta"):
        ldm = LDM.factory(LDM.resolve("paper"))
    counts = ldm.parameter_count()
    assert ldm.sg is None and "sg" not in counts
    # SD v1.5's UNet and KL-f8 autoencoder exactly as DiAD's (arXiv Table 11: 859 M, 83.7 M).
    assert (counts["unet"], counts["vae"]) == (859_520_964, 83_653_863)
    assert ldm.ddim.noise_step == 999 and ldm.ddim.timesteps == tuple(range(901, 0, -100))
    # Same sampling, scoring and training details as DiAD's paper profile.
    diad, mine = DIAD.resolve("paper"), LDM.resolve("paper")
    for key in ("image_size", "T", "beta_start", "beta_end", "ddim_steps", "start_step", "backbone",
                "backbone_layers", "smoothing_sigma", "pool_kernel", "pool_rounds", "epochs", "train_batch_size",
                "grad_accumulation", "lr", "ae_epochs"):
        assert mine[key] == diad[key], key
    assert "only_mid_control" not in mine and "authors_checkpoint" not in mine
    assert {f.key for f in LDM.weight_files(mine)} == {"sd15", "ae_init", "backbone", "lpips_vgg16"}


def test_ddpm_paper_profile_is_ho_et_al_256_model_on_meta_device():
    settings = DDPM.resolve("paper")
    with torch.device("meta"):
        ddpm = DDPM.factory(settings)
    # Ho et al. (2020): "our 256 x 256 models have 114 million parameters".
    assert ddpm.parameter_count()["unet"] == 113_673_219
    assert ddpm.unet.config.sample_size == 256 and ddpm.input_size == (256, 256)
    assert (settings.beta_schedule, settings.beta_start, settings.beta_end, settings.T) == ("linear", 1e-4, 0.02, 1000)
    assert ddpm.ddim.noise_step == 999 and len(ddpm.ddim.steps) == 10
    assert [f.key for f in DDPM.weight_files(settings)] == ["backbone"]  # the U-Net trains from scratch
    assert DDPM.weight_files(DDPM.resolve("tiny")) == []


@pytest.mark.parametrize("method, weights", [("ddpm", ["backbone"]), ("ldm", ["sd15", "ae_init", "backbone"])])
def test_paper_profiles_plan_with_dry_run(tmp_path, capsys, method, weights):
    from harness.cli import main

    args = ["run", "--methods", method, "--protocol", "multiclass", "--profile", "paper", "--dry-run",
            "--results-dir", str(tmp_path / "r"), "--cache-dir", str(tmp_path / "c")]
    # Without the pinned files the preflight stops (exit 2) and names each; --weights random plans.
    assert main(args) == 2
    out = capsys.readouterr().out
    assert f"{method}/paper on synthetic multiclass" in out and all(f"weights {k}: MISSING" in out for k in weights)
    assert main([*args, "--weights", "random"]) == 0
    assert "gpus=1" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- training

def test_ldm_trains_the_whole_unet_and_never_uses_the_image_as_guidance(tmp_path):
    method = LDMBaseline(LDM.resolve("tiny", MICRO_LDM))
    train = _train_set()
    ctx = fit_context(method.settings, tmp_path)
    method._initialise(train, ctx)
    before = {n: p.detach().clone() for n, p in method.unet.named_parameters()}
    method.train_denoiser(train, ctx)
    changed = {n for n, p in method.unet.named_parameters() if not torch.equal(p, before[n])}
    assert any(n.startswith("down_blocks.") for n in changed) and any(n.startswith("up_blocks.") for n in changed)
    z, t = torch.randn(2, 4, 8, 8), torch.tensor([5, 500])
    a = method.predict_noise(z, t, torch.rand(2, 3, 32, 32))
    b = method.predict_noise(z, t, torch.zeros(2, 3, 32, 32))
    assert torch.equal(a, b)  # no SG network: the input image does not steer the denoiser


def test_ldm_decoder_only_keeps_diads_split(tmp_path):
    method = LDMBaseline(LDM.resolve("tiny", {**MICRO_LDM, "trained_unet": "decoder"}))
    train = _train_set()
    ctx = fit_context(method.settings, tmp_path)
    method._initialise(train, ctx)
    before = {n: p.detach().clone() for n, p in method.unet.named_parameters()}
    method.train_denoiser(train, ctx)
    changed = {n for n, p in method.unet.named_parameters() if not torch.equal(p, before[n])}
    assert changed and not any(n.startswith(("conv_in.", "down_blocks.", "mid_block.")) for n in changed)


def test_ddpm_trains_on_the_epsilon_loss_and_reconstructs_in_pixel_space(tmp_path):
    method, ctx = _fit(DDPMBaseline, DDPM.resolve("tiny", {**MICRO_DDPM, "epochs": 2}), tmp_path)
    assert ctx.info["steps"] == 4 and ctx.info["unet_init"].startswith("random")
    images = torch.rand(3, 3, 32, 32)
    recon = method.reconstruct(images, torch.Generator().manual_seed(0))
    assert recon.shape == images.shape and recon.min() >= 0 and recon.max() <= 1
    # From a low noise step a DDIM pass keeps the image largely (the tiny profile's start step).
    assert (recon - images).abs().mean() < 0.5


@pytest.mark.parametrize("spec, cls, micro", [(DDPM, DDPMBaseline, MICRO_DDPM), (LDM, LDMBaseline, MICRO_LDM)],
                         ids=["ddpm", "ldm"])
def test_scoring_is_diads_feature_map_and_pooled_max(tmp_path, spec, cls, micro):
    method, _ = _fit(cls, spec.resolve("tiny", micro), tmp_path)
    images = torch.rand(2, 3, 32, 32)
    pred = method.predict(images, ["a", "a"])
    assert pred.anomaly_maps.shape == (2, 32, 32) and pred.anomaly_maps.dtype == torch.float32
    s = method.settings
    assert torch.allclose(pred.image_scores, pooled_max(pred.anomaly_maps, s.pool_kernel, s.pool_rounds))
    # Identical input and reconstruction give a zero map: the map is a feature distance to the reconstruction.
    assert method.anomaly_maps(images, method.to_pixels(images) if cls is LDMBaseline else images).abs().max() < 1e-4


@pytest.mark.parametrize("spec, micro", [(DDPM, MICRO_DDPM), (LDM, MICRO_LDM)], ids=["ddpm", "ldm"])
def test_conformance_kit(tmp_path, spec, micro):
    check_method(spec, "tiny", overrides={**micro, "train_batch_size": 2}, workdir=tmp_path)


class _Killed(RuntimeError):
    pass


def test_a_ddpm_fit_killed_halfway_resumes_to_identical_predictions(tmp_path, monkeypatch):
    settings = DDPM.resolve("tiny", {**MICRO_DDPM, "epochs": 2, "train_batch_size": 2, "grad_accumulation": 2})
    images = torch.rand(3, 3, 32, 32)
    reference, _ = _fit(DDPMBaseline, settings, tmp_path / "uninterrupted")
    expected = reference.predict(images, ["a"] * 3)
    original, count = Position.step, {"n": 0}

    def dying_step(self, *, epoch, batch):
        original(self, epoch=epoch, batch=batch)
        count["n"] += 1
        if count["n"] == 3:
            raise _Killed("killed")

    monkeypatch.setattr(Position, "step", dying_step)
    with pytest.raises(_Killed):
        _fit(DDPMBaseline, settings, tmp_path / "run", checkpoint_interval=0)
    monkeypatch.setattr(Position, "step", original)
    resumed, ctx = _fit(DDPMBaseline, settings, tmp_path / "run", checkpoint_interval=0)
    assert ctx.checkpoint.resumed_from["stage"] == "denoiser"
    got = resumed.predict(images, ["a"] * 3)
    assert torch.equal(got.anomaly_maps, expected.anomaly_maps) and torch.equal(got.image_scores, expected.image_scores)
