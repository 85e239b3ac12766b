"""Tests of the DiAD plugin: spec and sizes, weights, SG network and SFF, schedule, losses, training, resume."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

try:
    import harness_diad  # noqa: F401
except ImportError:  # not installed: import from the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins" / "diad"))

from harness import TrainSet, WeightsNotFoundError  # noqa: E402
from harness.engine.support.checkpoint import Position  # noqa: E402
from harness.data import ImageCache, Sample  # noqa: E402
from harness.settings import open_choices  # noqa: E402
from harness.testing import check_method, fit_context  # noqa: E402
from harness.toolkit.scoring import pooled_max  # noqa: E402
from harness_diad.architectures import architecture  # noqa: E402
from harness_diad.losses import PatchDiscriminator, adaptive_weight, hinge_d_loss  # noqa: E402
from harness_diad.model import DiAD  # noqa: E402
from harness_diad.networks import SFFBlock, SemanticGuidedNetwork, residual_channels  # noqa: E402
from harness_diad.plugin import PROFILES, harness_methods  # noqa: E402
from harness_diad.schedule import NoiseSchedule  # noqa: E402
from harness_diad.scoring import feature_distance_map  # noqa: E402
from harness_diad.weights import read_sd  # noqa: E402
from synthetic_runs import synthetic_record  # noqa: E402

(SPEC,) = harness_methods()
TINY = architecture("tiny")
#: The tiny profile at the smallest size that runs every code path quickly.
MICRO = {"ae_epochs": 1, "epochs": 1, "train_batch_size": 4, "ae_train_batch_size": 4, "ddim_steps": 4,
         "eval_batch_size": 4}


def micro(**overrides):
    """Settings of the tiny profile, shrunk (``MICRO``) and overridden."""
    return SPEC.resolve("tiny", {**MICRO, **overrides})


def _train_set(n: int = 8, size: int = 32) -> TrainSet:
    rng = np.random.default_rng(0)
    samples = []
    for i in range(n):
        img = (rng.random((size, size, 3)) * 50 + 100).astype(np.uint8)
        samples.append(Sample(f"a/train/good/{i}", "a", "train", 0, "good", image=lambda a=img: a))
    return TrainSet("t", samples, (size, size), ImageCache(), "bilinear")


def _fit(settings, tmp_path, train=None, **context):
    torch.manual_seed(0)
    method = DiAD(settings)
    ctx = fit_context(settings, tmp_path, **context)
    method.fit(train or _train_set(), ctx)
    return method, ctx


# ---------------------------------------------------------------------------------------------- spec and sizes

def test_paper_profile_matches_table_11_on_meta_device():
    with torch.device("meta"):
        method = SPEC.factory(SPEC.resolve("paper"))
    counts = method.parameter_count()
    # Table 11: 859 M, 471 M, 83.7 M; the SG count includes the SFF block's nine bias-free 3 x 3 convolutions.
    assert (counts["unet"], counts["sg"], counts["vae"]) == (859_520_964, 471_871_120, 83_653_863)
    assert sum(p.numel() for p in method.sg.sff.parameters()) == 3 * (640 + 2 * 1280) * 1280 * 9
    assert method.interpolation == "bilinear" and method.input_size == (256, 256)
    assert method.ddim.noise_step == 999 and method.ddim.timesteps == tuple(range(901, 0, -100))


def test_spec_typed_settings_profiles_and_choices():
    from harness.testing import check_spec

    check_spec(SPEC)
    assert SPEC.paper_protocol == "multiclass" and PROFILES["paper"] == {}
    assert SPEC.resources_for("paper").gpus == 1
    settings = SPEC.resolve("paper")
    assert settings.only_mid_control is True and settings.precision == "fp32" and settings.interpolation == "bilinear"
    assert settings.backbone_layers == (1, 2, 3) and settings.ae_disc_start == 50001
    choices = open_choices(SPEC.schema, settings)
    for name in ("checkpoint_selection", "only_mid_control", "noise_to_first_ddim_step", "interpolation",
                 "precision", "ae_epochs", "backbone_pretrained"):
        assert choices[name]["why"], name
    assert choices["checkpoint_selection"]["value"] == "final" and "test set" in choices["checkpoint_selection"]["why"]


def test_plugin_module_imports_no_heavy_library():
    code = ("import sys, harness_diad.plugin as p; p.harness_methods(); "
            "print([m for m in ('diffusers', 'timm', 'lpips', 'transformers') if m in sys.modules])")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "plugins" / "diad")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == "[]"


def test_weight_files_are_pinned_and_follow_the_settings():
    paper = {f.key: f for f in SPEC.weight_files(SPEC.resolve("paper"))}
    assert set(paper) == {"sd15", "ae_init", "backbone", "lpips_vgg16"}
    # The authors' fine-tuning starts from LDM's kl-f8 archive (their README), not SD's autoencoder.
    assert paper["ae_init"].url.endswith("/kl-f8.zip") and "kl-f8.zip" in paper["ae_init"].filenames
    sd, backbone = paper["sd15"], paper["backbone"]
    assert sd.filename == "v1-5-pruned.ckpt" and sd.repo_id == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert len(sd.revision) == 40 and len(sd.sha256) == 64
    assert backbone.repo_id == "timm/resnet50.a1_in1k" and len(backbone.revision) == 40 and len(backbone.sha256) == 64
    assert "resnet50-19c8e357.pth" in backbone.refuse  # torchvision's weights are not the authors'
    assert paper["lpips_vgg16"].url.endswith("vgg16-397923af.pth")
    assert SPEC.weight_files(SPEC.resolve("tiny")) == []
    folder = SPEC.weight_files(SPEC.resolve("paper", {"sd_path": "/models/sd15", "ae_perceptual_weight": 0.0}))
    assert [f.key for f in folder] == ["sd15", "ae_init", "backbone"] and folder[0].folder
    sd_ae = SPEC.weight_files(SPEC.resolve("paper", {"ae_init": "sd15", "ae_perceptual_weight": 0.0}))
    assert [f.key for f in sd_ae] == ["sd15", "backbone"]
    ema = SPEC.weight_files(SPEC.resolve("paper", {"sd_path": "/m/v1-5-pruned-emaonly.ckpt"}))[0]
    assert not ema.folder and ema.sha256.startswith("cc6cb271")
    authors = SPEC.weight_files(SPEC.resolve("paper", {"authors_checkpoint": "/m/epoch=999.ckpt"}))
    assert [f.key for f in authors] == ["authors_checkpoint", "backbone"]


# ---------------------------------------------------------------------------------------------- SFF block, SG network

def test_sff_block_shapes_and_zero_start():
    sff = SFFBlock([640, 1280, 1280], [1280, 1280, 1280])
    higher = [torch.randn(2, c, 8, 8) for c in (640, 1280, 1280)]
    last = [torch.randn(2, 1280, 4, 4) for _ in range(3)]
    out = sff(higher, last)
    assert [o.shape for o in out] == [torch.Size([2, 1280, 4, 4])] * 3
    # Zero-initialised convolutions: at the start the block is a SiLU on the last block.
    assert torch.allclose(out[0], torch.nn.functional.silu(last[0]))
    with torch.no_grad():
        for paths in sff.paths:
            for path in paths:
                path[0].weight.normal_()
    assert not torch.allclose(sff(higher, last)[0], torch.nn.functional.silu(last[0]))
    # Instance Norm, no affine parameters: only the convolutions hold weights.
    assert all(isinstance(p[1], torch.nn.InstanceNorm2d) and not p[1].affine for ps in sff.paths for p in ps)


def test_sg_network_fuses_block_3_into_block_4_of_sd15_layout():
    channels = residual_channels(architecture("sd15").unet)
    assert channels == [320, 320, 320, 320, 640, 640, 640, 1280, 1280, 1280, 1280, 1280]
    with torch.device("meta"):
        sg = SemanticGuidedNetwork(architecture("sd15").unet, architecture("sd15").hint_channels)
    assert [p[0].in_channels for p in sg.sff.paths[0]] == [640, 1280, 1280]


def test_only_mid_control_connects_the_fused_block_and_the_middle_only():
    torch.manual_seed(0)
    sg = SemanticGuidedNetwork(TINY.unet, TINY.hint_channels, only_mid_control=True)
    for p in sg.parameters():  # leave the zero init so that every residual is non-zero
        torch.nn.init.normal_(p, std=0.05)
    args = (torch.randn(2, 4, 8, 8), torch.randn(2, 3, 32, 32), torch.tensor([10, 500]), torch.randn(2, 77, 32))
    controls = sg.controls(*args)
    down, mid = sg(*args)
    b = TINY.unet["layers_per_block"] + 1
    assert len(controls) == len(residual_channels(TINY.unet)) + 1
    assert all(d.abs().sum() == 0 for d in down[:-b])
    assert all(torch.equal(d, c) for d, c in zip(down[-b:], controls[-b - 1:-1])) and torch.equal(mid, controls[-1])
    all_down, _ = sg(*args, only_mid_control=False)
    assert all(torch.equal(d, c) for d, c in zip(all_down, controls[:-1]))


def test_reset_new_parts_is_seeded_and_zero_initialises_the_projections():
    a = SemanticGuidedNetwork(TINY.unet, TINY.hint_channels)
    b = SemanticGuidedNetwork(TINY.unet, TINY.hint_channels)
    for net in (a, b):
        for p in net.parameters():
            torch.nn.init.normal_(p)
        net.reset_new_parts(3)
    emb = a.controlnet.controlnet_cond_embedding
    assert torch.equal(emb.conv_in.weight, b.controlnet.controlnet_cond_embedding.conv_in.weight)
    assert emb.conv_out.weight.abs().sum() == 0 and a.controlnet.controlnet_mid_block.weight.abs().sum() == 0
    assert all(path[0].weight.abs().sum() == 0 for paths in a.sff.paths for path in paths)


# ---------------------------------------------------------------------------------------------- schedule, scoring

def test_ddim_plan_of_the_authors_and_the_consistent_truncation():
    schedule = NoiseSchedule(1000, 0.00085, 0.012)
    authors = schedule.plan(10, 999, noise_to_first_step=False)
    assert authors.noise_step == 999 and authors.steps[0] == (901, 801) and authors.steps[-1] == (1, -1)
    consistent = schedule.plan(10, 300, noise_to_first_step=True)
    assert consistent.noise_step == consistent.timesteps[0] == 201 and consistent.timesteps == (201, 101, 1)
    # The betas are linear in sqrt(beta) (LDM's "linear"), computed in float64.
    assert np.isclose(schedule.betas[0], 0.00085) and np.isclose(schedule.betas[-1], 0.012)
    assert np.allclose(np.sqrt(schedule.betas), np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000))


def test_ddim_step_inverts_the_noising_for_the_true_noise():
    schedule = NoiseSchedule(1000, 0.00085, 0.012)
    z, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    x = schedule.add_noise(z, eps, 501)
    x_prev, x0 = schedule.ddim_step(x, eps, 501, 401)
    torch.testing.assert_close(x0, z, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x_prev, schedule.add_noise(z, eps, 401), atol=1e-5, rtol=1e-5)


def test_image_score_is_max_after_eight_8x8_poolings():
    maps = torch.zeros(2, 64, 64)
    maps[0, 10, 10] = 1.0  # a single hot pixel is averaged away
    maps[1, 20:44, 20:44] = 1.0  # a large region survives
    scores = pooled_max(maps, 8, 8)
    x = maps[:, None]
    for _ in range(8):
        x = torch.nn.functional.avg_pool2d(x, 8, stride=1)
    assert x.shape[-1] == 64 - 8 * 7
    assert torch.allclose(scores, x.flatten(1).amax(1))
    assert scores[1] > scores[0] > 0 and maps[0].max() == maps[1].max()


def test_feature_distance_is_one_minus_cosine_summed_over_levels():
    a = [torch.randn(1, 4, 4, 4), torch.randn(1, 8, 2, 2)]
    same = feature_distance_map(a, a, (8, 8))
    assert same.shape == (1, 8, 8) and same.abs().max() < 1e-5
    opposite = feature_distance_map(a, [-f for f in a], (8, 8))
    assert torch.allclose(opposite, torch.full_like(opposite, 4.0), atol=1e-5)


# ---------------------------------------------------------------------------------------------- losses

def test_patch_discriminator_hinge_loss_and_adaptive_weight():
    disc = PatchDiscriminator(3, 8, 3)
    disc.initialise(0)
    convs = [m for m in disc.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 5 and convs[1].bias is None and convs[-1].out_channels == 1
    assert abs(float(convs[2].weight.std()) - 0.02) < 0.005
    assert disc(torch.randn(2, 3, 32, 32)).shape == (2, 1, 2, 2)
    assert float(hinge_d_loss(torch.full((4,), 2.0), torch.full((4,), -2.0))) == 0.0
    assert float(hinge_d_loss(torch.zeros(4), torch.zeros(4))) == 1.0
    w = torch.randn(3, requires_grad=True)
    nll, g = (w * 2).sum(), (w * 4).sum()
    assert torch.isclose(adaptive_weight(nll, g, w, 0.5), torch.tensor(0.5 * 2 / (4 + 1e-4 / 3 ** 0.5)), rtol=1e-4)


def _ldm_unet_keys(unet_state: dict, n: int) -> dict:
    """diffusers UNet tensors under the original LDM names (the reverse of diffusers' conversion)."""
    resnet = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
              "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
    out = {}
    for key, value in unet_state.items():
        parts = key.split(".")
        head = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
                "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
        for d, ldm in head.items():
            if key.startswith(d + "."):
                new = ldm + key[len(d):]
                break
        else:
            if parts[0] in ("down_blocks", "up_blocks"):
                i, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
                if parts[0] == "down_blocks":
                    if kind == "downsamplers":
                        new = f"input_blocks.{(n + 1) * (i + 1)}.0.op." + ".".join(rest[1:])
                    else:
                        new = f"input_blocks.{(n + 1) * i + j + 1}.{0 if kind == 'resnets' else 1}"
                else:
                    if kind == "upsamplers":
                        has_attn = any(k.startswith(f"up_blocks.{i}.attentions.") for k in unet_state)
                        new = f"output_blocks.{(n + 1) * i + n}.{2 if has_attn else 1}." + ".".join(rest)
                    else:
                        new = f"output_blocks.{(n + 1) * i + j}.{0 if kind == 'resnets' else 1}"
                if kind == "resnets":
                    new += "." + resnet.get(rest[0], rest[0]) + "." + ".".join(rest[1:])
                elif kind == "attentions":
                    new += "." + ".".join(rest)
            else:  # mid_block.{resnets,attentions}.k...
                kind, k, rest = parts[1], int(parts[2]), parts[3:]
                index = 1 if kind == "attentions" else 2 * k
                tail = resnet.get(rest[0], rest[0]) + "." + ".".join(rest[1:]) if kind == "resnets" else ".".join(rest)
                new = f"middle_block.{index}.{tail}"
        out["model.diffusion_model." + new] = value
    return out


def _ldm_vae_keys(vae_state: dict, levels: int) -> dict:
    """diffusers autoencoder tensors under the original LDM names."""
    out = {}
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    for key, value in vae_state.items():
        new = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        new = new.replace("mid_block.resnets.0", "mid.block_1").replace("mid_block.resnets.1", "mid.block_2")
        if "mid_block.attentions.0" in new:
            new = new.replace("mid_block.attentions.0", "mid.attn_1")
            for d, ldm in attn.items():
                new = new.replace(f"attn_1.{d}.", f"attn_1.{ldm}.")
            if value.ndim == 2:
                value = value[:, :, None, None]
        parts = new.split(".")
        if parts[1] in ("down_blocks", "up_blocks"):
            i = int(parts[2]) if parts[1] == "down_blocks" else levels - 1 - int(parts[2])
            name = "down" if parts[1] == "down_blocks" else "up"
            if parts[3] == "resnets":
                new = f"{parts[0]}.{name}.{i}.block.{parts[4]}." + ".".join(parts[5:])
            else:
                new = f"{parts[0]}.{name}.{i}.{'downsample' if name == 'down' else 'upsample'}." + ".".join(parts[5:])
        out["first_stage_model." + new] = value
    return out


# ---------------------------------------------------------------------------------------------- loading

def _tiny_sd_networks(seed: int = 0):
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**TINY.unet)
    vae = AutoencoderKL(**TINY.vae)
    text = CLIPTextModel(CLIPTextConfig(**TINY.text_encoder))
    return unet, vae, text


