"""The pretrained files DiAD's ``paper`` profile reads, pinned (no heavy import: the spec uses it).

- **Stable Diffusion v1.5**, the file the authors' ``build_model.py`` reads: ``v1-5-pruned.ckpt``
  (LDM layout, 7.7 GB, EMA and non-EMA weights; like the authors we take the non-EMA
  ``model.diffusion_model.*`` weights) from ``stable-diffusion-v1-5/stable-diffusion-v1-5`` (the
  mirror of the withdrawn ``runwayml/stable-diffusion-v1-5``, same history) at a pinned commit,
  sha256 pinned. ``sd_path`` may name that file elsewhere, ``v1-5-pruned-emaonly.ckpt`` (pinned
  too), or a diffusers folder (``unet/``, ``vae/``, ``text_encoder/``), whose UNet holds the EMA
  weights; the record says which was read.
- **The scoring backbone**: the authors' ``test.py`` calls ``timm.create_model("resnet50",
  pretrained=True, features_only=True)`` with timm 0.8, which resolves to ``resnet50.a1_in1k``
  (the "ResNet strikes back" A1 weights), not torchvision's; the hub file is pinned by commit and
  sha256, and torchvision's ResNet-50 files are refused for ``resnet50``.
- **VGG-16** (torchvision ``vgg16-397923af.pth``), the trunk of the LPIPS term of the
  autoencoder loss (taming's ``LPIPS`` builds ``torchvision.models.vgg16(pretrained=True)``). Its
  full sha256 is not published; torchvision's file name carries its first 8 hex digits, which
  the fit checks. The LPIPS linear heads ship with the ``lpips`` package: its
  ``weights/v0.1/vgg.pth`` is byte-identical to the authors' ``taming/.../lpips/vgg.pth``
  (md5 ``d507d7349b931f0638a25a48a722f98a``, the hash taming itself checks).
- **LDM's kl-f8 autoencoder**, where the authors' fine-tuning starts (their README:
  ``kl-f8.zip`` from the latent-diffusion release, its ``model.ckpt`` moved to
  ``models/autoencoders.ckpt``, loaded non-strictly, so its ``loss.*`` tensors, the trained
  discriminator among them, come along when present). Pinned by its URL; the archive or the
  extracted checkpoint is accepted; its sha256 is not published and is recorded for every job.
- Optional, named by settings: a checkpoint written by the authors' code (``authors_checkpoint``:
  nobody has published a trained DiAD) and an autoencoder in the LDM layout to start
  fine-tuning from instead of kl-f8 (``ae_init_path``, e.g. the authors' published
  ``mvtecad_fs.ckpt``, a Lightning checkpoint of their fine-tuning).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from harness import WeightFile
from harness.toolkit.weightfiles import timm_backbone_file

#: The Hub repository and commit of Stable Diffusion v1.5.
SD_REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SD_REVISION = "451f4fe16113bff5a5d2269ed5ad43b0592e9a14"
#: sha256 of the single-file checkpoints (Git LFS object ids of the Hub files).
SD_FILE_SHA256 = {
    "v1-5-pruned.ckpt": "e1441589a6f3c5a53f5f54d0975a18a7feb7cdf0b0dee276dfc3331ae376a053",
    "v1-5-pruned-emaonly.ckpt": "cc6cb27103417325ff94f52b7a5d2dde45a7515b25c255d8e396c90014281516",
}
#: File suffixes that mark ``sd_path`` as a single-file checkpoint (else: a diffusers folder).
SINGLE_FILE_SUFFIXES = (".ckpt", ".safetensors", ".pt", ".pth", ".bin")
#: Files of a diffusers folder DiAD reads.
SD_FOLDER_PATTERNS = ("unet/config.json", "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
                      "vae/diffusion_pytorch_model.safetensors", "text_encoder/config.json",
                      "text_encoder/model.safetensors")

SD15_SINGLE_FILE = WeightFile(
    key="sd15", what="Stable Diffusion v1.5, v1-5-pruned.ckpt (LDM layout; the file the authors' build_model.py reads)",
    filenames=("v1-5-pruned.ckpt",), repo_id=SD_REPO, revision=SD_REVISION, filename="v1-5-pruned.ckpt",
    sha256=SD_FILE_SHA256["v1-5-pruned.ckpt"], setting="sd_path",
)

RESNET50_A1 = WeightFile(
    key="backbone",
    what="ImageNet ResNet-50 A1 weights (timm resnet50.a1_in1k: what timm 0.8 create_model('resnet50', "
         "pretrained=True) loads in the authors' test.py)",
    filenames=("resnet50.a1_in1k.safetensors",), repo_id="timm/resnet50.a1_in1k",
    revision="93271f4677dbf7b4d7f7e7d9d7811bd66c327e56", filename="model.safetensors",
    sha256="773525d5821de224f8f30c33377b7a795d7863e08522698200d3217d3f2a41bb", setting="backbone_weights_file",
    # torchvision's ResNet-50 V1 / V2 files: other weights than the authors'.
    refuse=("resnet50-19c8e357.pth", "resnet50-0676ba61.pth", "resnet50-11ad3fa6.pth"),
)

KL_F8 = WeightFile(
    key="ae_init", what="LDM's kl-f8 autoencoder (kl-f8.zip of the latent-diffusion release, the model.ckpt the authors' "
                        "finetune_autoencoder.py starts from)",
    filenames=("kl-f8.zip", "autoencoders.ckpt", "kl-f8.ckpt"),
    url="https://ommer-lab.com/files/latent-diffusion/kl-f8.zip", setting="ae_init_path",
)

VGG16 = WeightFile(
    key="lpips_vgg16", what="ImageNet VGG-16 (torchvision vgg16-397923af.pth), the LPIPS trunk of the autoencoder loss",
    filenames=("vgg16-397923af.pth",), url="https://download.pytorch.org/models/vgg16-397923af.pth",
    setting="lpips_vgg_file",
)
#: The sha256 prefix torchvision puts in the VGG-16 file name (its full digest is not published).
VGG16_SHA256_PREFIX = "397923af"


def sd_file(settings: Mapping[str, Any]) -> WeightFile:
    """The SD v1.5 file or folder a job reads (see the module docstring)."""
    explicit = str(settings.get("sd_path", "") or "")
    if not explicit:
        return SD15_SINGLE_FILE
    path = Path(explicit)
    if path.suffix.lower() in SINGLE_FILE_SUFFIXES:
        return WeightFile(key="sd15", what=f"Stable Diffusion v1.5 single-file checkpoint ({path.name})",
                          filenames=(path.name,), repo_id=SD_REPO if path.name in SD_FILE_SHA256 else "",
                          revision=SD_REVISION if path.name in SD_FILE_SHA256 else "",
                          filename=path.name if path.name in SD_FILE_SHA256 else "",
                          sha256=SD_FILE_SHA256.get(path.name, ""), setting="sd_path")
    return WeightFile(key="sd15", what="Stable Diffusion v1.5 diffusers folder (unet/, vae/, text_encoder/)",
                      filenames=(path.name,), repo_id=SD_REPO, revision=SD_REVISION, folder=True,
                      allow_patterns=SD_FOLDER_PATTERNS, setting="sd_path")


def backbone_file(settings: Mapping[str, Any]) -> WeightFile:
    """The scoring backbone's ImageNet weights."""
    name = str(settings.get("backbone", "resnet50"))
    if name == "resnet50":
        return RESNET50_A1
    return timm_backbone_file(name)


