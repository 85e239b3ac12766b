"""Building blocks that several methods share, apart from the contract; plugins import them by choice.

One implementation of each:

- :mod:`harness.toolkit.coreset` — greedy k-center coreset selection on a random projection;
- :mod:`harness.toolkit.backbones` — timm feature extractors built without weights, their
  ImageNet weights loaded from disk, BatchNorm re-estimation for random backbones;
- :mod:`harness.toolkit.multiscale` — multi-scale CNN features resized to one grid and concatenated
  (UniAD's MFCN neck, shared by UniAD and LafitE), with UniAD's EfficientNet padding;
- :mod:`harness.toolkit.efficientnet` — the EfficientNet-b4 file UniAD loads, renamed for timm;
- :mod:`harness.toolkit.crops` — centre crops, and maps of a crop put back on the full image;
- :mod:`harness.toolkit.ops` — ImageNet normalisation, SciPy-exact Gaussian smoothing, map
  resizing, chunked nearest-neighbour distances;
- :mod:`harness.toolkit.scoring` — image scores from maps (pooled maximum);
- :mod:`harness.toolkit.foreground` — Otsu thresholding and the object foreground of an image;
- :mod:`harness.toolkit.pseudo_validation` — held-out training images and synthetic anomalies
  pasted onto them, for methods that select hyperparameters without test data;
- :mod:`harness.toolkit.sd15` — Stable Diffusion v1.5 network configurations (diffusers);
- :mod:`harness.toolkit.precision` — autocast and gradient scaling for ``--precision``;
- :mod:`harness.toolkit.noise` — inference noise drawn per image (batch-invariant predictions);
- :mod:`harness.toolkit.weightfiles` — the pinned weight file of any timm backbone;
- :mod:`harness.toolkit.training` — the training loop: checkpointed batches resumed where a fit
  stopped, one optimiser step (precision, accumulation, clipping), the fast-dev stop.

Nothing here is imported by ``import harness``: each module loads its libraries when imported.
"""