def test_single_file_checkpoint_loads_like_v1_5_pruned_ckpt(tmp_path):
    unet, vae, text = _tiny_sd_networks(1)
    state = {**_ldm_unet_keys(unet.state_dict(), TINY.unet["layers_per_block"]),
             **_ldm_vae_keys(vae.state_dict(), len(TINY.vae["block_out_channels"])),
             # v1-5-pruned.ckpt keeps CLIP under cond_stage_model.transformer.text_model.*
             **{"cond_stage_model.transformer.text_model." + k.removeprefix("text_model."): v
                for k, v in text.state_dict().items()},
             "model_ema.decay": torch.tensor(0.9999), "betas": torch.zeros(3)}
    torch.save({"state_dict": state}, tmp_path / "v1-5-pruned.ckpt")
    loaded = read_sd(tmp_path / "v1-5-pruned.ckpt", TINY)
    assert loaded.layout == "single_file"
    for ours, net in ((loaded.unet, unet), (loaded.vae, vae), (loaded.text_encoder.state_dict(), text)):
        reference = net.state_dict()
        assert set(ours) == set(reference)
        assert all(torch.equal(ours[k].reshape(reference[k].shape), reference[k]) for k in reference), type(net)
    # A tensor that belongs to no network is an error, not silently dropped.
    state["control_model.stray.weight"] = torch.zeros(2)
    torch.save(state, tmp_path / "other.ckpt")
    with pytest.raises(WeightsNotFoundError, match="stray"):
        read_sd(tmp_path / "other.ckpt", TINY)


