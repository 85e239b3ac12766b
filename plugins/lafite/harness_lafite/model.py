"""LafitE as a harness method: feature diffusion, coreset feature editing, pseudo-validation.

Fit (three checkpointed stages, :mod:`harness.engine.support.checkpoint`; a killed fit resumes where it stopped)
    0. When tau or K is searched, a seeded ``holdout_fraction`` of every category's training
       images is set aside (:func:`harness.toolkit.pseudo_validation.split_holdout`); those images
       build the pseudo-validation set and are used for nothing else: not in the standardisation
       statistics, not in the memory bank, not in the U-Net's training set.
    1. ``features``: the backbone gets the weights UniAD uses (``backbone_pretrained``), or seeded
       random weights with BatchNorm statistics re-estimated on the fitting images (``tiny``,
       ``--weights random``); recorded in ``context.info["backbone_init"]``. The aggregated
       feature tensor of every fitting image (:mod:`harness.toolkit.multiscale`) is standardised per
       channel with the fitting images' mean and standard deviation when ``feature_standardize``
       (off in ``paper``: neither the paper nor UniAD standardises, and it would reweight the
       channels in Eq. 12's error and the editing distances; on in ``tiny``); editing,
       diffusion and the reconstruction error all live in that space. Every feature slice goes
       into the memory bank, reduced to a greedy coreset (``coreset_ratio``).
    2. ``unet``: the U-Net is trained on the feature tensors (Eq. 6), AdamW, the learning rate
       dropped by ``lr_drop_factor`` after ``lr_drop_at`` of the epochs. The batch order of an
       epoch depends only on (seed, epoch); the noise and time steps come from a generator that
       the checkpoint keeps, so a resumed fit continues the same sequence.
    3. ``selection``: tau (editing off) and then K are chosen on the pseudo-validation set
       (:mod:`harness_lafite.selection`), each candidate's AUROC recorded with its spread; each
       evaluated candidate is kept with the checkpoint. A grid of one value fixes it.

Predict
    Features -> (edit, Eq. 10) -> noise to tau (Eq. 11) -> DDIM back to 0 (Eq. 7) -> squared L2
    error to the unedited features -> bilinear upsampling -> Gaussian (sigma = 4) -> image score =
    max after average pooling (:mod:`harness_lafite.scoring`). ``feature_editing=False`` runs the
    paper's "LafitE w/o F.E." ablation (the diffusion starts from the unedited features).

A fast dev run (``--fast-dev-run``) runs the same stages with one epoch, two optimiser steps on
batches of at most four feature tensors, a selection over the first and last value of each grid
on two pseudo-validation images per category, and two DDIM evaluations (in selection and in
predict); the record says so.
"""

from __future__ import annotations

import time
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from harness import FitContext, Method, Prediction, TrainSet
from harness.toolkit.multiscale import MultiScaleFeatures, load_backbone_weights
from harness.toolkit.noise import ImageNoise
from harness.toolkit.precision import autocast, grad_scaler
from harness.toolkit.pseudo_validation import make_pseudo_validation, split_holdout
from harness.toolkit.training import optimiser_step, train_batches
from harness_lafite.diffusion import build_noise_schedule, build_unet, diffusion_loss, reconstruct
from harness_lafite.editing import WEIGHTINGS, coreset_bank, edit_features
from harness_lafite.scoring import image_scores, reconstruction_maps
from harness_lafite.selection import select_tau_then_k
from harness_lafite.weightfiles import weight_files

#: In a fast dev run: the largest training batch, the DDIM evaluations, the pseudo-validation
#: images per category and the bootstrap rounds.
DEV_BATCH, DEV_DDIM_STEPS, DEV_PSEUDO_VAL, DEV_BOOTSTRAP = 4, 2, 2, 10


