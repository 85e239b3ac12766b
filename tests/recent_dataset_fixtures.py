"""Miniature trees of MVTec AD 2, MVTec LOCO AD, Real-IAD, BTAD and KolektorSDD2, file for file.

Each builder takes a ``random.Random`` and draws the number of images per folder, writes them
with the archive's names, nesting, suffixes and mask encodings, and returns the counts it wrote
(``{category: {"train", "test_normal", "test_anomalous", ...}}``), so a test compares the
loader's counts with the truth of a tree it has never seen before.

- MVTec AD 2: ``test_public/{good,bad}``, masks ``test_public/ground_truth/bad/<stem>_mask.png``,
  ``validation/good``, private sets without ground truth; stems like ``000_regular``.
- MVTec LOCO AD: a folder of masks per anomalous image (``ground_truth/<type>/<stem>/000.png``,
  each with its defect type's pixel value, overlapping on purpose) and ``defects_config.json``.
- Real-IAD: ``realiad_<res>/<cat>/{OK,NG/<cls>}/S<id>/<cat>_<id>_..._C<k>_<time>.jpg`` (five
  views per object, masks as same-stem PNGs) and the split JSONs in
  ``realiad_jsons/realiad_jsons[_sv]/<cat>.json`` (``meta.prefix`` = the category).
- BTAD: ``01`` BMP images and PNG masks, ``02`` PNG and PNG, ``03`` BMP and BMP.
- KolektorSDD2: ``train``/``test`` with ``<id>.png`` and ``<id>_GT.png`` (all-zero for normal).
"""

from __future__ import annotations

import json
import random
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from dataset_fixtures import SIZE, Writer, expected_mask

LOCO_DEFECTS = [
    {"defect_name": "missing_part", "pixel_value": 255, "saturation_threshold": 40, "relative_saturation": False},
    {"defect_name": "wrong_colour", "pixel_value": 17, "saturation_threshold": 0.5, "relative_saturation": True},
    {"defect_name": "scratch", "pixel_value": 96, "saturation_threshold": 10, "relative_saturation": False},
]


def loco_channel(tag: str, size: int = SIZE) -> np.ndarray:
    """The defect region written for one LOCO mask file (``tag`` = its relative path), as bool (H, W)."""
    rng = np.random.default_rng(zlib.crc32(tag.encode()))
    mask = np.zeros((size, size), dtype=bool)
    for _ in range(int(rng.integers(1, 3))):  # a channel may hold several blobs (one defect, split)
        y, x = (int(v) for v in rng.integers(0, size - 10, 2))
        h, w = (int(v) for v in rng.integers(2, 10, 2))
        mask[y:y + h, x:x + w] = True
    return mask


def build_mvtec_ad2(root: Path, rng: random.Random, categories=("can", "walnuts")) -> dict:
    """MVTec AD 2 in miniature; returns the counts written."""
    w, counts = Writer(rng.randrange(1000)), {}
    for cat in categories:
        n = {k: rng.randint(1, 4) for k in ("train", "validation", "good", "bad", "test_private", "test_private_mixed")}
        for split in ("train", "validation"):
            for i in range(n[split]):
                w.image(root / cat / split / "good" / f"{i:03d}_regular.png", f"{cat}/{split}/good/{i:03d}")
        for i in range(n["good"]):
            w.image(root / cat / "test_public" / "good" / f"{i:03d}_regular.png", f"{cat}/test/good/{i:03d}_regular")
        for i in range(n["bad"]):
            stem = f"{i:03d}_{'overexposed' if i % 2 else 'regular'}"
            tag = f"{cat}/test/bad/{stem}"
            w.image(root / cat / "test_public" / "bad" / f"{stem}.png", tag)
            w.mask(root / cat / "test_public" / "ground_truth" / "bad" / f"{stem}_mask.png", tag)
        for split in ("test_private", "test_private_mixed"):
            for i in range(n[split]):
                w.image(root / cat / split / f"{i:03d}_regular.png", f"{cat}/{split}/{i:03d}")
        counts[cat] = {"train": n["train"], "validation": n["validation"], "test_normal": n["good"],
                       "test_anomalous": n["bad"], "masks": n["bad"],
                       "test_unscored": n["test_private"] + n["test_private_mixed"]}
    w.write()
    return counts