def test_missing_sd_weights_name_the_file_and_the_pull_command(tmp_path):
    settings = micro(sd_pretrained=True)
    with pytest.raises(WeightsNotFoundError) as err:
        _fit(settings, tmp_path)
    text = str(err.value)
    assert "v1-5-pruned.ckpt" in text and "harness weights pull" in text and "--weights random" in text


def test_pretrained_fit_copies_sd_into_unet_and_sg(tmp_path):
    unet, vae, text = _tiny_sd_networks(2)
    folder = tmp_path / "sd"
    for name, net in (("unet", unet), ("vae", vae), ("text_encoder", text)):
        net.save_pretrained(folder / name)
    method, ctx = _fit(micro(sd_pretrained=True, sd_path=str(folder), ae_epochs=0, epochs=0), tmp_path / "fit")
    assert torch.equal(method.unet.conv_in.weight, unet.conv_in.weight)
    assert torch.equal(method.sg.controlnet.conv_in.weight, unet.conv_in.weight)
    assert torch.equal(method.vae.encoder.conv_in.weight, vae.encoder.conv_in.weight)
    assert method.context.embedding.abs().sum() > 0  # the empty prompt's CLIP output
    assert ctx.info["sd_layout"] == "folder" and any(str(folder) in u["path"] for u in ctx.weights.used)


