"""Golden tests: our DiAD networks, loaded through the converter, against outputs of the authors' code.

``tests/golden/diad/`` holds the state_dict of the authors' ``sgn.sgn.DiAD`` (lewandofskee/DiAD at
d2813006, official key names) in a tiny configuration with random, perturbed weights (stored as
int8 codes with a float32 scale per tensor, their product exactly the weights used), its configuration, fixed inputs and the outputs of the official
functions, and a reference set of the authors' scoring code (see its README). Each test builds our networks from that configuration (diffusers' own LDM config
functions), loads the official state through :mod:`harness_diad.convert` and compares with
atol = rtol = 1e-4 (the DDIM latents, which grow to about 34, relative to their magnitude).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

try:
    import harness_diad  # noqa: F401
except ImportError:  # not installed: import from the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins" / "diad"))

GOLDEN = Path(__file__).resolve().parent / "golden" / "diad"

TOL = dict(atol=1e-4, rtol=1e-4)


def _relative(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    scale = float(expected.abs().max())
    torch.testing.assert_close(actual, expected, atol=1e-4 * max(scale, 1.0), rtol=1e-4, msg=lambda m: f"{what}: {m}")


@pytest.fixture(scope="module")
def golden():
    """(config, official state, inputs and outputs)."""
    from safetensors.torch import load_file

    config = json.loads((GOLDEN / "diad_config.json").read_text())
    state = official_state()
    io = load_file(str(GOLDEN / "diad_io.safetensors"))
    return config, state, io


def official_state() -> dict[str, torch.Tensor]:
    """The official state_dict: int8 codes times their float32 scale, exactly the weights that made the outputs."""
    from safetensors import safe_open

    with safe_open(str(GOLDEN / "diad_state.safetensors"), framework="pt") as handle:
        scales = json.loads(handle.metadata()["int8_scales"])
        return {k: (handle.get_tensor(k).float() * torch.tensor(scales[k], dtype=torch.float32) if k in scales
                    else handle.get_tensor(k)) for k in handle.keys()}


@pytest.fixture(scope="module")
def method(golden):
    """Our DiAD with the golden configuration and the official weights, in eval mode."""
    from harness_diad.architectures import from_ldm_config
    from harness_diad.model import DiAD
    from harness_diad.plugin import harness_methods

    config, state, _ = golden
    (spec,) = harness_methods()
    # The paper profile's pipeline; a small random backbone (the golden data stops before the scoring).
    settings = spec.resolve("paper", {"backbone": "resnet18", "backbone_pretrained": False,
                                      "sd_pretrained": False, "gradient_checkpointing": False})
    torch.manual_seed(0)
    model = DiAD(settings, arch=from_ldm_config(config, "golden"))
    model.load_authors_checkpoint(GOLDEN / "diad_state.safetensors", state=state)
    model.eval()
    return model


def test_the_golden_configuration_is_built_and_every_official_tensor_loaded(golden, method):
    from harness_diad.convert import convert_authors_state

    config, state, _ = golden
    counts = method.parameter_count()
    # The README's counts of control_model.*, model.diffusion_model.* and first_stage_model.*.
    assert (counts["sg"], counts["unet"], counts["vae"]) == (1_753_008, 2_491_844, 367_527)
    converted = convert_authors_state(state, method.arch)  # raises on any tensor it cannot place
    assert not converted.ignored
    assert len(converted.unet) + len(converted.controlnet) + len(converted.sff) + len(converted.vae) == 1220 - 13
    # The SFF block's authors' down{i}{j} reads output 5+i and feeds output 8+j.
    assert torch.equal(method.sg.sff.paths[0][2][0].weight, state["control_model.down31.0.weight"])
    # Our schedule is the authors' buffers.
    for name, ours in (("alphas_cumprod", method.schedule.alphas_cumprod), ("sqrt_alphas_cumprod",
                       method.schedule._sqrt), ("sqrt_one_minus_alphas_cumprod", method.schedule._sqrt_one_minus)):
        torch.testing.assert_close(torch.from_numpy(ours), state[name], atol=0, rtol=1e-7)


@torch.no_grad()
def test_sg_network_gives_the_13_official_control_tensors(golden, method):
    _, _, io = golden
    hint_out = {}
    handle = method.sg.controlnet.controlnet_cond_embedding.register_forward_hook(
        lambda _m, _i, out: hint_out.setdefault("hint", out))
    try:
        controls = method.sg.controls(io["in.x_noisy"], io["in.image"], io["in.t"], io["in.context"])
    finally:
        handle.remove()
    assert len(controls) == 13
    torch.testing.assert_close(hint_out["hint"], io["out.sg_guided_hint"], **TOL)
    for i, control in enumerate(controls):
        torch.testing.assert_close(control, io[f"out.sg_control.{i:02d}"], **TOL,
                                   msg=lambda m, i=i: f"control {i}: {m}")


@pytest.mark.parametrize("only_mid_control", [True, False])
@torch.no_grad()
def test_unet_noise_prediction_with_the_sg_network(golden, method, only_mid_control):
    _, _, io = golden
    eps = method.predict_noise(io["in.x_noisy"], io["in.t"], io["in.image"], io["in.context"],
                               only_mid_control=only_mid_control)
    expected = io[f"out.eps_only_mid_control_{str(only_mid_control).lower()}"]
    torch.testing.assert_close(eps, expected, **TOL)
    other = io[f"out.eps_only_mid_control_{str(not only_mid_control).lower()}"]
    assert (eps - other).abs().max() > 1e-2  # the switch matters at these weights


@torch.no_grad()
def test_autoencoder_posterior_latent_and_reconstruction(golden, method):
    _, _, io = golden
    posterior = method.vae.encode(io["in.image"]).latent_dist
    torch.testing.assert_close(posterior.mean, io["out.vae_posterior_mean"], **TOL)
    torch.testing.assert_close(posterior.logvar, io["out.vae_posterior_logvar"], **TOL)
    z0 = method.encode(io["in.image"], noise=io["in.vae_eps"])
    torch.testing.assert_close(z0, io["out.z0"], **TOL)
    torch.testing.assert_close(method.decode(io["out.z0"]), io["out.vae_recon"], **TOL)


@torch.no_grad()
def test_ten_step_ddim_test_pipeline_step_by_step(golden, method):
    """From the image to the decoded sample: every step compared (log_images_test, batch by batch)."""
    _, _, io = golden
    plan = method.ddim  # the paper profile: noised to 999, DDIM 901, 801, ..., 1
    assert plan.noise_step == 999 and list(io["in.t_x_T"]) == [999, 999]
    z0 = method.encode(io["in.image"], noise=io["in.vae_eps"])
    x_t = method.schedule.add_noise(z0, io["in.q_noise"], plan.noise_step)
    torch.testing.assert_close(x_t, io["out.x_T"], **TOL)
    steps = []
    samples = method.sample(x_t, io["in.image"], plan, context=io["in.context"],
                            callback=lambda i, t, x, x0: steps.append((t, x.clone(), x0.clone())))
    assert [t for t, _, _ in steps] == io["out.ddim_t_steps"][:, 0].tolist() == [901 - 100 * i for i in range(10)]
    for i, (_, x, x0) in enumerate(steps):
        _relative(x, io["out.ddim_x_steps"][i], f"x after DDIM step {i}")
        _relative(x0, io["out.ddim_pred_x0_steps"][i], f"pred_x0 of DDIM step {i}")
    _relative(samples, io["out.ddim_samples"], "DDIM samples")
    torch.testing.assert_close(method.decode(samples), io["out.samples_decoded"], **TOL)


def test_an_sd_single_file_in_the_official_layout_loads_through_the_same_converter(golden, method, tmp_path):
    """The UNet and autoencoder tensors of the official state, saved as an SD v1 file, read by read_sd."""
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    from harness_diad.architectures import Architecture
    from harness_diad.weights import read_sd

    _, state, _ = golden
    text_config = dict(vocab_size=49408, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, max_position_embeddings=77, projection_dim=64)
    torch.manual_seed(0)
    text = CLIPTextModel(CLIPTextConfig(**text_config))
    single = {k: v.clone() for k, v in state.items() if not k.startswith("control_model.")}
    # The layout of v1-5-pruned.ckpt: CLIP under cond_stage_model.transformer.text_model.*.
    single.update({"cond_stage_model.transformer.text_model." + k.removeprefix("text_model."): v.clone()
                   for k, v in text.state_dict().items()})
    single.update({"model_ema." + k.replace(".", "")[:60]: torch.zeros(1) for k in list(state)[20:21]})
    save_file(single, str(tmp_path / "v1-5-pruned.safetensors"))
    arch = Architecture("golden-sd", dict(method.arch.unet), dict(method.arch.vae), text_config)
    weights = read_sd(tmp_path / "v1-5-pruned.safetensors", arch)
    assert weights.layout == "single_file"
    for ours, net in ((weights.unet, method.unet), (weights.vae, method.vae)):
        reference = net.state_dict()
        assert set(ours) == set(reference)
        assert all(torch.equal(ours[k].reshape(reference[k].shape), reference[k]) for k in reference)
    assert all(torch.equal(weights.text_encoder.state_dict()[k], v) for k, v in text.state_dict().items())


def test_the_authors_checkpoint_setting_scores_their_model_without_training(golden, tmp_path):
    """``authors_checkpoint`` loads a checkpoint of the authors' code through the converter; fit trains nothing."""
    from harness.data import ImageCache, TrainSet
    from harness.testing import fit_context, tiny_dataset
    from harness_diad.architectures import from_ldm_config
    from harness_diad.model import DiAD
    from harness_diad.plugin import harness_methods

    from safetensors.torch import save_file

    config, state, _ = golden
    (spec,) = harness_methods()
    # A checkpoint file of the official layout, as the authors' code writes its state_dict.
    path = tmp_path / "diad.safetensors"
    save_file(state, str(path))
    settings = spec.resolve("paper", {"authors_checkpoint": str(path), "backbone": "resnet18",
                                      "backbone_pretrained": False, "image_size": 128, "eval_batch_size": 4})
    assert [f.key for f in spec.weight_files(settings)] == ["authors_checkpoint"]
    model = DiAD(settings, arch=from_ldm_config(config, "golden"))
    # 128 px: the latent's last level is 2 x 2 (Instance Norm in the SFF block needs more than one value).
    index = tiny_dataset(128, n_train=2, n_test=2)
    samples = [s for c in index.categories.values() for s in c.train]
    context = fit_context(settings, tmp_path / "fit")
    model.fit(TrainSet(index.name, samples, model.input_size, ImageCache(), model.interpolation), context)
    assert context.info["init"] == "authors_checkpoint" and "ae_steps" not in context.info
    assert torch.equal(model.unet.conv_in.weight, state["model.diffusion_model.input_blocks.0.0.weight"])
    assert torch.equal(model.sg.controlnet.conv_in.weight, state["control_model.input_blocks.0.0.weight"])
    assert [u["path"] for u in context.weights.used] == [str(path)] and len(context.weights.used[0]["sha256"]) == 64
    prediction = model.predict(torch.rand(2, 3, 128, 128), ["alpha", "alpha"])
    assert prediction.anomaly_maps.shape == (2, 128, 128) and torch.isfinite(prediction.image_scores).all()