def _named_file(key: str, what: str, setting: str, settings: Mapping[str, Any]) -> WeightFile:
    path = Path(str(settings.get(setting, "")))
    return WeightFile(key=key, what=what, filenames=(path.name,), setting=setting)


def authors_file(settings: Mapping[str, Any]) -> WeightFile:
    """The authors' trained DiAD checkpoint named by ``authors_checkpoint``."""
    return _named_file("authors_checkpoint", "the authors' trained DiAD checkpoint (LDM / ControlNet layout)",
                       "authors_checkpoint", settings)


def ae_init_file(settings: Mapping[str, Any]) -> WeightFile | None:
    """The LDM-layout autoencoder the fine-tuning starts from: ``ae_init_path``, else kl-f8 (``ae_init``), else None."""
    if settings.get("ae_init_path"):
        return _named_file("ae_init", "autoencoder checkpoint in the LDM layout (e.g. LDM's kl-f8 model.ckpt or the "
                           "authors' mvtecad_fs.ckpt)", "ae_init_path", settings)
    if settings.get("ae_init", "kl-f8") == "kl-f8":
        return KL_F8
    return None


def uses_lpips(settings: Mapping[str, Any]) -> bool:
    """Whether a fit trains the autoencoder with the LPIPS term (and so reads VGG-16)."""
    return (not settings.get("authors_checkpoint") and int(settings.get("ae_epochs", 0)) > 0
            and float(settings.get("ae_perceptual_weight", 0.0)) > 0)


def weight_files(settings: Mapping[str, Any]) -> list[WeightFile]:
    """Every pretrained file a job with ``settings`` reads (the spec's ``weights``)."""
    files = []
    if settings.get("authors_checkpoint"):
        files.append(authors_file(settings))
    else:
        if settings.get("sd_pretrained"):
            files.append(sd_file(settings))
        # kl-f8 replaces SD's pretrained autoencoder; an explicit ae_init_path is read in any case.
        if settings.get("ae_init_path") or (settings.get("sd_pretrained") and ae_init_file(settings) is not None):
            files.append(ae_init_file(settings))
        if uses_lpips(settings):
            files.append(VGG16)
    if settings.get("backbone_pretrained"):
        files.append(backbone_file(settings))
    return files


__all__ = ["SD15_SINGLE_FILE", "RESNET50_A1", "KL_F8", "VGG16", "VGG16_SHA256_PREFIX", "SD_REPO", "SD_REVISION",
           "SD_FILE_SHA256", "sd_file", "backbone_file", "authors_file", "ae_init_file", "uses_lpips", "weight_files"]
