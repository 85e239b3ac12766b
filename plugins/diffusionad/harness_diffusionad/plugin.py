"""Registers DiffusionAD with the harness (entry point ``diffusionad`` in the group ``harness``).

Importing this module is cheap: the networks (diffusers) load when a method is built.

Profiles
--------
``paper``
    The defaults: the authors' code (HuiZhang0812/DiffusionAD at 8a64c03, ``args/args1.json``,
    ``train.py``, ``eval.py``) where it and the paper's text disagree. 256 x 256 inputs in [0, 1],
    a 128-channel UNet with multipliers (1, 1, 2, 2, 4, 4), residual resampling at every level,
    additive time conditioning (131,654,403 parameters, as theirs), the 64-channel six-stage
    segmentation U-Net, 3000 epochs at batch 16, Adam 1e-4 (UNet) and 1e-5 (segmentation, cosine
    T_max 10 stepped per batch), focal weight 5, training levels split at 300, inference levels
    200 and 400 with the norm-guided combination, fp32. One model per category
    (``paper_protocol="oneclass"``). It needs the DTD texture images (``dtd_root``; or the
    explicit opt-out ``texture_source=procedural``); the authors' foreground masks are used when
    ``foreground_root`` is given, else Otsu (the record says which).
``paper_text``
    The paper's text where it differs from the code: 500 epochs, batch 6 made of 3 normal and 3
    synthetic images, one learning rate 1e-4 for both networks, training as Algorithm 1 (one
    random level, noise loss on every image, no clamp of the estimate), two of the text's seven
    augmentations per anomaly source, the uniform 8 x 8 shuffle, inference at levels 100 and 200
    with the two segmentations averaged.
``tiny``
    The same code at toy scale for CPU runs: 32 px, an 8-channel three-level UNet, a 16-channel
    four-stage segmentation U-Net, procedural textures, larger learning rates, images diffused
    in [-1, 1] (see the profile's comment for why).

No weights are pretrained, and the authors publish no trained model (their issues #41 and #68 ask
for checkpoints). ``official_checkpoints`` points a run at checkpoints in the authors' format
(``<folder>/<category>/params-best.pt``, as their ``train.py`` writes it, e.g. a model trained
with their code) and skips training; that file is then the only one the job declares.
"""

from __future__ import annotations

from harness import DataNeed, EvalGrid, MethodSpec, PaperRef, Resources, Setting, WeightFile, hookimpl
from harness.settings import antialias, eval_batch_size, image_size, interpolation, precision

PAPER = PaperRef(
    title="DiffusionAD: Norm-guided One-step Denoising Diffusion for Anomaly Detection",
    venue="arXiv 2023 (IEEE TPAMI 2025)",
    url="https://arxiv.org/abs/2303.08730",
    code="https://github.com/HuiZhang0812/DiffusionAD",
)

_CODE = "the authors' code (args1.json / train.py / eval.py)"

