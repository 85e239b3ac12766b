"""Dataset plugins for the public anomaly-detection benchmarks.

One module per dataset (``mvtec``, ``visa``, ``mpdd``, ``dagm``, ``mvtec3d``, ``medical``,
``folder``, ``mvtec_ad2``, ``mvtec_loco``, ``realiad``, ``btad``, ``ksdd2``), each registered under its own entry point of the group ``harness``; ``layout``
holds what they share (walking MVTec-style trees, pairing masks with images by relative path,
checking the root). The modules import only the public ``harness`` API, as an outside plugin
would.
"""
