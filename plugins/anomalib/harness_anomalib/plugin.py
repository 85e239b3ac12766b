"""Registers anomalib's image models as harness methods (entry point ``anomalib``, group ``harness``).

Importing this module is cheap: the variants and their constructor settings are data
(:mod:`harness_anomalib.variants`, ``signatures.json``); anomalib, Lightning and timm load when
a method is built. Without anomalib installed (``pip install 'harness-ad[anomalib]'``) the
plugin registers nothing: its methods are simply absent from ``harness list`` and the rest of
the harness is untouched.
"""

from __future__ import annotations

import importlib.util
from functools import partial

from harness import DataNeed, MethodSpec, PaperRef, Resources, Setting, hookimpl
from harness.settings import eval_batch_size, image_size, interpolation

from harness_anomalib.variants import VARIANTS, Variant
from harness_anomalib.weightfiles import weight_files

#: The data needs the adapter can declare (the setting names are the harness's own: DiffusionAD
#: uses ``dtd_root`` too).
NEEDS = {
    "dtd": DataNeed(setting="dtd_root", what="the Describable Textures Dataset (DTD) images, the anomaly source of "
                    "its synthetic defects", how="download dtd-r1.0.1.tar.gz from "
                    "https://www.robots.ox.ac.uk/~vgg/data/dtd/ and unpack it (or set anomaly_source=procedural)",
                    random_weights_fallback="procedural textures (the record says so)"),
    "imagenette": DataNeed(setting="imagenet_dir", what="ImageNette (EfficientAD's penalty images)",
                           how="download imagenette2.tgz from https://github.com/fastai/imagenette and unpack it (or "
                               "set anomaly_source=procedural)",
                           random_weights_fallback="procedural textures (the record says so)"),
}

_FROM_ANOMALIB = "anomalib's default (the constructor's)"


def installed() -> bool:
    """Whether anomalib can be imported (checked without importing it)."""
    return importlib.util.find_spec("anomalib") is not None


def adapter_settings(variant: Variant) -> list[Setting]:
    """The adapter's own settings of ``variant`` (size, schedule, weights, data)."""
    h = variant.harness
    bicubic = variant.name in ("winclip", "anomalydino")
    out = [
        image_size(h["image_size"], help="side the images are resized to (the model's pre-processor Resize)"),
        interpolation("bicubic" if bicubic else "bilinear",
                      choice="the model's pre-processor resizes with this filter (torchvision, antialiased)"),
        eval_batch_size(8),
        Setting("train_batch_size", int, h.get("train_batch_size", 32), "images per training step", minimum=1,
                choice="anomalib's datamodules default to 32; the papers' batch where it differs"),
        Setting("backbone_pretrained", bool, True, "load the pretrained files the model needs from disk (never "
                "downloaded); false: every pretrained part randomly initialised, seeded from the job"),
    ]
    if variant.kind != "fewshot":
        out.append(Setting("epochs", int, h.get("epochs", 1), "training epochs (1 for memory-bank models)",
                           minimum=0, choice="the paper's schedule, as anomalib's example configs give it"))
        out.append(Setting("max_steps", int, h.get("max_steps", -1), "optimiser steps (-1: set by epochs); "
                           "models with a step schedule read it", minimum=-1))
    if variant.toy_width:
        out.append(Setting("toy_width", int, 0, "base width the adapter rebuilds the model's networks with (0: "
                           "anomalib's own widths); only the tiny profile sets it, for CPU runs", minimum=0))
    if "center_crop" in h:
        out.append(Setting("center_crop", int, h["center_crop"], "side of the model's centre crop; its maps are "
                           "pasted back on the full image, the outside scored as the image's lowest value",
                           minimum=0, choice="the paper's 448 -> 392 crop; the harness scores every pixel"))
    if variant.source_argument:
        out.append(Setting("anomaly_source", str, "dtd" if "dtd" in variant.needs else "imagenette",
                           "where the model's anomaly source (or penalty) images come from", 
                           choices=("dtd", "imagenette", "procedural")))
        if "dtd" in variant.needs:
            out.append(Setting("dtd_root", str, "", "folder of the DTD images"))
        if "imagenette" in variant.needs:
            out.append(Setting("imagenet_dir", str, "", "folder of the ImageNette images"))
    return out


def constructor_settings(variant: Variant) -> list[Setting]:
    """The model's constructor arguments as typed settings (:mod:`harness_anomalib.signatures`)."""
    from harness_anomalib.signatures import constructor_settings as table

    types = {"int": int, "float": float, "bool": bool, "str": str, "tuple[int, ...]": tuple[int, ...],
             "tuple[float, ...]": tuple[float, ...], "tuple[str, ...]": tuple[str, ...],
             "tuple[tuple[int, ...], ...]": tuple[tuple[int, ...], ...]}
    out = []
    for param in table(variant):
        empty = " (empty: None, anomalib's own choice)" if param["none_when_empty"] else ""
        out.append(Setting(param["setting"], types[param["type"]], param["default"],
                           f"anomalib {variant.model}({param['name']}: {param['annotation']}){empty}",
                           choices=tuple(param["choices"]) if param["choices"] else None, choice=_FROM_ANOMALIB))
    return out


def settings_of(variant: Variant) -> tuple[Setting, ...]:
    """Every setting of ``variant``: the adapter's, then the constructor's."""
    return tuple(adapter_settings(variant) + constructor_settings(variant))


def profiles_of(variant: Variant) -> dict[str, dict]:
    """``paper`` (the defaults) and ``tiny`` (random weights, toy size)."""
    return {"paper": {}, "tiny": {"backbone_pretrained": False, **variant.tiny}}


def data_needs(variant: Variant, settings) -> list[DataNeed]:
    """DTD or ImageNette unless the profile uses procedural textures."""
    if not variant.source_argument or settings["anomaly_source"] == "procedural":
        return []
    return [NEEDS[n] for n in variant.needs]


def build(variant: Variant, settings):
    """The factory: builds the anomalib model's architecture (no weight file is read)."""
    from harness_anomalib.adapter import AnomalibMethod

    return AnomalibMethod(settings, variant)


def method_spec(variant: Variant) -> MethodSpec:
    """The harness spec of one variant."""
    paper = PaperRef(title=variant.title, venue=variant.venue, url=variant.url, code=variant.code)
    kinds = {"trained": "trained by gradient steps", "memory_bank": "a memory bank of features fitted in one pass",
             "fewshot": "zero/few-shot: k reference images per category, no training"}
    return MethodSpec(
        name=variant.name, paper=paper, protocols=variant.protocols, profiles=profiles_of(variant),
        factory=partial(build, variant), settings=settings_of(variant), paper_protocol=variant.paper_protocol,
        weights=partial(weight_files, variant), data_needs=partial(data_needs, variant),
        resources={"paper": Resources(gpus=1, cpus=4, memory_gb=16), "tiny": Resources(cpus=1)},
        description=f"anomalib's {variant.model} ({kinds[variant.kind]}), run by the harness's anomalib adapter: our "
                    "protocols, our data pipeline feeding the model's own pre-processing, raw maps scored by our "
                    "metrics (anomalib's post-processing, evaluator and visualizer off)."
                    + (f" {variant.note}." if variant.note else ""),
    )


@hookimpl
def harness_methods():
    """Every anomalib variant, or none when anomalib is not installed."""
    if not installed():
        return []
    return [method_spec(v) for v in VARIANTS]
