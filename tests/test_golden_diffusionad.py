"""Golden tests: our DiffusionAD, given the authors' weights, gives the authors' outputs.

``tests/golden/diffusionad/`` (README there) holds data made by running the authors' own classes
(HuiZhang0812/DiffusionAD at 8a64c03):

- a tiny configuration with random, perturbed weights: the official state_dicts (official key
  names, float16-exact values stored in float16), inputs and outputs. We build our denoiser and
  segmentation network with the same configuration through the plugin's own settings, load the
  official state through :mod:`harness_diffusionad.convert` (the converter that also reads a
  ``params-best.pt`` written by their ``train.py``), and compare every output at
  atol = rtol = 1e-4 (the thread count alone moves them by about 1e-5);
- the initialisation law of every tensor of the paper-size UNet as the authors' constructor draws
  it (recorded while it ran): a freshly built paper denoiser of ours must have the same zeroed
  tensors and the same uniform bounds;
- imgaug's outputs of the ten augmenters of the authors' data code at fixed parameters: ours must
  give the same pixels.
"""

from __future__ import annotations

import collections
import json
import sys
from pathlib import Path

import pytest
import torch

from harness.toolkit.noise import ImageNoise

try:
    import harness_diffusionad  # noqa: F401
except ImportError:  # not installed: import from the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins" / "diffusionad"))

GOLDEN = Path(__file__).resolve().parent / "golden" / "diffusionad"

TOL = {"atol": 1e-4, "rtol": 1e-4}


