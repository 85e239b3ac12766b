"""Registers AnomalySD with the harness (entry point ``anomalysd`` in the group ``harness``).

Importing this module is cheap: diffusers, transformers, lpips and timm load only when a method
is built (:func:`build`). No official code is public, so the paper's text is the specification
(:mod:`harness_anomalysd.model`); each value it leaves open is a setting whose ``choice`` says
what was chosen and why, and every record lists them under ``method_info.choices``.

Profiles
--------
``paper``
    The defaults: Sec. 5.1's 512 × 512 inputs and evaluation grid; Stable Diffusion v1.5
    inpainting (UNet, KL autoencoder, CLIP ViT-L/14 text encoder and tokenizer) from the pinned
    snapshot; Adam at 1e-4, batch 8, 4000 UNet and 200 decoder epochs; β = 0.1; γ ∈ {0, 0.2,
    0.5}; λ chosen per category on held-out pseudo-validation images; 50 denoising steps read
    as the SD inpainting pipeline's ``num_inference_steps`` with ``strength`` λ (20 UNet steps
    at λ = 0.4); grids k ∈ {1, 2, 4, 8}; prototype masks from EfficientNet-B6 (ImageNet
    ``tf_efficientnet_b6.aa_in1k``); α = 0.1; Gaussian σ = 4. Each test image costs 85 grid +
    1 prototype inpaintings.
``tiny``
    The same code on a CPU at 64 px: a toy UNet / autoencoder / text encoder, randomly
    initialised and trained on the shots (the encoder too, since nothing is pretrained), a
    character-level CLIP tokenizer generated at run time, a random LPIPS trunk with the
    package's linear weights, a random EfficientNet-B0 with BatchNorm statistics re-estimated on
    the shots; grids k ∈ {1, 2, 4}; fewer epochs, denoising steps and λ candidates.
"""

from __future__ import annotations

from harness import MethodSpec, PaperRef, Resources, Setting, hookimpl
from harness.settings import eval_batch_size, image_size, interpolation, precision
from harness_anomalysd.weightfiles import SD_REPO, weight_files

PAPER = PaperRef(
    title="AnomalySD: Few-Shot Multi-Class Anomaly Detection with Stable Diffusion Model",
    venue="arXiv 2024",
    url="https://arxiv.org/abs/2408.01960",
    code="",
)

_AUG = ("Sec. 5.1 names contrast, brightness, scaling and rotation augmentation of the shots but no magnitudes; "
        "moderate values that keep an object recognisable")

