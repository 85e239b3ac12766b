"""Tests of the DiAD plugin: sizes, SD loading paths, SFF block, scoring rule, frozen parts, a tiny run."""

from __future__ import annotations

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

from harness import FitContext, TrainSet, WeightsNotFoundError  # noqa: E402
from harness.data import ImageCache, Sample  # noqa: E402
from harness.progress import Progress  # noqa: E402
from harness.weights import WeightsResolver  # noqa: E402
from harness_diad.architectures import ARCHITECTURES  # noqa: E402
from harness_diad.model import DiAD  # noqa: E402
from harness_diad.networks import SFFBlock, SemanticGuidedNetwork, residual_channels  # noqa: E402
from harness_diad.plugin import PROFILES, harness_methods  # noqa: E402
from harness_diad.scoring import feature_distance_map, pooled_max_score  # noqa: E402
from harness_diad.weights import find_sd, read_sd  # noqa: E402
from synthetic_runs import synthetic_record  # noqa: E402

TINY = ARCHITECTURES["tiny"]
#: The tiny profile at the smallest size that runs every code path quickly.
MICRO = {**PROFILES["tiny"], "image_size": 32, "ae_epochs": 1, "epochs": 1, "batch_size": 4, "ae_batch_size": 4,
         "ddim_steps": 2}


# ---------------------------------------------------------------------------------------------- sizes

def test_paper_profile_matches_table_11_on_meta_device():
    with torch.device("meta"):
        method = DiAD(PROFILES["paper"])
    counts = method.parameter_count()
    for name, paper in (("unet", 859e6), ("sg", 471e6), ("vae", 83.7e6)):
        assert abs(counts[name] / paper - 1) < 0.03, (name, counts[name])
    # The SG count includes the SFF block's nine bias-free 3 x 3 convolutions (110.6 M).
    assert sum(p.numel() for p in method.sg.sff.parameters()) == 3 * (640 + 2 * 1280) * 1280 * 9


def test_spec_declares_every_setting():
    (spec,) = harness_methods()
    assert spec.name == "diad"
    for profile in spec.profiles.values():
        assert set(profile) == set(spec.settings_help)


# ---------------------------------------------------------------------------------------------- SFF block

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
    channels = residual_channels(ARCHITECTURES["sd15"]["unet"])
    assert channels == [320, 320, 320, 320, 640, 640, 640, 1280, 1280, 1280, 1280, 1280]
    with torch.device("meta"):
        sg = SemanticGuidedNetwork(ARCHITECTURES["sd15"]["unet"], ARCHITECTURES["sd15"]["hint_channels"])
    assert [p[0].in_channels for p in sg.sff.paths[0]] == [640, 1280, 1280]


def test_sg_network_residuals_only_reach_the_last_block_and_middle():
    torch.manual_seed(0)
    sg = SemanticGuidedNetwork(TINY["unet"], TINY["hint_channels"])
    for p in sg.parameters():  # leave the zero init so that every residual is non-zero
        torch.nn.init.normal_(p, std=0.05)
    down, mid = sg(torch.randn(2, 4, 8, 8), torch.randn(2, 3, 32, 32), torch.tensor([10, 500]), torch.randn(2, 77, 32))
    b = TINY["unet"]["layers_per_block"] + 1
    assert len(down) == len(residual_channels(TINY["unet"]))
    assert all(d.abs().sum() == 0 for d in down[:-b])
    assert all(d.abs().sum() > 0 for d in down[-b:]) and mid.abs().sum() > 0


# ---------------------------------------------------------------------------------------------- scoring

def test_image_score_is_max_after_eight_8x8_poolings():
    maps = torch.zeros(2, 64, 64)
    maps[0, 10, 10] = 1.0  # a single hot pixel is averaged away
    maps[1, 20:44, 20:44] = 1.0  # a large region survives
    scores = pooled_max_score(maps, kernel=8, rounds=8)
    x = maps[:, None]
    for _ in range(8):
        x = torch.nn.functional.avg_pool2d(x, 8, stride=1)
    assert x.shape[-1] == 64 - 8 * 7
    assert torch.allclose(scores, x.flatten(1).amax(1))
    assert scores[1] > scores[0] > 0
    # The maximum of the raw map would not separate them.
    assert maps[0].max() == maps[1].max()
    # A map smaller than the window stops pooling instead of failing.
    assert pooled_max_score(torch.ones(1, 5, 5), 8, 8).item() == 1.0


def test_feature_distance_is_one_minus_cosine_summed_over_levels():
    a = [torch.randn(1, 4, 4, 4), torch.randn(1, 8, 2, 2)]
    same = feature_distance_map(a, a, (8, 8))
    assert same.shape == (1, 8, 8) and same.abs().max() < 1e-5
    opposite = feature_distance_map(a, [-f for f in a], (8, 8))
    assert torch.allclose(opposite, torch.full_like(opposite, 4.0), atol=1e-5)


# ---------------------------------------------------------------------------------------------- loading

def _tiny_sd_networks(seed: int = 0):
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**TINY["unet"])
    vae = AutoencoderKL(**TINY["vae"])
    text = CLIPTextModel(CLIPTextConfig(**TINY["text_encoder"]))
    return unet, vae, text


def _context(tmp_path: Path, weights_dir: Path | None = None, **settings) -> FitContext:
    return FitContext(device=torch.device("cpu"), seed=0, profile="tiny", settings=settings, cache_dir=tmp_path,
                      weights=WeightsResolver(weights_dir), progress=Progress(False),
                      pseudo_validation=lambda **_: None)


