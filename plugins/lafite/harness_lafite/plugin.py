"""Registers LafitE with the harness (entry point ``lafite`` in the group ``harness``).

Importing this module is cheap: timm and diffusers load when a method is built (:func:`build`).

No official code is public, so the paper's text is the specification, and UniAD's code
(zhiyuanyou/UniAD) where the paper says it follows UniAD. Facts from the paper (Section 4.1):
224 x 224 inputs resized bilinearly, ImageNet EfficientNet-b4, stages 1-4 resized to 32 x 32 and
concatenated (UniAD's aggregation: 24 + 32 + 56 + 160 = 272 channels; UniAD itself uses 14 x 14,
settable through ``feature_size``), a U-Net with base 256 channels and multipliers (1, 2, 3, 4),
1000 epochs at batch 64, T = 1000 with the cosine schedule, AdamW (lr 1e-4, weight decay 1e-4,
lr x 0.1 after 800 epochs), a 10 % coreset, Gaussian sigma 4, tau and K chosen on a
pseudo-validation set of synthetic anomalies (tau with editing off, then K).

The backbone is the file UniAD loads (its ``experiments/MVTec-AD/config.yaml``:
``efficientnet-b4-6ed6700e.pth``; EfficientNet-PyTorch's release of the TensorFlow ImageNet
checkpoint), run as timm's ``tf_efficientnet_b4`` with UniAD's padding
(:mod:`harness.toolkit.multiscale`). Every choice the paper leaves open is a setting whose
``choice`` text says what the default is and why; ``harness describe lafite`` lists them and
every record repeats them.

Profiles
--------
``paper``
    The defaults: needs the EfficientNet-b4 file on disk and a GPU.
``tiny``
    The same code at toy scale for a CPU: 128 px, a randomly initialised ResNet-18 (layer1 +
    layer2, 192 channels; BatchNorm re-estimated on the training images) aggregated on an 8 x 8
    grid, a two-level 64-channel U-Net without attention, 8 epochs at lr 3e-3, three DDIM
    evaluations, tau in (25, 100), K in (2, 5), and a 50 % coreset. Why not EfficientNet-b4: at
    128 px it is several times slower on a CPU, and its random features separated the synthetic
    defects worse (nearest-neighbour image AUROC 0.62 vs 0.73 for ResNet-18 layers 1-2); a 10 %
    coreset of random features lost a further ~0.05 AUROC.
"""

from __future__ import annotations

from harness import EvalGrid, MethodSpec, PaperRef, Resources, Setting, hookimpl
from harness.settings import eval_batch_size, image_size, interpolation, precision
from harness_lafite.weightfiles import weight_files

PAPER = PaperRef(
    title="LafitE: Latent Diffusion Model with Feature Editing for Unsupervised Multi-class Anomaly Detection",
    venue="arXiv 2023",
    url="https://arxiv.org/abs/2307.08059",
    code="",
)

#: The paper's range of the corruption step is in its Fig. 6, which our copy does not have: the
#: grid spans the whole schedule (T = 1000) so that it contains any range the figure shows.
TAU_GRID = (50, 100, 200, 300, 400, 500, 600, 700, 800, 900)