SETTINGS = (
    # -- data and evaluation --------------------------------------------------------------------
    image_size(512, help="side of the square input (Sec. 5.1: all images are scaled to 512 x 512)"),
    Setting("eval_size", int, 512, "side of the pixel-metric grid (0 = native); --eval-size overrides it",
            minimum=0),
    eval_batch_size(4),
    interpolation("bicubic", choice="the paper does not say how images are scaled to 512 px; Pillow bicubic, the "
                                    "harness default"),
    precision("fp16", choice="the paper fine-tunes the 860 M-parameter UNet at batch 8 and 512 px on one 24 GB RTX "
              "3090: fp32 weights, gradients and Adam moments alone take 13.8 GB and fp32 activations do not fit "
              "beside them, so the run must have used mixed precision (fp16 autocast with fp32 master weights and "
              "loss scaling, diffusers' fine-tuning recipe) together with gradient checkpointing"),
    Setting("gradient_checkpointing", bool, True,
            "recompute activations in the backward pass (diffusers' enable_gradient_checkpointing on the UNet and "
            "the autoencoder) to save memory",
            choice="needed to fit a batch of 8 at 512 px in the paper's 24 GB (see precision); the numbers do not "
                   "change, only memory and time"),
    # -- networks and weights ------------------------------------------------------------------
    Setting("architecture", str, "sd15-inpainting", "network sizes: SD v1.5 inpainting, or the toy 'tiny' ones",
            choices=("sd15-inpainting", "tiny")),
    Setting("sd_pretrained", bool, True,
            "load the SD inpainting weights from disk (never downloaded); false = seeded random init"),
    Setting("sd_model", str, SD_REPO, "Hugging Face repository of the SD inpainting pipeline (the pinned snapshot "
            "when it is the default)"),
    Setting("sd_path", str, "", "explicit local diffusers folder of the pipeline (unet/, vae/, text_encoder/, "
            "tokenizer/)"),
    Setting("lpips_pretrained", bool, True,
            "load torchvision's ImageNet AlexNet into the LPIPS trunk; false = random trunk (the package's linear "
            "weights are always used)"),
    Setting("lpips_weights_file", str, "", "explicit path of alexnet-owt-7be5be79.pth (optional)"),
    Setting("backbone", str, "tf_efficientnet_b6", "timm name of the prototype feature extractor",
            choice="Sec. 5.1 says EfficientNet B6 without naming weights; ImageNet-1k ones (tf_efficientnet_b6."
                   "aa_in1k), since nothing in the paper suggests the JFT-300M noisy-student weights"),
    Setting("backbone_layers", tuple[int, ...], (2, 3), "timm feature stages concatenated for the prototypes (Eq. 12)",
            choice="Eq. 12's 'layers 2 and 3' read as timm's feature stages 2 and 3 (strides 8 and 16), the levels "
                   "PatchCore-style prototype methods use"),
    Setting("backbone_pretrained", bool, True,
            "load the backbone's ImageNet weights from disk; false = seeded random init with BatchNorm statistics "
            "re-estimated on the shots"),
    Setting("backbone_weights_file", str, "", "explicit path of the backbone weights (optional)"),
    Setting("latent_scale", str, "config", "latent scaling: the VAE config's factor, or 1 / std of the shots' "
            "latents ('auto', for random autoencoders)", choices=("config", "auto")),
    # -- fine-tuning ----------------------------------------------------------------------------
    Setting("train_batch_size", int, 8, "images per fine-tuning step (Sec. 5.1: 8)", minimum=1),
    Setting("decoder_epochs", int, 200, "decoder fine-tuning epochs over the shots (Sec. 5.1: 200)", minimum=0),
    Setting("unet_epochs", int, 4000, "UNet fine-tuning epochs over the shots (Sec. 5.1: 4000)", minimum=0),
    Setting("decoder_lr", float, 1e-4, "Adam learning rate of the decoder", minimum=0.0,
            choice="Sec. 5.1 gives one learning rate, 1e-4, without naming the stage; used for both"),
    Setting("unet_lr", float, 1e-4, "Adam learning rate of the UNet (Sec. 5.1: 1e-4)", minimum=0.0),
    Setting("decoder_lpips_weight", float, 0.1, "beta of Eq. 9 (MSE + beta LPIPS)", minimum=0.0),
    Setting("train_encoder", bool, False, "also train the VAE encoder with the decoder (only sensible for random "
            "networks)"),
    Setting("mask_gammas", tuple[float, ...], (0.0, 0.2, 0.5),
            "IoU thresholds gamma of the training masks, one drawn per mask with equal probability", minimum=0.0,
            maximum=1.0),
    Setting("mask_side_range", tuple[float, ...], (0.1, 1.0),
            "training rectangle sides as fractions of the image side", minimum=0.0, maximum=1.0,
            choice="the paper does not give the rectangles' sizes; uniform sides of 10-100 % of the image's, so "
                   "that IoU > 0.5 stays reachable on texture images (all foreground)"),
    Setting("aug_brightness", float, 0.2, "brightness jitter (+-, multiplicative)", minimum=0.0, choice=_AUG),
    Setting("aug_contrast", float, 0.2, "contrast jitter (+-, around the mean)", minimum=0.0, choice=_AUG),
    Setting("aug_scale", tuple[float, ...], (0.9, 1.1), "zoom range", minimum=0.0, choice=_AUG),
    Setting("aug_rotation", float, 15.0, "maximum rotation in degrees", minimum=0.0, choice=_AUG),
    Setting("prompt_mode", str, "hierarchical", "prompts: the paper's coarse + detailed, coarse only, the "
            "'A photo of [c].' ablation, or none", choices=("hierarchical", "coarse", "simple", "none")),
    Setting("prompts_file", str, "", "JSON file of extra / replacement prompts (format of "
            "harness_anomalysd/prompts/*.json)",
            choice="the paper's detailed prompts are in its supplementary, which is not public; ours are written "
                   "per category in harness_anomalysd/prompts/"),
    # -- noise strength ---------------------------------------------------------------------------
    Setting("noise_strength", float, 0.4, "lambda when none is chosen (zero-shot, 'fixed', 1-shot fallbacks): "
            "denoising starts at lambda T", minimum=0.0, maximum=1.0,
            choice="0.4: the value Sec. 5.3 gives for capsule, wood and screw"),
    Setting("noise_strength_per_category", dict[str, float], {}, "explicit {category: lambda}; these categories "
            "are not selected"),
    Setting("lambda_selection", str, "holdout", "how lambda is chosen per category: on held-out shots, on "
            "augmented copies of the shots, or not at all", choices=("holdout", "augmented", "fixed"),
            choice="the paper specifies lambda per category without saying how (likely on test images); chosen "
                   "here on pseudo-validation images made from held-out shots, as no test image may be used"),
    Setting("lambda_candidates", tuple[float, ...], (0.2, 0.3, 0.4, 0.5, 0.6), "the lambda grid searched",
            minimum=0.0, maximum=1.0,
            choice="Fig. 4 shows 0.2 too weak and 0.8 too strong, 0.4 right for three categories; a 0.1 grid "
                   "between the two failures"),
    Setting("lambda_holdout_fraction", float, 0.25, "share of each category's shots held out for the selection "
            "(at least one; a 1-shot category uses augmented copies of its shot)", minimum=0.0, maximum=1.0,
            choice="one of 4 shots: enough to measure an unseen normal image, while 3 still train"),
    Setting("lambda_refit", bool, True, "after choosing lambda on the held-out shots, fine-tune again from the "
            "initial weights on all k shots",
            choice="select on a held-out split, then refit on all data, so that a k-shot result uses k shots; "
                   "doubles the fine-tuning time"),
    Setting("lambda_val_per_category", int, 8, "pseudo-validation images per category (half with a pasted "
            "fragment)", minimum=2),
    # -- inference --------------------------------------------------------------------------------
    Setting("denoising_steps", int, 50, "the 'denoising step' N of Sec. 5.1", minimum=1),
    Setting("step_schedule", str, "pipeline", "reading of N: 'pipeline' = an N-step schedule over T of which "
            "about lambda N steps run from lambda T (SD inpainting pipeline's num_inference_steps + strength); "
            "'span' = N steps from lambda T to 0", choices=("pipeline", "span"),
            choice="the paper's 'denoising step' and 'noise strength' are the two parameters of diffusers' SD "
                   "inpainting pipeline (num_inference_steps = 50, strength = lambda), which runs about lambda N "
                   "steps: 20 at lambda = 0.4 (FPS depends on it; 'span' runs 50)"),
    Setting("guidance_scale", float, 1.0, "classifier-free guidance scale; 1 = the prompt embedding alone",
            minimum=1.0, choice="Sec. 4.2 conditions on the averaged prompt embedding and mentions no guidance"),
    Setting("scales", tuple[int, ...], (1, 2, 4, 8), "grid sizes k of the multi-scale masks", minimum=1),
    Setting("inpaint_batch", int, 16, "inpaintings per UNet call (memory vs speed; results do not change)",
            minimum=1),
    Setting("anomaly_map", str, "fused", "which map is scored: Eq. 21's fusion, S_ms alone (no prototype "
            "branch) or S_pg alone", choices=("fused", "multi_scale", "prototype")),
    Setting("prototype_rotations", tuple[int, ...], (0, 90, 180, 270),
            "rotations (degrees, multiples of 90) of the shots in the prototype bank",
            choice="Eq. 13 augments the bank 'by rotation' without angles; the four right angles"),
    Setting("alpha", float, 0.1, "alpha of Eq. 21 (weight of S_pg)", minimum=0.0, maximum=1.0),
    Setting("smoothing_sigma", float, 4.0, "Gaussian sigma (pixels) applied to the anomaly map", minimum=0.0),
    Setting("inference_seed", int, 0, "seed of the starting noise at inference (every mask of an image starts "
            "from the same noise)",
            choice="the paper does not say; one fixed noise per image makes predictions deterministic"),
)

