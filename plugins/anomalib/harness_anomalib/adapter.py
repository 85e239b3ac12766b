"""One harness method for any anomalib image model (see :mod:`harness_anomalib` for the rules).

The adapter keeps anomalib's *model* and drops its *pipeline*:

- **Built** from the variant's anomalib class with the job's typed settings as constructor
  arguments, ``post_processor=False, evaluator=False, visualizer=False`` (no min-max
  normalisation, no thresholds, no metrics of anomalib's), and the model's own pre-processor
  (``configure_pre_processor`` at the profile's size), whose *transform* the adapter applies
  itself: to every training batch before ``training_step`` and to every test batch before the
  inner torch model. The module's own callbacks are switched off so nothing else touches a batch.
- **Trained** by a bare Lightning ``Trainer`` (no logger, no validation, no Lightning
  checkpoints) on the harness's training set, wrapped in a tiny ``LightningDataModule`` because
  several models read ``trainer.datamodule`` in their hooks. Memory-bank models collect features
  in ``training_step`` and fit at the epoch's end (anomalib's ``MemoryBankMixin``); models with a
  step schedule (Dinomaly, INP-Former, UniNet) get ``max_steps``.
- **Checkpointed** at every epoch end through the harness's stage API (safetensors + JSON): the
  module's state and each optimiser's and scheduler's state; a rerun resumes after the last
  finished epoch.
- **Predicted** by the inner torch model (``module.model``) in eval mode: its raw anomaly map and
  raw image score go to the harness unchanged. A centre-cropping model's map is pasted back on
  the full input image (:func:`harness.toolkit.crops.paste_crop`, outside = the image's lowest
  score).
"""

from __future__ import annotations

import importlib
import inspect
import tempfile
import warnings
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F

from harness import FitContext, Method, Prediction, TrainSet
from harness.toolkit.crops import center_crop_box, paste_crop

from harness_anomalib import hooks
from harness_anomalib.hooks import load_module_state
from harness_anomalib.offline import weights_from_disk
from harness_anomalib.variants import Variant


def anomalib_class(variant: Variant) -> type:
    """The anomalib Lightning module class of ``variant``."""
    with warnings.catch_warnings():
        # anomalib's own imports warn of timm's and its own deprecated paths: nothing a user can act on.
        warnings.simplefilter("ignore", FutureWarning)
        return getattr(importlib.import_module("anomalib.models"), variant.model)


@contextmanager
def quiet_lightning():
    """Lightning's start-up notes (GPU/TPU availability, tips, why a fit stopped) at WARNING only:
    the harness prints its own progress, once per job rather than once per Trainer."""
    import logging

    logger = logging.getLogger("lightning.pytorch")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def _enum_value(cls: type, name: str, value: Any) -> Any:
    """Turn a string setting into the constructor's enum where the annotation asks for one."""
    import enum

    annotation = inspect.signature(cls.__init__).parameters[name].annotation
    members = [a for a in getattr(annotation, "__args__", (annotation,)) if isinstance(a, type)
               and issubclass(a, enum.Enum)]
    if members and isinstance(value, str):
        for member in members[0]:
            if member.value == value:
                return member
    return value


def constructor_kwargs(variant: Variant, settings: Mapping[str, Any], source_dir: str | None = None) -> dict[str, Any]:
    """The anomalib constructor's arguments from the job's settings.

    Empty strings and tuples stand for ``None`` (the constructor's own default), tuples become
    lists, string settings become the constructor's enum members; arguments the adapter owns
    (the anomaly-source folder) come from ``source_dir``.
    """
    from harness_anomalib.signatures import constructor_settings

    cls = anomalib_class(variant)
    kwargs: dict[str, Any] = {}
    for param in constructor_settings(variant):
        name = param["name"]
        value = settings[param["setting"]]
        if param.get("none_when_empty") and value in ("", (), 0):
            value = None
        elif isinstance(value, tuple):
            value = [list(v) if isinstance(v, tuple) else v for v in value]
            if param["annotation"].startswith("tuple"):
                value = tuple(value)
        kwargs[name] = _enum_value(cls, name, value)
    for name, what in variant.owned.items():
        if what == "source":
            kwargs[name] = source_dir
        elif what == "image_size":
            kwargs[name] = (int(settings["image_size"]), int(settings["image_size"]))
    return kwargs


