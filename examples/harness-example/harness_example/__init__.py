"""An example third-party package for the harness, written against its documented API only.

- method ``patchnn``: nearest-neighbour distance of small colour patches to a per-category
  memory bank of normal patches (:mod:`harness_example.method`);
- dataset ``checkers``: generated checkerboards with off-colour squares as defects;
- metric ``image_separation``: how far anomalous image scores sit above normal ones;
- reporter: one JSON line per finished job appended to ``$HARNESS_EXAMPLE_LOG``.

The entry point is :mod:`harness_example.plugin`; importing it loads no heavy library.
"""
