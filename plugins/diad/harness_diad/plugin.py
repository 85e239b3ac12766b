"""Registers DiAD with the harness (entry point ``diad`` in the group ``harness``).

Importing this module is cheap: diffusers, transformers, timm and lpips load when a method is
built (:func:`build`).

Profiles
--------
``paper`` (the defaults)
    The paper (AAAI 2024, arXiv Table 11) and the authors' code (lewandofskee/DiAD at
    ``d2813006``): 256 x 256 inputs resized bilinearly; SD v1.5's UNet (859.5 M parameters), the
    SG network (ControlNet copy of the UNet encoder and middle block, 361.3 M, plus the SFF block,
    110.6 M: 471.9 M as Table 11 counts it) and the KL-f8 autoencoder (83.65 M), initialised from
    ``v1-5-pruned.ckpt``; T = 1000 with SD's betas 0.00085-0.012 ("linear" in LDM); autoencoder
    fine-tuning with the authors' ``finetune_autoencoder.py``, starting from LDM's ``kl-f8``
    file as theirs (its discriminator too, when the file has one; LPIPS in train mode, its dropout
    active, as under Lightning; LPIPS + patch discriminator from step 50 001), then the denoiser with AdamW 1e-5, batch 12, gradient accumulation 4, 1000
    epochs, fp32, gradient checkpointing as their ``use_checkpoint``; DDIM with 10 steps, the
    latent noised to 999; timm ``resnet50.a1_in1k`` stages f2-f4, Gaussian sigma 5, 8 rounds of
    8 x 8 average pooling. Where paper and code differ, the code is followed and the other reading
    is a setting: AdamW (the paper says Adam, citing AdamW); ImageNet-normalised pixels
    everywhere (``pixel_normalization``); ``only_mid_control=True`` as train.py / test.py set it
    (diad.yaml says False); the first DDIM step at 901 after noising to 999
    (``noise_to_first_ddim_step``); the final epoch, not a test-set choice
    (``checkpoint_selection``).
``tiny``
    The same code at toy scale on a CPU: 32 px (latents 8 x 8), a two-level UNet and three-level
    autoencoder with random initialisation (no SD weights), a random ResNet-18 with BatchNorm
    statistics re-estimated on the training images, 15 + 15 epochs at larger learning rates, the
    latent noised to DDIM step 301 and denoised from there (one consistent truncated schedule),
    bicubic resizing (at 32 px it keeps the synthetic set's faint defects), and pooling and
    smoothing scaled to the smaller maps.
"""

from __future__ import annotations

from harness import EvalGrid, MethodSpec, PaperRef, Resources, Setting, hookimpl
from harness.settings import eval_batch_size, image_size, interpolation, precision
from harness_diad.weightfiles import weight_files

