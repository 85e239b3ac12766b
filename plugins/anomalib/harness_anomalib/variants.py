"""The anomalib models the harness exposes, as data: one row per method.

Each :class:`Variant` names the anomalib class, the paper, how the model learns (``trained``:
gradient steps; ``memory_bank``: one pass collecting features, fitted at the epoch's end;
``fewshot``: k reference images per category, no training), the harness settings of its
``paper`` profile (anomalib's defaults for the model's own arguments, the paper's schedule) and
its ``tiny`` profile (random-init backbones at toy size, so every model runs offline on the
synthetic set within the main job's budget), the pretrained files it loads and the data it needs.
Constructor arguments become settings automatically (:mod:`harness_anomalib.signatures`).

Importing this module is cheap: it holds strings and numbers only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping


@dataclass(frozen=True)
class Variant:
    """One anomalib model as a harness method.

    Attributes
    ----------
    name : str
        The harness method name (as ``results/reported/`` names the method).
    model : str
        The class in ``anomalib.models``.
    title, venue, url, code : str
        The paper.
    kind : str
        ``trained``, ``memory_bank`` or ``fewshot``.
    paper_protocol : str
        The protocol of the paper's own numbers.
    harness : mapping
        Values of the adapter's own settings in the ``paper`` profile (``image_size``,
        ``center_crop``, ``train_batch_size``, ``epochs``, ``max_steps``).
    tiny : mapping
        Overrides (adapter settings and constructor arguments) of the ``tiny`` profile.
    owned : mapping
        Constructor arguments the adapter sets itself, with what it sets: ``source`` (the
        anomaly-source folder), ``image_size`` (the profile's input size as a pair), ``imagenet``
        (the ImageNette folder), ``protocol`` (set from the job's protocol and shots).
    timm : tuple of str
        Constructor arguments naming timm backbones whose pretrained weights the model loads.
    torchvision : tuple of str
        Files of torchvision weights the model loads (their URL's last part).
    needs : tuple of str
        Data needs: ``dtd`` (anomaly textures) or ``imagenette`` (EfficientAD's penalty images).
    renames : mapping
        Constructor argument -> setting name where the argument's name means something else
        in the harness (anomalib's ``precision`` is a dtype, the harness's an autocast mode).
    note : str
        What differs from the paper, for ``describe``.
    """

    name: str
    model: str
    title: str
    venue: str
    url: str
    code: str
    kind: str
    paper_protocol: str
    harness: Mapping[str, Any]
    tiny: Mapping[str, Any]
    owned: Mapping[str, str] = field(default_factory=dict)
    timm: tuple[str, ...] = ()
    torchvision: tuple[str, ...] = ()
    needs: tuple[str, ...] = ()
    renames: Mapping[str, str] = field(default_factory=lambda: {"precision": "model_precision"})
    note: str = ""

    @property
    def toy_width(self) -> bool:
        """Whether the model has a ``toy_width`` setting (its widths are not constructor arguments)."""
        return "toy_width" in self.tiny

    @property
    def source_argument(self) -> str:
        """The constructor argument that takes the anomaly-source folder ('' if none)."""
        return next((k for k, v in self.owned.items() if v == "source"), "")

    @property
    def protocols(self) -> tuple[str, ...]:
        """Zero/few-shot models (WinCLIP, AnomalyDINO) run under ``fewshot`` only."""
        return ("fewshot",) if "fewshot" in (self.kind, self.paper_protocol) else ("multiclass", "fewshot", "oneclass")


#: Random-init ResNet-18 at 64 px: what the ``tiny`` profiles of the CNN models use.
_TINY_CNN = {"image_size": 64, "train_batch_size": 16}

VARIANTS: tuple[Variant, ...] = (
    Variant("padim", "Padim", "PaDiM: a Patch Distribution Modeling Framework for Anomaly Detection and Localization",
            "ICPR 2021", "https://arxiv.org/abs/2011.08785", "", "memory_bank", "oneclass",
            {"image_size": 256, "train_batch_size": 32, "epochs": 1},
            {**_TINY_CNN, "layers": ("layer1", "layer2"), "n_features": 40, "pre_trained": False},
            timm=("backbone",)),
    Variant("anomalib_patchcore", "Patchcore", "Towards Total Recall in Industrial Anomaly Detection", "CVPR 2022",
            "https://arxiv.org/abs/2106.08265", "https://github.com/amazon-science/patchcore-inspection",
            "memory_bank", "oneclass", {"image_size": 256, "train_batch_size": 32, "epochs": 1},
            # layer2 only (an 8 x 8 grid at 64 px) and a 2 % coreset: anomalib's k-center greedy
            # selection is O(bank x picks), 7 minutes on this CPU with layer1 + layer2 at 5 %.
            {**_TINY_CNN, "backbone": "resnet18", "layers": ("layer2",), "coreset_sampling_ratio": 0.02,
             "pre_trained": False}, timm=("backbone",),
            note="anomalib's PatchCore (wide_resnet50_2 from timm: the racm_in1k weights, not the torchvision V1 "
                 "file of the paper); the harness's own reproduction is 'patchcore'"),
    Variant("stfpm", "Stfpm", "Student-Teacher Feature Pyramid Matching for Anomaly Detection", "BMVC 2021",
            "https://arxiv.org/abs/2103.04257", "", "trained", "oneclass",
            {"image_size": 256, "train_batch_size": 32, "epochs": 100},
            {**_TINY_CNN, "epochs": 3, "layers": ("layer1", "layer2")}, timm=("backbone",),
            note="the teacher is always pretrained in anomalib; tiny's teacher is random"),
    Variant("rd4ad", "ReverseDistillation", "Anomaly Detection via Reverse Distillation from One-Class Embedding",
            "CVPR 2022", "https://arxiv.org/abs/2201.10703", "https://github.com/hq-deng/RD4AD", "trained", "oneclass",
            {"image_size": 256, "train_batch_size": 16, "epochs": 200},
            {**_TINY_CNN, "epochs": 3, "backbone": "resnet18", "pre_trained": False}, timm=("backbone",)),
    Variant("fastflow", "Fastflow", "FastFlow: Unsupervised Anomaly Detection and Localization via 2D Normalizing "
            "Flows", "arXiv 2021", "https://arxiv.org/abs/2111.07677", "", "trained", "oneclass",
            {"image_size": 256, "train_batch_size": 32, "epochs": 500},
            {**_TINY_CNN, "epochs": 3, "flow_steps": 2, "pre_trained": False}, timm=("backbone",)),
    Variant("cflow", "Cflow", "CFLOW-AD: Real-Time Unsupervised Anomaly Detection with Localization via "
            "Conditional Normalizing Flows", "WACV 2022", "https://arxiv.org/abs/2107.12571",
            "https://github.com/gudovskiy/cflow-ad", "trained", "oneclass",
            {"image_size": 256, "train_batch_size": 32, "epochs": 50},
            {**_TINY_CNN, "epochs": 2, "backbone": "resnet18", "layers": ("layer1", "layer2"), "pre_trained": False,
             "coupling_blocks": 2, "condition_vector": 32, "fiber_batch_size": 256}, timm=("backbone",)),
    Variant("cfa", "Cfa", "CFA: Coupled-hypersphere-based Feature Adaptation for Target-Oriented Anomaly "
            "Localization", "IEEE Access 2022", "https://arxiv.org/abs/2206.04325",
            "https://github.com/sungwool/CFA_for_anomaly_localization", "trained", "oneclass",
            {"image_size": 256, "train_batch_size": 32, "epochs": 30},
            {**_TINY_CNN, "epochs": 3, "backbone": "resnet18"}, timm=("backbone",),
            note="anomalib's CFA always asks for a pretrained backbone; tiny's is random"),
    Variant("csflow", "Csflow", "Fully Convolutional Cross-Scale-Flows for Image-based Defect Detection", "WACV 2022",
            "https://arxiv.org/abs/2110.02855", "https://github.com/marco-rudolph/cs-flow", "trained", "oneclass",
            {"image_size": 768, "train_batch_size": 16, "epochs": 240},
            {"image_size": 128, "train_batch_size": 16, "epochs": 1, "cross_conv_hidden_channels": 32,
             "n_coupling_blocks": 2}, torchvision=("efficientnet_b5_lukemelas-1a07897c.pth",),
            note="EfficientNet-B5 (torchvision IMAGENET1K_V1) features; tiny's is random"),
    Variant("draem", "Draem", "DRAEM - A Discriminatively Trained Reconstruction Embedding for Surface Anomaly "
            "Detection", "ICCV 2021", "https://arxiv.org/abs/2108.07610", "https://github.com/VitjanZ/DRAEM",
            "trained", "oneclass", {"image_size": 256, "train_batch_size": 8, "epochs": 700},
            {"image_size": 64, "train_batch_size": 16, "epochs": 4, "anomaly_source": "procedural", "toy_width": 16},
            owned={"dtd_dir": "source"}, needs=("dtd",),
            note="tiny rebuilds both subnetworks at toy width (toy_width; anomalib's are 128 and 64 wide, 97 M "
                 "parameters)"),
    Variant("dsr", "Dsr", "DSR - A Dual Subspace Re-Projection Network for Surface Anomaly Detection", "ECCV 2022",
            "https://arxiv.org/abs/2208.01521", "https://github.com/VitjanZ/DSR_anomaly_detection", "trained",
            "oneclass", {"image_size": 256, "train_batch_size": 8, "epochs": 100},
            {"image_size": 64, "train_batch_size": 16, "epochs": 2, "toy_width": 16},
            note="tiny rebuilds the model at toy width (toy_width: codebook of 64 entries of toy_width channels, "
                 "both U-Nets of base width toy_width where anomalib's are 64); the pretrained VQ-VAE (anomalib's "
                 "vq_model_pretrained_128_4096.pckl) is loaded in paper runs; tiny's is random"),
    Variant("efficientad", "EfficientAd", "EfficientAD: Accurate Visual Anomaly Detection at Millisecond-Level "
            "Latencies", "WACV 2024", "https://arxiv.org/abs/2303.14535", "", "trained", "oneclass",
            {"image_size": 256, "train_batch_size": 1, "max_steps": 70000},
            {"image_size": 256, "train_batch_size": 1, "max_steps": 40, "anomaly_source": "procedural",
             "teacher_out_channels": 16, "toy_width": 16}, owned={"imagenet_dir": "source"}, needs=("imagenette",),
            note="tiny keeps 256 px (the autoencoder's fixed kernels need it) with 16 teacher channels and the "
                 "teacher's and student's hidden layers rebuilt at toy width (toy_width: 16, 32, 32 channels "
                 "where anomalib's small PDN has 128, 256, 256); the batch size is 1 (anomalib refuses others); "
                 "the map quantiles are computed on the training "
                 "images (anomalib computes them on its validation split, the test set for MVTec AD); tiny's "
                 "teacher is random and its penalty images are procedural textures"),
    Variant("supersimplenet", "Supersimplenet", "SuperSimpleNet: Unifying Unsupervised and Supervised Learning for "
            "Fast and Reliable Surface Defect Detection", "ICPR 2024", "https://arxiv.org/abs/2408.03143",
            "https://github.com/blaz-r/SuperSimpleNet", "trained", "oneclass",
            {"image_size": 256, "train_batch_size": 32, "epochs": 300},
            # One epoch: its 1024-wide segmentation head and 5 x 5 classification head on the 32 x 32
            # upscaled grid make an epoch 23 s on 2 cores, and 4 epochs scored no better (0.38).
            {**_TINY_CNN, "epochs": 1, "backbone": "resnet18", "layers": ("layer1", "layer2")}, timm=("backbone",)),
    Variant("glass", "Glass", "A Unified Anomaly Synthesis Strategy with Gradient Ascent for Industrial Anomaly "
            "Detection and Localization", "ECCV 2024", "https://arxiv.org/abs/2407.09359",
            "https://github.com/cqylunlun/GLASS", "trained", "oneclass",
            {"image_size": 288, "train_batch_size": 8, "epochs": 640},
            {**_TINY_CNN, "epochs": 3, "backbone": "resnet18", "pretrain_embed_dim": 64,
             "target_embed_dim": 64, "discriminator_hidden": 64, "anomaly_source": "procedural"},
            owned={"anomaly_source_path": "source", "input_shape": "image_size"}, timm=("backbone",),
            needs=("dtd",)),
    Variant("uninet", "UniNet", "UniNet: A Contrastive Learning-guided Unified Framework with Feature Selection for "
            "Anomaly Detection", "CVPR 2025", "https://pangdatangtt.github.io/",
            "https://github.com/pangdatangtt/UniNet", "trained", "oneclass",
            {"image_size": 256, "train_batch_size": 8, "epochs": 100},
            {**_TINY_CNN, "epochs": 1, "student_backbone": "resnet50", "teacher_backbone": "resnet50"},
            torchvision=("wide_resnet50_2-9ba9bcbe.pth",),
            note="the teachers are torchvision's wide_resnet50_2 DEFAULT weights (IMAGENET1K_V2); tiny's are random "
                 "ResNet-50s (UniNet's bottleneck is sized for the channels of a ResNet-50)"),
    Variant("dinomaly", "Dinomaly", "Dinomaly: The Less Is More Philosophy in Multi-Class Unsupervised Anomaly "
            "Detection", "CVPR 2025", "https://arxiv.org/abs/2405.14325", "https://github.com/guojiajeremy/Dinomaly",
            "trained", "multiclass", {"image_size": 448, "center_crop": 392, "train_batch_size": 16,
                                      "max_steps": 10000},
            {"image_size": 64, "center_crop": 56, "train_batch_size": 16, "max_steps": 12,
             "encoder_name": "vit_small_patch14_dinov2"},
            timm=("encoder_name",)),
    Variant("inpformer", "InpFormer", "Exploring Intrinsic Normal Prototypes within a Single Image for Universal "
            "Anomaly Detection", "CVPR 2025", "https://arxiv.org/abs/2503.02424",
            "https://github.com/luow23/INP-Former", "trained", "multiclass",
            {"image_size": 448, "center_crop": 392, "train_batch_size": 16, "epochs": 200},
            {"image_size": 64, "center_crop": 56, "train_batch_size": 16, "epochs": 1,
             "encoder_name": "vit_small_patch14_dinov2", "target_layers": (2, 3, 4, 5),
             "fuse_layer_encoder": ((0, 1), (2, 3)), "fuse_layer_decoder": ((0,), (1,)), "inp_num": 2},
            timm=("encoder_name",)),
    Variant("anomalydino", "AnomalyDINO", "AnomalyDINO: Boosting Patch-based Few-shot Anomaly Detection with DINOv2",
            "WACV 2025", "https://arxiv.org/abs/2405.14529", "https://github.com/dammsi/AnomalyDINO", "memory_bank",
            "fewshot", {"image_size": 252, "train_batch_size": 8, "epochs": 1},
            {"image_size": 56, "train_batch_size": 8}, timm=("encoder_name",)),
    Variant("winclip", "WinClip", "WinCLIP: Zero-/Few-Shot Anomaly Classification and Segmentation", "CVPR 2023",
            "https://arxiv.org/abs/2303.14814", "", "fewshot", "fewshot",
            {"image_size": 240, "train_batch_size": 8}, {"image_size": 240, "train_batch_size": 8},
            owned={"class_name": "protocol", "k_shot": "protocol", "few_shot_source": "protocol"},
            note="ViT-B-16-plus-240 (open_clip, laion400m_e31); its reference images are exactly the harness's "
                 "seeded shots of each category"),
)


def variant(name: str) -> Variant:
    """The variant called ``name``."""
    for v in VARIANTS:
        if v.name == name:
            return v
    raise KeyError(name)
