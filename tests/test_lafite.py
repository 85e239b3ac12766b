"""Tests of the LafitE plugin: spec, backbone, Eq. 10, DDIM, scoring, selection, hold-out, resume, weights."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from synthetic_runs import synthetic_record
from toy_plugins import load_toy

from harness import TrainSet, WeightsNotFoundError
from harness.data import ImageCache, read_image, resize_image, to_tensor
from harness.testing import check_method, fit_context
from harness.toolkit.efficientnet import UNIAD_EFFICIENTNET_B4, convert_efficientnet_pytorch
from harness.toolkit.multiscale import MultiScaleFeatures
from harness.toolkit.pseudo_validation import (make_pseudo_validation, rotate_mask, split_holdout,
                                               synthesize_anomaly)
from harness.toolkit.scoring import pooled_max
from harness_lafite import model as lafite_model
from harness_lafite import training as lafite_training
from harness_lafite.diffusion import build_noise_schedule, ddim_update, reconstruct, reverse_timesteps
from harness_lafite.editing import edit_features, editing_weights
from harness_lafite.model import LafitE
from harness_lafite.plugin import PROFILES, harness_methods
from harness_lafite.scoring import image_scores, reconstruction_maps
from harness_lafite.selection import category_mean_auroc, select_tau_then_k, summarise

SIZE = 32
(SPEC,) = harness_methods()
#: Smallest settings that run every code path in a few seconds.
MICRO_OVERRIDES = {"image_size": SIZE, "feature_size": 4, "base_channels": 16, "norm_groups": 8, "epochs": 2,
                   "train_batch_size": 4, "tau_grid": (10, 60), "k_grid": (2, 3), "ddim_steps": 2,
                   "pseudo_val_per_category": 4, "eval_batch_size": 8, "score_pool_size": 4,
                   "coreset_projection_dim": 16, "bootstrap_rounds": 20}
MICRO = SPEC.resolve("tiny", MICRO_OVERRIDES)


def _micro(**changes):
    return SPEC.resolve("tiny", {**MICRO_OVERRIDES, **changes})


def _toy():
    index = load_toy()
    train = [s for cat in index.categories.values() for s in cat.train]
    test = [s for cat in index.categories.values() for s in cat.test]
    images = to_tensor([resize_image(read_image(s.image), (SIZE, SIZE)) for s in test])
    return TrainSet("toy", train, (SIZE, SIZE), ImageCache()), images, [s.category for s in test], \
        np.array([s.label for s in test])


def _context(tmp_path, settings, profile="tiny", **kwargs):
    return fit_context(settings, tmp_path, profile=profile, weights_dir=tmp_path / "weights", **kwargs)


def _fit(settings, workdir, **kwargs):
    torch.manual_seed(0)
    train, *_ = _toy()
    method = LafitE(settings).to("cpu")
    context = _context(workdir, settings, **kwargs)
    method.fit(train, context)
    method.eval()
    return method, context


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    _, images, categories, labels = _toy()
    method, context = _fit(MICRO, tmp_path_factory.mktemp("lafite"))
    return method, context, images, categories, labels


# ---------------------------------------------------------------------------------------------- spec and sizes

def test_spec_is_complete_and_the_paper_profile_follows_the_paper():
    assert SPEC.name == "lafite" and set(SPEC.profiles) >= {"paper", "tiny"} and SPEC.profiles["paper"] == {}
    paper = SPEC.resolve("paper")
    assert paper.epochs == 1000 and paper.train_batch_size == 64 and paper.lr == 1e-4 and paper.weight_decay == 1e-4
    assert paper.channel_mults == (1, 2, 3, 4) and paper.base_channels == 256 and paper.timesteps == 1000
    assert paper.beta_schedule == "squaredcos_cap_v2" and paper.coreset_ratio == 0.1 and paper.smoothing_sigma == 4
    assert paper.image_size == 224 and paper.interpolation == "bilinear" and paper.feature_size == 32
    assert paper.backbone == "tf_efficientnet_b4" and paper.backbone_layers == (0, 1, 2, 3)
    assert paper.editing_weights == "normalized" and paper.precision == "fp32"
    # Neither the paper nor UniAD standardises features (issue 24): off in paper, a setting.
    assert paper.feature_standardize is False and SPEC.resolve("tiny").feature_standardize is True
    # The tau grid spans the schedule; more pseudo-validation images than before (20).
    assert min(paper.tau_grid) <= 100 and max(paper.tau_grid) >= 800 and paper.pseudo_val_per_category >= 40
    choices = {s.name for s in SPEC.settings if s.choice}
    assert {"editing_weights", "tau_grid", "k_grid", "holdout_fraction", "backbone_padding", "score_pool_size",
            "feature_standardize", "ddim_steps"} <= choices
    assert SPEC.paper_protocol == "multiclass" and SPEC.resources_for("paper").gpus == 1


def test_plugin_module_is_cheap_to_import():
    code = ("import sys, harness_lafite.plugin as p; p.harness_methods(); "
            "print([m for m in ('timm', 'diffusers', 'transformers') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_paper_profile_builds_on_meta_device():
    with torch.device("meta"):
        method = SPEC.factory(SPEC.resolve("paper"))
    assert method.features.channels == 272  # UniAD's EfficientNet-b4 stages 1-4: 24 + 32 + 56 + 160
    assert method.input_size == (224, 224) and method.interpolation == "bilinear"
    counts = method.parameter_count()
    # Stem + blocks 0-4 of EfficientNet-b4 (the stride-32 blocks are dropped).
    assert 3.5e6 < counts["backbone"] < 3.8e6, counts
    # Base 256, multipliers (1, 2, 3, 4), two blocks per level, attention at 16/8/4 px.
    assert 3.5e8 < counts["unet"] < 3.7e8, counts
    assert method.unet.config.in_channels == method.unet.config.out_channels == 272
    # UniAD's padding: stage 3's stride-2 5x5 convolution pads (2, 2) as computed for 380 px.
    assert method.features.backbone.blocks[2][0].conv_dw.static_pad == (2, 2, 2, 2)


def test_aggregation_resizes_every_stage_to_the_grid():
    feats = MultiScaleFeatures("resnet18", (1, 2), grid=6).eval()
    with torch.no_grad():
        out = feats(torch.rand(2, 3, 64, 64))
    assert out.shape == (2, 64 + 128, 6, 6) and feats.channels == 192


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="tau_grid"):
        LafitE(_micro(tau_grid=(1000,)))
    with pytest.raises(ValueError, match="k_grid"):
        _micro(k_grid=(1, 2))
    with pytest.raises(ValueError, match="editing_weights"):
        _micro(editing_weights="softmax")


# ---------------------------------------------------------------------------------------------- the backbone UniAD loads

def test_backbone_matches_uniads_efficientnet():
    """timm's tf_efficientnet_b4 with UniAD's padding and converted weights = EfficientNet-PyTorch's network."""
    efficientnet_pytorch = pytest.importorskip("efficientnet_pytorch", reason="pip install efficientnet-pytorch")
    torch.manual_seed(0)
    reference = efficientnet_pytorch.EfficientNet.from_name("efficientnet-b4").eval()
    with torch.no_grad():  # random BatchNorm statistics, so that every tensor matters
        for m in reference.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1), m.running_var.uniform_(0.5, 1.5), m.weight.normal_(1, 0.1)
    x = torch.rand(1, 3, 224, 224)
    outputs = {}
    hooks = [reference._blocks[i].register_forward_hook(lambda _m, _i, o, i=i: outputs.__setitem__(i, o))
             for i in (1, 5, 9, 21)]  # UniAD's blocks of stages 1-4
    with torch.no_grad():
        reference.extract_features(x)
    for h in hooks:
        h.remove()
    for padding, exact in (("uniad", True), ("dynamic", False)):
        ours = MultiScaleFeatures("tf_efficientnet_b4", (0, 1, 2, 3), 32, padding).eval()
        converted = convert_efficientnet_pytorch(reference.state_dict(), ours.backbone)
        missing, _ = ours.backbone.load_state_dict(converted, strict=False)
        assert not missing
        with torch.no_grad():
            stages = ours.backbone(x)
        close = [torch.allclose(a, outputs[i], atol=1e-5) for a, i in zip(stages, (1, 5, 9, 21))]
        assert all(close) if exact else close[:2] == [True, True] and not close[2], (padding, close)