SETTINGS = (
    image_size(224),
    interpolation("bilinear", choice="bilinear: 'we use bi-linear interpolation to resize the images to 224x224'"),
    eval_batch_size(32),
    precision("fp32", choice="fp32: the paper names no mixed precision (one RTX 3090)"),
    Setting("backbone", str, "tf_efficientnet_b4", "timm name of the feature extractor",
            choice="tf_efficientnet_b4: the TensorFlow-style EfficientNet-b4 (SAME padding, BatchNorm eps 1e-3) "
                   "that the weights UniAD uses were trained as"),
    Setting("backbone_layers", tuple[int, ...], (0, 1, 2, 3),
            "timm out_indices of the aggregated stages ((0, 1, 2, 3) = UniAD's stages 1-4, 272 channels)"),
    Setting("backbone_pretrained", bool, True,
            "load ImageNet weights from disk (never downloaded); false = seeded random init + BatchNorm re-estimation"),
    Setting("backbone_weights_file", str, "", "explicit path of the backbone weights (optional)"),
    Setting("backbone_padding", str, "uniad",
            "TensorFlow-style convolutions: padded for the native 380 px input (uniad) or for the actual input",
            choices=("uniad", "dynamic"),
            choice="uniad: UniAD's EfficientNet (EfficientNet-PyTorch 0.7.1) pads statically for 380 px, so at "
                   "224 px stage 3's stride-2 5x5 convolution pads (2, 2) where TensorFlow's rule pads (1, 2)"),
    Setting("feature_size", int, 32, "side of the aggregated feature grid", minimum=1,
            choice="32: the paper's text; UniAD aggregates at 14 (stride 16)"),
    Setting("feature_batch_size", int, 32, "images per backbone forward pass during fit", minimum=1),
    Setting("feature_standardize", bool, False, "standardise each feature channel with training statistics",
            choice="false: neither the paper nor UniAD's code standardises features, and standardising reweights "
                   "the channels in Eq. 12's error and in the editing distances; true rescales them to the unit "
                   "scale the noise schedule assumes (the tiny profile does, for its random ResNet-18 features)"),
    Setting("timesteps", int, 1000, "diffusion steps T of the noise schedule", minimum=2),
    Setting("beta_schedule", str, "squaredcos_cap_v2", "diffusers beta schedule (squaredcos_cap_v2 = cosine)",
            choices=("squaredcos_cap_v2", "linear", "scaled_linear")),
    Setting("base_channels", int, 256, "U-Net width of the first level", minimum=1),
    Setting("channel_mults", tuple[int, ...], (1, 2, 3, 4), "U-Net width multiplier per level", minimum=1),
    Setting("layers_per_block", int, 2, "U-Net residual blocks per level", minimum=1,
            choice="2: the paper is silent; the latent-diffusion U-Nets with multipliers (1, 2, 3, 4) use 2"),
    Setting("attention_resolutions", tuple[int, ...], (16, 8, 4), "feature-map sides with self-attention",
            choice="16, 8, 4: paper silent; latent-diffusion configs attend at down-sampling factors 2, 4, 8"),
    Setting("attention_head_dim", int, 32, "width of one attention head", minimum=1,
            choice="32: paper silent; as the latent-diffusion configs"),
    Setting("norm_groups", int, 32, "GroupNorm groups in the U-Net", minimum=1),
    Setting("dropout", float, 0.0, "dropout in the U-Net residual blocks", minimum=0.0, maximum=1.0,
            choice="0: paper silent"),
    Setting("epochs", int, 1000, "training epochs of the diffusion U-Net", minimum=0),
    Setting("train_batch_size", int, 64, "feature tensors per training step", minimum=1),
    Setting("lr", float, 1e-4, "initial AdamW learning rate", minimum=0.0),
    Setting("weight_decay", float, 1e-4, "AdamW weight decay", minimum=0.0),
    Setting("lr_drop_at", float, 0.8, "fraction of the epochs after which the learning rate drops", minimum=0.0,
            maximum=1.0),
    Setting("lr_drop_factor", float, 0.1, "factor of that drop", minimum=0.0),
    Setting("grad_clip_norm", float, 0.0, "clip the gradient norm to this value (0: no clipping)", minimum=0.0,
            choice="0: the paper names none; UniAD's config clips at 0.1 (clip_max_norm), which LafitE's "
                   "'following UniAD' may or may not include"),
    Setting("coreset_ratio", float, 0.1, "fraction of training feature slices kept in the memory bank",
            minimum=0.0, maximum=1.0),
    Setting("coreset_projection_dim", int, 128, "random projection size used while selecting the coreset (0: none)",
            minimum=0, choice="128: paper silent ('a greedy search algorithm'); PatchCore's projection"),
    Setting("feature_editing", bool, True, "edit features with the memory bank before diffusion (false = 'w/o F.E.')"),
    Setting("editing_weights", str, "normalized", "Eq. 10's neighbour weights: normalized (sum 1) or literal",
            choices=("normalized", "literal"),
            choice="normalized: Eq. 10 as printed gives weights 1 - softmax(d) that sum to K - 1 (all zero for "
                   "K = 1), so the edited slice is about (K - 1) times a neighbour and the K search is driven "
                   "by scale, against the text's 'will not lie too far from the normal data manifold'; divided "
                   "by K - 1 they sum to one (a convex combination). 'literal' keeps the print."),
    Setting("ddim_steps", int, 10, "U-Net evaluations of the DDIM reverse process from tau to 0", minimum=1,
            choice="10: the paper does not give the DDIM step count; evenly spaced from tau to 0"),
    Setting("ddim_eta", float, 0.0, "DDIM eta (0 = deterministic)", minimum=0.0,
            choice="0: deterministic DDIM, the paper gives sigma_t only in general form"),
    Setting("tau_grid", tuple[int, ...], TAU_GRID, "candidate corruption steps tau (one value: fixed, no search)",
            minimum=1, choice="50 and 100..900 by 100: Fig. 6 (the paper's tau range) is not in our copy; the grid "
                              "spans the whole schedule"),
    Setting("k_grid", tuple[int, ...], (2, 3, 5, 10, 20), "candidate numbers of neighbours K (one value: fixed)",
            minimum=2, choice="2, 3, 5, 10, 20: Fig. 6 is not in our copy; K >= 2 (Eq. 10 is degenerate for K = 1)"),
    Setting("holdout_fraction", float, 0.1,
            "share of each category's training images held out for pseudo-validation (used for nothing else)",
            minimum=0.0, maximum=0.9,
            choice="0.1: the paper does not say which normal images build the pseudo-validation set; these are "
                   "kept out of the memory bank and the U-Net's training set so that tau and K are not chosen on "
                   "images the model has seen"),
    Setting("pseudo_val_per_category", int, 40,
            "pseudo-validation images per category: half synthetic anomalies, the rest distinct held-out normals",
            minimum=2, choice="40: paper silent; at most 20 distinct normal images plus 20 anomalies per category "
                              "(MVTec AD holds out 6-39 images per category at 10 %)"),
    Setting("pseudo_val_seed", int, 0, "seed of the held-out split and of the synthetic anomalies"),
    Setting("bootstrap_rounds", int, 200, "resamples for the AUROC spread of each selection candidate (0: none)",
            minimum=0),
    Setting("smoothing_sigma", float, 4.0, "Gaussian sigma (pixels) applied to the upsampled anomaly map",
            minimum=0.0),
    Setting("score_pool_size", int, 16, "average-pooling window (pixels) before the max that gives the image score",
            minimum=1, choice="16: the paper says 'average pooling' without a size; UniAD's evaluation "
                              "(max with avgpool_size [16, 16], stride 1)"),
    Setting("inference_seed", int, 0, "seed of the forward-diffusion noise at inference"),
)

