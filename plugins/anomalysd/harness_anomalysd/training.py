"""AnomalySD's fit: the decoder and UNet fine-tuning (Eqs. 8 and 9) as checkpointed stages, the
prototype banks, and the choice of the denoising strengths on held-out shots."""

from __future__ import annotations

import time
import zlib
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from harness import FitContext, TrainSet
from harness.toolkit.backbones import recalibrate_batchnorm
from harness.toolkit.ops import imagenet_normalize
from harness.toolkit.precision import grad_scaler
from harness.toolkit.pseudo_validation import split_holdout
from harness.toolkit.training import optimiser_step, train_batches
from harness_anomalysd import sampling, selection
from harness_anomalysd.augment import augment
from harness_anomalysd.masks import foreground_mask, random_training_mask


def _stage_seed(seed: int, stage: str, *parts: int) -> list[int]:
    """Entropy for a NumPy / torch generator that depends only on the job seed, the stage and ``parts``."""
    return [int(seed) & 0xFFFFFFFF, zlib.crc32(stage.encode("utf-8")), *[int(p) for p in parts]]


def _torch_generator(entropy: Sequence[int]) -> torch.Generator:
    return torch.Generator().manual_seed(int(np.random.default_rng(list(entropy)).integers(2**62)))


class AnomalySDTraining:
    """The fit of :class:`~harness_anomalysd.model.AnomalySD`: fine-tuning, prototype banks, λ selection.

    A mixin: the networks, settings and state are :class:`~harness_anomalysd.model.AnomalySD`'s.
    """

    def fit(self, train: TrainSet, context: FitContext) -> None:
        """Load (or randomly keep) the networks, fine-tune on the shots, build the banks, choose λ.

        With no training image (``--shots 0``) nothing is fine-tuned, no bank is built and λ is
        ``noise_strength`` (zero-shot, the paper's first row of Table 1).
        """
        s = self.settings
        start = time.perf_counter()
        self.dev_run = bool(context.fast_dev_run)
        info: dict[str, Any] = self._load_weights(context)
        info.update(shots_total=len(train), zero_shot=len(train) == 0, precision=s.precision,
                    gradient_checkpointing=s.gradient_checkpointing, anomaly_map=s.anomaly_map)
        random_backbone = self.backbone is not None and (context.random_weights or not s.backbone_pretrained)
        self.strengths = {}
        if len(train) == 0:
            if s.anomaly_map == "prototype":
                raise ValueError("anomaly_map='prototype' needs shots to build prototype banks (--shots >= 1)")
            self.eval()
            info.update(self._denoising_info(train.categories), fit_seconds=round(time.perf_counter() - start, 2))
            context.info.update(info)
            return
        mode = s.lambda_selection
        fit_part, holdout = (split_holdout(train, s.lambda_holdout_fraction, context.seed, min_fit=1, min_holdout=1)
                             if mode == "holdout" else (train, train.subset([])))
        refit = mode == "holdout" and len(holdout) > 0 and s.lambda_refit
        initial = None
        if refit:
            # The final model starts again from the same weights; kept on the host.
            initial = {name: {k: v.detach().to("cpu", copy=True) for k, v in net.state_dict().items()}
                       for name, net in (("unet", self.unet), ("vae", self.vae))}
        images, cats = self._images(fit_part)
        prefix = "select/" if refit else ""
        info["fine_tuning"] = self._fine_tune(images, cats, context, prefix, random_backbone)
        if mode != "fixed":
            info["noise_strength"] = self._select_strengths(fit_part, holdout, context, prefix)
        else:
            info["noise_strength"] = {"selection": "fixed"}
        if refit:
            self.unet.load_state_dict(initial["unet"])
            self.vae.load_state_dict(initial["vae"])
            self.latent_scale = float(self.vae.config.scaling_factor)
            del initial
            all_images, all_cats = self._images(train)
            info["fine_tuning_selection_model"] = info.pop("fine_tuning")
            info["fine_tuning"] = self._fine_tune(all_images, all_cats, context, "", random_backbone)
        info["noise_strength"]["refit_on_all_shots"] = refit
        _, fallback = self.prompt_sets(train.categories)
        info["prompt_fallback_categories"] = fallback
        self.eval()
        info.update(self._denoising_info(train.categories))
        info.update(latent_scale=round(self.latent_scale, 6),
                    prototype_banks={c: int(b.shape[0]) for c, b in self.banks.items()},
                    fit_seconds=round(time.perf_counter() - start, 2))
        context.info.update(info)
        self._prompt_cache = {}

    def _fine_tune(self, images: torch.Tensor, cats: Sequence[str], context: FitContext, prefix: str,
                   recalibrate: bool) -> dict[str, Any]:
        """Decoder stage, UNet stage and prototype banks on ``images``; the stages' last losses."""
        s = self.settings
        out: dict[str, Any] = {}
        out["decoder_loss"] = round(self.train_decoder(images, context, prefix + "decoder", {}), 5)
        if s.latent_scale == "auto":
            with torch.no_grad(), self._autocast():
                std = float(self.vae.encode(images * 2 - 1).latent_dist.mode().float().std())
            self.latent_scale = 1.0 / max(std, 1e-6)
        # The UNet stage's checkpoints carry the fine-tuned autoencoder, so a resume inside it
        # finds the decoder it was trained with.
        out["unet_loss"] = round(self.train_unet(images, cats, context, prefix + "unet", {"vae": self.vae}), 5)
        if self.uses_prototypes:
            self.build_banks(images, cats, recalibrate)
        return out

    def _images(self, train: TrainSet) -> tuple[torch.Tensor, list[str]]:
        images, cats = [], []
        for x, c in train.images():
            images.append(x)
            cats.append(c)
        if not images:
            return torch.zeros(0, 3, *self.input_size, device=self.device), []
        return torch.stack(images).to(self.device), cats

    def _augment(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        s = self.settings
        return augment(images, generator, s.aug_brightness, s.aug_contrast, s.aug_scale, s.aug_rotation)

    def _batches(self, n: int, seed: int, stage: str, epoch: int) -> list[np.ndarray]:
        """The batches of one epoch: a permutation that depends only on (seed, stage, epoch)."""
        order = np.random.default_rng(_stage_seed(seed, stage, epoch)).permutation(n)
        size = self.settings.train_batch_size
        return [order[i:i + size] for i in range(0, n, size)]

    def _steps(self, n: int, epochs: int, seed: int, stage: str, position, context: FitContext
               ) -> Iterator[tuple[int, np.ndarray, np.random.Generator, torch.Generator]]:
        """``(epoch, batch indices, numpy rng, torch generator)`` of the batches still to run.

        Batches consumed before an interruption are skipped; every generator is seeded by (job
        seed, stage, epoch, batch), so the data a step sees does not depend on where a run resumed.
        """
        def epoch_batches(epoch: int, first: int):
            return enumerate(self._batches(n, seed, stage, epoch))

        for step in train_batches(context, position, context.epochs(epochs), epoch_batches, desc=stage):
            entropy = _stage_seed(seed, stage, step.epoch, step.index)
            yield step.epoch, step.data, np.random.default_rng(entropy), _torch_generator(entropy)

    def train_decoder(self, images: torch.Tensor, context: FitContext, stage: str, carry: Mapping[str, Any]) -> float:
        """Fine-tune the decoder (and, with ``train_encoder``, the encoder) with Eq. 9; last loss."""
        s = self.settings
        params = list(self.vae.decoder.parameters()) + list(self.vae.post_quant_conv.parameters())
        if s.train_encoder:
            params += list(self.vae.encoder.parameters()) + list(self.vae.quant_conv.parameters())
        opt = torch.optim.Adam(params, lr=s.decoder_lr)
        scaler = grad_scaler(self.device, s.precision)
        loss_value = float("nan")
        self.vae.train()
        with context.checkpoint.stage(stage, vae=self.vae, decoder_optimiser=opt, decoder_scaler=scaler,
                                      **carry) as position:
            for _epoch, idx, _rng, generator in self._steps(images.shape[0], s.decoder_epochs, context.seed, stage,
                                                           position, context):
                x = self._augment(images[idx], generator) * 2 - 1
                with self._autocast():
                    with torch.set_grad_enabled(s.train_encoder):
                        z = self.vae.encode(x).latent_dist.mode()
                    recon = self.vae.decode(z).sample
                    loss = F.mse_loss(recon.float(), x) + s.decoder_lpips_weight * self.lpips(recon, x).float().mean()
                optimiser_step(loss, [opt], scaler)
                loss_value = float(loss.detach())
            if not position.done:
                position.extra["loss"] = loss_value
            loss_value = float(position.extra.get("loss", loss_value))
        self.vae.eval()
        return loss_value

    def _training_masks(self, images: torch.Tensor, cats: Sequence[str], textures: frozenset[str],
                        rng: np.random.Generator) -> torch.Tensor:
        s = self.settings
        out = []
        for x, c in zip(images.detach().float().cpu().numpy(), cats):
            fg = foreground_mask(x, whole=c in textures)
            mask, _ = random_training_mask(fg, rng, s.mask_gammas, s.mask_side_range)
            out.append(torch.from_numpy(mask))
        return torch.stack(out).float().to(self.device)

    def train_unet(self, images: torch.Tensor, cats: Sequence[str], context: FitContext, stage: str,
                   carry: Mapping[str, Any]) -> float:
        """Fine-tune the UNet with the inpainting loss (Eq. 8); returns the last loss."""
        s = self.settings
        sets, _ = self.prompt_sets(cats)
        embeddings = {c: self.encode_prompts(p) for c, p in sets.items()}
        opt = torch.optim.Adam(self.unet.parameters(), lr=s.unet_lr)
        scaler = grad_scaler(self.device, s.precision)
        T = len(self.abar)
        loss_value = float("nan")
        self.unet.train()
        with context.checkpoint.stage(stage, unet=self.unet, unet_optimiser=opt, unet_scaler=scaler,
                                      **carry) as position:
            for _epoch, idx, rng, generator in self._steps(images.shape[0], s.unet_epochs, context.seed, stage,
                                                          position, context):
                x = self._augment(images[idx], generator)
                batch_cats = [cats[i] for i in idx]
                masks = self._training_masks(x, batch_cats, context.textures, rng)
                cond = torch.stack([embeddings[c][int(rng.integers(len(embeddings[c])))] for c in batch_cats])
                t = rng.integers(0, T, size=x.shape[0])
                with self._autocast():
                    with torch.no_grad():
                        z = self.encode(x).float()
                        z_masked = self.encode_masked(x, masks)
                    noise = torch.randn(z.shape, generator=generator).to(self.device)
                    z_t = sampling.add_noise(z, noise, t, self.abar)
                    timesteps = torch.from_numpy(t).to(self.device)
                    pred = self.unet(self.unet_input(z_t, masks, z_masked), timesteps, encoder_hidden_states=cond).sample
                    loss = F.mse_loss(pred.float(), noise)
                optimiser_step(loss, [opt], scaler)
                loss_value = float(loss.detach())
            if not position.done:
                position.extra["loss"] = loss_value
            loss_value = float(position.extra.get("loss", loss_value))
        self.unet.eval()
        return loss_value

    @torch.no_grad()
    def build_banks(self, images: torch.Tensor, cats: Sequence[str], recalibrate: bool) -> None:
        """Eq. 13: per category, every feature of every rotated shot.

        A random backbone first gets its BatchNorm statistics from these same rotated shots.
        """
        angles = self.settings.prototype_rotations
        rotated = torch.stack([torch.rot90(x, k=angle // 90 % 4, dims=(1, 2)) for x in images for angle in angles])
        owners = [c for c in cats for _ in angles]
        if recalibrate:
            # Nearly equal chunks of at most 16: never a lone image, whose 1 x 1 late stages
            # BatchNorm cannot normalise.
            chunks = torch.tensor_split(rotated, max(1, -(-len(rotated) // 16)))
            recalibrate_batchnorm(self.backbone, (imagenet_normalize(chunk) for chunk in chunks))
        self.backbone.eval()
        banks: dict[str, list[torch.Tensor]] = {}
        for i in range(0, len(rotated), 16):
            feats = self.features(rotated[i:i + 16])
            for f, c in zip(feats, owners[i:i + 16]):
                banks.setdefault(c, []).append(f.flatten(1).T)
        self.banks = {c: torch.cat(v).contiguous() for c, v in banks.items()}

    def _select_strengths(self, fit_part: TrainSet, holdout: TrainSet, context: FitContext, prefix: str
                          ) -> dict[str, Any]:
        """Choose λ per category on pseudo-validation images (:mod:`harness_anomalysd.selection`)."""
        s = self.settings
        fixed = dict(s.noise_strength_per_category)
        candidates = list(s.lambda_candidates)
        per_category = s.lambda_val_per_category
        held = holdout.by_category()
        fitted = fit_part.by_category()
        categories = [c for c in fit_part.categories if c not in fixed]
        if self.dev_run:
            # The real selection code on one category, one candidate and two images (an
            # inpainting of the paper's networks costs minutes on a CPU).
            categories, candidates, per_category = categories[:1], candidates[:1], 2
        with context.checkpoint.stage(prefix + "lambda", unet=self.unet, vae=self.vae) as position:
            if not position.done:
                sources, images, cats = {}, [], []
                for c in categories:
                    source, indices = (holdout, held[c]) if held.get(c) else (fit_part, fitted[c])
                    sources[c] = "held out (unseen by the model)" if source is holdout else "augmented copies of " \
                        "the shots the model was fine-tuned on (seen: nothing to hold out)"
                    for i in indices:
                        images.append(source[i][0])
                        cats.append(c)
                per_cat: dict[str, Any] = {}
                if images:
                    val = selection.pseudo_validation(torch.stack(images), cats, per_category,
                                                      int(context.seed) + 7919, self._augment)
                    labels = val.labels
                    results: dict[str, dict[float, dict[str, float]]] = {c: {} for c in categories}
                    for lam in candidates:
                        maps = self.anomaly_maps(val.images.to(self.device), val.categories,
                                                 {c: lam for c in categories})
                        scores = maps.flatten(1).amax(1)
                        for c in categories:
                            idx = torch.tensor([i for i, v in enumerate(val.categories) if v == c])
                            results[c][lam] = selection.criterion(maps[idx], scores[idx], labels[idx],
                                                                  val.masks[idx])
                    for c in categories:
                        chosen = selection.choose(results[c], s.noise_strength)
                        per_cat[c] = {"lambda": chosen, "source": sources[c],
                                      "images": int(sum(v == c for v in val.categories)),
                                      "candidates": {str(lam): {k: round(v, 4) for k, v in r.items()}
                                                     for lam, r in results[c].items()}}
                position.extra["per_category"] = per_cat
            per_cat = dict(position.extra.get("per_category", {}))
        self.strengths = {c: float(v["lambda"]) for c, v in per_cat.items()}
        return {"selection": s.lambda_selection, "criterion": "mean of image and pixel AUROC on pseudo-validation "
                "images (augmented copies, half with a pasted fragment)", "candidates": candidates,
                "per_category": per_cat, "held_out": {c: [holdout.samples[i].key for i in v] for c, v in held.items()},
                "explicit": fixed}