# -- the authors' scoring (test.py: cal_anomaly_map, gaussian_filter, EvalImageMax) ----------------

@pytest.fixture(scope="module")
def scoring():
    from safetensors.torch import load_file

    return load_file(str(GOLDEN / "diad_scoring.safetensors"))


def _features(scoring, which: str) -> list[torch.Tensor]:
    return [scoring[f"in.features_{which}.{i}"].float() for i in (1, 2, 3)]


def test_scoring_maps_per_layer_and_their_sum(scoring):
    """1 - cos per layer, upsampled bilinearly (corners aligned) to the input side, summed."""
    from harness_diad.scoring import feature_distance_map

    f_in, f_out = _features(scoring, "input"), _features(scoring, "recon")
    for i, (a, b) in enumerate(zip(f_in, f_out), start=1):
        layer = feature_distance_map([a], [b], (64, 64))
        torch.testing.assert_close(layer, scoring[f"out.anomaly_map_layer.{i}"], **TOL)
        assert float(layer.std()) > 1e-3  # the pairs differ: the maps are not flat
    torch.testing.assert_close(feature_distance_map(f_in, f_out, (64, 64)), scoring["out.anomaly_map_sum"], **TOL)


def test_scoring_smoothing_and_pooled_image_score_through_the_method(scoring):
    """DiAD.anomaly_maps (sigma 5) and the predict rule (8 rounds of 8 x 8 average pooling, then the max)."""
    from harness.toolkit.scoring import pooled_max
    from harness_diad.model import DiAD
    from harness_diad.plugin import harness_methods

    (spec,) = harness_methods()
    settings = spec.resolve("paper", {"backbone": "resnet18", "backbone_pretrained": False, "sd_pretrained": False,
                                      "architecture": "tiny", "gradient_checkpointing": False})
    model = DiAD(settings)
    queue = [_features(scoring, "input"), _features(scoring, "recon")]

    class Stored(torch.nn.Module):
        """Stands in for the backbone: gives the stored features of the input, then of the reconstruction."""

        def forward(self, x):
            return queue.pop(0)

    model.backbone = Stored()
    pixels = torch.zeros(3, 3, 64, 64)
    maps = model.anomaly_maps(pixels, model.to_pixels(pixels))
    assert not queue
    torch.testing.assert_close(maps, scoring["out.anomaly_map_smoothed"], **TOL)
    score = pooled_max(maps, settings.pool_kernel, settings.pool_rounds)
    assert (settings.smoothing_sigma, settings.pool_kernel, settings.pool_rounds) == (5.0, 8, 8)
    torch.testing.assert_close(score.double(), scoring["out.image_score"], **TOL)
