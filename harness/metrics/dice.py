"""DICE for the medical sets, as DiAD's Table 6 and BMAD report it.

Definition
----------
For one category (one BMAD set), over *every pixel of every test image* (normal slices
included, their masks all zero), at the evaluation grid::

    DICE = max over thresholds t of  2 TP(t) / (2 TP(t) + FP(t) + FN(t)),

where a pixel is predicted defective when its score is ``>= t``. The threshold is therefore
the one that maximises the micro-averaged Dice on the test pixels themselves, and since
``2TP / (2TP + FP + FN)`` is the F1 score, DICE equals the pixel F1max of the same maps,
exactly. It is computed from the exact engine's value (no binning, no threshold grid).

Where this comes from
---------------------
- DiAD (arXiv version, Table 6 "Medical dataset") prints DICE beside image AUROC, pixel AUROC
  and PRO for MKD, CFLOW, RD4AD, PaDiM, PatchCore, STFPM, UniAD and DiAD, without defining it;
  the DiAD code (lewandofskee/DiAD) has no Dice computation. The baselines' numbers are BMAD's.
- BMAD (DorisBao/BMAD) runs CFLOW, RD4AD, PaDiM, PatchCore, STFPM, DRAEM and CFA through its
  copy of anomalib, whose configs list ``Dice`` as a pixel metric with ``threshold: adaptive``,
  ``normalization_method: min_max`` and ``val_split_mode: same_as_test``. That pipeline
  (1) computes the adaptive pixel threshold as the one maximising F1 on the precision-recall
  curve of the validation pixels, which are the test pixels (``same_as_test``); (2) min-max
  normalises the maps so that this threshold maps to 0.5; (3) updates torchmetrics' ``Dice``
  (``average="micro"``, threshold 0.5) with every test map and mask: ``2TP / (2TP + FP + FN)``
  summed over all pixels. Steps (1)-(3) give the F1 at its maximising threshold, i.e. the
  definition above (up to float rounding in their normalisation).
- BMAD's own MKD script uses another rule (each map min-max normalised on its own, threshold
  0.5, Dice averaged over anomalous images only); its UTRAD script leaves Dice commented out.
  Those are single-method variants and are not what this metric computes.
"""

from __future__ import annotations

from harness.metrics.scores import CategoryScores

#: The datasets DICE is computed on (the BMAD sets with masks and DiAD's multi-class union).
MEDICAL_DATASETS = ("brainmri", "liverct", "resc", "medical")


def dice(scores: CategoryScores) -> float:
    """Micro-averaged Dice over all test pixels at the Dice-maximising threshold (see module doc).

    Parameters
    ----------
    scores : CategoryScores
        One category's test set; only the exact engine's pixel counts are used, so the maps need
        not be kept.

    Returns
    -------
    float
        A fraction in [0, 1]; NaN when the category has no defect pixel.
    """
    return scores.standard_metrics["pixel_f1max"]


def dice_at_threshold(maps, masks, threshold: float) -> float:
    """Micro Dice ``2TP / (2TP + FP + FN)`` of ``maps >= threshold`` against ``masks`` (a reference).

    Parameters
    ----------
    maps, masks : array-like of the same shape
    threshold : float

    Returns
    -------
    float
        NaN when neither the prediction nor the ground truth has a positive pixel.
    """
    import numpy as np

    predicted = np.asarray(maps) >= threshold
    truth = np.asarray(masks) > 0
    tp = float(np.count_nonzero(predicted & truth))
    denominator = float(np.count_nonzero(predicted)) + float(np.count_nonzero(truth))
    return 2.0 * tp / denominator if denominator else float("nan")


__all__ = ["MEDICAL_DATASETS", "dice", "dice_at_threshold"]