SETTINGS = (
    # -- the runner's and shared settings
    image_size(256, choice="paper and code: 256 x 256"),
    eval_batch_size(8, choice="the authors' eval.py scores one image at a time; predictions do not depend on the "
                              "batch except for the seeded inference noise"),
    interpolation("bilinear", choice="the authors resize images, DTD textures and foreground masks with "
                                     "cv2.resize (bilinear)"),
    antialias(False, choice="false: the authors' cv2.resize does not antialias (Pillow's and torchvision's bilinear "
                            "filters do when shrinking), so an authors' model sees the pixels it was trained on; "
                            "true: Pillow's filter"),
    precision("fp32", choice=f"{_CODE} trains and evaluates in fp32"),
    Setting("train_batch_size", int, 16, "training images per step (normal and synthetic together)", minimum=1,
            choice=f"{_CODE}: 16; the paper's text: 6 (3 normal + 3 synthetic)"),
    Setting("epochs", int, 3000, "training epochs over the job's training images", minimum=0,
            choice=f"{_CODE}: 3000; the paper's text: 500"),
    Setting("denoiser_lr", float, 1e-4, "Adam learning rate of the denoising UNet", minimum=0.0),
    Setting("seg_lr", float, 1e-5, "Adam learning rate of the segmentation network", minimum=0.0,
            choice=f"{_CODE}: 1e-5; the paper's text gives one initial learning rate, 1e-4"),
    Setting("seg_cosine_tmax", int, 10, "T_max of the cosine schedule of the segmentation learning rate, stepped "
            "every batch (0: constant)", minimum=0,
            choice=f"{_CODE}: CosineAnnealingLR(T_max=10) stepped per batch (the rate falls to 0 and back every 20 "
                   "steps); the paper is silent"),
    Setting("weight_decay", float, 0.0, "Adam weight decay of both networks", minimum=0.0),
    Setting("gradient_checkpointing", bool, False, "recompute the UNet's activations in the backward pass to save "
            "memory (diffusers)"),
    Setting("inference_seed", int, 0, "seed of the forward-diffusion noise drawn at every predict call", minimum=0,
            choice="the authors draw fresh unseeded noise per image; seeded here so that scores are reproducible"),
    # -- diffusion
    Setting("T", int, 1000, "diffusion steps of the noise schedule", minimum=2),
    Setting("beta_start", float, 1e-4, "first beta of the linear schedule (for T = 1000; scaled by 1000 / T)",
            minimum=0.0),
    Setting("beta_end", float, 0.02, "last beta of the linear schedule (for T = 1000; scaled by 1000 / T)",
            minimum=0.0),
    Setting("x0_clamp", str, "symmetric", "one-step estimates clamped to [-1, 1] ('symmetric') or not ('none')",
            choices=("symmetric", "none"),
            choice=f"{_CODE} clamps every x0 estimate to [-1, 1] (models/DDPM.py); the paper's Algorithms 1 and 2 do "
                   "not clamp"),
    Setting("pixel_range", str, "unit", "range images are diffused in: 'unit' = [0, 1], 'symmetric' = [-1, 1]",
            choices=("unit", "symmetric"),
            choice="the authors diffuse the loader's [0, 1] images (x0 estimates still clamped to [-1, 1]); the "
                   "DDPM convention is [-1, 1], which doubles the signal-to-noise ratio at a given level"),
    # -- denoising UNet
    Setting("base_channels", int, 128, "UNet channels of the first level (and of the time sinusoid)", minimum=1),
    Setting("channel_mults", tuple[float, ...], (1, 1, 2, 2, 4, 4), "UNet width multiplier per level (first = 1)"),
    Setting("layers_per_block", int, 2, "UNet residual blocks per level on the way down (one more up)", minimum=1),
    Setting("attention_resolutions", tuple[int, ...], (32, 16, 8), "feature sides (px) with self-attention"),
    Setting("num_heads", int, 4, "attention heads at every UNet attention layer", minimum=1),
    Setting("time_conditioning", str, "additive", "how residual blocks take the time embedding",
            choices=("additive", "scale_shift"),
            choice="the authors' ResBlock adds the projected embedding; scale_shift is improved DDPM's FiLM variant"),
    Setting("resample", str, "resnet", "'resnet': residual blocks that pool / up-sample (the authors' "
            "biggan_updown=True), 'conv': strided / up-sampling convolutions", choices=("resnet", "conv")),
    Setting("norm_groups", int, 32, "GroupNorm groups in the UNet (the authors' GroupNorm32)", minimum=1),
    Setting("dropout", float, 0.0, "dropout in the UNet's residual blocks", minimum=0.0, maximum=1.0),
    Setting("denoiser_init", str, "zero_out", "initialisation of the UNet: 'zero_out' (every residual block's last "
            "convolution, every attention output projection and the final convolution start at zero) or 'default' "
            "(diffusers' initialisation, nothing zeroed)", choices=("zero_out", "default"),
            choice="the authors' Recon_subnetwork.py wraps those layers in zero_module (a fresh UNet predicts zero "
                   "noise, every block starts as the identity); the paper is silent"),
    # -- segmentation network
    Setting("seg_base_channels", int, 64, "segmentation U-Net width of the first stage", minimum=1),
    Setting("seg_depth", int, 6, "segmentation U-Net stages (the authors': 6)", minimum=2),
    # -- training
    Setting("training", str, "norm_guided", "'norm_guided': two levels, segmentation of the norm-guided estimate "
            "(code); 'single_level': one random level, plain estimate (the paper's Algorithm 1)",
            choices=("norm_guided", "single_level"),
            choice=f"{_CODE} trains on the norm-guided estimate (two levels split at normal_t_range); the paper's "
                   "Algorithm 1 on a single level"),
    Setting("normal_t_range", int, 300, "norm_guided training levels: low in [0, this), high in [this, T)",
            minimum=1),
    Setting("noise_loss_on", str, "normal", "images whose noise-prediction loss is learnt",
            choices=("normal", "all"),
            choice=f"{_CODE} (and the TPAMI version's Eq. 9): normal images only; the arXiv text's Eq. 6: all"),
    Setting("focal_weight", float, 5.0, "weight gamma of the focal loss", minimum=0.0),
    Setting("smooth_l1_weight", float, 1.0, "weight of the smooth L1 loss", minimum=0.0),
    Setting("focal_alpha", float, 0.5, "focal loss alpha", minimum=0.0),
    Setting("focal_gamma", float, 4.0, "focal loss gamma (focusing exponent)", minimum=0.0),
    # -- inference
    Setting("levels", tuple[int, ...], (200, 400), "the two inference noise levels (low, high)", minimum=0,
            choice=f"{_CODE}: 200 and 400 (eval_normal_t / eval_noisier_t); the paper's text: 100 and 200"),
    Setting("combination", str, "norm_guided", "'norm_guided': one segmentation of the norm-guided estimate; "
            "'average': mean of the segmentations at both levels", choices=("norm_guided", "average"),
            choice=f"{_CODE}: norm-guided; the paper's text: the average of both levels"),
    Setting("guidance_weight", float, 1.0, "w of the norm-guided noise correction (condition_w)", minimum=0.0),
    Setting("top_k", int, 50, "image score = mean of the top_k largest map values", minimum=1),
    # -- anomaly synthesis
    Setting("texture_source", str, "dtd", "anomaly textures: 'dtd' (the DTD images under dtd_root; required) or "
            "'procedural' (an explicit opt-out: generated textures)", choices=("dtd", "procedural"),
            choice="paper and code: the Describable Textures Dataset; procedural textures only when opted out (or "
                   "with --weights random and no dtd_root)"),
    Setting("dtd_root", str, "", "folder of the DTD images (https://www.robots.ox.ac.uk/~vgg/data/dtd/)"),
    Setting("foreground_root", str, "", "folder of the authors' foreground masks (<root>/<category>/DISthresh/good/"
            "<stem>.png, <root>/carpet/thresh/*.png); empty: Otsu for objects, whole image for textures",
            choice="the authors use DIS foregrounds they publish as files; without them Otsu stands in "
                   "(harness.toolkit.foreground)"),
    Setting("foreground", str, "auto", "without foreground_root: 'auto' (Otsu, whole image when the split is "
            "lopsided), 'otsu', or 'whole' (every category)", choices=("auto", "otsu", "whole")),
    Setting("extra_texture_categories", tuple[str, ...], ("zipper",),
            "categories treated as textures besides the dataset's own texture categories",
            choice="the authors' texture_list adds MVTec's zipper (an object) to the textures"),
    Setting("synthesis_workers", int, 8, "DataLoader worker processes that make the synthetic anomalies (0: the "
            "main process); the batches do not depend on it", minimum=0,
            choice="the authors' loader uses 8 workers"),
    Setting("anomaly_probability", float, 0.5, "probability that an image gets a synthetic anomaly ('coin')",
            minimum=0.0, maximum=1.0),
    Setting("anomaly_sampling", str, "coin", "'coin': each image independently; 'half': exactly half of each batch",
            choices=("coin", "half"),
            choice="the authors' dataset flips a coin per image; the paper's text: batches of 3 normal + 3 synthetic"),
    Setting("train_sampling", str, "replacement", "how an epoch draws its images: 'replacement' or 'permutation'",
            choices=("replacement", "permutation"),
            choice="the authors' dataset ignores the index and draws an image at random (with replacement)"),
    Setting("augmentations", int, 3, "random augmentations applied to an anomaly source", minimum=0, maximum=10,
            choice=f"{_CODE}: 3 of its 10 augmenters; the paper's text: 2 of 7"),
    Setting("augmentation_pool", str, "code", "augmentations drawn from: 'code' (the authors' ten imgaug augmenters: "
            "gamma per channel, brightness x and + in a random colour space, sharpness, hue and saturation, solarize "
            "with p 0.5, posterize, invert, autocontrast, equalize, rotation) or 'paper' (the text's seven: equalize, "
            "sharpness, auto-contrast, solarize, posterize, invert, gamma-contrast)", choices=("code", "paper"),
            choice=f"{_CODE}: the ten augmenters of randAugmenter; the paper's text names seven"),
    Setting("grid_shuffle", str, "strips", "self-augmentation rearrangement: 'strips' (the code: alternate vertical, "
            "then horizontal strips shuffled) or 'cells' (the 64 cells of the 8 x 8 grid in a uniform order)",
            choices=("strips", "cells"),
            choice=f"{_CODE} shuffles alternate strips; the paper's text: 'divided into an 8x8 grid and randomly "
                   "rearranged'"),
    Setting("self_augment_probability", float, 0.5, "for objects: probability of the shuffled self-augmented image "
            "as the anomaly source instead of a texture", minimum=0.0, maximum=1.0),
    Setting("perlin_scale_exp", tuple[int, ...], (0, 6), "Perlin lattice cells per axis are 2**k, k in [lo, hi)",
            minimum=0),
    Setting("perlin_threshold", float, 0.5, "Perlin noise threshold of the anomaly mask"),
    Setting("beta_range", tuple[float, ...], (0.2, 0.8), "range of the opacity with which the normal image shows "
            "through an anomaly", minimum=0.0, maximum=1.0),
    # -- the authors' checkpoints
    Setting("official_checkpoints", str, "", "checkpoints in the authors' format (train.py's params-best.pt; none is "
            "published): a folder with <category>/<official_checkpoint_name>, or one file; when set, fit loads it and "
            "skips training"),
    Setting("official_checkpoint_name", str, "params-best.pt", "checkpoint file name inside each category folder"),
)