PROFILES = {
    "paper": {},
    # Random networks trained on the shots within a few CPU minutes; see the README's AnomalySD
    # section for what it reaches on the synthetic set.
    "tiny": {
        "image_size": 64, "eval_size": 256, "eval_batch_size": 30, "precision": "fp32",
        "gradient_checkpointing": False, "architecture": "tiny", "sd_pretrained": False, "lpips_pretrained": False,
        "backbone": "efficientnet_b0", "backbone_pretrained": False, "latent_scale": "auto", "train_encoder": True,
        "decoder_epochs": 40, "unet_epochs": 60, "decoder_lr": 1e-3, "unet_lr": 1e-3, "denoising_steps": 10,
        "scales": (1, 2, 4), "inpaint_batch": 240, "smoothing_sigma": 2.0, "lambda_candidates": (0.3, 0.5, 0.7),
        "lambda_refit": False, "lambda_val_per_category": 6,
    },
}


def build(settings):
    """The factory: builds AnomalySD's networks (no weights are read)."""
    from harness_anomalysd.model import AnomalySD

    return AnomalySD(settings)


@hookimpl
def harness_methods():
    """Return the AnomalySD method spec."""
    return [MethodSpec(
        name="anomalysd", paper=PAPER, protocols=("fewshot",), profiles=PROFILES, factory=build, settings=SETTINGS,
        paper_protocol="fewshot", weights=weight_files,
        resources={"paper": Resources(gpus=1, cpus=4, memory_gb=32), "tiny": Resources(cpus=1)},
        description="Stable Diffusion inpainting fine-tuned on k shots per category with hierarchical prompts and "
                    "foreground-aware masks; multi-scale grid and prototype-guided masks at inference, LPIPS "
                    "distances fused by a harmonic mean. Few-shot and zero-shot (--shots 0).",
    )]