class _DataModule:
    """Built lazily as a ``LightningDataModule`` subclass (Lightning imported on first use)."""

    @staticmethod
    def create(loader: torch.utils.data.DataLoader, batch_size: int):
        import lightning.pytorch as pl

        class HarnessData(pl.LightningDataModule):
            """The harness's training set as anomalib's hooks expect a datamodule."""

            def __init__(self) -> None:
                super().__init__()
                self.train_batch_size = batch_size

            def train_dataloader(self):
                return loader

        return HarnessData()


class AnomalibMethod(Method):
    """An anomalib image model as a harness method.

    Parameters
    ----------
    settings : Settings
        The variant's typed settings (:func:`harness_anomalib.plugin.settings_of`).
    variant : Variant
        Which anomalib model and how (:mod:`harness_anomalib.variants`).
    """

    interpolation = "bilinear"

    def __init__(self, settings: Mapping[str, Any], variant: Variant) -> None:
        super().__init__(settings)
        self.variant = variant
        try:
            self.module = self._build(files=None, source_dir=None)
        except (TypeError, RuntimeError, NotImplementedError):
            if torch.empty(0).device.type != "meta":
                raise
            # Some anomalib parts (FrEIA's flow blocks) build tensors on the CPU explicitly and
            # cannot be built on the meta device that ``describe`` and the preflight use.
            with torch.device("cpu"):
                self.module = self._build(files=None, source_dir=None)
        #: Per-category state of a few-shot model (WinCLIP's text and reference embeddings).
        self.fewshot_state: dict[str, dict[str, torch.Tensor]] = {}

    # -- building ------------------------------------------------------------------------------
    def pre_processor(self, cls: type):
        """The model's own pre-processor at the profile's size (and crop)."""
        s = self.settings
        params = inspect.signature(cls.configure_pre_processor).parameters
        kwargs: dict[str, Any] = {"image_size": (int(s.image_size), int(s.image_size))}
        crop = int(s.get("center_crop", 0) or 0)
        for name in ("crop_size", "center_crop_size"):
            if name in params and crop:
                kwargs[name] = crop if name == "crop_size" else (crop, crop)
        return cls.configure_pre_processor(**kwargs)

    def _build(self, files: Mapping[str, Path] | None, source_dir: str | None):
        """Build the anomalib module; pretrained timm weights from ``files`` only (none: random)."""
        cls = anomalib_class(self.variant)
        with ExitStack() as stack, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            calls = stack.enter_context(weights_from_disk(files))
            placeholder = None
            if self.variant.source_argument and source_dir is None:
                # DRAEM and GLASS download DTD when their folder does not exist; the factory
                # builds the architecture only, with an empty folder (the fit rebuilds the model
                # with the real source).
                placeholder = stack.enter_context(tempfile.TemporaryDirectory(prefix="harness-anomalib-"))
            module = cls(**constructor_kwargs(self.variant, self.settings, source_dir or placeholder),
                         pre_processor=self.pre_processor(cls), post_processor=False, evaluator=False,
                         visualizer=False)
        self.weight_calls = list(calls)
        if self.variant.toy_width and int(self.settings["toy_width"]):
            hooks.shrink(module, self.variant, int(self.settings["toy_width"]))
        # The adapter applies the transform itself; the module's callbacks (its pre-processor)
        # must not transform a batch a second time.
        module.configure_callbacks = lambda: []
        self.transform = module.pre_processor.transform
        return module

    def networks(self) -> Mapping[str, torch.nn.Module]:
        """The inner torch model (what predicts); the Lightning module's other parts hold no weights."""
        return {"model": self.module.model}

    def to(self, device: torch.device | str) -> "AnomalibMethod":
        """Move the whole Lightning module (buffers of the memory-bank models included)."""
        self.device = torch.device(device)
        self.module.to(self.device)
        return self

    def eval(self) -> "AnomalibMethod":
        """Evaluation mode for the module and its inner model."""
        self.module.eval()
        return self

    # -- fitting ---------------------------------------------------------------------------------
    def fit(self, train: TrainSet, context: FitContext) -> None:
        """Train (or collect) on the harness's training images with a bare Lightning ``Trainer``."""
        s = self.settings
        torch.manual_seed(int(context.seed))
        files, weights_info = hooks.timm_files(self.variant, s, context)
        source_dir, source_info = hooks.anomaly_source(self.variant, s, context)
        self.module = self._build(files, source_dir)
        self.module.to(self.device)
        context.info.update(anomalib_version=hooks.anomalib_version(), anomalib_class=self.variant.model,
                            anomalib_config=_jsonable(constructor_kwargs(self.variant, s, source_dir)),
                            pre_processing=repr(self.transform).replace("\n", " "),
                            backbone_weights=weights_info, timm_models=self.weight_calls)
        if source_info:
            context.info["anomaly_source"] = source_info
        hooks.before_fit(self, train, context)
        if self.variant.kind == "fewshot":
            hooks.fit_fewshot(self, train, context)
            return
        optimisers = _OptimiserStates()
        with context.checkpoint.stage("anomalib", module=self.module, optimisers=optimisers) as position:
            if position.done:
                context.info.update(position.extra.get("info", {}))
                return
            epochs_done = position.epoch
            with quiet_lightning():
                trainer, datamodule = self._trainer(train, context, optimisers, position, epochs_done)
            if trainer is not None:
                with warnings.catch_warnings(), quiet_lightning():
                    warnings.simplefilter("ignore")
                    trainer.fit(self.module, datamodule=datamodule)
                context.info["trainer"] = {"epochs": int(trainer.current_epoch) + epochs_done,
                                           "steps": int(trainer.global_step), "max_epochs": trainer.max_epochs,
                                           "max_steps": trainer.max_steps}
            hooks.after_fit(self, train, context)
            position.extra["info"] = _jsonable(dict(context.info))

    def loader(self, train: TrainSet, batch_size: int, shuffle: bool = True) -> torch.utils.data.DataLoader:
        """The training images as anomalib batches, the model's transform applied."""
        from anomalib.data import ImageBatch

        transform = self.transform

        def collate(items):
            # Normal images only: label 0 and an empty mask (models with a supervised mode read them).
            images = transform(torch.stack([image for image, _ in items]))
            return ImageBatch(image=images, gt_label=torch.zeros(images.shape[0], dtype=torch.long),
                              gt_mask=torch.zeros(images.shape[0], *images.shape[-2:], dtype=torch.bool))

        generator = torch.Generator().manual_seed(int(torch.initial_seed()) % 2**63)
        return torch.utils.data.DataLoader(_ItemView(train), batch_size=batch_size, shuffle=shuffle,
                                           collate_fn=collate, generator=generator, drop_last=False)

    def _trainer(self, train: TrainSet, context: FitContext, optimisers: "_OptimiserStates", position,
                 epochs_done: int):
        import lightning.pytorch as pl

        s = self.settings
        batch_size = int(s.train_batch_size)
        loader = self.loader(train, batch_size)
        arguments = dict(self.module.trainer_arguments)
        for key in ("devices", "val_check_interval", "check_val_every_n_epoch", "max_steps", "max_epochs",
                    "num_sanity_val_steps", "callbacks", "accelerator", "strategy"):
            arguments.pop(key, None)
        max_steps = int(s.get("max_steps", -1) or -1)
        epochs = int(s.get("epochs", 1))
        if self.variant.kind == "memory_bank":
            epochs, max_steps = 1, -1
        remaining = max(0, context.epochs(epochs) - epochs_done)
        if max_steps > 0:
            remaining = -1
            if context.fast_dev_run:
                max_steps = 2
        elif remaining == 0:
            return None, None
        callback = _EpochCheckpoints(position, optimisers, epochs_done)
        accelerator = "gpu" if self.device.type == "cuda" else "cpu"
        trainer = pl.Trainer(
            accelerator=accelerator, devices=1, max_epochs=remaining, max_steps=max_steps, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            num_sanity_val_steps=0, limit_val_batches=0, callbacks=[callback], deterministic=False,
            limit_train_batches=2 if context.fast_dev_run else None, **arguments)
        return trainer, _DataModule.create(loader, batch_size)

    # -- inference -------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, images: torch.Tensor, categories: Sequence[str]) -> Prediction:
        """The inner model's raw anomaly maps and image scores (see the module docstring)."""
        if self.variant.kind == "fewshot":
            return hooks.predict_fewshot(self, images, categories)
        output = self.module.model(self.transform(images))
        return self.to_prediction(output.anomaly_map, output.pred_score, images.shape[-2:])

    def to_prediction(self, anomaly_map: torch.Tensor, pred_score: torch.Tensor, size: Sequence[int]) -> Prediction:
        """Put a model's raw output in the harness's shape, values untouched (pasted back when cropped)."""
        maps = anomaly_map.float()
        if maps.dim() == 4:
            maps = maps[:, 0]
        scores = pred_score.float().reshape(-1)
        crop = int(self.settings.get("center_crop", 0) or 0)
        if crop:
            box = center_crop_box(size, crop)
            if tuple(maps.shape[-2:]) != (box.height, box.width):
                maps = F.interpolate(maps[:, None], size=(box.height, box.width), mode="bilinear",
                                     align_corners=False)[:, 0]
            maps = paste_crop(maps, box, size)
        return Prediction(maps, scores)

    # -- state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The whole Lightning module's state (memory banks and statistics are buffers there)."""
        state: dict[str, Any] = {"module": {k: v.detach().cpu() for k, v in self.module.state_dict().items()}}
        if self.fewshot_state:
            state["fewshot"] = self.fewshot_state
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (buffers sized at fit time are resized first)."""
        load_module_state(self.module, state["module"])
        self.fewshot_state = {k: dict(v) for k, v in state.get("fewshot", {}).items()}


class _ItemView(torch.utils.data.Dataset):
    """A :class:`harness.TrainSet` as a map-style dataset of ``(image, category)``."""

    def __init__(self, train: TrainSet) -> None:
        self.train = train

    def __len__(self) -> int:
        return len(self.train)

    def __getitem__(self, index: int):
        return self.train[index]


class _OptimiserStates:
    """The Trainer's optimisers and schedulers as one checkpointable object.

    The Trainer creates them inside ``fit``; a restored state waits here until then
    (:meth:`apply`, called when training starts).
    """

    def __init__(self) -> None:
        self.trainer = None
        self.pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        if self.trainer is None:
            return self.pending or {}
        return {"optimisers": {str(i): o.state_dict() for i, o in enumerate(self.trainer.optimizers)},
                "schedulers": {str(i): _keyed(c.scheduler.state_dict())
                               for i, c in enumerate(self.trainer.lr_scheduler_configs)}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.pending = dict(state)

    def apply(self, trainer) -> None:
        self.trainer = trainer
        if not self.pending:
            return
        for i, optimiser in enumerate(trainer.optimizers):
            if str(i) in self.pending.get("optimisers", {}):
                optimiser.load_state_dict(self.pending["optimisers"][str(i)])
        for i, config in enumerate(trainer.lr_scheduler_configs):
            if str(i) in self.pending.get("schedulers", {}):
                config.scheduler.load_state_dict(_unkeyed(self.pending["schedulers"][str(i)]))
        self.pending = None


def _keyed(value: Any) -> Any:
    """A scheduler state with mappings whose keys are not strings (MultiStepLR's milestone
    Counter: UniNet's are floats) stored as ``{"__pairs__": [[key, value], ...]}`` (the state
    files take string keys only)."""
    if isinstance(value, Mapping):
        if all(isinstance(k, str) for k in value):
            return {k: _keyed(v) for k, v in value.items()}
        return {"__pairs__": [[k, _keyed(v)] for k, v in value.items()], "__type__": type(value).__name__}
    return value


def _unkeyed(value: Any) -> Any:
    """Inverse of :func:`_keyed`."""
    from collections import Counter

    if isinstance(value, Mapping):
        if "__pairs__" in value:
            pairs = {k: _unkeyed(v) for k, v in value["__pairs__"]}
            return Counter(pairs) if value.get("__type__") == "Counter" else pairs
        return {k: _unkeyed(v) for k, v in value.items()}
    return value


def _EpochCheckpoints(position, optimisers: _OptimiserStates, epochs_done: int):
    """A Lightning callback: restore optimiser state at the start, checkpoint at every epoch end."""
    import lightning.pytorch as pl

    class EpochCheckpoints(pl.Callback):
        def on_train_start(self, trainer, module) -> None:
            optimisers.apply(trainer)

        def on_train_epoch_end(self, trainer, module) -> None:
            position.step(epoch=epochs_done + trainer.current_epoch + 1, batch=0)
            position.save()

    return EpochCheckpoints()


def _jsonable(value: Any) -> Any:
    """JSON-ready copy (paths and enums as strings, tuples as lists)."""
    import enum

    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)
