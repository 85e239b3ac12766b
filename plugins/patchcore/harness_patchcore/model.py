"""PatchCore (Roth et al., CVPR 2022): a coreset of pretrained patch features, scored by k-NN.

Facts followed, from the paper and the authors' code (amazon-science/patchcore-inspection):

- features of WideResNet-50-2 ``layer2`` and ``layer3`` (ImageNet weights), each averaged over its
  3×3 neighbourhood, ``layer3`` upsampled bilinearly to ``layer2``'s grid;
- each layer's feature vector adaptively average-pooled to ``pretrain_embed_dim`` channels, the
  layers stacked and pooled again to ``target_embed_dim`` (the code's "preprocessing" and
  "aggregator");
- a memory bank of every training patch, reduced by greedy coreset selection to
  ``coreset_ratio`` (10 %) on a random projection;
- patch score = Euclidean distance to the nearest bank patch; image score = the largest patch
  score (the code's default, not the paper's re-weighted Eq. 7); anomaly map = patch scores
  upsampled bilinearly to the input size and smoothed with a Gaussian of σ = 4.

Where the harness differs from the code: images are resized straight to ``image_size`` (the code
resizes to 256 and centre-crops 224, which would hide defects at the border from the metrics);
the neighbourhood aggregation is a 3×3 mean over the feature map (the code unfolds 3×3 patches
and pools them, which is the same mean).

The ``tiny`` profile runs the same code with a randomly initialised WideResNet-50-2 (no weights
offline) at 128 px, ``layer1`` + ``layer2`` with 512-d embeddings and a 2 % coreset, seeded from
the job and with BatchNorm statistics re-estimated on the training images. Random features are
far weaker than ImageNet ones: on the embedded synthetic set it reaches an image AUROC of about
0.78 (multi-class), against the high 0.9s that pretrained PatchCore reaches on MVTec AD. It
exercises the code path; it is not a measure of PatchCore's accuracy.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F

from harness import FitContext, Method, Prediction, TrainSet
from harness.toolkit.backbones import create_features, load_weights, recalibrate_batchnorm
from harness.toolkit.coreset import greedy_coreset
from harness.toolkit.ops import gaussian_blur, imagenet_normalize, nearest_neighbour_distance, resize_maps
from harness.toolkit.precision import autocast


class PatchCore(Method):
    """PatchCore with a single memory bank for every category of the job.

    Parameters
    ----------
    settings : Settings
        See :data:`harness_patchcore.plugin.SETTINGS`.
    """

    def __init__(self, settings: Mapping[str, Any]) -> None:
        super().__init__(settings)
        self.backbone = create_features(self.settings.backbone, self.settings.backbone_layers)
        self.bank = torch.zeros(0, self.settings.target_embed_dim)

    def networks(self) -> Mapping[str, torch.nn.Module]:
        """The feature extractor (the memory bank is state, not a network)."""
        return {"backbone": self.backbone}

    def to(self, device: torch.device | str) -> "PatchCore":
        """Move the backbone and the memory bank."""
        super().to(device)
        self.bank = self.bank.to(self.device)
        return self

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch features of a batch: (B, h, w, D) on ``layer2``'s grid."""
        layers = self.backbone(imagenet_normalize(images))
        grid = layers[0].shape[-2:]
        pooled = []
        for feats in layers:
            feats = F.avg_pool2d(feats, kernel_size=3, stride=1, padding=1)
            if feats.shape[-2:] != grid:
                feats = F.interpolate(feats, size=grid, mode="bilinear", align_corners=False)
            b, c, h, w = feats.shape
            per_position = feats.permute(0, 2, 3, 1).reshape(-1, 1, c)
            pooled.append(F.adaptive_avg_pool1d(per_position, self.settings.pretrain_embed_dim)[:, 0])
        stacked = torch.stack(pooled, dim=1).reshape(pooled[0].shape[0], 1, -1)
        embedded = F.adaptive_avg_pool1d(stacked, self.settings.target_embed_dim)[:, 0]
        return embedded.reshape(images.shape[0], grid[0], grid[1], -1)

    def fit(self, train: TrainSet, context: FitContext) -> None:
        """Build the memory bank from every training patch and reduce it to a coreset.

        With ``backbone_pretrained`` (and not ``--weights random``) the backbone's ImageNet weights
        are read from disk through ``context.weights`` (never downloaded); a missing file raises
        :class:`harness.WeightsNotFoundError` naming the file and the pull command. Otherwise the
        backbone is re-initialised from ``context.seed`` and its BatchNorm statistics are
        re-estimated on the training images (see :meth:`_random_backbone`). The finished bank is
        checkpointed as one stage, so a killed job does not extract the features again.
        """
        from harness_patchcore.plugin import weight_files

        s = self.settings
        with context.checkpoint.stage("memory_bank", backbone=self.backbone, bank=_Bank(self)) as position:
            if position.done:
                context.info.update(position.extra.get("info", {}))
                return
            files = [] if context.random_weights else weight_files(s)
            if files:
                source = load_weights(self.backbone, files[0], context.weights, s)
                context.info.update(backbone_init="imagenet", backbone_weights=str(source))
            else:
                self._random_backbone(train, context.seed, s.train_batch_size)
                context.info["backbone_init"] = "random"
            self.backbone.to(self.device).eval()
            patches = []
            batches = train.batches(s.train_batch_size)
            with torch.no_grad(), autocast(self.device, s.precision):
                for images, _ in context.progress.iterate(batches, total=-(-len(train) // s.train_batch_size),
                                                          desc="patchcore features"):
                    patches.append(self.embed(images.to(self.device)).float().reshape(-1, s.target_embed_dim))
            bank = torch.cat(patches)
            keep = greedy_coreset(bank, s.coreset_ratio, projection_dim=s.coreset_projection_dim or None,
                                  seed=context.seed)
            self.bank = bank[keep].contiguous()
            context.info["memory_bank"] = {"patches": int(bank.shape[0]), "coreset": int(self.bank.shape[0]),
                                           "coreset_ratio": s.coreset_ratio}
            position.extra["info"] = dict(context.info)

    def _random_backbone(self, train: TrainSet, seed: int, batch_size: int) -> None:
        """Seeded random weights with BatchNorm statistics re-estimated on ``train``.

        The factory's random weights depend on whatever the global RNG held when it ran;
        re-initialising from the job's seed makes the fit reproducible. BatchNorm running
        statistics of a freshly initialised network are (0, 1), which does not match the
        activations real images produce: some channels saturate and others vanish, and the
        nearest-neighbour distances are dominated by a few channels. Re-estimating them on the
        training images (one pass in train mode, cumulative average, no gradients, normal images
        only) standardises every channel, which makes random features markedly better for
        PatchCore's scoring. It is the only "training" the tiny profile does.
        """
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            fresh = create_features(self.settings.backbone, self.settings.backbone_layers)
        self.backbone.load_state_dict(fresh.state_dict())
        self.backbone.to(self.device)
        recalibrate_batchnorm(self.backbone, (imagenet_normalize(x.to(self.device))
                                              for x, _ in train.batches(batch_size)))

    @torch.no_grad()
    def predict(self, images: torch.Tensor, categories: Sequence[str]) -> Prediction:
        """Score a batch against the single memory bank (``categories`` is not needed).

        Patch score = Euclidean distance to the nearest bank patch (k = 1). Image score = the
        largest *unsmoothed* patch score, as the official code computes it by default (the
        paper's Eq. 7 re-weighting by neighbourhood density is not used there either). Anomaly
        map = patch scores upsampled bilinearly to the input size, then Gaussian-smoothed with
        ``smoothing_sigma`` (4 px).
        """
        with autocast(self.device, self.settings.precision):
            feats = self.embed(images).float()
        b, h, w, d = feats.shape
        dist, _ = nearest_neighbour_distance(feats.reshape(-1, d), self.bank, k=1)
        patch_scores = dist[:, 0].reshape(b, h, w)
        image_scores = patch_scores.flatten(1).amax(1)
        maps = resize_maps(patch_scores, images.shape[-2:])
        maps = gaussian_blur(maps, self.settings.smoothing_sigma)
        return Prediction(maps, image_scores)

    def state_dict(self) -> dict[str, Any]:
        """Backbone (its BatchNorm statistics may be recalibrated) and memory bank."""
        return {"backbone": self.backbone.state_dict(), "bank": self.bank.cpu()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.backbone.load_state_dict(state["backbone"])
        self.bank = state["bank"].to(self.device)


class _Bank:
    """The memory bank as a checkpointable object (``state_dict`` / ``load_state_dict``)."""

    def __init__(self, method: PatchCore) -> None:
        self.method = method

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"bank": self.method.bank.cpu()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.method.bank = state["bank"].to(self.method.device)