def _train_set(n: int = 8, size: int = 32) -> TrainSet:
    rng = np.random.default_rng(0)
    samples = []
    for i in range(n):
        img = (rng.random((size, size, 3)) * 50 + 100).astype(np.uint8)
        samples.append(Sample(f"a/train/good/{i}", "a", "train", 0, "good", image=lambda a=img: a))
    return TrainSet("t", samples, (size, size), ImageCache())


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


def test_diffusers_folder_loads_through_the_real_sd_path(tmp_path):
    unet, vae, text = _tiny_sd_networks()
    folder = tmp_path / "weights" / "stable-diffusion-v1-5"
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    text.save_pretrained(folder / "text_encoder")
    path, layout = find_sd(WeightsResolver(tmp_path / "weights"))
    assert (path, layout) == (folder, "folder")
    loaded = read_sd(path, layout, TINY)
    for a, b in ((loaded.unet, unet), (loaded.vae, vae), (loaded.text_encoder, text)):
        sa, sb = a.state_dict(), b.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sb)


def test_single_file_checkpoint_loads_like_v1_5_pruned_ckpt(tmp_path):
    unet, vae, text = _tiny_sd_networks(1)
    state = {**_ldm_unet_keys(unet.state_dict(), TINY["unet"]["layers_per_block"]),
             **_ldm_vae_keys(vae.state_dict(), len(TINY["vae"]["block_out_channels"])),
             **{"cond_stage_model.transformer." + k: v for k, v in text.state_dict().items()}}
    (tmp_path / "w").mkdir()
    torch.save({"state_dict": state}, tmp_path / "w" / "v1-5-pruned.ckpt")
    path, layout = find_sd(WeightsResolver(tmp_path / "w"))
    assert layout == "single_file"
    loaded = read_sd(path, layout, TINY)
    for a, b in ((loaded.unet, unet), (loaded.vae, vae), (loaded.text_encoder, text)):
        sa, sb = a.state_dict(), b.state_dict()
        assert all(torch.allclose(sa[k], sb[k].reshape(sa[k].shape)) for k in sb), type(b).__name__


def test_missing_sd_weights_name_files_and_tiny_profile(tmp_path):
    method = DiAD({**MICRO, "pretrained": True})
    with pytest.raises(WeightsNotFoundError) as err:
        method.fit(_train_set(), _context(tmp_path, tmp_path / "empty"))
    text = str(err.value)
    assert "v1-5-pruned.ckpt" in text and "stable-diffusion-v1-5" in text and "tiny" in text


def test_pretrained_fit_copies_sd_into_unet_and_sg(tmp_path):
    unet, vae, text = _tiny_sd_networks(2)
    folder = tmp_path / "sd"
    for name, net in (("unet", unet), ("vae", vae), ("text_encoder", text)):
        net.save_pretrained(folder / name)
    method = DiAD({**MICRO, "pretrained": True, "sd_path": str(folder), "ae_epochs": 0, "epochs": 0})
    method.fit(_train_set(), _context(tmp_path))
    assert torch.equal(method.unet.conv_in.weight, unet.conv_in.weight)
    assert torch.equal(method.sg.controlnet.conv_in.weight, unet.conv_in.weight)
    assert torch.equal(method.vae.encoder.conv_in.weight, vae.encoder.conv_in.weight)
    # The context is the text encoder's output for the empty prompt.
    assert method.context.embedding.abs().sum() > 0


# ---------------------------------------------------------------------------------------------- training

def test_sd_encoder_frozen_while_sg_and_decoder_train(tmp_path):
    method = DiAD(MICRO)
    train = _train_set()
    ctx = _context(tmp_path)
    method._initialise(train, ctx)
    before = {n: p.detach().clone() for n, p in method.unet.named_parameters()}
    sg_before = {n: p.detach().clone() for n, p in method.sg.named_parameters()}
    method.train_denoiser(train, ctx)
    changed = {n for n, p in method.unet.named_parameters() if not torch.equal(p, before[n])}
    encoder = ("conv_in.", "time_embedding.", "down_blocks.", "mid_block.")
    assert not any(n.startswith(encoder) for n in changed)
    assert any(n.startswith("up_blocks.") for n in changed) and any(n.startswith("conv_out.") for n in changed)
    assert any(not torch.equal(p, sg_before[n]) for n, p in method.sg.named_parameters())


def test_tiny_fit_and_predict_shapes(tmp_path):
    method = DiAD(MICRO)
    ctx = _context(tmp_path)
    method.fit(_train_set(), ctx)
    images = torch.rand(3, 3, 32, 32)
    pred = method.predict(images, ["a"] * 3)
    assert pred.anomaly_maps.shape == (3, 32, 32) and pred.image_scores.shape == (3,)
    assert torch.isfinite(pred.anomaly_maps).all()
    again = method.predict(images, ["a"] * 3)
    assert torch.equal(pred.image_scores, again.image_scores)  # seeded inference noise
    assert ctx.info["sd_init"] == "random" and ctx.info["backbone_init"] == "random"


@pytest.mark.slow
def test_main_job_record_of_diad():
    """The README's job for this method: random SD-shaped networks, trained, all metrics recorded."""
    record = synthetic_record("diad")
    assert record["status"] == "ok", record.get("error")
    assert set(record["mean"]) >= {"image_auroc", "pixel_auroc", "pixel_aupro"}
    assert record["method_info"]["sd_init"] == "random" and record["method_info"]["steps"] > 0
