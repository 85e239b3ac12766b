"""Registers UniAD with the harness (entry point ``uniad`` in the group ``harness``).

Importing this module is cheap: torch and timm load when a method is built (:func:`build`).

UniAD (You et al., "A Unified Model for Multi-class Anomaly Detection", NeurIPS 2022) is the
multi-class baseline of DiAD and LafitE. The ``paper`` profile is the authors' MVTec-AD
configuration (zhiyuanyou/UniAD at a5b9d9d, ``experiments/MVTec-AD/config.yaml`` and
``tools/train_val.py``), trained on every category at once (``multiclass``):

- images resized to 224 x 224 (torchvision ``Resize`` with PIL's bilinear filter, antialiased),
  ImageNet normalisation, no augmentation (``hflip``, ``vflip``, ``rotate`` all false);
- EfficientNet-b4 (the TensorFlow-ported file UniAD loads, :data:`UNIAD_EFFICIENTNET_B4`), frozen
  in eval mode, stages 1-4 (its blocks 1, 5, 9, 21) resized to stride 16 and concatenated: 272
  channels at 14 x 14 (:mod:`harness.toolkit.multiscale`, shared with LafitE);
- the reconstruction transformer (:mod:`harness_uniad.network`): 272 -> 256, learned position
  embedding, 4 encoder and 4 decoder layers, 8 heads, feed-forward 1024, dropout 0.1, post-norm,
  neighbour mask 7 x 7 in the encoder and both decoder attentions, feature jittering (scale 20,
  probability 1) in training only;
- MSE between reconstructed and extracted features, AdamW (lr 1e-4, betas (0.9, 0.999), weight
  decay 1e-4) over the reconstruction network, gradient norm clipped at 0.1, batch 8, 1000
  epochs, StepLR (step 800, gamma 0.1, stepped as ``lr_scheduler.step(epoch)`` after each epoch);
- anomaly map: the L2 norm of the reconstruction error at 14 x 14, upsampled x16 (bilinear,
  ``align_corners=True``) to 224; image score: max of the 16 x 16 average-pooled (stride 1) map
  (the ``max`` entry, ``avgpool_size: [16, 16]``, of its evaluator).

Where we differ (recorded): the authors evaluate every 10 epochs on the test set and keep the
checkpoint with the best mean pixel AUROC (``key_metric: mean_pixel_auc``); the harness never
shows a method test data, so the model after the last epoch is used. Their evaluation flips an
AUROC below 0.5; ours never does.

Profiles
--------
``paper``
    The authors' MVTec-AD configuration above: needs the EfficientNet-b4 file and a GPU.
``tiny``
    The same code at toy scale for a CPU (see :data:`PROFILES`): 128 px images, a randomly
    initialised ResNet-18 (layer1 + layer2, 192 channels; BatchNorm statistics re-estimated on the
    training images) aggregated on an 8 x 8 token grid (stride 16), a one-layer 64-wide
    transformer with a 3 x 3 neighbour mask, 12 epochs at a larger learning rate. On the synthetic
    set (seed 0): image AUROC 61.6, pixel AUROC 63.2; random EfficientNet-b4 stages 1-4 at the
    same grid gave 55.0 / 59.5, and a 16 x 16 grid (64 px, stride 4) 52.0 / 40.9.
"""

from __future__ import annotations

from harness import EvalGrid, MethodSpec, PaperRef, Resources, Setting, hookimpl
from harness.settings import eval_batch_size, image_size, interpolation, precision
from harness_uniad.weightfiles import weight_files

PAPER = PaperRef(
    title="A Unified Model for Multi-class Anomaly Detection",
    venue="NeurIPS 2022",
    url="https://arxiv.org/abs/2206.03687",
    code="https://github.com/zhiyuanyou/UniAD",
)