def test_paper_weights_in_uniads_file_are_converted_and_recorded(tmp_path, monkeypatch):
    """A state dict in EfficientNet-PyTorch's layout, under UniAD's file name, is loaded into the extractor."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    reference_net = MultiScaleFeatures("tf_efficientnet_b4", (0, 1, 2, 3), 4)
    # Build the file in the official layout by renaming a timm state back (the inverse map).
    timm_state = {k: torch.randn_like(v) if v.is_floating_point() else v
                  for k, v in reference_net.backbone.state_dict().items()}
    flat = [f"blocks.{s}.{j}" for s, stage in enumerate(reference_net.backbone.blocks) for j in range(len(stage))]
    inverse = {}
    for n, name in enumerate(flat):
        expanded = f"{name}.conv_pwl.weight" in timm_state
        table = ({"conv_pw": "_expand_conv", "bn1": "_bn0", "conv_dw": "_depthwise_conv", "bn2": "_bn1",
                  "conv_pwl": "_project_conv", "bn3": "_bn2"} if expanded else
                 {"conv_dw": "_depthwise_conv", "bn1": "_bn1", "conv_pw": "_project_conv", "bn2": "_bn2"})
        table.update({"se.conv_reduce": "_se_reduce", "se.conv_expand": "_se_expand"})
        for key in [k for k in timm_state if k.startswith(name + ".")]:
            inner = key[len(name) + 1:]
            module = next(m for m in sorted(table, key=len, reverse=True) if inner.startswith(m + "."))
            inverse[f"_blocks.{n}.{table[module]}{inner[len(module):]}"] = timm_state[key]
    for key in [k for k in timm_state if not k.startswith("blocks.")]:
        inverse[key.replace("conv_stem", "_conv_stem").replace("bn1", "_bn0")] = timm_state[key]
    inverse["_fc.weight"] = torch.zeros(1000, 1792)  # the classifier, unused
    (tmp_path / "weights").mkdir()
    torch.save(inverse, tmp_path / "weights" / UNIAD_EFFICIENTNET_B4.filenames[0])
    settings = _micro(backbone="tf_efficientnet_b4", backbone_layers=(0, 1, 2, 3), backbone_pretrained=True,
                      epochs=1, tau_grid=(10,), k_grid=(2,))
    train, *_ = _toy()
    method = LafitE(settings).to("cpu")
    context = _context(tmp_path, settings, profile="paper")
    method.fit(train, context)
    assert context.info["backbone_init"] == "imagenet"
    assert context.info["selection"]["searched"] is False
    ours = method.features.backbone.state_dict()
    for key in ("conv_stem.weight", "blocks.0.0.conv_dw.weight", "blocks.4.0.conv_pwl.weight", "blocks.2.1.bn3.running_var"):
        assert torch.equal(ours[key], timm_state[key]), key
    (used,) = context.weights.used
    assert used["path"].endswith("efficientnet-b4-6ed6700e.pth") and len(used["sha256"]) == 64


def test_paper_profile_without_weights_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HARNESS_WEIGHTS", raising=False)
    train, *_ = _toy()
    settings = _micro(backbone="tf_efficientnet_b4", backbone_layers=(0, 1, 2, 3), backbone_pretrained=True)
    method = LafitE(settings)
    with pytest.raises(WeightsNotFoundError) as err:
        method.fit(train, _context(tmp_path, settings, profile="paper"))
    message = str(err.value)
    assert "efficientnet-b4-6ed6700e.pth" in message and str(tmp_path / "weights") in message
    assert "harness weights pull" in message
    assert SPEC.weight_files(SPEC.resolve("paper")) == [UNIAD_EFFICIENTNET_B4]
    assert SPEC.weight_files(SPEC.resolve("tiny")) == []


# ---------------------------------------------------------------------------------------------- Eq. 10

def test_editing_weights_follow_eq10():
    d = torch.tensor([[1.0, 2.0, 4.0]])
    literal = 1 - torch.exp(d) / torch.exp(d).sum()
    assert torch.allclose(editing_weights(d, "literal"), literal)
    assert torch.allclose(editing_weights(d, "literal").sum(), torch.tensor(2.0))  # K - 1
    # The default reading: the same weights, normalised to a convex combination.
    assert torch.allclose(editing_weights(d), literal / 2) and torch.allclose(editing_weights(d).sum(), torch.tensor(1.0))
    # Large distances must not overflow.
    assert torch.isfinite(editing_weights(torch.tensor([[500.0, 900.0]]))).all()
    with pytest.raises(ValueError, match="K >= 2"):
        editing_weights(torch.tensor([[1.0]]))


def test_edit_features_combines_the_nearest_bank_slices():
    bank = torch.tensor([[0.0, 0.0], [1.0, 0.0], [10.0, 10.0]])
    query = torch.tensor([0.2, 0.0]).view(1, 2, 1, 1)
    d = torch.tensor([0.2, 0.8])
    w = 1 - torch.softmax(d, 0)
    literal = edit_features(query, bank, k=2, weighting="literal")[0, :, 0, 0]
    assert torch.allclose(literal, w[0] * bank[0] + w[1] * bank[1], atol=1e-6)
    normalized = edit_features(query, bank, k=2)[0, :, 0, 0]
    # A convex combination stays between the neighbours; the literal one is K - 1 = 1 times it here.
    assert torch.allclose(normalized, literal, atol=1e-6) and 0 <= float(normalized[0]) <= 1
    three = edit_features(query, bank, k=3)[0, :, 0, 0]
    assert torch.allclose(edit_features(query, bank, k=3, weighting="literal")[0, :, 0, 0], 2 * three, atol=1e-5)
    # The nearer neighbour weighs more.
    assert w[0] > w[1] and literal[1].abs() < 1e-6


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

def test_scoring_is_squared_l2_then_the_toolkits_pooled_max():
    original = torch.zeros(1, 3, 4, 4)
    rec = original.clone()
    rec[0, :, 1, 1] = 1.0  # squared L2 = 3 at one position
    same = reconstruction_maps(original, rec, (4, 4), sigma=0)
    assert same.shape == (1, 4, 4) and float(same[0, 1, 1]) == 3.0 and float(same.sum()) == 3.0
    maps = reconstruction_maps(original, original + 1.0, (16, 16), sigma=4)
    assert maps.shape == (1, 16, 16) and torch.allclose(maps, torch.full_like(maps, 3.0))
    spot = torch.zeros(1, 8, 8)
    spot[0, 3, 3] = 16.0
    assert math.isclose(float(image_scores(spot, 4)), 1.0) and math.isclose(float(image_scores(spot, 1)), 16.0)
    noisy = torch.rand(3, 20, 20)
    assert torch.equal(image_scores(noisy, 16), pooled_max(noisy, 16, rounds=1))


def test_selection_picks_tau_without_editing_then_k_and_records_the_spread():
    labels = np.array([0, 0, 1, 1] * 2)
    cats = ["a"] * 4 + ["b"] * 4
    calls = []

    def evaluate(tau, k):
        calls.append((tau, k))
        good = (tau == 200 and k is None) or (tau == 200 and k == 5)
        block = np.array([0.0, 0.1, 0.9, 1.0]) if good else np.array([0.9, 1.0, 0.0, 0.1])
        return np.concatenate([block, block])

    chosen = select_tau_then_k(evaluate, labels, cats, [100, 200, 300], [2, 5], editing=True, rounds=30)
    assert chosen["tau"] == 200 and chosen["k"] == 5
    assert calls[:3] == [(100, None), (200, None), (300, None)] and calls[3:] == [(200, 2), (200, 5)]
    assert [g["auroc"] for g in chosen["tau_grid"]] == [0.0, 1.0, 0.0]
    best = chosen["tau_grid"][1]
    assert best["per_category"] == {"a": 1.0, "b": 1.0} and best["category_std"] == 0.0
    assert best["bootstrap_ci95"] == [1.0, 1.0] and best["bootstrap_std"] == 0.0
    ablation = select_tau_then_k(evaluate, labels, cats, [100, 200], [2, 5], editing=False)
    assert ablation["k"] is None and ablation["k_grid"] == []
    assert math.isnan(category_mean_auroc(np.zeros(2), np.zeros(2), ["a", "a"]))


def test_selection_reuses_candidates_already_evaluated():
    labels, cats = np.array([0, 1, 0, 1]), ["a"] * 4
    done, seen, calls = {}, [], []

    def evaluate(tau, k):
        calls.append((tau, k))
        return np.array([0.0, 1.0, 0.2, 0.8]) * (tau + (k or 0))

    first = select_tau_then_k(evaluate, labels, cats, [10, 20], [2, 3], done=done, on_result=lambda n, _s: seen.append(n))
    assert seen == ["tau=10", "tau=20", "tau=10,k=2", "tau=10,k=3"] and len(calls) == 4
    again = select_tau_then_k(evaluate, labels, cats, [10, 20], [2, 3], done=done)
    assert again == first and len(calls) == 4  # nothing evaluated twice


def test_bootstrap_spread_is_wider_for_a_noisy_candidate():
    rng = np.random.default_rng(0)
    labels = np.array([0] * 20 + [1] * 20)
    cats = ["a"] * 40
    clear = np.r_[rng.normal(0, 1, 20), rng.normal(4, 1, 20)]
    noisy = np.r_[rng.normal(0, 1, 20), rng.normal(0.5, 1, 20)]
    a, b = summarise(clear, labels, cats, rounds=200), summarise(noisy, labels, cats, rounds=200)
    assert a["auroc"] > b["auroc"] and b["bootstrap_std"] > a["bootstrap_std"] > 0
    assert b["bootstrap_ci95"][0] < b["auroc"] < b["bootstrap_ci95"][1]


# ---------------------------------------------------------------------------------------------- pseudo-validation data

def test_holdout_split_is_seeded_disjoint_and_per_category():
    train, *_ = _toy()
    fit, holdout = split_holdout(train, 0.15, seed=0)
    keys_fit, keys_held = {s.key for s in fit.samples}, {s.key for s in holdout.samples}
    assert not keys_fit & keys_held and len(keys_fit | keys_held) == len(train)
    assert {c: len(v) for c, v in holdout.by_category().items()} == {"red": 2, "blue": 2}
    assert {s.key for s in split_holdout(train, 0.15, seed=0)[1].samples} == keys_held  # seeded


def test_synthetic_anomalies_combine_two_to_four_rotated_masks():
    rng = np.random.default_rng(0)
    target = np.zeros((3, 64, 64), dtype=np.float32)
    donor = np.ones((3, 64, 64), dtype=np.float32)
    for _ in range(10):
        image, mask = synthesize_anomaly(target, donor, rng)
        assert mask.any() and np.array_equal(image[0] > 0.5, mask)  # the donor's pixels exactly where pasted
    square = np.zeros((64, 64), dtype=bool)
    square[20:40, 28:36] = True  # a tall 20 x 8 bar
    turned = rotate_mask(square, 90)
    ys, xs = np.nonzero(turned)
    assert np.ptp(xs) + 1 == 20 and np.ptp(ys) + 1 == 8 and turned.sum() == square.sum()
    # The number of fragments: 2-4 separate pastes (counted with a recording rng).
    from harness.toolkit import pseudo_validation as pv

    counts = []
    original = pv.paste_fragment

    def counting(*args, **kwargs):
        counts[-1] += 1
        return original(*args, **kwargs)

    try:
        pv.paste_fragment = counting
        for seed in range(30):
            counts.append(0)
            pv.synthesize_anomaly(target, donor, np.random.default_rng(seed))
    finally:
        pv.paste_fragment = original
    assert set(counts) == {2, 3, 4}


def test_pseudo_validation_set_uses_distinct_held_out_normals():
    train, *_ = _toy()
    _, holdout = split_holdout(train, 0.15, seed=0)
    pv = make_pseudo_validation(holdout, 6, seed=0, distinct_normals=True)
    assert pv.labels.tolist().count(1) == 6 and pv.labels.tolist().count(0) == 4  # 2 held-out normals per category
    normals = pv.images[pv.labels == 0].flatten(1)
    assert len({tuple(n[:50].tolist()) for n in normals}) == 4
    assert all(pv.masks[i].any() == bool(pv.labels[i]) for i in range(len(pv)))
    # The earlier behaviour (normals drawn with replacement) is still there for other callers.
    assert make_pseudo_validation(holdout, 6, seed=0).labels.tolist().count(0) == 6


# ---------------------------------------------------------------------------------------------- fit and predict

def test_lafite_passes_the_conformance_checks(tmp_path):
    check_method(SPEC, overrides={**MICRO_OVERRIDES, "pseudo_val_per_category": 2}, workdir=tmp_path)


def test_fit_records_the_choice_made_on_held_out_pseudo_validation(fitted):
    method, context, images, categories, _ = fitted
    info = context.info
    sel = info["selection"]
    assert info["backbone_init"] == "random"
    assert sel["searched"] and sel["tau"] in MICRO.tau_grid and sel["k"] in MICRO.k_grid
    assert [g["tau"] for g in sel["tau_grid"]] == list(MICRO.tau_grid)
    assert [g["k"] for g in sel["k_grid"]] == list(MICRO.k_grid)
    assert all({"per_category", "category_std", "bootstrap_std", "bootstrap_ci95"} <= set(g) for g in sel["tau_grid"])
    split = info["pseudo_validation_split"]
    assert split["held_out"] == 4 and split["fitting"] == 8
    # Two held-out normals and two anomalies per category.
    assert sel["pseudo_validation"]["images"] == 8 and sel["pseudo_validation"]["anomalous"] == 4
    assert (method.tau, method.k) == (sel["tau"], sel["k"])
    json.dumps(info)  # the record must be able to hold it
    bank = info["memory_bank"]
    # The bank holds slices of the 8 fitting images only (4 x 4 grid each).
    assert bank["slices"] == 8 * 16 and bank["coreset"] == round(MICRO.coreset_ratio * bank["slices"])
    out = method.predict(images, categories)
    assert out.anomaly_maps.shape == (len(images), SIZE, SIZE) and out.image_scores.shape == (len(images),)
    assert torch.isfinite(out.anomaly_maps).all() and torch.isfinite(out.image_scores).all()


def test_held_out_images_are_used_for_nothing_else(tmp_path, monkeypatch):
    seen: list[list[str]] = []
    original = LafitE._encode_all

    def spy(self, images, context, desc):
        if isinstance(images, TrainSet):
            seen.append([s.key for s in images.samples])
        return original(self, images, context, desc)

    monkeypatch.setattr(LafitE, "_encode_all", spy)
    train, *_ = _toy()
    _, holdout = split_holdout(train, MICRO.holdout_fraction, MICRO.pseudo_val_seed)
    method, _ = _fit(MICRO, tmp_path)
    held = {s.key for s in holdout.samples}
    assert seen and all(not held & set(keys) for keys in seen)  # backbone statistics, bank and U-Net data
    assert method.bank.shape[0] == round(MICRO.coreset_ratio * 8 * 16)


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
    assert torch.equal(a.anomaly_maps, b.anomaly_maps) and torch.equal(a.image_scores, b.image_scores)


@pytest.mark.parametrize("where", ["unet", "selection"])
def test_an_interrupted_fit_resumes_to_identical_predictions(tmp_path, monkeypatch, where):
    """Killed in the U-Net stage (mid-epoch) or in the selection, a rerun resumes and predicts the same."""
    _, images, categories, _ = _toy()
    settings = _micro(epochs=3)
    reference, _ = _fit(settings, tmp_path / "uninterrupted")
    expected = reference.predict(images, categories)

    calls = {"n": 0}
    target = "diffusion_loss" if where == "unet" else "reconstruct"
    module = lafite_training if where == "unet" else lafite_model  # where each is looked up
    original = getattr(module, target)
    crash_at = 4 if where == "unet" else 3  # the U-Net: epoch 1 (2 batches per epoch); selection: candidate 3

    def crashing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == crash_at:
            raise RuntimeError("simulated crash")
        return original(*args, **kwargs)

    monkeypatch.setattr(module, target, crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _fit(settings, tmp_path / "interrupted", checkpoint_interval=0)
    monkeypatch.setattr(module, target, original)
    torch.manual_seed(1234)  # a different global state: the resume must not depend on it
    train, *_ = _toy()
    resumed = LafitE(settings).to("cpu")
    context = _context(tmp_path / "interrupted", settings, checkpoint_interval=0)
    resumed.fit(train, context)
    resumed.eval()
    assert context.checkpoint.resumed_from is not None and context.checkpoint.resumed_from["stage"] == where
    got = resumed.predict(images, categories)
    assert (resumed.tau, resumed.k) == (reference.tau, reference.k)
    assert torch.equal(got.anomaly_maps, expected.anomaly_maps) and torch.equal(got.image_scores, expected.image_scores)


def test_without_feature_editing_is_the_ablation(tmp_path):
    _, images, categories, _ = _toy()
    method, context = _fit(_micro(feature_editing=False, epochs=1), tmp_path)
    assert method.k is None and context.info["selection"]["k"] is None
    assert context.info["selection"]["k_grid"] == [] and len(context.info["selection"]["tau_grid"]) == 2
    assert torch.isfinite(method.predict(images[:2], categories[:2]).image_scores).all()


def test_a_fixed_grid_holds_nothing_out(tmp_path):
    method, context = _fit(_micro(tau_grid=(10,), k_grid=(2,), epochs=1), tmp_path)
    assert context.info["pseudo_validation_split"]["held_out"] == 0
    assert context.info["memory_bank"]["slices"] == 12 * 16 and not context.info["selection"]["searched"]


def test_fast_dev_run_shortens_every_stage(tmp_path):
    method, context = _fit(_micro(epochs=5, tau_grid=(10, 30, 60), k_grid=(2, 3, 4)), tmp_path, fast_dev_run=True)
    info = context.info
    assert info["training"]["steps"] == 2 and info["training"]["epochs"] == 1
    assert [g["tau"] for g in info["selection"]["tau_grid"]] == [10, 60]
    assert [g["k"] for g in info["selection"]["k_grid"]] == [2, 4]
    assert method.ddim_steps == 2 and info["fast_dev_run"]["ddim_steps"] == 2


def test_bf16_precision_runs_and_returns_float32(tmp_path):
    _, images, categories, _ = _toy()
    method, _ = _fit(_micro(precision="bf16", epochs=1, tau_grid=(10,), k_grid=(2,)), tmp_path)
    out = method.predict(images[:2], categories[:2])
    assert out.anomaly_maps.dtype == torch.float32 and torch.isfinite(out.anomaly_maps).all()


# ---------------------------------------------------------------------------------------------- end to end

@pytest.mark.slow
def test_main_job_records_the_choice_made_on_pseudo_validation():
    """The README's job for this method chose tau and K on held-out pseudo-validation images."""
    record = synthetic_record("lafite")
    assert record["status"] == "ok"
    sel = record["method_info"]["selection"]
    assert sel["searched"] and sel["tau"] in PROFILES["tiny"]["tau_grid"] and sel["k"] in PROFILES["tiny"]["k_grid"]
    assert record["method_info"]["pseudo_validation_split"]["held_out"] > 0