def test_random_weights_read_no_file_even_when_the_settings_ask_for_pretrained(tmp_path):
    settings = micro(sd_pretrained=True, backbone_pretrained=True, ae_perceptual_weight=1.0, epochs=0)
    method, ctx = _fit(settings, tmp_path, random_weights=True)
    assert ctx.info["sd_init"] == "random" and ctx.info["backbone_init"].startswith("random")
    assert ctx.weights.used == []


# ---------------------------------------------------------------------------------------------- training

def test_sd_encoder_frozen_while_sg_and_decoder_train(tmp_path):
    method = DiAD(micro())
    train = _train_set()
    ctx = fit_context(method.settings, tmp_path)
    method._initialise(train, ctx)
    before = {n: p.detach().clone() for n, p in method.unet.named_parameters()}
    sg_before = {n: p.detach().clone() for n, p in method.sg.named_parameters()}
    method.train_denoiser(train, ctx)
    changed = {n for n, p in method.unet.named_parameters() if not torch.equal(p, before[n])}
    encoder = ("conv_in.", "time_embedding.", "down_blocks.", "mid_block.")
    assert not any(n.startswith(encoder) for n in changed)
    assert any(n.startswith("up_blocks.") for n in changed) and any(n.startswith("conv_out.") for n in changed)
    assert any(not torch.equal(p, sg_before[n]) for n, p in method.sg.named_parameters())