PROFILES = {
    "paper": {},
    "tiny": {
        "backbone": "resnet18", "backbone_layers": (1, 2), "backbone_pretrained": False, "image_size": 128,
        "feature_size": 8, "base_channels": 64, "channel_mults": (1, 2), "layers_per_block": 1,
        "attention_resolutions": (), "norm_groups": 16, "epochs": 8, "train_batch_size": 32, "lr": 3e-3,
        "feature_batch_size": 40, "eval_batch_size": 30, "coreset_ratio": 0.5, "ddim_steps": 3,
        "tau_grid": (25, 100), "k_grid": (2, 5), "holdout_fraction": 0.15, "pseudo_val_per_category": 16,
        "bootstrap_rounds": 100,
        # Random ResNet-18 features are far from unit scale; the profile was tuned standardised.
        "feature_standardize": True,
    },
}


def paper_grid(settings) -> EvalGrid:
    """UniAD's pixel grid, which LafitE says it follows (``--eval-grid paper``)."""
    return EvalGrid(name="paper", size=int(settings.image_size), mask_interpolation="nearest", mask_binarize="nonzero",
                    note="UniAD's TestBaseTransform: the mask resized to 224 x 224 by nearest neighbour; its "
                         "eval_helper counts values > 0; maps at 224 (the harness grid upsamples them to 256)")


def build(settings):
    """The factory: builds LafitE's architecture (no weights are read)."""
    from harness_lafite.model import LafitE

    return LafitE(settings)


@hookimpl
def harness_methods():
    """Return the LafitE method spec."""
    return [MethodSpec(
        name="lafite", paper=PAPER, protocols=("multiclass", "oneclass", "fewshot"), profiles=PROFILES,
        factory=build, settings=SETTINGS, paper_protocol="multiclass", weights=weight_files, paper_grid=paper_grid,
        resources={"paper": Resources(gpus=1, cpus=4, memory_gb=32), "tiny": Resources(cpus=1)},
        description="Diffusion model over aggregated EfficientNet-b4 features; query features edited with a "
                    "coreset memory bank (weighted K nearest neighbours), noised to step tau and denoised by "
                    "DDIM; anomaly = feature reconstruction error. tau and K chosen on a pseudo-validation set "
                    "of pasted-fragment anomalies made from held-out training images.",
    )]
