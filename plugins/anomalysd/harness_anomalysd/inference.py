"""AnomalySD's inference: the denoising plan, multi-scale masked inpainting, the scores and maps."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from harness import Prediction
from harness.method import FAST_DEV_STEPS
from harness.toolkit.ops import gaussian_blur, nearest_neighbour_distance
from harness.toolkit.noise import ImageNoise
from harness_anomalysd import sampling
from harness_anomalysd.masks import grid_masks, prototype_mask
from harness_anomalysd.scoring import feature_distance, fuse, harmonic_mean, lpips_features, scale_map


class AnomalySDInference:
    """The inference of :class:`~harness_anomalysd.model.AnomalySD`: denoising plan, inpainting, scores, maps.

    A mixin: the networks, settings and state are :class:`~harness_anomalysd.model.AnomalySD`'s.
    """

    def noise_strength(self, category: str) -> float:
        """λ of ``category``: ``noise_strength_per_category``, else the chosen one, else ``noise_strength``."""
        explicit = dict(self.settings.noise_strength_per_category)
        if category in explicit:
            return float(explicit[category])
        return float(self.strengths.get(category, self.settings.noise_strength))

    def timesteps(self, strength: float) -> list[int]:
        """The timesteps one inpainting visits at ``strength`` (few in a fast dev run)."""
        s = self.settings
        steps = sampling.inference_timesteps(strength, s.denoising_steps, s.step_schedule, len(self.abar))
        return steps[:FAST_DEV_STEPS] if self.dev_run else steps

    def scales(self) -> tuple[int, ...]:
        """Grid scales used by predict (only the first in a fast dev run)."""
        return tuple(self.settings.scales[:1]) if self.dev_run else tuple(self.settings.scales)

    def _denoising_info(self, categories: Sequence[str]) -> dict[str, Any]:
        s = self.settings
        per_cat = {}
        for c in categories:
            lam = self.noise_strength(c)
            steps = self.timesteps(lam)
            per_cat[c] = {"lambda": lam, "start_timestep": steps[0] if steps else None,
                          "start_step_paper": int(round(lam * len(self.abar))), "steps_run": len(steps)}
        return {"denoising": {"step_schedule": s.step_schedule, "denoising_steps": s.denoising_steps,
                              "sampler": "DDIM (eta = 0)", "per_category": per_cat, "dev_run_limits": self.dev_run}}

    @torch.no_grad()
    def inpaint(self, images: torch.Tensor, masks: torch.Tensor, latents: torch.Tensor, noise: torch.Tensor,
                cond: torch.Tensor, strength: float) -> torch.Tensor:
        """Inpaint ``images`` under ``masks`` starting from exactly the step ``λ·T`` (Eq. 11); one batch.

        Parameters
        ----------
        images : (N, 3, H, W) in [0, 1]
        masks : (N, H, W), 1 = inpaint
        latents : (N, 4, h, w) scaled clean latents ``E(x)``
        noise : (N, 4, h, w) the starting noise
        cond : (N, L, width) prompt embeddings
        strength : float
            λ in [0, 1].

        Returns
        -------
        torch.Tensor
            (N, 3, H, W) inpainted images in [0, 1], float32.
        """
        steps = self.timesteps(strength)
        with self._autocast():
            if not steps:
                return self.decode(latents)
            z_masked = self.encode_masked(images, masks)
            z = sampling.add_noise(latents.float(), noise, steps[0], self.abar)
            guidance = self.settings.guidance_scale
            uncond = self.encode_prompts([""]).expand(cond.shape[0], -1, -1) if guidance > 1 else None
            # The timesteps go to the device once: an int would be copied there at every UNet call.
            on_device = torch.tensor(steps, device=z.device, dtype=torch.long)
            for i, t in enumerate(steps):
                inp = self.unet_input(z, masks, z_masked)
                if uncond is None:
                    eps = self.unet(inp, on_device[i], encoder_hidden_states=cond).sample
                else:
                    both = self.unet(torch.cat([inp, inp]), on_device[i],
                                     encoder_hidden_states=torch.cat([uncond, cond])).sample
                    eps_u, eps_c = both.float().chunk(2)
                    eps = eps_u + guidance * (eps_c - eps_u)
                z = sampling.ddim_step(z.float(), eps.float(), t, steps[i + 1] if i + 1 < len(steps) else None,
                                       self.abar)
            return self.decode(z)

    def _distances(self, images, feats, masks, latents, noise, cond, strength, owner) -> torch.Tensor:
        """``D(x, x̂)`` for pairs (image ``owner[i]``, mask ``i``), ``inpaint_batch`` at a time; (N, H, W).

        ``feats`` are the images' LPIPS features, computed once and shared by all their masks; the
        distance is computed in float32.
        """
        chunk = self.settings.inpaint_batch
        out = []
        for a in range(0, masks.shape[0], chunk):
            idx = owner[a:a + chunk]
            x_hat = self.inpaint(images[idx], masks[a:a + chunk], latents[idx], noise[idx], cond[idx], strength)
            out.append(feature_distance(self.lpips, [f[idx] for f in feats], lpips_features(self.lpips, x_hat),
                                        images.shape[-2:]))
        return torch.cat(out)

    @torch.no_grad()
    def score_maps(self, images: torch.Tensor, categories: Sequence[str], strength: float,
                   seeds: Sequence[int] | None = None) -> dict[str, Any]:
        """Unsmoothed maps of images that share one noise strength.

        ``seeds``: one per image (else by position); each image's starting noise comes from its
        own seed mixed with ``inference_seed`` (shared by all its masks), so maps do not depend
        on the batch.

        Returns
        -------
        dict
            ``scales`` (list of (B, H, W) ``S^(k)``, empty when only the prototype branch runs),
            ``multi_scale`` (Eq. 19 or None), ``prototype`` (Eq. 20 or None), ``prototype_masks``
            (or None), ``map`` (Eq. 21, or the one branch ``anomaly_map`` asks for).
        """
        s = self.settings
        b, _, height, width = images.shape
        with self._autocast():
            latents = self.encode(images).float()
        noise = ImageNoise(seeds, b, latents.device, base=s.inference_seed).randn_like(latents)
        cond = torch.stack([self.prompt_embedding(c) for c in categories])
        feats = lpips_features(self.lpips, images)
        per_scale, multi = [], None
        with_banks = self.uses_prototypes and all(c in self.banks for c in categories)
        if s.anomaly_map != "prototype" or not with_banks:
            for k in self.scales():
                masks = grid_masks(height, width, k, device=images.device)
                n = masks.shape[0]
                # Every (image, patch) pair of the scale in one flat batch, image-major.
                owner = torch.arange(b, device=images.device).repeat_interleave(n)
                dist = self._distances(images, feats, masks.repeat(b, 1, 1), latents, noise, cond, strength, owner)
                per_scale.append(scale_map(masks, dist.view(b, n, height, width)))
            multi = harmonic_mean(per_scale)
        proto, proto_masks = None, None
        if with_banks and s.anomaly_map != "multi_scale":
            psi = self.features(images)
            errors = []
            for i, c in enumerate(categories):
                d, _ = nearest_neighbour_distance(psi[i].flatten(1).T, self.banks[c], k=1)
                errors.append((d[:, 0] ** 2).view(psi.shape[-2:]))
            proto_masks = prototype_mask(torch.stack(errors), (height, width))
            owner = torch.arange(b, device=images.device)
            proto = proto_masks * self._distances(images, feats, proto_masks, latents, noise, cond, strength, owner)
        if s.anomaly_map == "prototype" and proto is not None:
            final = proto
        elif s.anomaly_map == "multi_scale" or proto is None:
            final = multi
        else:
            final = fuse(multi, proto, s.alpha)
        return {"scales": per_scale, "multi_scale": multi, "prototype": proto, "prototype_masks": proto_masks,
                "map": final}

    @torch.no_grad()
    def anomaly_maps(self, images: torch.Tensor, categories: Sequence[str],
                     strengths: Mapping[str, float] | None = None, seeds: Sequence[int] | None = None) -> torch.Tensor:
        """Smoothed final maps (B, H, W), float32; images grouped by their category's λ.

        ``seeds``: one per image (else by position in ``images``)."""
        seeds = list(range(images.shape[0])) if seeds is None else list(seeds)
        maps = torch.zeros(images.shape[0], *images.shape[-2:], device=images.device)
        lams = [float(strengths[c]) if strengths and c in strengths else self.noise_strength(c) for c in categories]
        for lam in sorted(set(lams)):
            idx = [i for i, v in enumerate(lams) if v == lam]
            maps[idx] = self.score_maps(images[idx], [categories[i] for i in idx], lam,
                                        [seeds[i] for i in idx])["map"].float()
        return gaussian_blur(maps, self.settings.smoothing_sigma)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, categories: Sequence[str],
                seeds: Sequence[int] | None = None) -> Prediction:
        """Anomaly maps (Eq. 21, Gaussian-smoothed) and image scores (their maxima), float32.

        ``seeds``: one per image (the runner's), so predictions do not depend on the batch."""
        maps = self.anomaly_maps(images.to(self.device).float(), categories, seeds=seeds)
        return Prediction(maps, maps.flatten(1).amax(1))
