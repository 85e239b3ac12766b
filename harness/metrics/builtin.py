"""The seven standard metrics, provided through the metric hook like any plugin's.

All seven come from one pass of the exact engine (:mod:`harness.metrics.engine`), cached on the
:class:`CategoryScores`; each plugin picks its value.
"""

from __future__ import annotations

from harness.hookspecs import hookimpl
from harness.metrics.dice import MEDICAL_DATASETS, dice
from harness.metrics.scores import CategoryScores
from harness.specs import MetricSpec


def image_auroc(scores: CategoryScores) -> float:
    """Image-level AUROC of a category."""
    return scores.standard_metrics["image_auroc"]


def image_ap(scores: CategoryScores) -> float:
    """Image-level average precision of a category."""
    return scores.standard_metrics["image_ap"]


def image_f1max(scores: CategoryScores) -> float:
    """Image-level F1max of a category."""
    return scores.standard_metrics["image_f1max"]


def pixel_auroc(scores: CategoryScores) -> float:
    """Pixel-level AUROC of a category."""
    return scores.standard_metrics["pixel_auroc"]


def pixel_ap(scores: CategoryScores) -> float:
    """Pixel-level average precision of a category."""
    return scores.standard_metrics["pixel_ap"]


def pixel_f1max(scores: CategoryScores) -> float:
    """Pixel-level F1max of a category."""
    return scores.standard_metrics["pixel_f1max"]


def pixel_aupro(scores: CategoryScores) -> float:
    """Pixel-level AUPRO (FPR limit 0.3) of a category."""
    return scores.standard_metrics["pixel_aupro"]


STANDARD_METRICS = (
    MetricSpec("image_auroc", "image", True, image_auroc, "I-AUROC", True),
    MetricSpec("image_ap", "image", True, image_ap, "I-AP", True),
    MetricSpec("image_f1max", "image", True, image_f1max, "I-F1max", True),
    MetricSpec("pixel_auroc", "pixel", True, pixel_auroc, "P-AUROC", True),
    MetricSpec("pixel_ap", "pixel", True, pixel_ap, "P-AP", True),
    MetricSpec("pixel_f1max", "pixel", True, pixel_f1max, "P-F1max", True),
    MetricSpec("pixel_aupro", "pixel", True, pixel_aupro, "P-AUPRO", True),
)


#: DICE on the medical sets (DiAD's Table 6, BMAD): see :mod:`harness.metrics.dice`.
DICE = MetricSpec("dice", "pixel", True, dice, "DICE", False, datasets=MEDICAL_DATASETS, needs_maps=False,
                  description="micro Dice over all test pixels at the Dice-maximising threshold (BMAD's pipeline)")


@hookimpl
def harness_metrics():
    """The seven standard metrics of DESIGN.md, and DICE on the medical sets."""
    return [*STANDARD_METRICS, DICE]
