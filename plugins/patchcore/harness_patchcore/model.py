"""PatchCore (Roth et al., CVPR 2022): a coreset of pretrained patch features, scored by k-NN.

Facts followed, from the paper and the authors' code (amazon-science/patchcore-inspection,
``src/patchcore``); the ``paper`` profile follows the code where the two differ:

- images resized so that their *shorter side* is 256, the aspect ratio kept (torchvision's
  ``Resize(256)`` in their loader, bilinear, antialiased: ``resize_mode="shorter_side"``; VisA's
  1500 x 1000 images become 384 x 256), then centre-cropped to 224 x 224 (``--resize 256
  --imagesize 224``; setting ``center_crop``);
- features of WideResNet-50-2 ``layer2`` and ``layer3`` (torchvision's ImageNet V1 weights);
- local aggregation exactly as their ``PatchMaker`` and ``MeanMapper`` do it: every position's
  3 x 3 neighbourhood is unfolded (zero padding 1, stride 1) into a (C, 3, 3) patch; the patches of
  ``layer3`` are resized bilinearly (``align_corners=False``) to ``layer2``'s grid, element by
  element; each patch is flattened channel-major (C * 9 values) and adaptively average-pooled to
  ``pretrain_embed_dim`` (1024) values; the layers' vectors are concatenated and pooled again to
  ``target_embed_dim`` (1024). For ``layer2`` (512 channels: 4608 values pooled to 1024, windows of
  4.5) output ``2c`` is the mean of the first five entries of channel c's neighbourhood and
  ``2c + 1`` of the last five, both holding the centre; the final pooling averages such pairs, so
  a ``layer2`` channel ends up with weight 0.2 on the centre and 0.1 on each neighbour, not the
  1/9 of a plain 3 x 3 mean. ``layer3`` (9216 values to 1024) gets plain 3 x 3 means, and the
  final pooling averages pairs of adjacent channels;
- a memory bank of every training patch, reduced to ``int(0.1 * N)`` patches by their approximate
  greedy coreset (random projection to 128 dimensions; the first pick is the row farthest, on
  average, from 10 random rows);
- patch score = distance to the nearest bank patch as their FAISS ``IndexFlatL2`` returns it, i.e.
  the *squared* L2 distance (setting ``distance``; the paper writes the plain norm); image score
  = the largest patch score (the code's default, not the paper's re-weighted Eq. 7); anomaly map
  = patch scores upsampled bilinearly to the crop and smoothed with a Gaussian of sigma 4.

The centre crop and the rest of the image: the authors crop masks as they crop images, so their
metrics never see what lies outside the 224 x 224 crop (the outer 16 px of a square image, and
on VisA also the 80 px at either end of the long side). The harness scores every pixel of every
image with one metric code, so the crop's map is pasted back onto a map of the whole resized
image (:func:`harness.toolkit.crops.paste_crop`, at the place :func:`~harness.toolkit.crops.
center_crop_box` took it from), the outside filled with the image's lowest score; the evaluator
then resizes that full-image map bilinearly to its grid (the harness grid: 256 x 256 over the
whole image; ``--eval-grid paper``: the authors' crop). A defect lying only outside the crop
counts as missed (pixel metrics, AUPRO), and an image whose only defect is there gets the score
of its crop. ``center_crop=0`` uses the whole image instead.

The ``tiny`` profile runs the same code with a randomly initialised WideResNet-50-2 (no weights
offline) at 128 px without a crop, ``layer1`` + ``layer2`` with 512-d embeddings and a 2 % coreset,
seeded from the job and with BatchNorm statistics re-estimated on the training images. Random
features are far weaker than ImageNet ones: it exercises the code path; it is not a measure of
PatchCore's accuracy.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F

from harness import FitContext, Method, Prediction, TrainSet
from harness.toolkit.backbones import create_features, load_weights, recalibrate_batchnorm
from harness.toolkit.coreset import greedy_coreset
from harness.toolkit.crops import center_crop, center_crop_box, paste_crop
from harness.toolkit.ops import gaussian_blur, imagenet_normalize, nearest_neighbour_distance, resize_maps
from harness.toolkit.precision import autocast
from harness_patchcore.weightfiles import weight_files


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

    def crop(self, images: torch.Tensor) -> torch.Tensor:
        """The centre crop the backbone sees (torchvision's ``CenterCrop`` rounding); all of it without one."""
        return center_crop(images, center_crop_box(images.shape[-2:], self.settings.center_crop))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch features of a batch of (cropped) images: (B, h, w, D) on the first layer's grid."""
        layers = self.backbone(imagenet_normalize(images))
        return aggregate_patches(layers, self.settings.patchsize, self.settings.pretrain_embed_dim,
                                 self.settings.target_embed_dim)

    def fit(self, train: TrainSet, context: FitContext) -> None:
        """Build the memory bank from every training patch and reduce it to a coreset.

        With ``backbone_pretrained`` (and not ``--weights random``) the backbone's ImageNet weights
        are read from disk through ``context.weights`` (never downloaded); a missing file raises
        :class:`harness.WeightsNotFoundError` naming the file and the pull command. Otherwise the
        backbone is re-initialised from ``context.seed`` and its BatchNorm statistics are
        re-estimated on the training images (see :meth:`_random_backbone`). The finished bank is
        checkpointed as one stage, so a killed job does not extract the features again.
        """
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
                    feats = self.embed(self.crop(images.to(self.device))).float()
                    patches.append(feats.reshape(-1, s.target_embed_dim))
            bank = torch.cat(patches)
            # The authors' sampler keeps int(N * ratio) rows (at least one here).
            keep = greedy_coreset(bank, n=max(1, int(bank.shape[0] * s.coreset_ratio)),
                                  projection_dim=s.coreset_projection_dim or None, seed=context.seed,
                                  starting_points=s.coreset_starting_points)
            self.bank = bank[keep].contiguous()
            context.info["memory_bank"] = {"patches": int(bank.shape[0]), "coreset": int(self.bank.shape[0]),
                                           "coreset_ratio": s.coreset_ratio,
                                           "coreset_starting_points": s.coreset_starting_points}
            context.info["center_crop"] = self._crop_info(train[0][0].shape[-2:] if len(train) else train.size)
            context.info["resize"] = {"mode": self.resize_mode, "side": int(self.input_size[0]),
                                      "interpolation": self.interpolation, "antialias": self.antialias}
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
        recalibrate_batchnorm(self.backbone, (imagenet_normalize(self.crop(x.to(self.device)))
                                              for x, _ in train.batches(batch_size)))

    def _crop_info(self, size: Sequence[int]) -> dict[str, Any]:
        """What the crop keeps of an image of ``size``, for the record."""
        h, w = (int(v) for v in size)
        probe = self.crop(torch.zeros(1, 1, h, w, device="meta"))
        ch, cw = probe.shape[-2:]
        return {"side": int(self.settings.center_crop), "kept": [int(ch), int(cw)], "image": [h, w],
                "border_scored_as": "the image's lowest score" if (ch, cw) != (h, w) else None}

    @torch.no_grad()
    def predict(self, images: torch.Tensor, categories: Sequence[str]) -> Prediction:
        """Score a batch against the single memory bank (``categories`` is not needed).

        Patch score = the mean over ``num_neighbours`` (1) nearest bank patches of the squared
        (``distance="squared"``, the authors' FAISS) or plain Euclidean distance. Image score =
        the largest *unsmoothed* patch score, as the official code computes it by default (the
        paper's Eq. 7 re-weighting by neighbourhood density is not used there either). Anomaly
        map = patch scores upsampled bilinearly to the crop, Gaussian-smoothed with
        ``smoothing_sigma`` (4 px), and placed in a map of the input size whose outside-the-crop
        border holds the image's lowest score (see the module docstring).
        """
        s = self.settings
        cropped = self.crop(images)
        with autocast(self.device, s.precision):
            feats = self.embed(cropped).float()
        b, h, w, d = feats.shape
        k = min(int(s.num_neighbours), self.bank.shape[0])
        dist, _ = nearest_neighbour_distance(feats.reshape(-1, d), self.bank, k=k)
        if s.distance == "squared":
            dist = dist * dist
        patch_scores = dist.mean(dim=1).reshape(b, h, w)
        image_scores = patch_scores.flatten(1).amax(1)
        maps = gaussian_blur(resize_maps(patch_scores, cropped.shape[-2:]), s.smoothing_sigma)
        box = center_crop_box(images.shape[-2:], s.center_crop)
        return Prediction(paste_crop(maps, box, images.shape[-2:]).float(), image_scores.float())

    def state_dict(self) -> dict[str, Any]:
        """Backbone (its BatchNorm statistics may be recalibrated) and memory bank."""
        return {"backbone": self.backbone.state_dict(), "bank": self.bank.cpu()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.backbone.load_state_dict(state["backbone"])
        self.bank = state["bank"].to(self.device)


def aggregate_patches(layers: Sequence[torch.Tensor], patchsize: int, pretrain_dim: int,
                      target_dim: int) -> torch.Tensor:
    """PatchCore's locally aware patch features, as the authors' code computes them.

    Parameters
    ----------
    layers : sequence of torch.Tensor
        (B, C_l, h_l, w_l) feature maps; the first one's grid is the patch grid.
    patchsize : int
        Neighbourhood side p (3): each position's p x p neighbourhood (zero padding (p - 1) // 2,
        stride 1) is unfolded into C_l * p * p values.
    pretrain_dim : int
        Every layer's unfolded values, flattened channel-major, are adaptively average-pooled to
        this many (the authors' ``MeanMapper``).
    target_dim : int
        The layers' pooled vectors, concatenated in layer order, are pooled again to this many
        (their ``Aggregator``).

    Returns
    -------
    torch.Tensor
        (B, h_0, w_0, target_dim).

    Notes
    -----
    A later layer's unfolded values are resized to the first grid one by one (bilinear,
    ``align_corners=False``), as in the authors' ``_embed``. The pooling windows straddle the
    p * p entries of a channel (see the module docstring for what that weighs).
    """
    pad = (int(patchsize) - 1) // 2
    grid = None
    pooled = []
    for feats in layers:
        b, c, h, w = feats.shape
        unfolded = F.unfold(feats, kernel_size=int(patchsize), padding=pad, stride=1)
        side_h, side_w = h + 2 * pad - int(patchsize) + 1, w + 2 * pad - int(patchsize) + 1
        unfolded = unfolded.reshape(b, -1, side_h, side_w)
        if grid is None:
            grid = (side_h, side_w)
        elif (side_h, side_w) != grid:
            # channels_last: the same values (bilinear weighs each channel alone), and on a CPU six
            # times faster for thousands of unfolded channels on a small grid.
            unfolded = F.interpolate(unfolded.contiguous(memory_format=torch.channels_last), size=grid,
                                     mode="bilinear", align_corners=False)
        per_position = unfolded.permute(0, 2, 3, 1).reshape(-1, 1, unfolded.shape[1])
        pooled.append(F.adaptive_avg_pool1d(per_position, int(pretrain_dim))[:, 0])
    stacked = torch.stack(pooled, dim=1).reshape(pooled[0].shape[0], 1, -1)
    embedded = F.adaptive_avg_pool1d(stacked, int(target_dim))[:, 0]
    return embedded.reshape(layers[0].shape[0], grid[0], grid[1], -1)


class _Bank:
    """The memory bank as a checkpointable object (``state_dict`` / ``load_state_dict``)."""

    def __init__(self, method: PatchCore) -> None:
        self.method = method

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"bank": self.method.bank.cpu()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.method.bank = state["bank"].to(self.method.device)
