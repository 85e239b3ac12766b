"""anomalib's image models as harness methods: one generic adapter and a table of variants.

- :mod:`harness_anomalib.plugin` — the entry point (cheap to import): one ``MethodSpec`` per
  variant, its typed settings, weight files and data needs; nothing when anomalib is absent.
- :mod:`harness_anomalib.variants` — the table: method name -> anomalib class, paper, profiles.
- :mod:`harness_anomalib.signatures` — constructor arguments as typed settings (``signatures.json``).
- :mod:`harness_anomalib.adapter` — build, fit (a bare Lightning ``Trainer``), predict (raw maps).
- :mod:`harness_anomalib.offline` — pretrained weights from declared files only, never downloaded.
- :mod:`harness_anomalib.hooks` — what some models need beyond the generic path.
- :mod:`harness_anomalib.textures` — procedural anomaly-source textures for the ``tiny`` profiles.
"""