def build_mvtec_loco(root: Path, rng: random.Random, categories=("breakfast_box", "pushpins")) -> dict:
    """MVTec LOCO AD in miniature (several, overlapping masks per image); returns the counts written."""
    w, counts = Writer(rng.randrange(1000)), {}
    for cat in categories:
        n = {k: rng.randint(1, 4) for k in ("train", "validation", "good", "logical_anomalies", "structural_anomalies")}
        for split in ("train", "validation"):
            for i in range(n[split]):
                w.image(root / cat / split / "good" / f"{i:03d}.png", f"{cat}/{split}/good/{i:03d}")
        for i in range(n["good"]):
            w.image(root / cat / "test" / "good" / f"{i:03d}.png", f"{cat}/test/good/{i:03d}")
        channels = 0
        for kind in ("logical_anomalies", "structural_anomalies"):
            for i in range(n[kind]):
                w.image(root / cat / "test" / kind / f"{i:03d}.png", f"{cat}/test/{kind}/{i:03d}")
                for j in range(rng.randint(1, 3)):
                    path = root / cat / "ground_truth" / kind / f"{i:03d}" / f"{j:03d}.png"
                    value = LOCO_DEFECTS[(i + j) % len(LOCO_DEFECTS)]["pixel_value"]
                    tag = f"{cat}/{kind}/{i:03d}/{j:03d}"
                    w.jobs.append((path, lambda p, t=tag, v=value: Image.fromarray(
                        loco_channel(t).astype(np.uint8) * v, "L").save(p)))
                    channels += 1
        w.text(root / cat / "defects_config.json", json.dumps(LOCO_DEFECTS, indent=4))
        counts[cat] = {"train": n["train"], "validation": n["validation"], "test_normal": n["good"],
                       "test_anomalous": n["logical_anomalies"] + n["structural_anomalies"],
                       "masks": n["logical_anomalies"] + n["structural_anomalies"], "mask_channels": channels}
    w.text(root / "license.txt", "CC BY-NC-SA 4.0\n")
    w.write()
    return counts


def build_realiad(root: Path, rng: random.Random, categories=("audiojack", "bottle_cap"),
                  resolutions=("1024", "256")) -> dict:
    """Real-IAD in miniature: objects of five views, multi- and single-view JSONs; returns the mv counts."""
    w, counts = Writer(rng.randrange(1000)), {}
    for cat in categories:
        mv = {"meta": {"prefix": cat, "normal_class": "OK"}, "train": [], "test": []}
        sv = {"meta": {"prefix": cat, "normal_class": "OK"}, "train": [], "test": []}
        objects = [("train", "OK")] * rng.randint(1, 2) + [("test", "OK")] * rng.randint(1, 2) + \
                  [("test", rng.choice(["AK", "QS", "HS"])) for _ in range(rng.randint(1, 3))]
        n = {"train": 0, "test_normal": 0, "test_anomalous": 0}
        for number, (split, cls) in enumerate(objects, start=1):
            folder = f"OK/S{number:04d}" if cls == "OK" else f"NG/{cls}/S{number:04d}"
            for view in range(1, 6):
                stem = f"{cat}_{number:04d}_{'OK' if cls == 'OK' else 'NG_' + cls}_C{view}_2023092209{view:04d}"
                # In an anomalous object only some views show the defect (they are labelled OK).
                view_cls = cls if cls == "OK" or view in (1, 3) else "OK"
                mask = None if view_cls == "OK" else f"{folder}/{stem}.png"
                entry = {"category": cat, "anomaly_class": view_cls, "image_path": f"{folder}/{stem}.jpg",
                         "mask_path": mask}
                mv[split].append(entry)
                if view in (1, 2):
                    sv[split].append(entry)
                for res in resolutions:
                    base = root / f"realiad_{res}" / cat
                    w.image(base / f"{folder}/{stem}.jpg", f"{cat}/{split}/{view_cls}/{stem}")
                    if mask:
                        w.mask(base / mask, f"{cat}/{split}/{view_cls}/{stem}")
                key = "train" if split == "train" else ("test_normal" if view_cls == "OK" else "test_anomalous")
                n[key] += 1
        # realiad_jsons.zip extracts to realiad_jsons/<split folder>/<cat>.json
        w.text(root / "realiad_jsons" / "realiad_jsons" / f"{cat}.json", json.dumps(mv))
        w.text(root / "realiad_jsons" / "realiad_jsons_sv" / f"{cat}.json", json.dumps(sv))
        n["masks"] = n["test_anomalous"]
        counts[cat] = n
    w.write()
    return counts