PROFILES = {
    "paper": {},
    "paper_text": {
        "epochs": 500, "train_batch_size": 6, "anomaly_sampling": "half", "seg_lr": 1e-4, "seg_cosine_tmax": 0,
        "training": "single_level", "noise_loss_on": "all", "augmentations": 2, "augmentation_pool": "paper",
        "grid_shuffle": "cells", "x0_clamp": "none", "levels": (100, 200), "combination": "average",
    },
    # Trained from scratch on a CPU, the segmentation network only starts to separate the
    # synthetic set's defects after several hundred joint steps, so the budget goes into steps
    # rather than width or resolution: 32 px, an 8-channel denoiser, batch 16, 64 epochs (960
    # steps). Self-attention sits at the 8 x 8 level only (at 16 x 16 with 4-channel heads it took
    # 40% of a step). At this scale the authors' [0, 1] range learns more slowly than [-1, 1]
    # (image AUROC on the synthetic set, seed 0, 1 thread: 0.49 / 0.59 / 0.62 in [0, 1] against
    # 0.68 / 0.54 / 0.69 in [-1, 1] for 600 steps, 600 steps with attention at 8 px, and this
    # profile), so tiny diffuses in [-1, 1]; the paper profiles use [0, 1].
    "tiny": {
        "image_size": 32, "eval_batch_size": 30, "base_channels": 8, "channel_mults": (1, 2, 4),
        "layers_per_block": 1, "attention_resolutions": (8,), "norm_groups": 4, "seg_base_channels": 16,
        "seg_depth": 4, "epochs": 64, "denoiser_lr": 2e-3, "seg_lr": 3e-3, "seg_cosine_tmax": 0,
        "pixel_range": "symmetric", "interpolation": "bicubic", "antialias": True, "texture_source": "procedural",
        "synthesis_workers": 0, "anomaly_sampling": "half", "train_sampling": "permutation",
        # 32 px images: lattices finer than 4 x 4 cells give speckles of a pixel or two.
        "perlin_scale_exp": (0, 3),
    },
}

