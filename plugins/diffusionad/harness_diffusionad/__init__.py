"""DiffusionAD (Zhang et al.) as a plugin of the anomaly-detection benchmark harness.

The entry point ``diffusionad = harness_diffusionad.plugin`` in the group ``harness`` registers the
method; see :mod:`harness_diffusionad.model` for what training and inference do.
"""
