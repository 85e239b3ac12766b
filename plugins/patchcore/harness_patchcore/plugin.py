"""The PatchCore method plugin: the baseline of every paper's tables.

Importing this module is cheap: the network code (timm) loads when a method is built.
"""

from __future__ import annotations

from harness import EvalGrid, MethodSpec, PaperRef, Resources, Setting, hookimpl
from harness.settings import antialias, eval_batch_size, image_size, interpolation, precision, resize_mode
from harness_patchcore.weightfiles import weight_files

PAPER = PaperRef(
    title="Towards Total Recall in Industrial Anomaly Detection",
    venue="CVPR 2022",
    url="https://arxiv.org/abs/2106.08265",
    code="https://github.com/amazon-science/patchcore-inspection",
)

SETTINGS = (
    image_size(256, help="side the runner resizes images to: the shorter side with resize_mode=shorter_side (the "
                         "authors' --resize 256; see center_crop)"),
    resize_mode("shorter_side",
                choice="shorter_side: the authors' loader applies torchvision's Resize(256), which scales the shorter "
                       "side to 256 and keeps the aspect ratio (VisA's 1.5:1 images become 256 x 384), then "
                       "CenterCrop(224); square stretches non-square images to 256 x 256 first"),
    antialias(True, choice="true: the authors resize PIL images with torchvision's Resize (Pillow's filter, "
                           "antialiased)"),
    Setting("center_crop", int, 224,
            "side of the centre crop the backbone sees (0: none); the map outside it gets the image's lowest score",
            minimum=0,
            choice="224: the authors' code resizes to 256 and centre-crops 224 (--resize 256 --imagesize 224, for "
                   "images and masks alike). Their metrics never see what lies outside the crop; ours do (the "
                   "map is pasted back on the full resized image), so a defect lying only there is scored as "
                   "normal. 0 feeds the whole image (nothing lost)."),
    interpolation("bilinear", choice="bilinear: torchvision's Resize in the authors' MVTec loader (its default "
                                     "filter, PIL with antialiasing)"),
    eval_batch_size(8),
    precision("fp32"),
    Setting("train_batch_size", int, 8, "images per feature-extraction batch during fit", minimum=1),
    Setting("backbone", str, "wide_resnet50_2", "timm name of the pretrained feature extractor"),
    Setting("backbone_layers", tuple[int, ...], (2, 3),
            "backbone stages whose features are used (timm indices: 2, 3 = layer2, layer3)"),
    Setting("backbone_pretrained", bool, True,
            "load ImageNet weights from disk (never downloaded); false = seeded random init + BatchNorm re-estimation"),
    Setting("backbone_weights_file", str, "", "explicit path of the backbone weights (optional)"),
    Setting("patchsize", int, 3, "side of the neighbourhood each feature is aggregated over (the authors' --patchsize)",
            minimum=1),
    Setting("pretrain_embed_dim", int, 1024, "channels each layer's patch feature is pooled to", minimum=1),
    Setting("target_embed_dim", int, 1024, "channels of the final patch feature", minimum=1),
    Setting("coreset_ratio", float, 0.1, "fraction of training patches kept in the memory bank", minimum=0.0,
            maximum=1.0),
    Setting("coreset_projection_dim", int, 128, "random projection size used while selecting the coreset (0: none)",
            minimum=0),
    Setting("coreset_starting_points", int, 10,
            "random rows whose mean distance starts the greedy coreset (1: start from one random row)", minimum=1,
            choice="10: the authors' ApproximateGreedyCoresetSampler starts from the mean distance to 10 random "
                   "rows; the paper only says 'greedy coreset'"),
    Setting("num_neighbours", int, 1, "nearest bank patches whose distances are averaged into a patch score",
            minimum=1),
    Setting("distance", str, "squared", "patch score: squared or plain Euclidean distance to the bank",
            choices=("squared", "euclidean"),
            choice="squared: the authors' FAISS IndexFlatL2 returns squared L2 distances, which their code uses "
                   "as scores and maps; the paper writes the plain norm. Image AUROC is the same either way "
                   "(a monotone change of the maximum); the maps, hence the pixel metrics, differ."),
    Setting("smoothing_sigma", float, 4.0, "Gaussian sigma (pixels) applied to the upsampled anomaly map", minimum=0.0),
)

PROFILES = {
    "paper": {},
    # The paper's backbone, randomly initialised. Random features keep fine detail only in the
    # early stages, so layer1 + layer2 are used (stride 4: a 32 x 32 patch grid at the synthetic
    # set's native 128 px) with 512-d embeddings; the coreset keeps 2% on a 32-d projection to
    # stay within the CPU budget. The whole image is used (no centre crop: at 128 px a crop
    # would cut off a sixth of every side).
    "tiny": {
        "backbone_layers": (1, 2), "backbone_pretrained": False, "image_size": 128, "center_crop": 0,
        "resize_mode": "square",
        "pretrain_embed_dim": 512, "target_embed_dim": 512, "coreset_ratio": 0.02, "coreset_projection_dim": 32,
        "train_batch_size": 16, "eval_batch_size": 16,
    },
}

def paper_grid(settings) -> EvalGrid:
    """The pixel grid of the authors' code (``--eval-grid paper``): their crop, their mask rule."""
    return EvalGrid(name="paper", size=int(settings.image_size), resize_mode=settings.resize_mode,
                    crop=int(settings.center_crop), mask_interpolation="bilinear", mask_antialias=True,
                    mask_binarize="truncate",
                    note="the authors' MVTecDataset: Resize(256) and CenterCrop(224) on the PIL mask (bilinear, "
                         "antialiased), ToTensor; their metrics cast masks to int (only pixels that stay 255 are "
                         "defects); only the crop is scored, at 224 x 224")


def build(settings):
    """The factory: builds PatchCore's architecture (no weights are read)."""
    from harness_patchcore.model import PatchCore

    return PatchCore(settings)


@hookimpl
def harness_methods():
    """PatchCore."""
    return [MethodSpec(
        name="patchcore", paper=PAPER, protocols=("multiclass", "fewshot", "oneclass"), profiles=PROFILES,
        factory=build, settings=SETTINGS, paper_protocol="oneclass", weights=weight_files, paper_grid=paper_grid,
        resources={"paper": Resources(gpus=1, cpus=4, memory_gb=16), "tiny": Resources(cpus=1)},
        description="Memory bank of pretrained WideResNet-50 patch features reduced by a greedy coreset; "
                    "anomaly = distance to the nearest normal patch.",
    )]
