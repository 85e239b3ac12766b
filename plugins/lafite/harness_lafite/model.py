"""LafitE as a harness method: feature diffusion, coreset feature editing, pseudo-validation.

Fit
    1. Backbone: ImageNet weights read from disk (``pretrained``), or seeded random weights with
       BatchNorm statistics re-estimated on the training images (``tiny``); recorded in
       ``context.info["backbone_init"]``.
    2. The aggregated feature tensor of every training image (:mod:`harness_lafite.features`).
       With ``feature_standardize`` each channel is standardised with the training mean and
       standard deviation, so that the tensor has the unit scale the noise schedule assumes (the
       paper is silent on feature scaling; latent diffusion rescales its latents for the same
       reason). Editing, diffusion and the reconstruction error all live in that space.
    3. Memory bank of every training slice, reduced to a greedy coreset (``coreset_ratio``).
    4. The U-Net is trained on the feature tensors (Eq. 6), AdamW, the learning rate dropped by
       ``lr_drop_factor`` after ``lr_drop_at`` of the epochs.
    5. tau (editing off) and then K are chosen on the pseudo-validation set from the core
       (:mod:`harness_lafite.selection`); a grid of one value fixes it without a search.

Predict
    Features -> (edit, Eq. 10) -> noise to tau (Eq. 11) -> DDIM back to 0 (Eq. 7) -> squared L2
    error to the unedited features -> bilinear upsampling -> Gaussian (sigma = 4) -> image score =
    max after average pooling (:mod:`harness_lafite.scoring`). ``feature_editing=False`` runs the
    paper's "LafitE w/o F.E." ablation (the diffusion starts from the unedited features).
"""

from __future__ import annotations

import time
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from harness import FitContext, Method, Prediction, TrainSet
from harness.backbones import load_pretrained
from harness_lafite.diffusion import build_noise_schedule, build_unet, diffusion_loss, reconstruct
from harness_lafite.editing import WEIGHTINGS, coreset_bank, edit_features
from harness_lafite.features import MultiScaleFeatures
from harness_lafite.scoring import pooled_max, reconstruction_maps
from harness_lafite.selection import select_tau_then_k


