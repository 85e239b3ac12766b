"""What the adapter does differently for some models, kept apart from the generic path.

- pretrained files: resolved through the job's :class:`harness.WeightFinder`, ``context.weights`` (never
  downloaded), handed to :func:`harness_anomalib.offline.weights_from_disk` by timm name or
  torchvision file name; DSR's VQ model and EfficientAD's teacher, which anomalib fetches in
  ``on_train_start``, are read from the declared file instead (random in ``tiny``).
- anomaly sources: the DTD folder (``dtd_root``), ImageNette (``imagenet_dir``) or, with
  ``anomaly_source=procedural``, seeded textures written into the job's cache.
- EfficientAD's map quantiles: computed on the training images after the fit (anomalib computes
  them on its validation split, which for MVTec AD is the test set).
- few-shot models (WinCLIP): one reference set per category, exactly the harness's seeded shots.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch

from harness import FitContext, Prediction, TrainSet
from harness_anomalib.weightfiles import weight_files

if TYPE_CHECKING:  # pragma: no cover
    from harness_anomalib.adapter import AnomalibMethod
    from harness_anomalib.variants import Variant


def anomalib_version() -> str:
    """The installed anomalib's version (recorded with every job)."""
    from importlib import metadata

    return metadata.version("anomalib")


def pretrained(settings: Mapping[str, Any], context: FitContext | None = None) -> bool:
    """Whether this job loads pretrained files (not ``tiny``, not ``--weights random``)."""
    return bool(settings["backbone_pretrained"]) and not (context is not None and context.random_weights)


def timm_files(variant: "Variant", settings: Mapping[str, Any], context: FitContext) -> tuple[dict[str, Path] | None, Any]:
    """``{timm name or torchvision file: path}`` of the job's pretrained files, and what the record says."""
    if not pretrained(settings, context):
        return None, "random (seeded from the job)"
    files: dict[str, Path] = {}
    used = {}
    for file in weight_files(variant, settings):
        path = context.weights.resolve(file, settings)
        files[file.key] = path
        used[file.key] = str(path)
    return files, used


def anomaly_source(variant: "Variant", settings: Mapping[str, Any], context: FitContext) -> tuple[str | None, str]:
    """The folder handed to the model's anomaly-source argument, and how it was chosen."""
    if not variant.source_argument:
        return None, ""
    from harness_anomalib.textures import write_textures

    setting = "imagenet_dir" if "imagenette" in variant.needs else "dtd_root"
    if settings["anomaly_source"] == "procedural" or (context.random_weights and not settings[setting]):
        folder = write_textures(Path(context.cache_dir) / "textures", int(settings["image_size"]), context.seed)
        return str(folder), f"procedural textures ({folder}) instead of {setting}"
    return str(settings[setting]), f"{setting}={settings[setting]}"


