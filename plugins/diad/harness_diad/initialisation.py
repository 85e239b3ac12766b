"""DiAD's starting weights (:class:`~harness_diad.model.DiAD`): the authors' checkpoint, SD v1.5
and an autoencoder in the LDM layout read from disk, or seeded random networks."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from harness import FitContext, TrainSet, WeightsNotFoundError
from harness.toolkit.backbones import create_features, load_weights, recalibrate_batchnorm
from harness.toolkit.ops import imagenet_normalize
from harness_diad import weightfiles
from harness_diad.convert import check_schedule, convert_authors_state, load_strict, read_checkpoint
from harness_diad.weights import empty_prompt_context, random_text_encoder, read_sd, text_encoder


def seeded_build(seed: int, build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """``build()`` under torch's global generator seeded with ``seed`` (restored afterwards)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return build()


def initialise_backbone(backbone: torch.nn.Module, s: Mapping, train: TrainSet, context: FitContext,
                        device: torch.device) -> None:
    """The scoring backbone of DiAD and its baselines: ImageNet weights from disk, or seeded random ones with
    BatchNorm statistics re-estimated on the training images; what was done goes to ``context.info``."""
    if s.backbone_pretrained and not context.random_weights:
        path = load_weights(backbone, weightfiles.backbone_file(s), context.weights, s)
        context.info.update({"backbone_init": "imagenet", "backbone_weights": str(path)})
        return
    backbone.load_state_dict(seeded_build(context.seed, lambda: create_features(s.backbone, s.backbone_layers))
                             .state_dict())
    backbone.to(device)
    recalibrate_batchnorm(backbone, (imagenet_normalize(x.to(device)) for x, _ in train.batches(s.train_batch_size)))
    context.info["backbone_init"] = "random (BatchNorm statistics re-estimated on the training images)"


class DiADInitialisation:
    """Where :class:`~harness_diad.model.DiAD`'s networks start (a mixin: the networks are DiAD's)."""

    def _initialise(self, train: TrainSet, context: FitContext) -> None:
        """The networks' starting weights: the authors' checkpoint, SD v1.5 or seeded random ones."""
        s = self.settings
        info = context.info
        random = context.random_weights
        seed = int(context.seed)
        if s.get("authors_checkpoint") and not random:
            path = context.weights.resolve(weightfiles.authors_file(s), s)
            self.load_authors_checkpoint(path)
            info.update({"init": "authors_checkpoint", "authors_checkpoint": str(path)})
        else:
            if s.sd_pretrained and not random:
                path = context.weights.resolve(weightfiles.sd_file(s), s)
                weights = read_sd(path, self.arch)
                if weights.schedule:
                    check_schedule(weights.schedule, self.schedule.alphas_cumprod64, str(path))
                load_strict(self.unet, weights.unet, f"{path} (UNet)")
                load_strict(self.vae, weights.vae, f"{path} (autoencoder)")
                text = weights.text_encoder
                info.update({"sd_init": "pretrained", "sd_weights": str(path), "sd_layout": weights.layout,
                             "sd_unet_weights": "non-EMA (as the authors' build_model.py)"
                             if weights.layout == "single_file" else "the diffusers folder's (EMA)"})
            else:
                self.unet.load_state_dict(seeded_build(seed, lambda: UNet2DConditionModel(**self.arch.unet)).state_dict())
                self.vae.load_state_dict(seeded_build(seed, lambda: AutoencoderKL(**self.arch.vae)).state_dict())
                text = random_text_encoder(self.arch, seed)
                info["sd_init"] = "random"
            self._ae_loss_state = {}
            ae_file = weightfiles.ae_init_file(s)
            if ae_file is not None and not random and (s.ae_init_path or s.sd_pretrained):
                path = context.weights.resolve(ae_file, s)
                converted = convert_authors_state(read_checkpoint(path), self.arch)
                load_strict(self.vae, converted.vae, f"{path} (autoencoder)")
                # The authors' strict=False load also fills their loss module (discriminator, LPIPS, logvar).
                self._ae_loss_state = converted.loss
                info.update({"ae_init": str(path), "ae_init_loss_tensors": len(converted.loss)})
            else:
                info["ae_init"] = "the SD autoencoder above" if not random else "random"
            if self.sg is not None:  # the LDM baseline (harness_diad.baselines) has none
                # The authors' build_model.py: the SG copy starts from SD's encoder; the rest is new.
                self.sg.reset_new_parts(seed)
                self.sg.copy_unet_encoder(self.unet)
            self.context.embedding.copy_(empty_prompt_context(text).to(self.context.embedding))
            del text
        self._initialise_backbone(train, context)
        self.to(self.device)

    def load_authors_checkpoint(self, path: Path | str, state: Mapping[str, torch.Tensor] | None = None) -> None:
        """Load a checkpoint of the authors' code (UNet, SG network, autoencoder, text encoder) strictly.

        ``state`` may be given already read (the golden tests); the prompt context is computed
        from the checkpoint's CLIP text encoder when it has one.
        """
        converted = convert_authors_state(read_checkpoint(path) if state is None else state, self.arch)
        check_schedule(converted.schedule, self.schedule.alphas_cumprod64, str(path))
        load_strict(self.unet, converted.unet, f"{path} (model.diffusion_model: UNet)")
        load_strict(self.sg.controlnet, converted.controlnet, f"{path} (control_model: SG network)")
        load_strict(self.sg.sff, converted.sff, f"{path} (control_model.down*: SFF block)")
        load_strict(self.vae, converted.vae, f"{path} (first_stage_model: autoencoder)")
        if converted.text_encoder is not None:
            self.context.embedding.copy_(empty_prompt_context(text_encoder(self.arch, converted)))
        elif self.arch.text_encoder is not None:
            raise WeightsNotFoundError(f"{path} holds no CLIP text encoder (cond_stage_model.transformer.*), which "
                                       "gives the empty prompt's context")

    def _initialise_backbone(self, train: TrainSet, context: FitContext) -> None:
        initialise_backbone(self.backbone, self.settings, train, context, self.device)


__all__ = ["DiADInitialisation"]
