"""Tests of the UniAD plugin: spec, neighbour mask, jitter, shapes, schedule, fit/resume, an end-to-end run."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from toy_plugins import ToyPlugin, load_toy

from harness import TrainSet, WeightsNotFoundError
from harness.data import ImageCache, read_image, resize_image, to_tensor
from harness.testing import check_method, fit_context
from harness.toolkit.efficientnet import UNIAD_EFFICIENTNET_B4
from harness_uniad import model as uniad_model
from harness_uniad.model import UniAD, step_lr_factor
from harness_uniad.network import UniADReconstruction, add_jitter, neighbour_mask
from harness_uniad.plugin import PROFILES, harness_methods

SIZE = 32
(SPEC,) = harness_methods()
#: Smallest settings that run every code path in a few seconds (8 x 8 tokens at stride 4).
MICRO_OVERRIDES = {"image_size": SIZE, "feature_stride": 4, "backbone": "tf_efficientnet_b4", "backbone_layers": (0, 1),
                   "hidden_dim": 16, "nhead": 2, "num_encoder_layers": 1, "num_decoder_layers": 1, "dim_feedforward": 32, "neighbor_size": (3, 3),
                   "epochs": 2, "train_batch_size": 4, "eval_batch_size": 8, "feature_batch_size": 8,
                   "score_pool_size": 4, "lr": 1e-3}
MICRO = SPEC.resolve("tiny", MICRO_OVERRIDES)


def _toy():
    index = load_toy()
    train = [s for cat in index.categories.values() for s in cat.train]
    test = [s for cat in index.categories.values() for s in cat.test]
    images = to_tensor([resize_image(read_image(s.image), (SIZE, SIZE)) for s in test])
    return TrainSet("toy", train, (SIZE, SIZE), ImageCache()), images, [s.category for s in test]


def _fit(settings, workdir, **kwargs):
    torch.manual_seed(0)
    train, *_ = _toy()
    method = UniAD(settings).to("cpu")
    context = fit_context(settings, workdir, weights_dir=workdir / "weights", **kwargs)
    method.fit(train, context)
    method.eval()
    return method, context


# ---------------------------------------------------------------------------------------------- spec

def test_paper_profile_is_the_authors_mvtec_config():
    paper = SPEC.resolve("paper")
    assert SPEC.paper_protocol == "multiclass" and SPEC.profiles["paper"] == {}
    assert (paper.image_size, paper.interpolation, paper.feature_stride, paper.backbone_layers) == \
        (224, "bilinear", 16, (0, 1, 2, 3))
    assert (paper.hidden_dim, paper.nhead, paper.num_encoder_layers, paper.num_decoder_layers,
            paper.dim_feedforward, paper.dropout, paper.activation, paper.normalize_before,
            paper.pos_embed_type) == (256, 8, 4, 4, 1024, 0.1, "relu", False, "learned")
    assert (paper.neighbor_size, paper.neighbor_mask, paper.jitter_scale, paper.jitter_prob) == \
        ((7, 7), (1, 1, 1), 20.0, 1.0)
    assert (paper.epochs, paper.train_batch_size, paper.lr, paper.weight_decay, paper.lr_step, paper.lr_gamma,
            paper.grad_clip_norm, paper.score_pool_size) == (1000, 8, 1e-4, 1e-4, 800, 0.1, 0.1, 16)
    assert SPEC.weight_files(paper) == [UNIAD_EFFICIENTNET_B4]
    assert SPEC.weight_files(SPEC.resolve("tiny")) == []
    grid = SPEC.paper_grid(paper)
    assert (grid.name, grid.size, grid.mask_interpolation, grid.mask_binarize) == ("paper", 224, "nearest", "nonzero")
    assert not PROFILES["tiny"].get("backbone_pretrained", True)


def test_plugin_module_is_cheap_to_import():
    code = ("import sys, harness_uniad.plugin as p; p.harness_methods(); "
            "print([m for m in ('timm', 'harness_uniad.model', 'harness_uniad.network') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_paper_profile_shapes_on_the_meta_device():
    with torch.device("meta"):
        method = SPEC.factory(SPEC.resolve("paper"))
        feats = torch.zeros(2, 272, 14, 14)
        rec, pred = method.reconstruction.eval()(feats)
    assert method.features.channels == 272 and method.reconstruction.feature_size == (14, 14)
    assert rec.shape == (2, 272, 14, 14) and pred.shape == (2, 1, 224, 224)
    assert method.reconstruction.input_proj.weight.shape == (256, 272)
    assert method.reconstruction.output_proj.weight.shape == (272, 256)
    assert len(method.reconstruction.transformer.encoder.layers) == 4
    assert method.reconstruction.transformer.decoder.layers[0].learned_embed.weight.shape == (196, 256)


def test_bad_sizes_are_refused_with_the_setting_named():
    with pytest.raises(ValueError, match="feature_stride"):
        UniAD(SPEC.resolve("tiny", {**MICRO_OVERRIDES, "image_size": 30}))
    with pytest.raises(ValueError, match="neighbor_size"):
        UniAD(SPEC.resolve("tiny", {**MICRO_OVERRIDES, "neighbor_size": (9, 9)}))
    with pytest.raises(ValueError, match="neighbor_mask"):
        UniAD(SPEC.resolve("tiny", {**MICRO_OVERRIDES, "neighbor_mask": (1, 1)}))


# ---------------------------------------------------------------------------------------------- network parts

def test_neighbour_mask_hides_the_window_around_each_token():
    mask = neighbour_mask((5, 6), (3, 3)).view(5, 6, 5, 6)
    blocked = torch.isinf(mask)
    assert blocked[2, 2].sum() == 9 and blocked[2, 2, 1:4, 1:4].all()  # inner token: its 3 x 3 window
    assert blocked[0, 0].sum() == 4 and blocked[0, 0, :2, :2].all()  # corner: clipped at the border
    assert blocked[4, 5].sum() == 4
    assert (mask[~blocked] == 0).all()
    # A 7 x 7 window at 14 x 14 (the paper profile): 49 hidden keys for a central token.
    assert torch.isinf(neighbour_mask((14, 14), (7, 7))).sum(dim=1).max() == 49


def test_the_mask_switches_choose_the_attentions():
    net = UniADReconstruction(8, 1, (5, 5), hidden_dim=8, nhead=2, num_encoder_layers=1, num_decoder_layers=1,
                              dim_feedforward=8, neighbor_size=(3, 3), neighbor_mask=(False, True, False))
    seen = []
    for attn in (net.transformer.encoder.layers[0].self_attn, net.transformer.decoder.layers[0].self_attn,
                 net.transformer.decoder.layers[0].multihead_attn):
        attn.register_forward_pre_hook(lambda _m, args, kwargs: seen.append(kwargs.get("attn_mask") is not None),
                                       with_kwargs=True)
    net.eval()(torch.randn(1, 8, 5, 5))
    assert seen == [False, True, False]


def test_jitter_scales_with_the_token_norm_over_its_width():
    tokens = torch.ones(4000, 2, 10) * 3.0  # norm sqrt(10) * 3 per token
    out = add_jitter(tokens, scale=20.0, prob=1.0, generator=torch.Generator().manual_seed(0))
    expected_std = 20.0 * (3.0 * 10 ** 0.5) / 10
    assert abs(float((out - tokens).std()) - expected_std) < 0.05 * expected_std
    assert torch.equal(add_jitter(tokens, 20.0, 0.0, torch.Generator().manual_seed(0)), tokens)


def test_jitter_only_in_training():
    net = UniADReconstruction(8, 1, (4, 4), hidden_dim=8, nhead=2, num_encoder_layers=1, num_decoder_layers=1,
                              dim_feedforward=8, dropout=0.0, neighbor_size=(3, 3), jitter_scale=20.0)
    x = torch.randn(2, 8, 4, 4)
    net.eval()
    assert torch.equal(net.reconstruct(x, torch.Generator().manual_seed(0)),
                       net.reconstruct(x, torch.Generator().manual_seed(1)))
    net.train()
    assert not torch.allclose(net.reconstruct(x, torch.Generator().manual_seed(0)),
                              net.reconstruct(x, torch.Generator().manual_seed(1)))
    net.jitter_scale = 0.0  # no jitter and no dropout: training mode gives the eval output
    train_out = net.reconstruct(x)
    net.eval()
    torch.testing.assert_close(train_out, net.reconstruct(x))


def test_anomaly_map_is_the_l2_error_upsampled_with_aligned_corners():
    net = UniADReconstruction(3, 4, (2, 2), hidden_dim=8, nhead=2, num_encoder_layers=1, num_decoder_layers=1,
                              dim_feedforward=8, neighbor_size=None)
    feats, rec = torch.zeros(1, 3, 2, 2), torch.zeros(1, 3, 2, 2)
    rec[0, :, 0, 0] = torch.tensor([3.0, 4.0, 0.0])  # L2 = 5 at the top-left token
    pred = net.anomaly_map(feats, rec)
    assert pred.shape == (1, 1, 8, 8)
    assert float(pred[0, 0, 0, 0]) == pytest.approx(5.0) and float(pred[0, 0, -1, -1]) == pytest.approx(0.0)


def test_the_learning_rate_drops_one_epoch_late_as_in_the_authors_loop():
    assert [step_lr_factor(e, 800, 0.1, True) for e in (0, 1, 800, 801)] == pytest.approx([1, 1, 1, 0.1])
    assert [step_lr_factor(e, 800, 0.1, False) for e in (0, 799, 800)] == pytest.approx([1, 1, 0.1])


# ---------------------------------------------------------------------------------------------- fit and predict

@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    _, images, categories = _toy()
    method, context = _fit(MICRO, tmp_path_factory.mktemp("uniad"))
    return method, context, images, categories


def test_fit_trains_and_predict_gives_maps_at_the_image_size(fitted):
    method, context, images, categories = fitted
    out = method.predict(images, categories)
    assert out.anomaly_maps.shape == (len(images), SIZE, SIZE) and out.image_scores.shape == (len(images),)
    assert torch.isfinite(out.anomaly_maps).all() and (out.anomaly_maps >= 0).all()
    info = context.info
    assert info["backbone_init"] == "random" and info["training"]["steps"] == 2 * 3  # 12 images, batch 4
    assert info["training"]["feature_shape"] == [24 + 32, 8, 8]
    assert info["training"]["final_epoch_loss"] < info["training"]["first_epoch_loss"]
    # The image score is the toolkit's pooled max of the returned map.
    from harness.toolkit.scoring import pooled_max

    torch.testing.assert_close(out.image_scores, pooled_max(out.anomaly_maps, 4))
    assert not method.reconstruction.training


def test_the_method_follows_the_contract(tmp_path):
    check_method(SPEC, overrides=MICRO_OVERRIDES, workdir=tmp_path)


def test_a_missing_backbone_file_names_it(tmp_path):
    settings = SPEC.resolve("tiny", {**MICRO_OVERRIDES, "backbone_pretrained": True, "backbone": "tf_efficientnet_b4"})
    train, *_ = _toy()
    method = UniAD(settings)
    with pytest.raises(WeightsNotFoundError, match="efficientnet-b4-6ed6700e.pth"):
        method.fit(train, fit_context(settings, tmp_path, weights_dir=tmp_path / "weights"))


def test_an_interrupted_fit_resumes_to_identical_predictions(tmp_path, monkeypatch):
    """Killed mid-epoch in the reconstruction stage, a rerun resumes and predicts the same."""
    _, images, categories = _toy()
    settings = SPEC.resolve("tiny", {**MICRO_OVERRIDES, "epochs": 3})
    reference, _ = _fit(settings, tmp_path / "uninterrupted")
    expected = reference.predict(images, categories)

    calls = {"n": 0}
    original = uniad_model.F.mse_loss

    def crashing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # epoch 1, second batch (3 batches per epoch)
            raise RuntimeError("simulated crash")
        return original(*args, **kwargs)

    monkeypatch.setattr(uniad_model.F, "mse_loss", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _fit(settings, tmp_path / "interrupted", checkpoint_interval=0)
    monkeypatch.setattr(uniad_model.F, "mse_loss", original)
    torch.manual_seed(1234)  # the resume restores the RNG state it needs
    train, *_ = _toy()
    resumed = UniAD(settings).to("cpu")
    context = fit_context(settings, tmp_path / "interrupted", weights_dir=tmp_path / "weights", checkpoint_interval=0)
    resumed.fit(train, context)
    resumed.eval()
    assert context.checkpoint.resumed_from is not None
    assert context.checkpoint.resumed_from["stage"] == "reconstruction"
    got = resumed.predict(images, categories)
    assert torch.equal(got.anomaly_maps, expected.anomaly_maps) and torch.equal(got.image_scores, expected.image_scores)


def test_a_multiclass_run_writes_an_ok_record(tmp_path):
    """End to end through the runner: one model on both toy categories, our metrics, a record."""
    import harness_uniad.plugin as uniad_plugin

    from harness.engine.jobs import Job
    from harness.engine.options import RunOptions
    from harness.engine.registry import load_registry
    from harness.engine.runner import Runner

    registry = load_registry(entry_points=[], extra_plugins=[("toy", ToyPlugin()), ("uniad", uniad_plugin)])
    options = RunOptions(results_dir=tmp_path / "results", cache_dir=tmp_path / "cache", device="cpu", eval_size=32,
                         progress=False, latency_repeats=1)
    overrides = tuple(sorted((k, v) for k, v in MICRO_OVERRIDES.items() if k != "image_size"))
    job = Job("uniad", "toy", "multiclass", None, 0, "tiny", overrides=overrides + (("image_size", SIZE),))
    summary = Runner(registry, options).run([job])
    (outcome,) = summary.outcomes
    assert outcome.status == "ok", summary.describe()
    record = outcome.record
    assert set(record.metrics) == {"red", "blue"}
    assert np.isfinite(record.mean["image_auroc"]) and record.efficiency["params"] > 0