SETTINGS = (
    image_size(256),
    eval_batch_size(8),
    interpolation("bilinear", choice="the authors' data loaders resize with torchvision Resize on PIL images, "
                                     "i.e. bilinear (the harness default is bicubic)"),
    precision("fp32", choice="the authors train both stages with Lightning precision=32 (finetune_autoencoder.py, "
                             "train.py)"),
    Setting("gradient_checkpointing", bool, True,
            "recompute UNet and SG activations in the backward pass (diffusers enable_gradient_checkpointing)",
            choice="the authors' diad.yaml sets use_checkpoint: True for both UNets; it saves memory and changes no "
                   "number"),
    Setting("architecture", str, "sd15", "network sizes: 'sd15' (Stable Diffusion v1.5) or 'tiny'",
            choices=("sd15", "tiny")),
    Setting("sd_pretrained", bool, True, "load Stable Diffusion v1.5 from disk (never downloaded); false = seeded "
            "random initialisation"),
    Setting("sd_path", str, "", "explicit SD v1.5 file (v1-5-pruned.ckpt) or diffusers folder (optional)",
            choice="default v1-5-pruned.ckpt, the file the authors' build_model.py reads (non-EMA weights); a "
                   "diffusers folder holds the EMA weights"),
    Setting("authors_checkpoint", str, "",
            "a checkpoint written by the authors' code (train.py's epoch=*.ckpt; none is published): converted, "
            "loaded and scored without training; empty = train"),
    Setting("T", int, 1000, "diffusion steps of the noise schedule", minimum=1),
    Setting("beta_start", float, 0.00085, "first beta of the schedule", minimum=0.0),
    Setting("beta_end", float, 0.012, "last beta of the schedule", minimum=0.0),
    Setting("beta_schedule", str, "scaled_linear", "'scaled_linear' (LDM's 'linear': linear in sqrt(beta)) or "
            "'linear'", choices=("scaled_linear", "linear")),
    Setting("ddim_steps", int, 10, "DDIM sampling steps at inference (schedule i * T/n + 1)", minimum=1),
    Setting("start_step", int, 999, "diffusion step the input latent is noised to; DDIM runs the schedule's steps "
            "at or below it", minimum=0),
    Setting("noise_to_first_ddim_step", bool, False,
            "noise the latent to the first DDIM step run instead of start_step (one consistent schedule)",
            choice="the authors' code noises to 999 and runs its 10-step schedule from 901 (false); the paper says the "
                   "denoising repeats the diffusion's timesteps (true)"),
    Setting("only_mid_control", bool, True,
            "SG outputs reach only the SD decoder's first block (the SFF outputs) and the middle block; false = all 13",
            choice="the authors' train.py and test.py set only_mid_control = True (models/diad.yaml says False)"),
    Setting("pixel_normalization", str, "imagenet", "'imagenet' (the code: autoencoder, hint and backbone see "
            "ImageNet-normalised images) or 'symmetric' (SD's [-1, 1])", choices=("imagenet", "symmetric"),
            choice="the authors' data loaders ImageNet-normalise the autoencoder input and the hint alike"),
    Setting("backbone", str, "resnet50", "timm model of the feature extractor (paper: ResNet50)"),
    Setting("backbone_layers", tuple[int, ...], (1, 2, 3),
            "timm feature stages compared (1, 2, 3 = f2-f4: 64, 32, 16 px at 256 input)"),
    Setting("backbone_pretrained", bool, True, "load the backbone's ImageNet weights from disk; false = seeded "
            "random init + BatchNorm re-estimation",
            choice="timm resnet50.a1_in1k: what the authors' timm 0.8 create_model('resnet50', pretrained=True) loads"),
    Setting("backbone_weights_file", str, "", "explicit path of the backbone weights (optional)"),
    Setting("lpips_vgg_file", str, "", "explicit path of torchvision's VGG-16 weights for the LPIPS term (optional)"),
    Setting("ae_init", str, "kl-f8", "the autoencoder the fine-tuning starts from: 'kl-f8' (LDM's kl-f8.zip "
            "model.ckpt, pinned) or 'sd15' (SD v1.5's copy of it)", choices=("kl-f8", "sd15"),
            choice="kl-f8: the authors' README and finetune_autoencoder.py start from LDM's kl-f8 file, loaded "
                   "non-strictly (its loss.* tensors, the trained discriminator among them, come along when present); "
                   "sd15 uses the autoencoder SD v1.5 ships"),
    Setting("ae_init_path", str, "", "an explicit LDM-layout autoencoder file to start fine-tuning from instead (e.g. "
            "kl-f8.zip's model.ckpt elsewhere, or the authors' published mvtecad_fs.ckpt with ae_epochs=0)"),
    Setting("ae_disc_init", str, "checkpoint", "the patch discriminator's start: 'checkpoint' (the starting file's "
            "loss.discriminator.* tensors when it has them, else fresh) or 'fresh' (taming's initialisation)",
            choices=("checkpoint", "fresh"),
            choice="checkpoint: the authors' load_state_dict(strict=False) of kl-f8 fills their loss module, the "
                   "discriminator included; fresh: a new discriminator"),
    Setting("ae_lpips_mode", str, "train", "LPIPS of the autoencoder loss in 'train' mode (dropout 0.5 before its "
            "linear heads active, as Lightning's train mode leaves it) or 'eval' (no dropout)",
            choices=("train", "eval"),
            choice="train: Lightning puts the whole module, the loss's LPIPS included, in train mode during the "
                   "authors' fine-tuning, so LPIPS's dropout is active; eval is LPIPS as a fixed metric"),
    Setting("ae_epochs", int, 1000, "autoencoder fine-tuning epochs (0 = no fine-tuning)", minimum=0,
            choice="finetune_autoencoder.py sets no max_epochs: Lightning 1.5's default of 1000"),
    Setting("ae_train_batch_size", int, 4, "autoencoder fine-tuning batch", minimum=1),
    Setting("ae_grad_accumulation", int, 8, "autoencoder gradient accumulation (batches per optimiser step)",
            minimum=1),
    Setting("ae_lr", float, 1.8e-4, "autoencoder Adam learning rate (the code: 4.5e-5 x batch)", minimum=0.0),
    Setting("ae_kl_weight", float, 1e-6, "weight of the KL term of the autoencoder loss", minimum=0.0),
    Setting("ae_perceptual_weight", float, 1.0, "weight of the LPIPS-VGG term of the autoencoder loss (0 = none)",
            minimum=0.0),
    Setting("ae_disc_start", int, 50001, "optimiser step from which the adversarial terms act", minimum=0),
    Setting("ae_disc_weight", float, 0.5, "discriminator weight (times the adaptive weight) in the autoencoder "
            "loss", minimum=0.0),
    Setting("ae_disc_factor", float, 1.0, "factor of both adversarial terms (0 = no discriminator)", minimum=0.0),
    Setting("ae_disc_layers", int, 3, "stride-2 layers of the patch discriminator", minimum=1),
    Setting("epochs", int, 1000, "denoiser training epochs", minimum=0),
    Setting("train_batch_size", int, 12, "denoiser training batch", minimum=1),
    Setting("grad_accumulation", int, 4, "denoiser gradient accumulation (batches per optimiser step)", minimum=1),
    Setting("lr", float, 1e-5, "AdamW learning rate of the denoiser", minimum=0.0,
            choice="the code uses AdamW (default weight decay 0.01); the paper says Adam and cites AdamW"),
    Setting("checkpoint_selection", str, "final", "which epoch's model is kept", choices=("final",),
            choice="the authors validate on the test set every 25 epochs and keep the best val_acc checkpoint; "
                   "selecting on test labels is not allowed here, so the final epoch is kept"),
    Setting("smoothing_sigma", float, 5.0, "Gaussian sigma (pixels) applied to the anomaly map", minimum=0.0),
    Setting("pool_kernel", int, 8, "average-pooling window of the image score (stride 1)", minimum=1),
    Setting("pool_rounds", int, 8, "successive average poolings before the maximum", minimum=0),
    Setting("inference_seed", int, 0, "seed of the posterior sample and forward-diffusion noise at inference"),
)