def _load(name: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    # States are stored in float16 (their values are float16-exact): float32 gives the weights used.
    return {k: v.float() if v.dtype == torch.float16 else v for k, v in load_file(str(GOLDEN / name)).items()}


@pytest.fixture(scope="module")
def golden():
    """Configuration, inputs/outputs and the two official state_dicts."""
    return {"config": json.loads((GOLDEN / "diffusionad_config.json").read_text()),
            "io": _load("diffusionad_io.safetensors"), "unet": _load("diffusionad_unet_state.safetensors"),
            "seg": _load("diffusionad_seg_state.safetensors")}


def _settings(config: dict):
    """Our settings for the golden configuration, from the official constructor arguments."""
    from harness_diffusionad.plugin import harness_methods

    (spec,) = harness_methods()
    unet, seg = config["unet"]["kwargs"], config["seg"]["kwargs"]
    assert unet["n_head_channels"] == -1 and unet["biggan_updown"] and unet["in_channels"] == 3
    assert seg["in_channels"] == 6 and seg["out_channels"] == 1
    # The official attention_resolutions are downsampling factors img_size // r, i.e. feature sides r.
    sides = tuple(int(r) for r in unet["attention_resolutions"].split(","))
    return spec, spec.resolve("paper", {
        "image_size": unet["img_size"], "base_channels": unet["base_channels"],
        "channel_mults": tuple(unet["channel_mults"]), "layers_per_block": unet["num_res_blocks"],
        "attention_resolutions": sides, "num_heads": unet["n_heads"], "dropout": float(unet["dropout"]),
        "seg_base_channels": seg["base_channels"], "seg_depth": 6, "T": 1000,
        "guidance_weight": float(config["diffusion"]["args"]["condition_w"]),
    })


@pytest.fixture(scope="module")
def method(golden):
    """Our DiffusionAD built with the golden configuration, official weights loaded through the converter."""
    from harness_diffusionad.convert import load_official

    spec, settings = _settings(golden["config"])
    model = spec.factory(settings)
    load_official(model.denoiser, model.segmenter, golden["unet"], golden["seg"], settings.num_heads)
    return model.eval()


def test_parameter_counts_match_the_official_networks(golden, method):
    official_unet = sum(v.numel() for v in golden["unet"].values())
    official_seg = sum(v.numel() for k, v in golden["seg"].items() if "running" not in k and "num_batches" not in k)
    counts = method.parameter_count()
    assert counts["denoiser"] == official_unet == 1_061_827
    assert counts["segmenter"] == official_seg == 112_309


def test_denoiser_matches(golden, method):
    io = golden["io"]
    with torch.no_grad():
        eps = method.denoiser(io["in.unet_x"], io["in.unet_t"]).sample
    torch.testing.assert_close(eps, io["out.unet_eps"], **TOL)


def test_noise_schedule_matches(golden, method):
    assert torch.equal(torch.from_numpy(method.schedule.betas), golden["io"]["out.betas"])


def test_norm_guided_one_step_evaluation_matches(golden, method):
    io = golden["io"]
    with torch.no_grad():
        est = method.estimates(method.to_model_range(io["in.image"]), io["in.normal_t"], io["in.noisier_t"],
                               io["in.noise_normal"], io["in.noise_noisier"])
    pairs = {"x_low": "eval_x_normal_t", "x_high": "eval_x_noisier_t", "eps_low": "eval_estimate_noise_normal",
             "eps_high": "eval_estimate_noise_noisier", "x0_high": "eval_pred_x_0_noisier",
             "x_high_to_low": "eval_pred_x_t_noisier", "x0_low": "eval_pred_x_0_normal",
             "guided": "eval_pred_x_0_condition"}
    for ours, official in pairs.items():
        torch.testing.assert_close(est[ours], io[f"out.{official}"], **TOL, msg=lambda m, o=ours: f"{o}: {m}")
    loss = (est["mse_low"] + est["mse_high"]).mean().reshape(1)
    torch.testing.assert_close(loss, io["out.eval_loss"], **TOL)


def test_segmentation_network_matches(golden, method):
    io = golden["io"]
    with torch.no_grad():
        direct = method.segmenter(io["in.seg_x"])  # non-square input
        on_eval = method.segment_pair(io["in.image"], io["out.eval_pred_x_0_condition"])
    torch.testing.assert_close(direct, io["out.seg_direct_out"], **TOL)
    torch.testing.assert_close(torch.cat([io["in.image"], io["out.eval_pred_x_0_condition"]], 1), io["out.seg_in_cat"])
    torch.testing.assert_close(on_eval, io["out.seg_pred_mask"], **TOL)


def test_top50_image_score_matches(golden, method):
    from harness_diffusionad.model import top_k_mean

    torch.testing.assert_close(top_k_mean(golden["io"]["out.seg_pred_mask"], method.settings.top_k),
                               golden["io"]["out.image_score_top50"], **TOL)


def test_predict_runs_the_official_evaluation_path(golden, method):
    """``predict`` at the official levels equals the official pipeline fed with the same noise."""
    io = golden["io"]
    image = io["in.image"][:1]
    noise = ImageNoise(None, 1, "cpu", base=method.settings.inference_seed)
    noise_low, noise_high = noise.randn_like(image), noise.randn_like(image)
    t = [torch.full((1,), v, dtype=torch.long) for v in method.settings.levels]
    with torch.no_grad():
        expected = method.segment_pair(image, method.estimates(image, *t, noise_low, noise_high)["guided"])[:, 0]
        got = method.predict(image, ["x"])
    torch.testing.assert_close(got.anomaly_maps, expected, **TOL)
    assert method.settings.levels == (200, 400)  # eval_normal_t / eval_noisier_t of args1.json


def test_a_train_py_checkpoint_layout_loads_with_weights_only(golden, tmp_path):
    """A ``params-best.pt`` as the authors' ``train.py`` saves it (args as a defaultdict) loads and scores."""
    from harness.testing import fit_context
    from harness.data import ImageCache, TrainSet
    from harness_diffusionad.convert import read_official_checkpoint

    args = collections.defaultdict(str)
    args.update({"img_size": [32, 32], "Batch_Size": 16, "EPOCHS": 3000})
    folder = tmp_path / "diff-params-ARGS=1" / "bottle"
    folder.mkdir(parents=True)
    torch.save({"n_epoch": 2999, "unet_model_state_dict": collections.OrderedDict(golden["unet"]),
                "seg_model_state_dict": collections.OrderedDict(golden["seg"]), "args": args},
               folder / "params-best.pt")
    data = read_official_checkpoint(folder / "params-best.pt")
    assert data["n_epoch"] == 2999 and data["args"]["EPOCHS"] == 3000

    spec, settings = _settings(golden["config"])
    settings = settings.replace(official_checkpoints=str(tmp_path / "diff-params-ARGS=1"))
    model = spec.factory(settings)
    from harness import Sample

    train = TrainSet("t", [Sample("bottle/train/good/000", "bottle", "train", 0, "good",
                                  image=lambda: torch.zeros(32, 32, 3, dtype=torch.uint8).numpy())],
                     (32, 32), ImageCache())
    context = fit_context(settings, tmp_path / "work")
    model.fit(train, context)
    assert context.info["trained"] is False and context.info["official_checkpoint_epoch"] == 2999
    assert [u["key"] for u in context.weights.used] == ["official_checkpoint"]
    io = golden["io"]
    with torch.no_grad():
        est = model.estimates(io["in.image"], io["in.normal_t"], io["in.noisier_t"], io["in.noise_normal"],
                              io["in.noise_noisier"])
        torch.testing.assert_close(model.segment_pair(io["in.image"], est["guided"]), io["out.seg_pred_mask"], **TOL)


# -- the authors' initialisation -----------------------------------------------------------------

#: Law codes of the reference (the authors' constructor): zeroed / ones / uniform(-bound, bound).
_LAW = {"zeros": 0.0, "ones": 1.0, "uniform": 2.0}


@pytest.fixture(scope="module")
def init_reference():
    return json.loads((GOLDEN / "diffusionad_init.json").read_text())


@pytest.fixture(scope="module")
def paper_denoiser():
    """Our paper-profile denoiser, freshly built (random, seeded), with its official-name map."""
    from harness_diffusionad.plugin import harness_methods

    (spec,) = harness_methods()
    torch.manual_seed(0)
    return spec.factory(spec.resolve("paper")).denoiser


def _as_ours(reference: dict, field: str, model) -> dict[str, torch.Tensor]:
    """A per-tensor value of the reference (official names) carried onto our names by the converter."""
    from harness_diffusionad.convert import convert_unet_state

    def value(record):
        if field == "law":
            zero = record["zero_after_build"]
            return 0.0 if zero else _LAW[record["init"]]
        return float(record["bound"])
    official = {name: torch.full(record["shape"], value(record)) for name, record in reference["tensors"].items()}
    return convert_unet_state(official, model, num_heads=4)


def test_paper_denoiser_zeroes_the_authors_output_layers(init_reference, paper_denoiser):
    """The tensors the authors' constructor leaves at zero (zero_module and GroupNorm biases) are zero in ours."""
    assert init_reference["parameters"] == sum(p.numel() for p in paper_denoiser.parameters()) == 131_654_403
    laws = _as_ours(init_reference, "law", paper_denoiser)
    state = paper_denoiser.state_dict()
    zero = [k for k, v in laws.items() if bool((v == 0).all())]
    # Every residual block's conv2, every attention to_out.0 and conv_out, weights and biases, among them.
    assert {k for k in zero if k.endswith(("conv2.weight", "to_out.0.weight"))} == {
        k for k in state if k.endswith(("conv2.weight", "to_out.0.weight"))}
    assert "conv_out.weight" in zero and "conv_out.bias" in zero
    for key in zero:
        assert torch.count_nonzero(state[key]) == 0, key
    for key, law in laws.items():
        if bool((law != 0).all()):
            assert torch.count_nonzero(state[key]) > 0, f"{key} is zero in ours, not in the authors' network"


def test_paper_denoiser_follows_the_authors_initialiser(init_reference, paper_denoiser):
    """Every other tensor: ones where theirs are ones, else uniform within their bound (at 1e-4) with its spread."""
    laws = _as_ours(init_reference, "law", paper_denoiser)
    bounds = _as_ours(init_reference, "bound", paper_denoiser)
    state = paper_denoiser.state_dict()
    for key, law in laws.items():
        value, law = state[key].double(), float(law.flatten()[0])
        if law == _LAW["ones"]:
            assert bool((value == 1).all()), key
        elif law == _LAW["uniform"]:
            bound = float(bounds[key].flatten()[0])
            assert float(value.abs().max()) <= bound * (1 + 1e-4), key
            n = value.numel()
            if n >= 64:
                # U(-b, b): std b / sqrt(3); its estimate's relative error is about 0.45 / sqrt(n).
                expected = bound / 3 ** 0.5
                assert abs(float(value.std()) / expected - 1) < 6 * 0.45 / n ** 0.5 + 1e-3, key
                assert abs(float(value.mean())) < 6 * expected / n ** 0.5, key


def test_default_init_keeps_diffusers_initialisation():
    from harness_diffusionad.networks import build_denoiser

    torch.manual_seed(0)
    model = build_denoiser(32, base_channels=32, channel_mults=(1, 2), attention_resolutions=(16,), init="default")
    assert torch.count_nonzero(model.conv_out.weight) > 0
    assert all(torch.count_nonzero(m.conv2.weight) > 0 for m in model.down_blocks[0].resnets)


# -- the authors' augmenters (imgaug 0.4.0), pixel for pixel --------------------------------------

@pytest.fixture(scope="module")
def augmented():
    from safetensors.numpy import load_file

    return load_file(str(GOLDEN / "diffusionad_augment.safetensors"))


def _same(ours, theirs, max_off: int = 0, share: float = 0.0):
    import numpy as np

    diff = np.abs(ours.astype(int) - theirs.astype(int))
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    assert diff.max() <= max_off and (diff > 0).mean() <= share, (diff.max(), (diff > 0).mean())


def test_gamma_contrast_is_per_channel(augmented):
    from harness_diffusionad.synthesis import gamma_contrast

    image = augmented["in.image"]
    gammas = (0.6, 1.3, 1.9)
    ours = gamma_contrast(image, gammas)
    for c, gamma in enumerate(gammas):
        _same(ours[..., c], augmented[f"gamma.{gamma}"][..., c])
    assert not (ours[..., 0] == gamma_contrast(image, (1.3,) * 3)[..., 0]).all()


@pytest.mark.parametrize("space", ["YCrCb", "HSV", "HLS", "Lab", "Luv", "YUV"])
@pytest.mark.parametrize("add_first", [False, True])
def test_brightness_multiplies_and_adds_in_a_colour_space(augmented, space, add_first):
    from harness_diffusionad.synthesis import multiply_and_add_to_brightness

    ours = multiply_and_add_to_brightness(augmented["in.image"], 1.15, -17, space, add_first=add_first)
    _same(ours, augmented[f"brightness.{space}.{'add_mul' if add_first else 'mul_add'}"])


@pytest.mark.parametrize("factor", [0.3, 1.7])
def test_sharpness(augmented, factor):
    from harness_diffusionad.synthesis import enhance_sharpness

    _same(enhance_sharpness(augmented["in.image"], factor), augmented[f"sharpness.{factor}"])


@pytest.mark.parametrize("hue,saturation", [(37, -23), (-41, 45)])
def test_hue_and_saturation(augmented, hue, saturation):
    from harness_diffusionad.synthesis import add_to_hue_and_saturation

    _same(add_to_hue_and_saturation(augmented["in.image"], hue, saturation),
          augmented[f"hue_saturation.{hue}.{saturation}"])


def test_solarize_inverts_above_the_threshold_with_probability_one_half(augmented):
    import numpy as np

    from harness_diffusionad.synthesis import CODE_AUGMENTATIONS, solarize

    image = augmented["in.image"]
    _same(solarize(image, 77.5), augmented["solarize.77.5"])
    applied = [not np.array_equal(CODE_AUGMENTATIONS["solarize"](image, np.random.default_rng(i)), image)
               for i in range(400)]
    assert 0.42 < np.mean(applied) < 0.58


@pytest.mark.parametrize("bits", [1, 3, 8])
def test_posterize(augmented, bits):
    from harness_diffusionad.synthesis import posterize

    _same(posterize(augmented["in.image"], bits), augmented[f"posterize.{bits}"])


def test_invert(augmented):
    from harness_diffusionad.synthesis import invert

    _same(invert(augmented["in.image"]), augmented["invert"])


@pytest.mark.parametrize("cutoff", [0, 7])
def test_autocontrast(augmented, cutoff):
    from harness_diffusionad.synthesis import autocontrast

    _same(autocontrast(augmented["in.image"], cutoff), augmented[f"autocontrast.{cutoff}"])


def test_equalize(augmented):
    from harness_diffusionad.synthesis import equalize

    _same(equalize(augmented["in.image"]), augmented["equalize"])


@pytest.mark.parametrize("degrees", [23.7, -41.2])
def test_rotation(augmented, degrees):
    from harness_diffusionad.synthesis import rotate

    # cv2.warpAffine rounds its coordinates to 1/32 px: a matrix computed in another order may move
    # a rare pixel by one grey level.
    _same(rotate(augmented["in.image"], degrees), augmented[f"rotate.{degrees}"], max_off=1, share=0.01)