RESOURCES = {
    "paper": Resources(gpus=1, cpus=8, memory_gb=32),
    "paper_text": Resources(gpus=1, cpus=8, memory_gb=16),
    "tiny": Resources(cpus=1, memory_gb=2),
}


def weight_files(settings):
    """Nothing is pretrained; the authors' checkpoints are declared only when ``official_checkpoints`` names them."""
    if not settings.official_checkpoints:
        return []
    return [WeightFile(key="official_checkpoints",
                       what="DiffusionAD checkpoints in the authors' format (params-best.pt per category, as "
                            "HuiZhang0812/DiffusionAD's train.py writes them)",
                       setting="official_checkpoints", folder=True)]


#: DTD, the anomaly textures of the paper's synthesis (the URL is synthesis.DTD_URL's; not imported
#: from there to keep this module cheap).
DTD_NEED = DataNeed(
    setting="dtd_root", what="the Describable Textures Dataset (DTD) images, the anomaly textures of its synthesis",
    how="download dtd-r1.0.1.tar.gz from https://www.robots.ox.ac.uk/~vgg/data/dtd/ and unpack it (or opt out with "
        "--set diffusionad.texture_source=procedural)",
    random_weights_fallback="procedural textures (the record says so)")


def data_needs(settings):
    """DTD, unless the profile opted out of it (``texture_source=procedural``, as ``tiny`` does)."""
    return [] if settings.texture_source == "procedural" else [DTD_NEED]


