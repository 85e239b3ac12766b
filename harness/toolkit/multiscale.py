"""Multi-scale CNN features resized to one grid and concatenated (UniAD's MFCN neck; LafitE's Eq. 1).

Shared by UniAD and LafitE. A frozen CNN gives the feature maps of several stages; each is resized bilinearly to one
``grid`` x ``grid`` lattice and the maps are concatenated along the channel axis. With
EfficientNet-b4 and timm's stages 0-3 (strides 2, 4, 8, 16; 24 + 32 + 56 + 160 = 272 channels)
this is UniAD's aggregation, which LafitE follows ("stages 1 to 4", UniAD counts from 1; UniAD's
blocks 1, 5, 9 and 21 of its flat block list). UniAD resizes with ``UpsamplingBilinear2d``
(``align_corners=True``), which this module reproduces.

The backbone UniAD builds is not timm's: it is its copy of EfficientNet-PyTorch 0.7.1
(lukemelas), loaded from ``efficientnet-b4-6ed6700e.pth``, the TensorFlow EfficientNet-b4
ImageNet checkpoint ported to PyTorch (see :data:`harness.toolkit.efficientnet.UNIAD_EFFICIENTNET_B4`).
timm's ``tf_efficientnet_b4`` is the same network (TensorFlow "SAME" padding, BatchNorm eps
1e-3), with other parameter names: :func:`harness.toolkit.efficientnet.convert_efficientnet_pytorch` renames the file's
tensors. One difference remains: EfficientNet-PyTorch pads statically, with the padding computed
for the network's native input (380 px for b4), while timm pads dynamically for the actual input.
At 224 px the two differ in one place, the stride-2 5 x 5 depthwise convolution that opens
stage 3 (timm ``blocks.2.0.conv_dw``): UniAD pads it (2, 2) on each axis, TensorFlow's rule at
224 px pads (1, 2), which shifts that stage's and every later stage's features by one pixel
(at stride 4). :func:`use_static_same_padding` gives timm's network UniAD's padding (setting
``backbone_padding="uniad"``). :func:`load_backbone_weights` reads a declared file into the
extractor (either naming), :meth:`MultiScaleFeatures.reinitialise` gives seeded random weights.

UniAD's MFCN resizes stage ``i`` by ``scale_factor = stride_i / 16`` with
``UpsamplingBilinear2d``; with ``align_corners=True`` the sampling positions depend only on the
input and output sizes, so resizing to ``size=(grid, grid)`` is the same operation (224 px:
112, 56, 28 -> 14; the stride-16 stage is left as it is, as a scale factor of 1 leaves it).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from harness.toolkit.backbones import create_features, recalibrate_batchnorm
from harness.toolkit.ops import imagenet_normalize

if TYPE_CHECKING:  # pragma: no cover
    from harness.data import TrainSet
    from harness.method import FitContext
    from harness.specs import WeightFile

#: ``backbone_padding`` values.
PADDINGS = ("uniad", "dynamic")


class MultiScaleFeatures(nn.Module):
    """A timm backbone whose selected stages are resized to one grid and concatenated.

    Parameters
    ----------
    backbone : str
        timm model name (``tf_efficientnet_b4`` in the ``paper`` profile).
    layers : sequence of int
        timm ``out_indices`` of the stages to aggregate.
    grid : int
        Side of the aggregated feature tensor (32 in the paper's text for 224 px inputs).
    padding : {"uniad", "dynamic"}
        ``uniad``: TensorFlow-style convolutions padded statically for the network's native input
        size, as UniAD's EfficientNet does (:func:`use_static_same_padding`); ``dynamic``: timm's
        padding for the actual input. Networks without TensorFlow-style padding are unaffected.

    Notes
    -----
    The network is built without weights (see :func:`harness.toolkit.backbones.create_features`),
    so it can be created on the meta device; pretrained weights are loaded in ``fit``.
    """

    def __init__(self, backbone: str, layers: Sequence[int], grid: int, padding: str = "uniad") -> None:
        super().__init__()
        if int(grid) < 1:
            raise ValueError(f"feature_size must be a positive grid side, got {grid!r}")
        if padding not in PADDINGS:
            raise ValueError(f"backbone_padding must be one of {PADDINGS}, not {padding!r}")
        self.backbone_name = backbone
        self.layers = tuple(int(i) for i in layers)
        self.grid = int(grid)
        self.padding = padding
        self.backbone = self._build()

    def _build(self) -> nn.Module:
        net = create_features(self.backbone_name, self.layers)
        drop_unused_blocks(net)
        if self.padding == "uniad":
            use_static_same_padding(net)
        return net

    @property
    def channels(self) -> int:
        """Channels of the aggregated tensor (sum over the selected stages)."""
        return int(sum(self.backbone.feature_info.channels()))

    def stages(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The selected stages' feature maps of images in [0, 1] (ImageNet-normalised inside)."""
        return list(self.backbone(imagenet_normalize(images)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Aggregated features of images in [0, 1].

        Parameters
        ----------
        images : torch.Tensor
            (B, 3, H, W) in [0, 1].

        Returns
        -------
        torch.Tensor
            (B, C, grid, grid).
        """
        size = (self.grid, self.grid)
        resized = [m if tuple(m.shape[-2:]) == size else
                   F.interpolate(m, size=size, mode="bilinear", align_corners=True) for m in self.stages(images)]
        return torch.cat(resized, dim=1)

    def reinitialise(self, seed: int, batches: Iterable[torch.Tensor]) -> None:
        """Seeded random weights with BatchNorm statistics re-estimated on ``batches``.

        Used when no pretrained weights are wanted (the ``tiny`` profile, ``--weights random``):
        the factory's random weights depend on the global RNG state, so they are redrawn from
        ``seed``; BatchNorm statistics of a fresh network are (0, 1), which lets some channels
        saturate and others vanish, so they are re-estimated on normal training images (no
        gradients).

        Parameters
        ----------
        seed : int
        batches : iterable of torch.Tensor
            Normal training images (B, 3, H, W) in [0, 1], on the backbone's device.
        """
        device = next(self.backbone.parameters()).device
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            fresh = self._build()
        self.backbone.load_state_dict(fresh.state_dict())
        self.backbone.to(device)
        recalibrate_batchnorm(self.backbone, (imagenet_normalize(x) for x in batches))


def drop_unused_blocks(backbone: nn.Module) -> None:
    """Remove the blocks after the last returned stage of a timm EfficientNet-style extractor.

    timm's ``EfficientNetFeatures`` keeps (and runs) every block even when only the early stages
    are returned; for EfficientNet-b4 stages 1-4 the two stride-32 blocks hold 10 M unused
    parameters. Pretrained checkpoints still load (their extra tensors are ignored). Other
    backbones are left unchanged.
    """
    blocks = getattr(backbone, "blocks", None)
    names = backbone.feature_info.module_name() if hasattr(backbone, "feature_info") else []
    if not isinstance(blocks, nn.Sequential) or getattr(backbone, "feature_hooks", None) is not None:
        return
    if not names or not all(n.startswith("blocks.") and n.split(".")[1].isdigit() for n in names):
        return
    last = max(int(n.split(".")[1]) for n in names)
    backbone.blocks = blocks[:last + 1]


class StaticSamePadConv2d(nn.Conv2d):
    """A convolution with fixed (left, right, top, bottom) zero padding applied before it."""

    def __init__(self, conv: nn.Conv2d, pad: tuple[int, int, int, int]) -> None:
        # Built on the meta device (no memory), then given the convolution's own parameters, so
        # the state-dict names and tensors stay those of the replaced module.
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, 0, conv.dilation,
                         conv.groups, conv.bias is not None, device="meta")
        self.weight = conv.weight
        self.bias = conv.bias
        self.static_pad = tuple(int(p) for p in pad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pad statically, then convolve without padding."""
        if any(self.static_pad):
            x = F.pad(x, self.static_pad)
        return F.conv2d(x, self.weight, self.bias, self.stride, (0, 0), self.dilation, self.groups)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", static_pad={self.static_pad}"


def _tf_same_pad(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def use_static_same_padding(backbone: nn.Module, reference_size: int | None = None) -> int:
    """Pad every dynamic TensorFlow-"SAME" convolution statically, as EfficientNet-PyTorch does.

    EfficientNet-PyTorch (and UniAD's copy of it) builds each convolution with the padding that
    TensorFlow's "SAME" rule gives for the network's native input (``reference_size``, 380 px for
    EfficientNet-b4, from the model's pretrained configuration) and keeps it for any input. The
    spatial size is followed through the convolutions in the order they are registered, which is
    the order EfficientNet runs them (squeeze-excitation convolutions act on pooled maps and have
    stride 1, so they do not change it).

    Returns
    -------
    int
        How many convolutions were replaced (0 for a network without dynamic padding).
    """
    try:
        from timm.layers.conv2d_same import Conv2dSame
    except ImportError:  # pragma: no cover - timm < 0.9
        from timm.models.layers.conv2d_same import Conv2dSame
    if not any(isinstance(m, Conv2dSame) for m in backbone.modules()):
        return 0
    if reference_size is None:
        cfg = getattr(backbone, "pretrained_cfg", None) or {}
        reference_size = int(cfg.get("input_size", (3, 0, 0))[-1])
    if not reference_size:
        raise ValueError("use_static_same_padding needs the network's native input size (reference_size)")
    size = int(reference_size)
    replaced = 0
    for name, module in list(backbone.named_modules()):
        if not isinstance(module, nn.Conv2d):
            continue
        stride, kernel, dilation = module.stride[0], module.kernel_size[0], module.dilation[0]
        if isinstance(module, Conv2dSame):
            pad_h = _tf_same_pad(size, kernel, stride, dilation)
            parent = backbone.get_submodule(name.rsplit(".", 1)[0]) if "." in name else backbone
            setattr(parent, name.rsplit(".", 1)[-1], StaticSamePadConv2d(module, (pad_h[0], pad_h[1], pad_h[0], pad_h[1])))
            replaced += 1
        size = math.ceil(size / stride)
    return replaced


def load_backbone_weights(features: MultiScaleFeatures, path, what: str) -> None:
    """Load a backbone weight file into ``features.backbone`` (timm or EfficientNet-PyTorch names).

    Parameters
    ----------
    features : MultiScaleFeatures
    path : path-like
        The resolved file (safetensors, or a PyTorch file read with ``weights_only=True``).
    what : str
        What the file is, for the error message.

    Raises
    ------
    harness.WeightsNotFoundError
        When a tensor of the backbone is missing from the file (it is not the backbone it claims).
    """
    from harness.errors import WeightsNotFoundError
    from harness.toolkit.backbones import read_state
    from harness.toolkit.efficientnet import convert_efficientnet_pytorch, is_efficientnet_pytorch_state

    state = read_state(path)
    if is_efficientnet_pytorch_state(state):
        state = convert_efficientnet_pytorch(state, features.backbone)
    missing, _ = features.backbone.load_state_dict(state, strict=False)
    if missing:
        raise WeightsNotFoundError(f"{path} does not fit {what}: {len(missing)} missing tensors, "
                                   f"e.g. {', '.join(missing[:3])}")


def prepare_features(features: MultiScaleFeatures, files: Sequence["WeightFile"], train: "TrainSet",
                     context: "FitContext", settings: Any, device: torch.device, batch_size: int) -> dict[str, Any]:
    """Give ``features`` their starting weights and put them in eval mode on ``device``.

    The first of ``files`` (the method's declared backbone file) is read from disk, unless the
    job runs with random weights or there is none; otherwise the backbone is drawn from the job's
    seed with its BatchNorm statistics re-estimated on the training images (``batch_size`` per
    batch). ``settings`` may name the file explicitly. Returns what the record says
    (``backbone_init``, ``backbone_weights``).
    """
    files = [] if context.random_weights else list(files)
    if files:
        path = context.weights.resolve(files[0], settings)
        load_backbone_weights(features, path, files[0].what)
        info = {"backbone_init": "imagenet", "backbone_weights": str(path)}
    else:
        features.to(device)
        features.reinitialise(context.seed, (x.to(device) for x, _ in train.batches(batch_size)))
        info = {"backbone_init": "random"}
    features.to(device).eval()
    return info
