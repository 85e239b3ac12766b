"""DiAD (He et al., AAAI 2024) as a plugin of the anomaly-detection benchmark harness.

The entry point ``diad = harness_diad.plugin`` in the group ``harness`` registers the method; see
:mod:`harness_diad.model` for training and inference and :mod:`harness_diad.networks` for the
Semantic-Guided network and the SFF block.
"""