PROFILES = {
    "paper": {},
    # A random toy denoiser trained for a minute cannot generate from pure noise (image AUROC
    # 0.49 from step 999 in our runs): the tiny profile starts at DDIM step 301, where the noisy
    # latent still carries the image, and spends its budget on the autoencoder, whose
    # reconstructions the scores compare. At 32 px (the synthetic set is 128 px) bicubic
    # resizing keeps the faint synthetic defects that bilinear smooths away: image AUROC 0.650
    # against 0.596 (seed 0, one thread).
    "tiny": {
        "architecture": "tiny", "sd_pretrained": False, "image_size": 32, "eval_batch_size": 30,
        "interpolation": "bicubic",
        "gradient_checkpointing": False, "backbone": "resnet18", "backbone_pretrained": False,
        "start_step": 301, "noise_to_first_ddim_step": True,
        "ae_epochs": 15, "ae_train_batch_size": 8, "ae_grad_accumulation": 1, "ae_lr": 2e-3,
        "ae_perceptual_weight": 0.0, "ae_init": "sd15",
        "epochs": 15, "train_batch_size": 12, "grad_accumulation": 1, "lr": 1e-3,
        "smoothing_sigma": 0.6, "pool_kernel": 2, "pool_rounds": 8,
    },
}

PAPER = PaperRef(
    title="DiAD: A Diffusion-based Framework for Multi-class Anomaly Detection",
    venue="AAAI 2024",
    url="https://arxiv.org/abs/2312.06607",
    code="https://github.com/lewandofskee/DiAD",
)

RESOURCES = {
    # The authors trained on one 32 GB V100; the host holds the 7.7 GB checkpoint while converting it.
    "paper": Resources(gpus=1, cpus=8, memory_gb=32),
    "tiny": Resources(cpus=1, memory_gb=2),
}


def paper_grid(settings) -> EvalGrid:
    """The pixel grid of the authors' test.py (``--eval-grid paper``)."""
    return EvalGrid(name="paper", size=int(settings.image_size), mask_interpolation="bilinear", mask_antialias=True,
                    mask_binarize="nonzero",
                    note="the authors' MVTecDataset: transforms.Resize((256, 256)) on the PIL mask (bilinear, "
                         "antialiased), ToTensor; their eval_helper sets every mask value > 0 to 1; maps at 256")


def build(settings):
    """The factory: DiAD's architecture (no weights are read; works on the meta device)."""
    from harness_diad.model import DiAD

    return DiAD(settings)


@hookimpl
def harness_methods():
    """Return the DiAD method spec."""
    return [MethodSpec(
        name="diad", paper=PAPER, protocols=("multiclass", "oneclass", "fewshot"), profiles=PROFILES,
        factory=build, settings=SETTINGS, paper_protocol="multiclass", resources=RESOURCES, weights=weight_files,
        paper_grid=paper_grid,
        description="Stable Diffusion v1.5 latent denoiser with a Semantic-Guided ControlNet-style copy of its "
                    "encoder and the SFF block; the input is noised to T and reconstructed by 10 DDIM steps "
                    "guided by the image; anomaly = ResNet-50 feature distance (f2-f4) to the reconstruction, "
                    "image score = max after 8 rounds of 8 x 8 average pooling.",
    )]
