"""Make ``reference.json``: AUC-sPRO by MVTec's LOCO evaluation code on the miniature LOCO fixtures.

How the committed numbers were made (2026-12-05):

1. MVTec's evaluation modules (``src/image.py``, ``src/metrics.py``, ``src/aggregation.py``,
   ``src/util.py``; "Copyright 2023 MVTec Software GmbH") were taken from the only copy reachable
   offline, the AutoVI evaluation code (github.com/PlatDrake2875/autovi_evaluation_code, commit
   4b154db), which ships them with two input changes of AutoVI's own: masks are read as RGB
   (``bool_array[:, :, 0]``) and maps from PNG files. The metric code (sPRO per channel,
   saturation, FPR outside all channels, threshold refinement, bounded trapezoid) is MVTec's.
   Nothing of it is in this repository; point ``--official`` at that folder to rerun.
2. For each seed, the fixture tree of ``recent_dataset_fixtures.build_mvtec_loco`` and the maps
   of ``recent_dataset_fixtures.loco_maps`` (both seeded) are built; every anomalous image's
   channels are read as integer arrays (given as (H, W, 3), the AutoVI input form), each map is an
   ``AnomalyMap``; good images have no ground truth map.
3. ``MetricsAggregator(gt_maps, anomaly_maps).run(curve_max_distance=1e-9)`` (NumPy's global seed
   0 for its initial threshold sample) gives the threshold metrics; as the official
   ``evaluate_experiment.py`` does per test sub-folder, they are reduced to the good images plus
   the logical (then structural) anomalies, and ``get_auc_for_max_fpr`` (scaled to one) gives
   AUC-sPRO at the limits 0.01, 0.05, 0.1, 0.3, 1.0; the category's value is the mean of the
   two, as in the MVTec LOCO AD paper.

Run: ``python tests/golden/spro/make_reference.py --official /path/to/autovi_evaluation_code``
(with ``loguru`` importable, or a stub of it: the official ``util.py`` only logs with it).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # tests/
sys.path.insert(0, str(HERE.parents[2] / "datasets" / "benchmarks"))

SEEDS = (0, 1, 2)
LIMITS = (0.01, 0.05, 0.1, 0.3, 1.0)


def official_spro(official: Path, seed: int) -> dict:
    """AUC-sPRO per category and anomaly type by the official code, on the seed's fixture."""
    sys.path.insert(0, str(official))
    from src.aggregation import MetricsAggregator  # noqa: PLC0415 - the official code, from --official
    from src.image import AnomalyMap, DefectsConfig, GroundTruthChannel, GroundTruthMap
    from src.util import get_auc_for_max_fpr

    import recent_dataset_fixtures as R
    from harness_benchmarks import mvtec_loco

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "loco"
        R.build_mvtec_loco(root, random.Random(seed))
        index = mvtec_loco.load_mvtec_loco(root)
        for category, data in index.categories.items():
            config = DefectsConfig.create_from_list(json.loads((root / category / "defects_config.json").read_text()))
            maps = R.loco_maps(data.test, seed)
            gt_maps, anomaly_maps, kinds = [], [], []
            for sample in data.test:
                anomaly_maps.append(AnomalyMap(maps[sample.key].astype(np.float64), file_path=sample.key))
                kinds.append(sample.defect)
                if not sample.label:
                    gt_maps.append(None)
                    continue
                channels = []
                for channel in sample.channels:
                    array = np.asarray(Image.open(channel.source))
                    channels.append(GroundTruthChannel.create_from_integer_array(
                        np.repeat(array[:, :, None], 3, axis=2), config))
                gt_maps.append(GroundTruthMap(channels, file_path=sample.key))
            np.random.seed(0)
            metrics = MetricsAggregator(gt_maps, anomaly_maps).run(curve_max_distance=1e-9)
            per_kind = {}
            for kind in ("logical_anomalies", "structural_anomalies"):
                chosen = [a for a, k in zip(anomaly_maps, kinds) if k in ("good", kind)]
                reduced = metrics.reduce_to_images(chosen)
                fprs, spros = reduced.get_fp_rates(), reduced.get_mean_spros()
                per_kind[kind] = {str(limit): float(get_auc_for_max_fpr(fprs, spros, limit, scale_to_one=True))
                                  for limit in LIMITS}
            mean = {str(limit): (per_kind["logical_anomalies"][str(limit)]
                                 + per_kind["structural_anomalies"][str(limit)]) / 2 for limit in LIMITS}
            out[category] = {"mean": mean, **per_kind, "n_thresholds": int(len(metrics.anomaly_thresholds))}
    return out


def main() -> int:
    """Write reference.json next to this script."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", required=True, type=Path, help="folder holding MVTec's src/ package")
    args = parser.parse_args()
    data = {"made_by": "tests/golden/spro/make_reference.py (see its docstring)",
            "seeds": {str(seed): official_spro(args.official, seed) for seed in SEEDS}}
    (HERE / "reference.json").write_text(json.dumps(data, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