def test_accumulation_steps_the_leftover_at_each_epoch_end(tmp_path):
    # 5 images, batch 2: 3 batches per epoch; accumulating 2, Lightning steps after batches 2 and 3.
    settings = micro(ae_epochs=2, ae_train_batch_size=2, ae_grad_accumulation=2, epochs=2, train_batch_size=2,
                     grad_accumulation=2)
    _, ctx = _fit(settings, tmp_path, train=_train_set(5))
    assert ctx.info["ae_steps"] == 4 and ctx.info["steps"] == 4


def test_the_adversarial_term_is_gated_on_the_step(tmp_path):
    base = dict(ae_epochs=2, ae_train_batch_size=2, epochs=0)
    off, _ = _fit(micro(**base, ae_disc_factor=0.0), tmp_path / "off")
    late, late_ctx = _fit(micro(**base, ae_disc_start=100), tmp_path / "late")
    # Before the start the loss is exactly L1 + KL: identical to training without a discriminator.
    assert all(torch.equal(a, b) for a, b in zip(off.vae.state_dict().values(), late.vae.state_dict().values()))
    assert late_ctx.info["ae_adversarial_steps"] == 0
    on, on_ctx = _fit(micro(**base, ae_disc_start=3), tmp_path / "on")  # 8 images / 2: 8 steps, 5 adversarial
    assert on_ctx.info["ae_adversarial_steps"] == 5 and on_ctx.info["ae_steps"] == 8
    assert not all(torch.equal(a, b) for a, b in zip(off.vae.state_dict().values(), on.vae.state_dict().values()))


