"""The AnomalySD method plugin (Yan et al., 2024): few-shot multi-class anomaly detection with Stable
Diffusion inpainting. The entry point is :mod:`harness_anomalysd.plugin`; the method is
:class:`harness_anomalysd.model.AnomalySD`."""
