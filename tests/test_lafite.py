"""Tests of the LafitE plugin: sizes, Eq. 10, DDIM, scoring, selection, a micro fit, weights."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from synthetic_runs import synthetic_record
from toy_plugins import load_toy

from harness import FitContext, TrainSet, WeightsNotFoundError
from harness.data import ImageCache, read_image, resize_image, to_tensor
from harness.progress import Progress
from harness.pseudo_validation import make_pseudo_validation
from harness.weights import WeightsResolver
from harness_lafite.diffusion import build_noise_schedule, ddim_update, reconstruct, reverse_timesteps
from harness_lafite.editing import edit_features, editing_weights
from harness_lafite.features import MultiScaleFeatures
from harness_lafite.model import LafitE
from harness_lafite.plugin import PROFILES, harness_methods
from harness_lafite.scoring import pooled_max, reconstruction_maps
from harness_lafite.selection import category_mean_auroc, select_tau_then_k

SIZE = 32
#: Smallest settings that run every code path in a few seconds.
MICRO = {**PROFILES["tiny"], "image_size": SIZE, "feature_size": 4, "base_channels": 16, "norm_groups": 8,
         "epochs": 2, "batch_size": 4, "tau_grid": (10, 60), "k_grid": (2, 3), "ddim_steps": 2,
         "pseudo_val_per_category": 4, "eval_batch_size": 8, "score_pool_size": 4, "coreset_projection_dim": 16}


def _toy():
    index = load_toy()
    train = [s for cat in index.categories.values() for s in cat.train]
    test = [s for cat in index.categories.values() for s in cat.test]
    images = to_tensor([resize_image(read_image(s.image), (SIZE, SIZE)) for s in test])
    return TrainSet("toy", train, (SIZE, SIZE), ImageCache()), images, [s.category for s in test], \
        np.array([s.label for s in test])


def _context(tmp_path, settings, train, profile="tiny"):
    return FitContext(device=torch.device("cpu"), seed=0, profile=profile, settings=settings, cache_dir=tmp_path,
                      weights=WeightsResolver(tmp_path / "weights"), progress=Progress(enabled=False),
                      pseudo_validation=lambda n=8, seed=None: make_pseudo_validation(train, n, seed or 0))


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    torch.manual_seed(0)
    train, images, categories, labels = _toy()
    method = LafitE(MICRO).to("cpu")
    context = _context(tmp_path_factory.mktemp("lafite"), MICRO, train)
    method.fit(train, context)
    method.eval()
    return method, context, images, categories, labels


# ---------------------------------------------------------------------------------------------- spec and sizes

def test_spec_is_complete():
    (spec,) = harness_methods()
    assert spec.name == "lafite" and set(spec.profiles) >= {"paper", "tiny"}
    for profile in spec.profiles.values():
        assert set(profile) <= set(spec.settings_help)
    paper = spec.profiles["paper"]
    assert paper["epochs"] == 1000 and paper["batch_size"] == 64 and paper["lr"] == 1e-4
    assert paper["channel_mults"] == (1, 2, 3, 4) and paper["base_channels"] == 256 and paper["T"] == 1000
    assert paper["beta_schedule"] == "squaredcos_cap_v2" and paper["coreset_ratio"] == 0.1


def test_paper_profile_builds_on_meta_device():
    with torch.device("meta"):
        method = LafitE(PROFILES["paper"])
    assert method.features.channels == 272  # UniAD's EfficientNet-b4 stages 1-4: 24 + 32 + 56 + 160
    assert method.input_size == (224, 224)
    counts = method.parameter_count()
    # Stem + blocks 0-4 of EfficientNet-b4 (the stride-32 blocks are dropped).
    assert 3.5e6 < counts["backbone"] < 3.8e6, counts
    # Base 256, multipliers (1, 2, 3, 4), two blocks per level, attention at 16/8/4 px.
    assert 3.5e8 < counts["unet"] < 3.7e8, counts
    assert method.unet.config.in_channels == method.unet.config.out_channels == 272


def test_aggregation_resizes_every_stage_to_the_grid():
    feats = MultiScaleFeatures("resnet18", (1, 2), grid=6).eval()
    with torch.no_grad():
        out = feats(torch.rand(2, 3, 64, 64))
    assert out.shape == (2, 64 + 128, 6, 6) and feats.channels == 192


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="k_grid"):
        LafitE({**MICRO, "k_grid": (1, 2)})
    with pytest.raises(ValueError, match="tau_grid"):
        LafitE({**MICRO, "tau_grid": (1000,)})
    with pytest.raises(ValueError, match="editing_weights"):
        LafitE({**MICRO, "editing_weights": "softmax"})


# ---------------------------------------------------------------------------------------------- Eq. 10

def test_editing_weights_follow_eq10():
    d = torch.tensor([[1.0, 2.0, 4.0]])
    expected = 1 - torch.exp(d) / torch.exp(d).sum()
    assert torch.allclose(editing_weights(d, "paper"), expected)
    assert torch.allclose(editing_weights(d, "paper").sum(), torch.tensor(2.0))  # K - 1
    assert torch.allclose(editing_weights(d, "normalized").sum(), torch.tensor(1.0))
    # Large distances must not overflow.
    assert torch.isfinite(editing_weights(torch.tensor([[500.0, 900.0]]))).all()
    with pytest.raises(ValueError, match="K >= 2"):
        editing_weights(torch.tensor([[1.0]]))


def test_edit_features_combines_the_nearest_bank_slices():
    bank = torch.tensor([[0.0, 0.0], [1.0, 0.0], [10.0, 10.0]])
    query = torch.tensor([0.2, 0.0]).view(1, 2, 1, 1)
    edited = edit_features(query, bank, k=2, weighting="paper")[0, :, 0, 0]
    d = torch.tensor([0.2, 0.8])
    w = 1 - torch.softmax(d, 0)
    assert torch.allclose(edited, w[0] * bank[0] + w[1] * bank[1], atol=1e-6)
    # The far slice is never used, and the nearer neighbour weighs more.
    assert w[0] > w[1] and edited[1].abs() < 1e-6


# ---------------------------------------------------------------------------------------------- diffusion

def test_ddim_update_matches_diffusers_step():
    schedule = build_noise_schedule(1000, "squaredcos_cap_v2")
    ddim = DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=False,
                         set_alpha_to_one=True)
    ddim.set_timesteps(10)
    abar = schedule.alphas_cumprod.double()
    x, eps = torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.randn(2, 3, 4, 4, dtype=torch.float64)
    for t, prev in ((500, 400), (100, 0)):
        ours = ddim_update(x, eps, float(abar[t]), float(abar[prev]))
        theirs = ddim.step(eps, t, x).prev_sample
        assert torch.allclose(ours, theirs, atol=1e-6)
    # The final step of diffusers (t = 0, alpha 1) is our jump to the clean tensor.
    assert torch.allclose(ddim_update(x, eps, float(abar[0]), 1.0), ddim.step(eps, 0, x).prev_sample, atol=1e-6)


def test_reverse_timesteps_start_at_tau():
    assert reverse_timesteps(300, 3) == [300, 200, 100]
    assert reverse_timesteps(2, 5) == [2, 1, 0]


def test_reconstruct_with_an_oracle_denoiser_returns_the_input():
    """A denoiser that knows the clean tensor brings any tau back to it exactly."""
    schedule = build_noise_schedule(1000, "squaredcos_cap_v2")
    clean = torch.randn(2, 3, 4, 4)
    abar = schedule.alphas_cumprod

    class Oracle(torch.nn.Module):
        def forward(self, x, t):
            a = abar[t].view(-1, 1, 1, 1)
            return type("Out", (), {"sample": (x - a.sqrt() * clean) / (1 - a).sqrt()})()

    out = reconstruct(Oracle(), schedule, clean, tau=400, steps=4, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out, clean, atol=1e-4)
    with pytest.raises(ValueError, match="tau"):
        reconstruct(Oracle(), schedule, clean, tau=1000, steps=2)


# ---------------------------------------------------------------------------------------------- scoring, selection

def test_scoring_is_squared_l2_then_pooled_max():
    original = torch.zeros(1, 3, 4, 4)
    rec = original.clone()
    rec[0, :, 1, 1] = 1.0  # squared L2 = 3 at one position
    same = reconstruction_maps(original, rec, (4, 4), sigma=0)
    assert same.shape == (1, 4, 4) and float(same[0, 1, 1]) == 3.0 and float(same.sum()) == 3.0
    maps = reconstruction_maps(original, original + 1.0, (16, 16), sigma=4)
    assert maps.shape == (1, 16, 16) and torch.allclose(maps, torch.full_like(maps, 3.0))
    spot = torch.zeros(1, 8, 8)
    spot[0, 3, 3] = 16.0
    assert math.isclose(float(pooled_max(spot, 4)), 1.0) and math.isclose(float(pooled_max(spot, 1)), 16.0)


def test_selection_picks_tau_without_editing_then_k():
    labels = np.array([0, 0, 1, 1])
    cats = ["a"] * 4
    calls = []

    def evaluate(tau, k):
        calls.append((tau, k))
        good = (tau == 200 and k is None) or (tau == 200 and k == 5)
        return np.array([0.0, 0.1, 0.9, 1.0]) if good else np.array([0.9, 1.0, 0.0, 0.1])

    chosen = select_tau_then_k(evaluate, labels, cats, [100, 200, 300], [2, 5], editing=True)
    assert chosen["tau"] == 200 and chosen["k"] == 5
    assert calls[:3] == [(100, None), (200, None), (300, None)] and calls[3:] == [(200, 2), (200, 5)]
    assert [g["auroc"] for g in chosen["tau_grid"]] == [0.0, 1.0, 0.0]
    ablation = select_tau_then_k(evaluate, labels, cats, [100, 200], [2, 5], editing=False)
    assert ablation["k"] is None and ablation["k_grid"] == []
    assert math.isnan(category_mean_auroc(np.zeros(2), np.zeros(2), ["a", "a"]))


# ---------------------------------------------------------------------------------------------- fit and predict

def test_fit_records_the_choice_made_on_pseudo_validation(fitted):
    method, context, images, categories, _ = fitted
    info = context.info
    sel = info["selection"]
    assert info["backbone_init"] == "random"
    assert sel["tau"] in MICRO["tau_grid"] and sel["k"] in MICRO["k_grid"]
    assert [g["tau"] for g in sel["tau_grid"]] == list(MICRO["tau_grid"])
    assert [g["k"] for g in sel["k_grid"]] == list(MICRO["k_grid"])
    assert sel["pseudo_validation"]["images"] == 2 * MICRO["pseudo_val_per_category"]
    assert (method.tau, method.k) == (sel["tau"], sel["k"])
    json.dumps(info)  # the record must be able to hold it
    bank = info["memory_bank"]
    assert bank["coreset"] == round(MICRO["coreset_ratio"] * bank["slices"]) == method.bank.shape[0]
    out = method.predict(images, categories)
    assert out.anomaly_maps.shape == (len(images), SIZE, SIZE) and out.image_scores.shape == (len(images),)
    assert torch.isfinite(out.anomaly_maps).all() and torch.isfinite(out.image_scores).all()


def test_state_dict_round_trip(fitted, tmp_path):
    method, _, images, categories, _ = fitted
    path = tmp_path / "fit.pt"
    torch.save(method.state_dict(), path)
    torch.manual_seed(999)
    restored = LafitE(MICRO).to("cpu")
    restored.load_state_dict(torch.load(path, weights_only=True))
    restored.eval()
    assert (restored.tau, restored.k) == (method.tau, method.k)
    a, b = method.predict(images[:4], categories[:4]), restored.predict(images[:4], categories[:4])
    assert torch.allclose(a.anomaly_maps, b.anomaly_maps) and torch.allclose(a.image_scores, b.image_scores)


def test_without_feature_editing_is_the_ablation(tmp_path):
    train, images, categories, _ = _toy()
    settings = {**MICRO, "feature_editing": False, "epochs": 1}
    method = LafitE(settings).to("cpu")
    context = _context(tmp_path, settings, train)
    method.fit(train, context)
    assert method.k is None and context.info["selection"]["k"] is None
    assert context.info["selection"]["k_grid"] == [] and len(context.info["selection"]["tau_grid"]) == 2
    method.eval()
    assert torch.isfinite(method.predict(images[:2], categories[:2]).image_scores).all()


def test_paper_profile_without_weights_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HARNESS_WEIGHTS", raising=False)
    train, *_ = _toy()
    settings = {**MICRO, "backbone": "efficientnet_b4", "layers": (0, 1, 2, 3), "pretrained": True}
    method = LafitE(settings)
    with pytest.raises(WeightsNotFoundError) as err:
        method.fit(train, _context(tmp_path, settings, train, profile="paper"))
    assert "efficientnet_b4" in str(err.value) and str(tmp_path / "weights") in str(err.value)


def test_paper_weights_are_loaded_from_disk(tmp_path, monkeypatch):
    """A full timm EfficientNet-b4 checkpoint in the weights folder is loaded into the extractor."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import timm

    full = timm.create_model("efficientnet_b4", pretrained=False)
    (tmp_path / "weights").mkdir()
    torch.save(full.state_dict(), tmp_path / "weights" / "efficientnet_b4.pth")
    train, *_ = _toy()
    settings = {**MICRO, "backbone": "efficientnet_b4", "layers": (0, 1, 2, 3), "pretrained": True, "epochs": 1,
                "tau_grid": (10,), "k_grid": (2,)}
    method = LafitE(settings).to("cpu")
    context = _context(tmp_path, settings, train, profile="paper")
    method.fit(train, context)
    assert context.info["backbone_init"] == "imagenet"
    assert context.info["selection"]["searched"] is False
    ours = method.features.backbone.state_dict()
    assert torch.equal(ours["conv_stem.weight"], full.state_dict()["conv_stem.weight"])
    assert torch.equal(ours["blocks.4.0.conv_pw.weight"], full.state_dict()["blocks.4.0.conv_pw.weight"])


# ---------------------------------------------------------------------------------------------- end to end

@pytest.mark.slow
def test_main_job_records_the_choice_made_on_pseudo_validation():
    """The README's job for this method chose tau and K on the pseudo-validation set."""
    record = synthetic_record("lafite")
    assert record["status"] == "ok"
    sel = record["method_info"]["selection"]
    assert sel["searched"] and sel["tau"] in PROFILES["tiny"]["tau_grid"] and sel["k"] in PROFILES["tiny"]["k_grid"]