def paper_grid(settings) -> EvalGrid:
    """The pixel grid of the authors' eval.py (``--eval-grid paper``)."""
    return EvalGrid(name="paper", size=int(settings.image_size), mask_interpolation="bilinear", mask_antialias=False,
                    mask_binarize="truncate",
                    note="the authors' eval.py: the mask cv2.resize'd (bilinear) to the input size, divided by 255 and "
                         "cast to int, so only pixels that stay 255 are defects; maps at the input size")


def build(settings):
    """The factory: builds DiffusionAD's two networks (no file is read)."""
    from harness_diffusionad.model import DiffusionAD

    return DiffusionAD(settings)


@hookimpl
def harness_methods():
    """Return the DiffusionAD method spec."""
    return [MethodSpec(
        name="diffusionad", paper=PAPER, protocols=("multiclass", "oneclass", "fewshot"), profiles=PROFILES,
        factory=build, settings=SETTINGS, paper_protocol="oneclass", resources=RESOURCES, weights=weight_files,
        paper_grid=paper_grid, data_needs=data_needs,
        description="Pixel-space DDPM UNet and a segmentation U-Net trained jointly on Perlin-noise synthetic "
                    "anomalies (DTD textures); norm-guided one-step denoising at two noise levels, segmentation of "
                    "(query, reconstruction), image score = mean of the top 50 map values. No pretrained weights.",
    )]