class LafitE(Method):
    """Latent diffusion over pretrained CNN features with memory-bank feature editing.

    Parameters
    ----------
    settings : mapping
        A resolved profile, documented in :data:`harness_lafite.plugin.SETTINGS_HELP`. Building
        reads no file, so it works under ``torch.device("meta")``.
    """

    def __init__(self, settings: Mapping[str, Any]) -> None:
        super().__init__(settings)
        s = self.settings
        if s["editing_weights"] not in WEIGHTINGS:
            raise ValueError(f"editing_weights must be one of {WEIGHTINGS}, not {s['editing_weights']!r}")
        bad_k = [k for k in s["k_grid"] if int(k) < 2]
        if bad_k:
            raise ValueError(f"k_grid values must be >= 2 (Eq. 10 gives all-zero slices for K = 1), got {bad_k}")
        bad_tau = [t for t in s["tau_grid"] if not 1 <= int(t) < int(s["T"])]
        if bad_tau:
            raise ValueError(f"tau_grid values must be in [1, T-1] = [1, {int(s['T']) - 1}], got {bad_tau}")
        self.features = MultiScaleFeatures(s["backbone"], s["layers"], int(s["feature_size"]))
        channels = self.features.channels
        self.unet = build_unet(channels, int(s["feature_size"]), base_channels=int(s["base_channels"]),
                               channel_mults=s["channel_mults"], layers_per_block=int(s["layers_per_block"]),
                               attention_resolutions=s["attention_resolutions"],
                               attention_head_dim=int(s["attention_head_dim"]), norm_groups=int(s["norm_groups"]),
                               dropout=float(s["dropout"]))
        self.schedule = build_noise_schedule(int(s["T"]), s["beta_schedule"])
        self.mean = torch.zeros(channels)
        self.std = torch.ones(channels)
        self.bank = torch.zeros(0, channels)
        self.tau: int = int(s["tau_grid"][0])
        self.k: int | None = int(s["k_grid"][0]) if s["feature_editing"] else None

    def networks(self) -> Mapping[str, torch.nn.Module]:
        """The feature extractor and the noise-prediction U-Net."""
        return {"backbone": self.features, "unet": self.unet}

    def to(self, device: torch.device | str) -> "LafitE":
        """Move the networks, the standardisation statistics and the memory bank."""
        super().to(device)
        self.mean, self.std, self.bank = (t.to(self.device) for t in (self.mean, self.std, self.bank))
        return self

    # ------------------------------------------------------------------ features

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Standardised aggregated features (B, C, g, g) of images in [0, 1]."""
        feats = self.features(images.to(self.device).float())
        if self.settings["feature_standardize"]:
            feats = (feats - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)
        return feats

    def _prepare_backbone(self, train: TrainSet, context: FitContext) -> None:
        s = self.settings
        if s["pretrained"]:
            source = load_pretrained(self.features.backbone, s["backbone"], context.weights, s.get("weights_file") or None)
            context.info.update(backbone_init="imagenet", backbone_weights=str(source))
        else:
            self.features.reinitialise(context.seed, (x.to(self.device) for x, _ in
                                                      train.batches(int(s["feature_batch_size"]))))
            context.info["backbone_init"] = "random"
        self.features.to(self.device).eval()

    @torch.no_grad()
    def _encode_all(self, images: torch.Tensor | TrainSet, context: FitContext, desc: str) -> torch.Tensor:
        """Features of a TrainSet or an image tensor, batch by batch, on :attr:`device`."""
        size = int(self.settings["feature_batch_size"])
        if isinstance(images, TrainSet):
            batches = (x for x, _ in images.batches(size))
            total = -(-len(images) // size)
        else:
            batches = (images[i:i + size] for i in range(0, len(images), size))
            total = -(-len(images) // size)
        return torch.cat([self.encode(x) for x in context.progress.iterate(batches, total=total, desc=desc)])

    # ------------------------------------------------------------------ training

    def _train_unet(self, feats: torch.Tensor, context: FitContext) -> dict[str, Any]:
        s = self.settings
        epochs, batch_size = int(s["epochs"]), min(int(s["batch_size"]), len(feats))
        optimiser = torch.optim.AdamW(self.unet.parameters(), lr=float(s["lr"]), weight_decay=float(s["weight_decay"]))
        milestone = max(1, int(round(float(s["lr_drop_at"]) * epochs)))
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimiser, milestones=[milestone],
                                                         gamma=float(s["lr_drop_factor"]))
        generator = torch.Generator(device=self.device).manual_seed(int(context.seed))
        order_rng = torch.Generator().manual_seed(int(context.seed))
        self.unet.train()
        start, steps, losses = time.perf_counter(), 0, []
        for _ in context.progress.epochs(epochs, desc="lafite diffusion"):
            order = torch.randperm(len(feats), generator=order_rng)
            epoch_losses = []
            for i in range(0, len(feats), batch_size):
                x0 = feats[order[i:i + batch_size]].to(self.device)
                loss = diffusion_loss(self.unet, self.schedule, x0, generator)
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                epoch_losses.append(loss.item())
                steps += 1
            scheduler.step()
            losses.append(float(np.mean(epoch_losses)))
        self.unet.eval()
        return {"epochs": epochs, "batch_size": batch_size, "steps": steps, "lr_drop_epoch": milestone,
                "first_epoch_loss": round(losses[0], 5) if losses else None,
                "final_epoch_loss": round(losses[-1], 5) if losses else None,
                "train_seconds": round(time.perf_counter() - start, 2)}

    def fit(self, train: TrainSet, context: FitContext) -> None:
        """Extract features, build the coreset bank, train the diffusion U-Net, choose tau and K.

        Parameters
        ----------
        train : TrainSet
            Normal images of every category of the job.
        context : FitContext
            ``context.weights`` finds the backbone weights (a missing file raises
            :class:`harness.WeightsNotFoundError`); ``context.pseudo_validation`` gives the
            synthetic anomalies tau and K are chosen on.
        """
        s = self.settings
        self._prepare_backbone(train, context)
        # Identity statistics first, so that encode() returns the raw features to measure.
        self.mean, self.std = torch.zeros_like(self.mean), torch.ones_like(self.std)
        feats = self._encode_all(train, context, "lafite features")
        if s["feature_standardize"]:
            # Statistics over every training position; the floor keeps dead channels finite.
            self.mean = feats.mean(dim=(0, 2, 3))
            self.std = feats.std(dim=(0, 2, 3)).clamp_min(1e-6)
            feats = (feats - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)
        channels = feats.shape[1]
        slices = feats.permute(0, 2, 3, 1).reshape(-1, channels)
        projection = int(s["coreset_projection_dim"]) or None
        self.bank = coreset_bank(slices, float(s["coreset_ratio"]), projection, int(context.seed))
        context.info.update({
            "feature_channels": int(channels), "feature_size": int(s["feature_size"]),
            "memory_bank": {"slices": int(slices.shape[0]), "coreset": int(self.bank.shape[0]),
                            "coreset_ratio": float(s["coreset_ratio"])},
        })
        context.info["training"] = self._train_unet(feats, context)
        context.info["selection"] = self._select(context)

    # ------------------------------------------------------------------ hyperparameter selection

    def _select(self, context: FitContext) -> dict[str, Any]:
        """Choose tau and K on the pseudo-validation set and keep them (no test image is used)."""
        s = self.settings
        editing = bool(s["feature_editing"])
        taus, ks = [int(t) for t in s["tau_grid"]], [int(k) for k in s["k_grid"]]
        searched = len(taus) > 1 or (editing and len(ks) > 1)
        info: dict[str, Any] = {"feature_editing": editing, "criterion": "pseudo-validation image AUROC, "
                                "mean over categories; tau with editing off, then K with editing on"}
        if searched:
            start = time.perf_counter()
            pv = context.pseudo_validation(int(s["pseudo_val_per_category"]), int(s["pseudo_val_seed"]))
            feats = self._encode_all(pv.images, context, "lafite pseudo-validation")
            size = tuple(pv.images.shape[-2:])
            labels = pv.labels.cpu().numpy()

            def evaluate(tau: int, k: int | None) -> np.ndarray:
                return np.concatenate([self._score(feats[i:i + self.eval_batch_size], size, tau, k)[1].cpu().numpy()
                                       for i in range(0, len(feats), self.eval_batch_size)])

            chosen = select_tau_then_k(evaluate, labels, pv.categories, taus, ks, editing)
            info["pseudo_validation"] = {"images": len(pv), "anomalous": int(labels.sum()),
                                         "per_category": int(s["pseudo_val_per_category"]),
                                         "seed": int(s["pseudo_val_seed"]),
                                         "search_seconds": round(time.perf_counter() - start, 2)}
        else:
            chosen = select_tau_then_k(lambda t, k: np.zeros(0), np.zeros(0), [], taus, ks, editing)
        self.tau, self.k = chosen["tau"], chosen["k"]
        info.update(chosen)
        info["searched"] = searched
        return info

    # ------------------------------------------------------------------ inference

    @torch.no_grad()
    def _score(self, x0: torch.Tensor, size: tuple[int, int], tau: int, k: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Maps (B, H, W) and image scores (B,) of standardised features ``x0`` for given tau, K."""
        s = self.settings
        start = edit_features(x0, self.bank, k, s["editing_weights"]) if k is not None else x0
        generator = torch.Generator(device=x0.device).manual_seed(int(s["inference_seed"]))
        rec = reconstruct(self.unet, self.schedule, start, tau, int(s["ddim_steps"]), float(s["ddim_eta"]), generator)
        maps = reconstruction_maps(x0, rec, size, float(s["smoothing_sigma"]))
        return maps, pooled_max(maps, int(s["score_pool_size"]))

    @torch.no_grad()
    def predict(self, images: torch.Tensor, categories: Sequence[str]) -> Prediction:
        """Reconstruct the (edited) features from step tau and score the reconstruction error.

        Parameters
        ----------
        images : torch.Tensor
            (B, 3, H, W) in [0, 1].
        categories : sequence of str
            Unused: one model and one memory bank serve every category.

        Returns
        -------
        Prediction
            Maps (B, H, W) and image scores (B,), float32.
        """
        x0 = self.encode(images)
        maps, scores = self._score(x0, tuple(images.shape[-2:]), self.tau, self.k)
        return Prediction(maps.float(), scores.float())

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Networks, standardisation statistics, memory bank and the chosen tau and K."""
        return {"backbone": self.features.state_dict(), "unet": self.unet.state_dict(), "mean": self.mean.cpu(),
                "std": self.std.cpu(), "bank": self.bank.cpu(), "tau": int(self.tau),
                "k": -1 if self.k is None else int(self.k)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.features.load_state_dict(state["backbone"])
        self.unet.load_state_dict(state["unet"])
        self.mean, self.std, self.bank = (state[key].to(self.device) for key in ("mean", "std", "bank"))
        self.tau = int(state["tau"])
        self.k = None if int(state["k"]) < 0 else int(state["k"])