def shrink(module, variant: "Variant", width: int) -> None:
    """Rebuild DRAEM's, DSR's or EfficientAD's networks at toy ``width`` (their widths are not
    constructor arguments)."""
    if variant.name == "draem":
        from anomalib.models.image.draem.torch_model import DiscriminativeSubNetwork, ReconstructiveSubNetwork

        module.model.reconstructive_subnetwork = ReconstructiveSubNetwork(sspcab=module.sspcab, base_width=width)
        module.model.discriminative_subnetwork = DiscriminativeSubNetwork(in_channels=6, out_channels=2,
                                                                          base_width=max(1, width // 2))
        if module.sspcab:
            module.setup_sspcab()
    elif variant.name == "dsr":
        from anomalib.models.image.dsr.torch_model import AnomalyDetectionModule, DsrModel, UpsamplingModule

        model = DsrModel(latent_anomaly_strength=module.model.latent_anomaly_strength, embedding_dim=width,
                         num_embeddings=64, num_hiddens=width, num_residual_layers=1,
                         num_residual_hiddens=max(1, width // 2))
        # DsrModel builds its two U-Nets (anomaly detection, upsampling) at a fixed base width of 64.
        model.anomaly_detection_module = AnomalyDetectionModule(
            in_channels=2 * model.image_dim, out_channels=model.anomaly_map_dim, base_width=width)
        model.upsampling_module = UpsamplingModule(
            in_channels=2 * model.image_dim + model.anomaly_map_dim, out_channels=model.anomaly_map_dim,
            base_width=width)
        module.model = model
    elif variant.name == "efficientad":
        # The teacher's and the student's hidden layers only: their output channels, the kernels,
        # strides and paddings (which fix the maps' size) and the autoencoder stay anomalib's.
        narrow_convolutions(module.model.teacher, width)
        narrow_convolutions(module.model.student, width)


def narrow_convolutions(network: torch.nn.Module, width: int) -> None:
    """Rebuild a patch description network's convolutions with its hidden widths scaled so the
    first is ``width``.

    The convolutions that produce the network's output channels (the small PDN's ``conv4``, the
    medium PDN's ``conv5`` and ``conv6``) keep them. Kernels, strides, paddings and biases are
    kept, so the output grid is anomalib's; the weights are new (random).
    """
    keep = {"SmallPatchDescriptionNetwork": {"conv4"},
            "MediumPatchDescriptionNetwork": {"conv5", "conv6"}}[type(network).__name__]
    convs = [(name, child) for name, child in network.named_children() if isinstance(child, torch.nn.Conv2d)]
    scale = width / convs[0][1].out_channels
    channels = convs[0][1].in_channels
    for name, conv in convs:
        out = conv.out_channels if name in keep else max(1, round(conv.out_channels * scale))
        setattr(network, name, torch.nn.Conv2d(channels, out, conv.kernel_size, stride=conv.stride,
                                               padding=conv.padding, bias=conv.bias is not None))
        channels = out


def before_fit(method: "AnomalibMethod", train: TrainSet, context: FitContext) -> None:
    """Model-specific preparation before the Trainer runs (pretrained parts anomalib fetches itself)."""
    module, name = method.module, method.variant.name
    use_files = pretrained(method.settings, context)
    width = int(method.settings.get("toy_width", 0) or 0)
    if use_files and width and weight_files(method.variant, method.settings):
        raise ValueError(f"{name}: toy_width={width} rebuilds networks whose pretrained files have anomalib's widths; "
                         f"run it with --weights random (as the tiny profile does) or set {name}.toy_width=0")
    if not use_files:
        recalibrated = recalibrate_random_backbones(method, train)
        if recalibrated:
            context.info["backbone_batchnorm"] = (f"{recalibrated} random timm backbone(s): BatchNorm statistics "
                                                  "re-estimated on the training images (as the harness's own tiny "
                                                  "PatchCore does)")
    if name == "efficientad":
        def prepare_pretrained_model() -> None:
            if use_files:
                path = context.weights.resolve(_single(method, "teacher"), method.settings)
                module.model.teacher.load_state_dict(torch.load(path, map_location=module.device, weights_only=True))
        module.prepare_pretrained_model = prepare_pretrained_model
        context.info["teacher"] = "pretrained" if use_files else "random (tiny / --weights random)"
    if name == "dsr":
        if use_files:
            path = context.weights.resolve(_single(method, "vq_model"), method.settings)
            module.prepare_pretrained_model = lambda: path
        else:
            module.prepare_pretrained_model = lambda: None
            module.model.load_pretrained_discrete_model_weights = lambda *args, **kwargs: None
        context.info["vq_model"] = "pretrained" if use_files else "random (tiny / --weights random)"


def recalibrate_random_backbones(method: "AnomalibMethod", train: TrainSet) -> int:
    """Re-estimate the BatchNorm statistics of every random timm feature extractor on ``train``.

    A randomly initialised backbone keeps the N(0, 1) statistics of its initialisation, which
    saturates some channels and silences others; one pass over the (normal) training images in
    train mode, no gradients, standardises them (:func:`harness.toolkit.backbones.
    recalibrate_batchnorm`). Only without pretrained files (``tiny``, ``--weights random``).
    """
    from anomalib.models.components.feature_extractors import TimmFeatureExtractor

    from harness.toolkit.backbones import recalibrate_batchnorm

    extractors = [m for m in method.module.modules() if isinstance(m, TimmFeatureExtractor)
                  and isinstance(getattr(m, "feature_extractor", None), torch.nn.Module)
                  and any(isinstance(n, torch.nn.modules.batchnorm._BatchNorm) for n in m.feature_extractor.modules())]
    for extractor in extractors:
        with torch.no_grad():
            recalibrate_batchnorm(extractor.feature_extractor,
                                  (batch.image.to(method.device) for batch in method.loader(train, 16, shuffle=False)))
        extractor.feature_extractor.eval()
    return len(extractors)


def after_fit(method: "AnomalibMethod", train: TrainSet, context: FitContext) -> None:
    """Model-specific work after the Trainer (EfficientAD's quantiles on normal training images)."""
    if method.variant.name != "efficientad":
        return
    from anomalib.data import ImageBatch

    module = method.module
    module.eval()
    batches = []
    for batch in method.loader(train, 8, shuffle=False):
        batches.append(ImageBatch(image=batch.image.to(module.device),
                                  gt_label=torch.zeros(batch.image.shape[0], dtype=torch.long)))
    module.model.quantiles.update(module.map_norm_quantiles(batches))
    context.info["map_quantiles"] = "computed on the training images (normal only), not on a test split"


def _single(method: "AnomalibMethod", key: str):
    return next(f for f in weight_files(method.variant, method.settings) if f.key == key)


def load_module_state(module: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """``module.load_state_dict(state)`` after giving buffers that a fit resizes (memory banks,
    PaDiM's Gaussians) the saved shapes."""
    own = module.state_dict()
    for key, value in state.items():
        if key in own and own[key].shape != value.shape:
            owner_name, _, leaf = key.rpartition(".")
            owner = module.get_submodule(owner_name) if owner_name else module
            if leaf in dict(owner.named_buffers(recurse=False)):
                owner.register_buffer(leaf, torch.empty_like(value, device=own[key].device))
            else:
                setattr(owner, leaf, torch.nn.Parameter(torch.empty_like(value, device=own[key].device)))
    module.load_state_dict(dict(state), strict=True)


# -- few-shot models ---------------------------------------------------------------------------------
def _category_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What WinCLIP's ``setup`` computes for one category (everything but the CLIP weights)."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if not k.startswith("clip.")}


def fit_fewshot(method: "AnomalibMethod", train: TrainSet, context: FitContext) -> None:
    """WinCLIP: per category, its name in the prompts and exactly its k seeded shots as references."""
    by_category: dict[str, list[torch.Tensor]] = defaultdict(list)
    for index in range(len(train)):
        image, category = train[index]
        by_category[category].append(image)
    model = method.module.model.to(method.device).eval()
    shots = {}
    with torch.no_grad():
        for category, images in sorted(by_category.items()):
            references = method.transform(torch.stack(images).to(method.device))
            model.k_shot = len(images)
            model.setup(category, references)
            method.fewshot_state[category] = _category_buffers(model)
            shots[category] = len(images)
    context.info["reference_images"] = shots
    context.info["prompt_class_names"] = sorted(by_category)


def predict_fewshot(method: "AnomalibMethod", images: torch.Tensor, categories: Sequence[str]) -> Prediction:
    """Score each image with its category's prompts and references (raw maps and scores)."""
    model = method.module.model
    maps = [None] * len(categories)
    scores = [None] * len(categories)
    for category in sorted(set(categories)):
        if category not in method.fewshot_state:
            raise KeyError(f"winclip: no reference images for category {category!r} (fitted: "
                           f"{', '.join(method.fewshot_state)})")
        full = dict(model.state_dict())
        full.update({k: v.to(method.device) for k, v in method.fewshot_state[category].items()})
        load_module_state(model, full)
        model.k_shot = next(iter(v.shape[0] for k, v in method.fewshot_state[category].items()
                                 if k.endswith("visual_embeddings")), 0)
        index = [i for i, c in enumerate(categories) if c == category]
        out = model(method.transform(images[index]))
        prediction = method.to_prediction(out.anomaly_map, out.pred_score, images.shape[-2:])
        for j, i in enumerate(index):
            maps[i], scores[i] = prediction.anomaly_maps[j], prediction.image_scores[j]
    return Prediction(torch.stack(maps), torch.stack(scores))