class LafitE(Method):
    """Latent diffusion over pretrained CNN features with memory-bank feature editing.

    Parameters
    ----------
    settings : Settings
        See :data:`harness_lafite.plugin.SETTINGS`. Building reads no file, so it works under
        ``torch.device("meta")``.
    """

    def __init__(self, settings: Mapping[str, Any]) -> None:
        super().__init__(settings)
        s = self.settings
        if s.editing_weights not in WEIGHTINGS:
            raise ValueError(f"editing_weights must be one of {WEIGHTINGS}, not {s.editing_weights!r}")
        bad_k = [k for k in s.k_grid if k < 2]
        if bad_k:
            raise ValueError(f"k_grid values must be >= 2 (Eq. 10 is degenerate for K = 1), got {bad_k}")
        bad_tau = [t for t in s.tau_grid if not 1 <= t < s.timesteps]
        if bad_tau:
            raise ValueError(f"tau_grid values must be in [1, T-1] = [1, {s.timesteps - 1}], got {bad_tau}")
        self.features = MultiScaleFeatures(s.backbone, s.backbone_layers, s.feature_size, s.backbone_padding)
        channels = self.features.channels
        self.unet = build_unet(channels, s.feature_size, base_channels=s.base_channels,
                               channel_mults=s.channel_mults, layers_per_block=s.layers_per_block,
                               attention_resolutions=s.attention_resolutions,
                               attention_head_dim=s.attention_head_dim, norm_groups=s.norm_groups,
                               dropout=s.dropout)
        self.schedule = build_noise_schedule(s.timesteps, s.beta_schedule)
        self.mean = torch.zeros(channels)
        self.std = torch.ones(channels)
        self.bank = torch.zeros(0, channels)
        self.tau: int = int(s.tau_grid[0])
        self.k: int | None = int(s.k_grid[0]) if s.feature_editing else None
        self.ddim_steps: int = int(s.ddim_steps)

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
        """Standardised aggregated features (B, C, g, g), float32, of images in [0, 1]."""
        with autocast(self.device, self.settings.precision):
            feats = self.features(images.to(self.device).float()).float()
        if self.settings.feature_standardize:
            feats = (feats - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)
        return feats

    def _prepare_backbone(self, train: TrainSet, context: FitContext) -> dict[str, Any]:
        """Load the declared weights, or draw seeded random ones; return what the record says."""
        s = self.settings
        files = [] if context.random_weights else weight_files(s)
        if files:
            path = context.weights.resolve(files[0], s)
            load_backbone_weights(self.features, path, files[0].what)
            info = {"backbone_init": "imagenet", "backbone_weights": str(path)}
        else:
            self.features.to(self.device)
            self.features.reinitialise(context.seed, (x.to(self.device) for x, _ in
                                                      train.batches(s.feature_batch_size)))
            info = {"backbone_init": "random"}
        self.features.to(self.device).eval()
        return info

    @torch.no_grad()
    def _encode_all(self, images: torch.Tensor | TrainSet, context: FitContext, desc: str) -> torch.Tensor:
        """Features of a TrainSet or an image tensor, batch by batch, on :attr:`device`."""
        size = self.settings.feature_batch_size
        if isinstance(images, TrainSet):
            batches = (x for x, _ in images.batches(size))
        else:
            batches = (images[i:i + size] for i in range(0, len(images), size))
        total = -(-len(images) // size)
        return torch.cat([self.encode(x) for x in context.progress.iterate(batches, total=total, desc=desc)])

    # ------------------------------------------------------------------ fit

    def _search_grids(self, context: FitContext) -> tuple[list[int], list[int]]:
        """The tau and K candidates (a fast dev run keeps the first and last of each)."""
        taus, ks = list(self.settings.tau_grid), list(self.settings.k_grid)
        if context.fast_dev_run:
            taus, ks = sorted(set([taus[0], taus[-1]]), key=taus.index), sorted(set([ks[0], ks[-1]]), key=ks.index)
        return taus, ks

    def _split(self, train: TrainSet, context: FitContext) -> tuple[TrainSet, TrainSet | None, dict[str, Any]]:
        """The fitting part and the held-out part of ``train`` (none when nothing is searched)."""
        s = self.settings
        taus, ks = self._search_grids(context)
        searched = len(taus) > 1 or (s.feature_editing and len(ks) > 1)
        if not searched:
            return train, None, {"held_out": 0, "reason": "one candidate per grid: nothing to select"}
        fit, holdout = split_holdout(train, s.holdout_fraction, s.pseudo_val_seed)
        usable = any(len(v) >= 2 for v in holdout.by_category().values())
        if not usable:
            return train, None, {"held_out": 0, "reason": "too few training images to hold any out (at least 2 "
                                                          "per category are needed); the first grid values are used"}
        return fit, holdout, {"held_out": len(holdout), "fitting": len(fit), "fraction": s.holdout_fraction,
                              "seed": s.pseudo_val_seed,
                              "per_category": {c: len(v) for c, v in holdout.by_category().items()}}

    def fit(self, train: TrainSet, context: FitContext) -> None:
        """Hold images out, extract features and build the bank, train the U-Net, choose tau and K.

        Parameters
        ----------
        train : TrainSet
            Normal images of every category of the job.
        context : FitContext
            ``context.weights`` finds the backbone weights (a missing file raises
            :class:`harness.WeightsNotFoundError` naming ``harness weights pull``);
            ``context.checkpoint`` keeps each stage; ``context.fast_dev_run`` shortens them.
        """
        s = self.settings
        fit_part, holdout, split_info = self._split(train, context)
        context.info["pseudo_validation_split"] = split_info
        if context.fast_dev_run:
            self.ddim_steps = min(self.ddim_steps, DEV_DDIM_STEPS)
            context.info["fast_dev_run"] = {"train_batch_size": min(s.train_batch_size, DEV_BATCH),
                                            "ddim_steps": self.ddim_steps, "pseudo_val_per_category": DEV_PSEUDO_VAL,
                                            "grids": "first and last value of each"}
        state = _FitState(self)
        feats = None
        with context.checkpoint.stage("features", model=state) as position:
            if not position.done:
                info = self._prepare_backbone(fit_part, context)
                feats = self._fit_features(fit_part, context, info)
                position.extra["info"] = info
        # Frozen from here on (also after a resume, where the stage body did not run).
        self.features.to(self.device).eval()
        context.info.update(position.extra.get("info", {}))

        self._train_unet(fit_part, feats, context, state)
        self._select(holdout, context, state)

    def _fit_features(self, fit_part: TrainSet, context: FitContext, info: dict[str, Any]) -> torch.Tensor:
        """Standardisation statistics and the coreset bank from the fitting images; their features."""
        s = self.settings
        # Identity statistics first, so that encode() returns the raw features to measure.
        self.mean, self.std = torch.zeros_like(self.mean), torch.ones_like(self.std)
        feats = self._encode_all(fit_part, context, "lafite features")
        if s.feature_standardize:
            # Statistics over every fitting position; the floor keeps dead channels finite.
            self.mean = feats.mean(dim=(0, 2, 3))
            self.std = feats.std(dim=(0, 2, 3)).clamp_min(1e-6)
            feats = (feats - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)
        channels = feats.shape[1]
        slices = feats.permute(0, 2, 3, 1).reshape(-1, channels)
        self.bank = coreset_bank(slices, s.coreset_ratio, s.coreset_projection_dim or None, int(context.seed))
        info.update({"feature_channels": int(channels), "feature_size": s.feature_size,
                     "memory_bank": {"slices": int(slices.shape[0]), "coreset": int(self.bank.shape[0]),
                                     "coreset_ratio": s.coreset_ratio}})
        return feats

    def _train_unet(self, fit_part: TrainSet, feats: torch.Tensor | None, context: FitContext,
                    state: "_FitState") -> None:
        """Stage ``unet``: Eq. 6 with AdamW and a step decay, checkpointed at every step boundary."""
        s = self.settings
        epochs = context.epochs(s.epochs)
        optimiser = torch.optim.AdamW(self.unet.parameters(), lr=s.lr, weight_decay=s.weight_decay)
        milestone = max(1, int(round(s.lr_drop_at * epochs)))
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimiser, milestones=[milestone], gamma=s.lr_drop_factor)
        scaler = grad_scaler(self.device, s.precision)
        noise = torch.Generator(device=self.device).manual_seed(int(context.seed))
        self.unet.to(self.device)
        with context.checkpoint.stage("unet", model=state, unet=self.unet, optimiser=optimiser, scheduler=scheduler,
                                      scaler=scaler, noise=noise) as position:
            if not position.done:
                if feats is None:
                    # Resumed after the features stage: the restored backbone and statistics give the
                    # same features again (cheaper than keeping them in every checkpoint).
                    feats = self._encode_all(fit_part, context, "lafite features")
                batch_size = min(s.train_batch_size, len(feats))
                if context.fast_dev_run:
                    batch_size = min(batch_size, DEV_BATCH)
                start, losses, epoch_losses = time.perf_counter(), [], []
                self.unet.train()

                def epoch_batches(epoch: int, first: int):
                    order = torch.from_numpy(np.random.default_rng([int(context.seed), epoch]).permutation(len(feats)))
                    return ((index, order[begin:begin + batch_size])
                            for index, begin in enumerate(range(0, len(feats), batch_size)))

                def epoch_end(epoch: int) -> None:
                    scheduler.step()
                    if epoch_losses:
                        losses.append(float(np.mean(epoch_losses)))
                    epoch_losses.clear()

                for step in train_batches(context, position, epochs, epoch_batches, desc="lafite diffusion",
                                          on_epoch_end=epoch_end):
                    x0 = feats[step.data.to(feats.device)].to(self.device)
                    with autocast(self.device, s.precision):
                        loss = diffusion_loss(self.unet, self.schedule, x0, noise)
                    optimiser_step(loss, [optimiser], scaler, clip=(self.unet.parameters(), s.grad_clip_norm))
                    epoch_losses.append(float(loss.detach()))
                position.extra["info"] = {
                    "epochs": epochs, "train_batch_size": batch_size, "steps": position.steps,
                    "lr_drop_epoch": milestone,
                    "final_epoch_loss": round(losses[-1], 5) if losses else None,
                    "train_seconds": round(time.perf_counter() - start, 2)}
        self.unet.eval()
        context.info["training"] = position.extra.get("info", {})

    # ------------------------------------------------------------------ hyperparameter selection

    def _select(self, holdout: TrainSet | None, context: FitContext, state: "_FitState") -> None:
        """Stage ``selection``: tau and K on the held-out pseudo-validation set (no test image)."""
        taus, ks = self._search_grids(context)
        with context.checkpoint.stage("selection", model=state, unet=self.unet) as position:
            if not position.done:
                position.extra["info"] = self._run_selection(holdout, taus, ks, context, position)
        info = position.extra["info"]
        self.tau, self.k = int(info["tau"]), (None if info["k"] is None else int(info["k"]))
        context.info["selection"] = info
        context.info["ddim_steps"] = self.ddim_steps

    def _run_selection(self, holdout: TrainSet | None, taus: list[int], ks: list[int], context: FitContext,
                       position) -> dict[str, Any]:
        s = self.settings
        editing = s.feature_editing
        info: dict[str, Any] = {"feature_editing": editing, "criterion": "pseudo-validation image AUROC, "
                                "mean over categories; tau with editing off, then K with editing on"}
        if holdout is None:
            chosen = select_tau_then_k(lambda t, k: np.zeros(0), np.zeros(0), [], taus[:1], ks[:1], editing)
            info.update(chosen, searched=False)
            return info
        start = time.perf_counter()
        per_category = DEV_PSEUDO_VAL if context.fast_dev_run else s.pseudo_val_per_category
        rounds = min(s.bootstrap_rounds, DEV_BOOTSTRAP) if context.fast_dev_run else s.bootstrap_rounds
        pv = make_pseudo_validation(holdout, per_category, s.pseudo_val_seed, distinct_normals=True)
        feats = self._encode_all(pv.images, context, "lafite pseudo-validation")
        size = tuple(pv.images.shape[-2:])
        labels = pv.labels.cpu().numpy()
        del pv.images

        def evaluate(tau: int, k: int | None) -> np.ndarray:
            # Seeded by index in the held-out set, so the choice does not depend on the batch size.
            b = self.eval_batch_size
            return np.concatenate([self._score(feats[i:i + b], size, tau, k, range(i, min(i + b, len(feats))))[1]
                                   .cpu().numpy() for i in range(0, len(feats), b)])

        done = position.extra.setdefault("candidates", {})

        def on_result(name: str, summary: dict) -> None:
            # One "step" per evaluated candidate: a long search is checkpointed as it goes.
            position.step(epoch=0, batch=len(done))

        chosen = select_tau_then_k(evaluate, labels, pv.categories, taus, ks, editing, rounds=rounds,
                                   seed=s.pseudo_val_seed, done=done, on_result=on_result)
        info.update(chosen, searched=True)
        info["pseudo_validation"] = {"images": int(len(labels)), "anomalous": int(labels.sum()),
                                     "per_category": per_category, "seed": s.pseudo_val_seed,
                                     "synthesis": "2-4 rotated random-shape masks per anomaly, fragments from "
                                                  "another held-out image of the category",
                                     "bootstrap_rounds": rounds,
                                     "search_seconds": round(time.perf_counter() - start, 2)}
        return info

    # ------------------------------------------------------------------ inference

    @torch.no_grad()
    def _score(self, x0: torch.Tensor, size: tuple[int, int], tau: int, k: int | None,
               seeds: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Maps (B, H, W) and image scores (B,) of standardised features ``x0`` for given tau, K.

        ``seeds``: one per image (else by position in the batch); each image's noise is drawn
        from its own seed mixed with ``inference_seed``.
        """
        s = self.settings
        start = edit_features(x0, self.bank, k, s.editing_weights) if k is not None else x0
        generator = ImageNoise(seeds, x0.shape[0], x0.device, base=s.inference_seed)
        with autocast(self.device, s.precision):
            rec = reconstruct(self.unet, self.schedule, start, tau, self.ddim_steps, s.ddim_eta, generator)
        maps = reconstruction_maps(x0, rec.float(), size, s.smoothing_sigma)
        return maps, image_scores(maps, s.score_pool_size)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, categories: Sequence[str],
                seeds: Sequence[int] | None = None) -> Prediction:
        """Reconstruct the (edited) features from step tau and score the reconstruction error.

        Parameters
        ----------
        images : torch.Tensor
            (B, 3, H, W) in [0, 1].
        categories : sequence of str
            Unused: one model and one memory bank serve every category.
        seeds : sequence of int, optional
            One per image (the runner's), so predictions do not depend on the batch.

        Returns
        -------
        Prediction
            Maps (B, H, W) and image scores (B,), float32.
        """
        x0 = self.encode(images)
        maps, scores = self._score(x0, tuple(images.shape[-2:]), self.tau, self.k, seeds)
        return Prediction(maps.float(), scores.float())

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Networks, standardisation statistics, memory bank, the chosen tau and K and the DDIM steps."""
        return {"backbone": self.features.state_dict(), "unet": self.unet.state_dict(), "mean": self.mean.cpu(),
                "std": self.std.cpu(), "bank": self.bank.cpu(), "tau": int(self.tau),
                "k": -1 if self.k is None else int(self.k), "ddim_steps": int(self.ddim_steps)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.features.load_state_dict(state["backbone"])
        self.unet.load_state_dict(state["unet"])
        self.mean, self.std, self.bank = (state[key].to(self.device) for key in ("mean", "std", "bank"))
        self.tau = int(state["tau"])
        self.k = None if int(state["k"]) < 0 else int(state["k"])
        self.ddim_steps = int(state.get("ddim_steps", self.settings.ddim_steps))


class _FitState:
    """What the features stage produces (backbone, statistics, bank), as one checkpointable object.

    Tracked in every stage, so that a resume in a later stage restores it from that stage's
    checkpoint.
    """

    def __init__(self, method: LafitE) -> None:
        self.method = method

    def state_dict(self) -> dict[str, Any]:
        m = self.method
        return {"backbone": m.features.state_dict(), "mean": m.mean.cpu(), "std": m.std.cpu(), "bank": m.bank.cpu()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        m = self.method
        m.features.load_state_dict(state["backbone"])
        m.mean, m.std, m.bank = (state[key].to(m.device) for key in ("mean", "std", "bank"))

