"""Golden tests: our DiffusionAD networks, given the authors' weights, give the authors' outputs.

``../shared/golden/diffusionad/`` holds data made by running the authors' own classes
(HuiZhang0812/DiffusionAD at 8a64c03) with a tiny configuration and random, perturbed weights:
the official state_dicts (official key names), the configuration, inputs and outputs. We build
our denoiser and segmentation network with the same configuration through the plugin's own
settings, load the official state through :mod:`harness_diffusionad.convert` (the converter that
also reads the authors' released ``params-best.pt``), and compare every output at
atol = rtol = 1e-4 (the thread count alone moves them by about 1e-5).
"""

from __future__ import annotations

import collections
import json
import sys
from pathlib import Path

import pytest
import torch

try:
    import harness_diffusionad  # noqa: F401
except ImportError:  # not installed: import from the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins" / "diffusionad"))

GOLDEN = Path(__file__).resolve().parents[2] / "shared" / "golden" / "diffusionad"

pytestmark = pytest.mark.skipif(not (GOLDEN / "diffusionad_io.safetensors").is_file(),
                                reason=f"the golden data of the authors' DiffusionAD code is not here ({GOLDEN}); "
                                       "it ships with the project's shared folder, not with a clone")

TOL = {"atol": 1e-4, "rtol": 1e-4}


def _load(name: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(GOLDEN / name))


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
    assert counts["denoiser"] == official_unet == 1_857_987
    assert counts["segmenter"] == official_seg == 446_089


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
    generator = torch.Generator().manual_seed(method.settings.inference_seed)
    noise_low, noise_high = torch.randn(image.shape, generator=generator), torch.randn(image.shape, generator=generator)
    t = [torch.full((1,), v, dtype=torch.long) for v in method.settings.levels]
    with torch.no_grad():
        expected = method.segment_pair(image, method.estimates(image, *t, noise_low, noise_high)["guided"])[:, 0]
        got = method.predict(image, ["x"])
    torch.testing.assert_close(got.anomaly_maps, expected, **TOL)
    assert method.settings.levels == (200, 400)  # eval_normal_t / eval_noisier_t of args1.json


def test_released_checkpoint_layout_loads_with_weights_only(golden, tmp_path):
    """A ``params-best.pt`` as the authors' ``train.py`` saves it (args as a defaultdict) loads and scores."""
    from harness.testing import fit_context
    from harness.data import ImageCache, TrainSet
    from harness_diffusionad.convert import read_official_checkpoint

    args = collections.defaultdict(str)
    args.update({"img_size": [64, 64], "Batch_Size": 16, "EPOCHS": 3000})
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
                                  image=lambda: torch.zeros(64, 64, 3, dtype=torch.uint8).numpy())],
                     (64, 64), ImageCache())
    context = fit_context(settings, tmp_path / "work")
    model.fit(train, context)
    assert context.info["trained"] is False and context.info["official_checkpoint_epoch"] == 2999
    assert [u["key"] for u in context.weights.used] == ["official_checkpoint"]
    io = golden["io"]
    with torch.no_grad():
        est = model.estimates(io["in.image"], io["in.normal_t"], io["in.noisier_t"], io["in.noise_normal"],
                              io["in.noise_noisier"])
        torch.testing.assert_close(model.segment_pair(io["in.image"], est["guided"]), io["out.seg_pred_mask"], **TOL)