SETTINGS = (
    image_size(224, help="side the images are resized to (input_size [224, 224] of the MVTec-AD config)"),
    interpolation("bilinear", choice="bilinear: the authors' TrainBaseTransform / TestBaseTransform apply "
                                     "torchvision's Resize(input_size, Image.BILINEAR) to PIL images"),
    eval_batch_size(32),
    precision("fp32", choice="fp32: the authors' training and evaluation run in float32"),
    Setting("backbone", str, "tf_efficientnet_b4", "timm name of the frozen feature extractor",
            choice="tf_efficientnet_b4: timm's TensorFlow-style EfficientNet-b4 (SAME padding, BatchNorm eps 1e-3), "
                   "the network of the EfficientNet-PyTorch file UniAD loads"),
    Setting("backbone_layers", tuple[int, ...], (0, 1, 2, 3),
            "timm out_indices of the aggregated stages ((0, 1, 2, 3) = UniAD's outlayers [1, 2, 3, 4], 272 channels)"),
    Setting("backbone_pretrained", bool, True,
            "load ImageNet weights from disk (never downloaded); false = seeded random init + BatchNorm re-estimation"),
    Setting("backbone_weights_file", str, "", "explicit path of the backbone weights (optional)"),
    Setting("backbone_padding", str, "uniad",
            "TensorFlow-style convolutions: padded for the native 380 px input (uniad) or for the actual input",
            choices=("uniad", "dynamic"),
            choice="uniad: UniAD's EfficientNet (EfficientNet-PyTorch 0.7.1) pads statically for 380 px"),
    Setting("feature_stride", int, 16, "stride of the aggregated feature grid (the neck's outstrides); "
            "image_size must be a multiple", minimum=1),
    Setting("feature_batch_size", int, 32, "images per backbone forward pass during fit", minimum=1),
    Setting("hidden_dim", int, 256, "transformer width", minimum=1),
    Setting("nhead", int, 8, "attention heads", minimum=1),
    Setting("num_encoder_layers", int, 4, "encoder layers", minimum=0),
    Setting("num_decoder_layers", int, 4, "decoder layers (each with its own learned queries)", minimum=1),
    Setting("dim_feedforward", int, 1024, "feed-forward width", minimum=1),
    Setting("dropout", float, 0.1, "dropout in attention and feed-forward blocks", minimum=0.0, maximum=1.0),
    Setting("activation", str, "relu", "feed-forward activation", choices=("relu", "gelu")),
    Setting("normalize_before", bool, False, "pre-norm layers (false: post-norm, the authors' config)"),
    Setting("pos_embed_type", str, "learned", "position embedding", choices=("learned", "sine")),
    Setting("neighbor_size", tuple[int, ...], (7, 7), "neighbour-mask window (rows, columns)", minimum=1),
    Setting("neighbor_mask", tuple[int, ...], (1, 1, 1),
            "neighbour mask on (1) or off (0) in the encoder, the decoder's first and its second attention",
            minimum=0, maximum=1),
    Setting("jitter_scale", float, 20.0, "feature-jitter scale (0: no jittering)", minimum=0.0),
    Setting("jitter_prob", float, 1.0, "probability that a training batch is jittered", minimum=0.0, maximum=1.0),
    Setting("epochs", int, 1000, "training epochs (max_epoch)", minimum=0),
    Setting("train_batch_size", int, 8, "feature maps per optimiser step", minimum=1),
    Setting("lr", float, 1e-4, "AdamW learning rate", minimum=0.0),
    Setting("weight_decay", float, 1e-4, "AdamW weight decay", minimum=0.0),
    Setting("lr_step", int, 800, "StepLR step size in epochs", minimum=1),
    Setting("lr_gamma", float, 0.1, "StepLR factor", minimum=0.0),
    Setting("lr_schedule_offset", bool, True,
            "step the schedule as the authors do (lr_scheduler.step(epoch) after epoch 'epoch')",
            choice="true: the authors call lr_scheduler.step(epoch) with the finished epoch's index, so the drop "
                   "takes effect one epoch later than a plain StepLR (from epoch 802, 1-based); false: StepLR as "
                   "documented (from epoch 801)"),
    Setting("grad_clip_norm", float, 0.1, "clip the gradient norm to this value (0: no clipping)", minimum=0.0,
            choice="0.1: the config's trainer.clip_max_norm (the paper does not mention clipping)"),
    Setting("score_pool_size", int, 16, "average-pooling window (pixels, stride 1) before the max that gives "
            "the image score", minimum=1, choice="16: the evaluator's max with avgpool_size [16, 16]"),
)

PROFILES = {
    "paper": {},
    "tiny": {
        # Random ResNet-18 layer1 + layer2 (192 channels) at 128 px on an 8 x 8 token grid (stride 16):
        # image AUROC 61.6 on the synthetic set, where random EfficientNet-b4 stages 1-4 gave 55.0.
        "image_size": 128, "backbone": "resnet18", "backbone_pretrained": False, "backbone_layers": (1, 2),
        "feature_stride": 16,
        "feature_batch_size": 60, "eval_batch_size": 60, "hidden_dim": 64, "nhead": 4,
        "num_encoder_layers": 1, "num_decoder_layers": 1, "dim_feedforward": 128, "neighbor_size": (3, 3),
        "epochs": 12, "train_batch_size": 16, "lr": 2e-3, "lr_step": 10, "grad_clip_norm": 1.0,
        "score_pool_size": 4,
    },
}


def paper_grid(settings) -> EvalGrid:
    """UniAD's pixel grid (``--eval-grid paper``): masks at 224 by nearest neighbour, counted at > 0."""
    return EvalGrid(name="paper", size=int(settings.image_size), mask_interpolation="nearest", mask_binarize="nonzero",
                    note="UniAD's TestBaseTransform: the mask resized to 224 x 224 by nearest neighbour (PIL); its "
                         "eval_helper counts values > 0; maps at 224, the output of the x16 upsampling")


def build(settings):
    """The factory: builds UniAD's architecture (no weights are read)."""
    from harness_uniad.model import UniAD

    return UniAD(settings)


@hookimpl
def harness_methods():
    """Return the UniAD method spec."""
    return [MethodSpec(
        name="uniad", paper=PAPER, protocols=("multiclass", "oneclass", "fewshot"), profiles=PROFILES,
        factory=build, settings=SETTINGS, paper_protocol="multiclass", weights=weight_files, paper_grid=paper_grid,
        resources={"paper": Resources(gpus=1, cpus=4, memory_gb=16), "tiny": Resources(cpus=1)},
        description="Frozen EfficientNet-b4 features (stages 1-4 at stride 16) reconstructed by a transformer with "
                    "neighbour-masked attention, a layer-wise learned-query decoder and feature jittering during "
                    "training; anomaly = L2 reconstruction error, image score = max of the 16 x 16 average-pooled "
                    "map. One model for every category.",
    )]