def build_btad(root: Path, rng: random.Random) -> dict:
    """BTAD in miniature with the archive's mixed suffixes; returns the counts written."""
    w, counts = Writer(rng.randrange(1000)), {}
    suffixes = {"01": (".bmp", ".png"), "02": (".png", ".png"), "03": (".bmp", ".bmp")}
    for cat, (image_ext, mask_ext) in suffixes.items():
        n = {k: rng.randint(1, 4) for k in ("train", "ok", "ko")}
        for i in range(n["train"]):
            w.image(root / cat / "train" / "ok" / f"{i:04d}{image_ext}", f"{cat}/train/good/{i:04d}")
        for i in range(n["ok"]):
            w.image(root / cat / "test" / "ok" / f"{i:04d}{image_ext}", f"{cat}/test/good/{i:04d}")
        for i in range(n["ko"]):
            tag = f"{cat}/test/ko/{i:04d}"
            w.image(root / cat / "test" / "ko" / f"{i:04d}{image_ext}", tag)
            w.mask(root / cat / "ground_truth" / "ko" / f"{i:04d}{mask_ext}", tag)
        counts[cat] = {"train": n["train"], "test_normal": n["ok"], "test_anomalous": n["ko"], "masks": n["ko"]}
    w.write()
    return counts


def build_ksdd2(root: Path, rng: random.Random) -> dict:
    """KolektorSDD2 in miniature: every image with a ``_GT`` mask, all-zero for normal ones."""
    w = Writer(rng.randrange(1000))
    n = {"train_ok": rng.randint(2, 5), "train_bad": rng.randint(1, 3), "test_ok": rng.randint(1, 4),
         "test_bad": rng.randint(1, 4)}
    number = 10000
    for split in ("train", "test"):
        for label in ("ok", "bad"):
            for _ in range(n[f"{split}_{label}"]):
                number += 1
                defect = "defect" if label == "bad" else "good"
                tag = f"ksdd2/{split}/{defect}/{number}"
                w.image(root / split / f"{number}.png", tag)
                if label == "bad":
                    w.mask(root / split / f"{number}_GT.png", tag)
                else:
                    w.jobs.append((root / split / f"{number}_GT.png",
                                   lambda p: Image.fromarray(np.zeros((SIZE, SIZE), np.uint8), "L").save(p)))
    w.write()
    return {"ksdd2": {"train": n["train_ok"], "test_normal": n["test_ok"], "test_anomalous": n["test_bad"],
                      "masks": n["test_bad"]}}


__all__ = ["LOCO_DEFECTS", "loco_maps", "build_btad", "build_ksdd2", "build_mvtec_ad2", "build_mvtec_loco",
           "build_realiad",
           "expected_mask", "loco_channel"]


def loco_maps(samples, seed: int, levels: int = 40) -> dict:
    """Seeded anomaly maps for LOCO test samples: noise, raised inside each mask channel, on ``levels``
    grey levels (ties within and across images; few enough distinct scores for the official
    script's threshold refinement to reach every one of them). ``{sample key: float32 (H, W)}``."""
    rng = np.random.default_rng(seed)
    out = {}
    for sample in samples:
        amap = rng.random((SIZE, SIZE))
        for channel in sample.channels:
            amap[np.asarray(Image.open(channel.source)) > 0] += rng.random() * 0.6
        out[sample.key] = (np.round(amap * levels) / levels).astype(np.float32)
    return out
