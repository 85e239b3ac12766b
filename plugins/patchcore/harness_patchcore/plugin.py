"""The PatchCore method plugin: the baseline of every paper's tables."""

from __future__ import annotations

from harness import MethodSpec, PaperRef, hookimpl
from harness_patchcore.model import PatchCore

PAPER = PaperRef(
    title="Towards Total Recall in Industrial Anomaly Detection",
    venue="CVPR 2022",
    url="https://arxiv.org/abs/2106.08265",
    code="https://github.com/amazon-science/patchcore-inspection",
)

PROFILES = {
    "paper": {
        "backbone": "wide_resnet50_2", "layers": (2, 3), "pretrained": True, "weights_file": "",
        "image_size": 256, "pretrain_embed_dim": 1024, "target_embed_dim": 1024, "coreset_ratio": 0.1,
        "coreset_projection_dim": 128, "smoothing_sigma": 4.0, "train_batch_size": 8, "eval_batch_size": 8,
    },
    # The paper's backbone, randomly initialised. Random features keep fine detail only in the
    # early stages, so layer1 + layer2 are used (stride 4: a 32 x 32 patch grid at the synthetic
    # set's native 128 px) with 512-d embeddings; the coreset keeps 2% on a 32-d projection to
    # stay within the CPU budget. On the synthetic set (seed 0) this gives an image AUROC of
    # 0.78 in about a minute, against 0.76-0.77 for ResNet-18 layers 1-3 at 128-192 px.
    "tiny": {
        "backbone": "wide_resnet50_2", "layers": (1, 2), "pretrained": False, "weights_file": "",
        "image_size": 128, "pretrain_embed_dim": 512, "target_embed_dim": 512, "coreset_ratio": 0.02,
        "coreset_projection_dim": 32, "smoothing_sigma": 4.0, "train_batch_size": 16, "eval_batch_size": 16,
    },
}

SETTINGS_HELP = {
    "backbone": "timm model name of the feature extractor",
    "layers": "backbone stages whose features are used (timm indices: 2, 3 = layer2, layer3)",
    "pretrained": "load ImageNet weights from disk (never downloaded); false = random init + BatchNorm recalibration",
    "weights_file": "explicit path of the backbone weights (optional)",
    "image_size": "side of the square input",
    "pretrain_embed_dim": "channels each layer's patch feature is pooled to",
    "target_embed_dim": "channels of the final patch feature",
    "coreset_ratio": "fraction of training patches kept in the memory bank",
    "coreset_projection_dim": "random projection size used while selecting the coreset",
    "smoothing_sigma": "Gaussian sigma (pixels) applied to the upsampled anomaly map",
    "train_batch_size": "batch size for feature extraction during fit",
    "eval_batch_size": "batch size of predict (the FPS figure states it)",
}


@hookimpl
def harness_methods():
    """PatchCore."""
    return [MethodSpec(
        name="patchcore", paper=PAPER, protocols=("multiclass", "fewshot", "oneclass"), profiles=PROFILES,
        factory=PatchCore, settings_help=SETTINGS_HELP,
        description="Memory bank of pretrained WideResNet-50 patch features reduced by a greedy coreset; "
                    "anomaly = distance to the nearest normal patch.",
    )]