def test_the_discriminator_adam_starts_at_the_global_step(tmp_path, monkeypatch):
    seen = {}
    original = torch.optim.Adam.step

    def spy(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if any(p.ndim == 4 and p.shape[1] == 3 and p.shape[-1] == 4 for g in self.param_groups for p in g["params"]):
            seen["step"] = float(next(iter(self.state.values()))["step"])
        return out

    monkeypatch.setattr(torch.optim.Adam, "step", spy)
    _fit(micro(ae_epochs=2, ae_train_batch_size=2, epochs=0, ae_disc_start=3), tmp_path)
    # Steps 0-2 without the discriminator (the authors' zero-gradient steps), then steps 3..7: Adam step 8.
    assert seen["step"] == 8.0


def test_gradient_checkpointing_changes_no_number(tmp_path):
    plain, _ = _fit(micro(ae_epochs=0), tmp_path / "a")
    checkpointed, _ = _fit(micro(ae_epochs=0, gradient_checkpointing=True), tmp_path / "b")
    assert checkpointed.unet.is_gradient_checkpointing and checkpointed.sg.controlnet.is_gradient_checkpointing
    for a, b in zip(plain.sg.state_dict().values(), checkpointed.sg.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_fast_dev_run_makes_two_steps_per_stage_and_bf16_predicts_float32(tmp_path):
    settings = micro(ae_epochs=5, epochs=5, ae_train_batch_size=2, train_batch_size=2, precision="bf16")
    method, ctx = _fit(settings, tmp_path, fast_dev_run=True)
    assert ctx.info["ae_steps"] == 2 and ctx.info["steps"] == 2 and ctx.info["epochs"] == 1
    pred = method.predict(torch.rand(2, 3, 32, 32), ["a", "a"])
    assert pred.anomaly_maps.dtype == torch.float32 and torch.isfinite(pred.anomaly_maps).all()


class _Killed(RuntimeError):
    pass


@pytest.mark.parametrize("kill_at", [3, 10])  # mid autoencoder stage; mid denoiser stage
def test_a_fit_killed_halfway_resumes_to_identical_predictions(tmp_path, monkeypatch, kill_at):
    settings = micro(ae_epochs=2, epochs=2, ae_train_batch_size=2, train_batch_size=2, grad_accumulation=2)
    images = torch.rand(3, 3, 32, 32)
    reference, ref_ctx = _fit(settings, tmp_path / "uninterrupted")
    assert ref_ctx.info["ae_steps"] == 8 and ref_ctx.info["steps"] == 4
    expected = reference.predict(images, ["a"] * 3)

    original, count = Position.step, {"n": 0}

    def dying_step(self, *, epoch, batch):
        original(self, epoch=epoch, batch=batch)  # saves the checkpoint (interval 0)
        count["n"] += 1
        if count["n"] == kill_at:
            raise _Killed("killed")

    monkeypatch.setattr(Position, "step", dying_step)
    with pytest.raises(_Killed):
        _fit(settings, tmp_path / "run", checkpoint_interval=0)
    monkeypatch.setattr(Position, "step", original)
    resumed, ctx = _fit(settings, tmp_path / "run", checkpoint_interval=0)
    stage = "autoencoder" if kill_at <= 8 else "denoiser"
    assert ctx.checkpoint.resumed_from["stage"] == stage
    got = resumed.predict(images, ["a"] * 3)
    assert torch.equal(got.anomaly_maps, expected.anomaly_maps) and torch.equal(got.image_scores, expected.image_scores)
    assert ctx.info["ae_steps"] == 8 and ctx.info["steps"] == 4


def test_conformance_kit(tmp_path):
    check_method(SPEC, "tiny", overrides={**MICRO, "ae_train_batch_size": 2, "train_batch_size": 2},
                 workdir=tmp_path)


def test_tiny_fit_and_predict_shapes(tmp_path):
    method, ctx = _fit(micro(), tmp_path)
    images = torch.rand(3, 3, 32, 32)
    pred = method.predict(images, ["a"] * 3)
    assert pred.anomaly_maps.shape == (3, 32, 32) and pred.image_scores.shape == (3,)
    assert torch.isfinite(pred.anomaly_maps).all()
    again = method.predict(images, ["a"] * 3)
    assert torch.equal(pred.image_scores, again.image_scores)  # seeded inference noise
    # Tiny profile, 4 DDIM steps (1, 251, 501, 751): noised to 251, the first step run.
    assert ctx.info["sd_init"] == "random" and ctx.info["noise_step"] == 251 and ctx.info["ddim_timesteps"] == [251, 1]


@pytest.mark.slow
def test_main_job_record_of_diad():
    """The README's job for this method: random SD-shaped networks, trained, all metrics recorded."""
    record = synthetic_record("diad")
    assert record["status"] == "ok", record.get("error")
    assert set(record["mean"]) >= {"image_auroc", "pixel_auroc", "pixel_aupro"}
    assert record["method_info"]["sd_init"] == "random" and record["method_info"]["steps"] > 0
    assert record["method_info"]["choices"]["checkpoint_selection"]["value"] == "final"


# ---------------------------------------------------------------------------------------------- the authors' autoencoder files

def _lightning_autoencoder_ckpt(path, seed: int = 5):
    """An autoencoder checkpoint laid out as the authors' mvtecad_fs.ckpt (Lightning 1.5, LDM's AutoencoderKL):
    the weights under state_dict without the first_stage_model. prefix, the loss module's tensors beside them,
    and Lightning's bookkeeping (epoch, global step, callbacks, optimiser states, loops)."""
    import collections

    torch.manual_seed(seed)
    vae = AutoencoderKL(**TINY.vae)
    disc = PatchDiscriminator(3, 64, 3)
    disc.initialise(seed)
    state = collections.OrderedDict(
        (k.removeprefix("first_stage_model."), v) for k, v in _ldm_vae_keys(vae.state_dict(), len(TINY.vae["block_out_channels"])).items())
    state.update({f"loss.discriminator.{k}": v.clone() for k, v in disc.state_dict().items()})
    state["loss.logvar"] = torch.zeros(())
    state["loss.perceptual_loss.lin0.model.1.weight"] = torch.rand(1, 64, 1, 1)
    opt = torch.optim.Adam(vae.parameters(), lr=1.8e-4, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(disc.parameters(), lr=1.8e-4, betas=(0.5, 0.9))
    checkpoint = {
        "epoch": 221, "global_step": 50999, "pytorch-lightning_version": "1.5.0", "state_dict": state,
        "callbacks": {"ModelCheckpoint{'monitor': None, 'mode': 'min', 'every_n_train_steps': 0, 'every_n_epochs': 1, "
                      "'train_time_interval': None, 'save_on_train_epoch_end': True}": {
                          "monitor": None, "best_model_score": None, "best_model_path": "", "current_score": None,
                          "dirpath": "/lightning_logs/version_0/checkpoints", "best_k_models": {},
                          "kth_best_model_path": "", "kth_value": torch.tensor(float("inf")), "last_model_path": ""}},
        "optimizer_states": [opt.state_dict(), opt_d.state_dict()], "lr_schedulers": [],
        "loops": {"fit_loop": {"state_dict": {}, "epoch_loop.state_dict": {"_batches_that_stepped": 50999},
                               "epoch_progress": {"total": {"ready": 222, "started": 222, "processed": 222,
                                                            "completed": 221}}}},
    }
    torch.save(checkpoint, path)
    return vae, disc


def test_a_lightning_autoencoder_checkpoint_loads_without_running_pickled_code(tmp_path):
    """The authors' mvtecad_fs.ckpt layout: weights_only=True reads it; the loss tensors are kept apart."""
    from harness_diad.convert import convert_authors_state, read_checkpoint

    path = tmp_path / "mvtecad_fs.ckpt"
    vae, disc = _lightning_autoencoder_ckpt(path)
    converted = convert_authors_state(read_checkpoint(path), TINY)
    reference = vae.state_dict()
    assert set(converted.vae) == set(reference)
    assert all(torch.equal(converted.vae[k].reshape(reference[k].shape), reference[k]) for k in reference)
    assert converted.loss["discriminator.main.0.weight"].equal(disc.state_dict()["main.0.weight"])
    assert {"logvar", "perceptual_loss.lin0.model.1.weight"} <= set(converted.loss) and not converted.ignored
    method, ctx = _fit(micro(ae_init_path=str(path), ae_epochs=0, epochs=0), tmp_path / "fit")
    assert torch.equal(method.vae.encoder.conv_in.weight, vae.encoder.conv_in.weight)
    assert ctx.info["ae_init"] == str(path) and ctx.info["ae_init_loss_tensors"] == len(converted.loss)
    assert [u["key"] for u in ctx.weights.used] == ["ae_init"]


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    """A pickled object with a reduce hook (what an attacker plants) is never executed."""
    import collections

    marker = tmp_path / "ran"

    class Planted:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"state_dict": collections.OrderedDict(w=torch.zeros(1)), "hyper_parameters": Planted()},
               tmp_path / "planted.ckpt")
    from harness_diad.convert import read_checkpoint

    with pytest.raises(WeightsNotFoundError, match="cannot be read"):
        read_checkpoint(tmp_path / "planted.ckpt")
    assert not marker.exists()


def test_kl_f8_archive_is_read_through_its_model_ckpt(tmp_path):
    """LDM's kl-f8.zip as the authors download it: the model.ckpt inside is extracted once and read."""
    import zipfile

    from harness_diad.convert import convert_authors_state, read_checkpoint

    inner = tmp_path / "model.ckpt"
    vae, _ = _lightning_autoencoder_ckpt(inner, seed=6)
    with zipfile.ZipFile(tmp_path / "kl-f8.zip", "w") as archive:
        archive.write(inner, "model.ckpt")
    inner.unlink()
    converted = convert_authors_state(read_checkpoint(tmp_path / "kl-f8.zip"), TINY)
    assert torch.equal(converted.vae["encoder.conv_in.weight"], vae.state_dict()["encoder.conv_in.weight"])
    assert (tmp_path / "kl-f8.model.ckpt").is_file()


@pytest.mark.parametrize("disc_init", ["checkpoint", "fresh"])
def test_the_discriminator_starts_from_the_checkpoint_and_lpips_drops_out(tmp_path, monkeypatch, disc_init):
    """kl-f8 loaded non-strictly fills the authors' loss module: the discriminator starts trained; LPIPS in train mode."""
    import harness_diad.model as model_module
    from harness_diad.weights import lpips_vgg

    path = tmp_path / "kl-f8.ckpt"
    _, disc = _lightning_autoencoder_ckpt(path, seed=7)
    seen = {}

    def recording_lpips(self, context):
        # LPIPS with random trunk and heads (no VGG-16 file here), recording its mode when it runs.
        module = lpips_vgg(None, pretrained_heads=False)
        module.register_forward_pre_hook(lambda m, _: seen.setdefault("lpips_training", m.training) and None)
        return module

    first = {}
    original_forward = PatchDiscriminator.forward

    def recording_forward(self, images):
        first.setdefault("main.0.weight", self.main[0].weight.detach().clone())
        return original_forward(self, images)

    monkeypatch.setattr(model_module.DiAD, "_lpips", recording_lpips)
    monkeypatch.setattr(PatchDiscriminator, "forward", recording_forward)
    settings = micro(ae_init_path=str(path), ae_epochs=1, epochs=0, ae_disc_start=0, ae_perceptual_weight=1.0,
                     ae_disc_init=disc_init)
    method, ctx = _fit(settings, tmp_path / "fit", random_weights=False)
    del method
    assert seen["lpips_training"] is True and ctx.info["ae_lpips_mode"] == "train"
    from_file = torch.equal(first["main.0.weight"], disc.state_dict()["main.0.weight"])
    assert from_file is (disc_init == "checkpoint")
    assert ("trained discriminator" in ctx.info["ae_discriminator_start"]) is (disc_init == "checkpoint")


def test_paper_profile_names_the_kl_f8_autoencoder():
    paper = SPEC.resolve("paper")
    assert (paper.ae_init, paper.ae_disc_init, paper.ae_lpips_mode) == ("kl-f8", "checkpoint", "train")
    choices = open_choices(SPEC.schema, paper)
    assert "kl-f8" in choices["ae_init"]["why"] and choices["ae_lpips_mode"]["value"] == "train"
