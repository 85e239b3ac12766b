"""LafitE's fit (:class:`~harness_lafite.model.LafitE`): the held-out split, the features stage, the
U-Net's training on the toolkit's loop and the choice of tau and K, each a checkpointed stage (see
:mod:`harness_lafite.model` for what each stage does)."""

from __future__ import annotations

import time
from typing import Any, Mapping

import numpy as np
import torch

from harness import FitContext, TrainSet
from harness.toolkit.multiscale import prepare_features
from harness.toolkit.precision import autocast, grad_scaler
from harness.toolkit.pseudo_validation import make_pseudo_validation, split_holdout
from harness.toolkit.training import optimiser_step, train_batches
from harness_lafite.diffusion import diffusion_loss
from harness_lafite.editing import coreset_bank
from harness_lafite.selection import select_tau_then_k
from harness_lafite.weightfiles import weight_files

#: In a fast dev run: the largest training batch, the DDIM evaluations, the pseudo-validation
#: images per category and the bootstrap rounds.
DEV_BATCH, DEV_DDIM_STEPS, DEV_PSEUDO_VAL, DEV_BOOTSTRAP = 4, 2, 2, 10


class LafitETraining:
    """The fit of :class:`~harness_lafite.model.LafitE` (a mixin: the networks, bank and settings are LafitE's)."""

    def _prepare_backbone(self, train: TrainSet, context: FitContext) -> dict[str, Any]:
        """Load the declared weights, or draw seeded random ones; return what the record says."""
        s = self.settings
        return prepare_features(self.features, weight_files(s), train, context, s, self.device, s.feature_batch_size)

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


class _FitState:
    """What the features stage produces (backbone, statistics, bank), as one checkpointable object.

    Tracked in every stage, so that a resume in a later stage restores it from that stage's
    checkpoint.
    """

    def __init__(self, method: Any) -> None:
        self.method = method

    def state_dict(self) -> dict[str, Any]:
        m = self.method
        return {"backbone": m.features.state_dict(), "mean": m.mean.cpu(), "std": m.std.cpu(), "bank": m.bank.cpu()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        m = self.method
        m.features.load_state_dict(state["backbone"])
        m.mean, m.std, m.bank = (state[key].to(m.device) for key in ("mean", "std", "bank"))


__all__ = ["LafitETraining", "DEV_BATCH", "DEV_DDIM_STEPS", "DEV_PSEUDO_VAL", "DEV_BOOTSTRAP"]
